"""The private Dovecot of the live tests and benchmarks (I/O).

The manager itself is ``balf.cli.localdovecot`` (``balf demo`` runs one too); this module adds
the test-machine step of installing Dovecot with apt-get when it is missing.
"""

from __future__ import annotations

from balf.cli.localdovecot import (
    MASTER_SEPARATOR,
    SPECIAL_USE,
    Account,
    Dovecot,
    DovecotError,
)
from tests.harness.apt import ensure_package

__all__ = ["MASTER_SEPARATOR", "SPECIAL_USE", "Account", "Dovecot", "DovecotError", "ensure_dovecot"]


def ensure_dovecot() -> str:
    """Install dovecot-imapd and dovecot-lmtpd if missing; return the path of ``dovecot``."""
    ensure_package("dovecot-imapd", "/usr/lib/dovecot/imap")
    ensure_package("dovecot-lmtpd", "/usr/lib/dovecot/lmtp")
    return ensure_package("dovecot-core", "dovecot")
