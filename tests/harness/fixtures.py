"""Pytest fixtures for live tests against a private Dovecot (I/O: starts Dovecot servers).

Loaded by ``tests/conftest.py`` through ``pytest_plugins``. The Dovecot itself lives in
``tests.harness.dovecot`` so that benchmarks can use it without pytest.
"""

from __future__ import annotations

import re
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.harness.dovecot import Account, Dovecot, ensure_dovecot


@contextmanager
def running_dovecot(keep_log_in: Path) -> Iterator[Dovecot]:
    """A started Dovecot in a fresh system temp dir, removed afterwards; its log is kept.

    Not under pytest's basetemp: that is 0700 (Dovecot's non-root processes could not reach
    it) and other pytest runs re-tighten it. The log is copied to ``keep_log_in``, which
    pytest keeps for its last three runs.
    """
    ensure_dovecot()
    root = Path(tempfile.mkdtemp(prefix="balf-dovecot-"))
    server = Dovecot(root)
    try:
        with server:
            yield server
    finally:
        keep_log_in.mkdir(parents=True, exist_ok=True)
        for name in ("dovecot.log", "dovecot.stderr", "dovecot.conf"):
            if (root / name).exists():
                shutil.copyfile(root / name, keep_log_in / name)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def dovecot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dovecot]:
    """One private Dovecot shared by the session; tests isolate themselves by user."""
    with running_dovecot(tmp_path_factory.mktemp("dovecot")) as server:
        yield server


@pytest.fixture
def imap_account(dovecot: Dovecot, request: pytest.FixtureRequest) -> Account:
    """A fresh user on the session Dovecot, named after the test so its log lines are findable."""
    stem = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:24]
    return dovecot.add_user(f"{stem or 'user'}-{secrets.token_hex(3)}")


@pytest.fixture
def fresh_dovecot(tmp_path: Path) -> Iterator[Dovecot]:
    """A private Dovecot for this test alone, for tests that stop, kill or restart the server."""
    with running_dovecot(tmp_path / "dovecot") as server:
        yield server
