"""Checks across keys of a built configuration (no I/O): what one key's type cannot say.

:func:`check_config` is called by ``load_config`` once the :class:`Config` is built, so that
a configuration that could never work is refused when it is loaded, in one line naming the
key, rather than when the part that uses it starts.
"""

from __future__ import annotations

from balf.config.errors import ConfigError
from balf.config.schema import Config

MIN_SECRET_LENGTH = 16  # characters; `balf init` writes 32 random bytes
MIN_LEASE_SECONDS = 3  # a bascule lease is renewed every third of it, at most once a second


def check_config(config: Config, source: str) -> None:
    """Raise :class:`ConfigError` (one line: ``source``, the key, what to do) for the first
    problem found."""
    relay = config.relay
    if (relay.username or relay.password) and relay.tls == "none":
        # Credentials in clear text on the wire: AUTH only over TLS (RFC 4954 4, RFC 8314).
        key = "relay.username" if relay.username else "relay.password"
        raise ConfigError(f"{source}: '{key}' is set but 'relay.tls' is \"none\": the relay login "
                          f"is only sent over TLS; set relay.tls to \"starttls\" or \"ssl\", "
                          f"or remove the credentials")
    if config.bascule.lease_seconds < MIN_LEASE_SECONDS:
        raise ConfigError(f"{source}: 'bascule.lease_seconds' must be at least {MIN_LEASE_SECONDS}, got "
                          f"{config.bascule.lease_seconds} (a run renews its hold on a mailbox every third "
                          f"of it; the default is 600)")
    secret = config.gateway.secret
    # Empty means "not configured yet": commands that do not run the gateway still work, and
    # the gateway refuses to start without one. A short secret is a mistake: refused here.
    if secret and len(secret) < MIN_SECRET_LENGTH:
        raise ConfigError(f"{source}: 'gateway.secret' must be at least {MIN_SECRET_LENGTH} "
                          f"characters, got {len(secret)} (32+ random bytes advised); set it in "
                          f"the file or with BALF_GATEWAY__SECRET, or run `balf init`")


__all__ = ["MIN_LEASE_SECONDS", "MIN_SECRET_LENGTH", "check_config"]
