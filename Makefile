# The two commands of the README: `make run` and `make test`. Everything else is here so
# that a fresh Debian machine needs nothing more than python3, make and root for apt-get.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DATA   ?= var/demo
APT_PACKAGES := dovecot-imapd dovecot-lmtpd

.PHONY: run test setup system-packages clean

setup: $(VENV)/.installed system-packages

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

# Dovecot serves the IMAP side of the demo and of the tests (a private instance on a high port).
system-packages:
	@if ! command -v dovecot >/dev/null || [ ! -x /usr/lib/dovecot/lmtp ] || [ ! -x /usr/lib/dovecot/imap ]; then \
		echo "installing $(APT_PACKAGES) with apt-get"; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(APT_PACKAGES); \
	fi

# Run the daemon on its embedded defaults: SQLite, loopback ports, a private Dovecot.
run: setup
	$(BIN)/balf demo --dir $(DATA)

# Run the whole test suite (Dovecot and PostgreSQL are started by the test harness).
test: setup
	$(BIN)/pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) var .pytest_cache
