"""The bascule's one exception tree (no I/O).

Library exceptions (imapclient, socket, expat, SQLAlchemy) are caught only in the adapter that
calls the library and translated here. ``TemporaryFailure``: rerunning later may succeed (the
server dropped the connection, a timeout); ``PermanentFailure``: someone must change something
(a wrong plan, a full quota, a refused login).
"""

from __future__ import annotations


class BridgeError(Exception):
    """Any failure of the bascule; ``str()`` is one line meant for the coordinator."""

    exit_code = 1


class TemporaryFailure(BridgeError):
    """A failure that a later run may not meet again; the checkpoint is kept for resuming."""


class PermanentFailure(BridgeError):
    """A failure that needs a human: the run of that mailbox stops."""


class SourceUnavailable(TemporaryFailure):
    """The source cannot be read right now (connection refused or dropped, timeout)."""


class TargetUnavailable(TemporaryFailure):
    """The target IMAP server cannot be reached or dropped the connection."""


class PlanError(PermanentFailure):
    """The campaign file, a source URI or a mailbox option is wrong."""


class SourceRefused(PermanentFailure):
    """The source refuses us (bad login, missing file, unreadable format)."""


class TargetRefused(PermanentFailure):
    """The target refuses us (bad login, cannot create a folder, APPEND rejected)."""


class QuotaExceeded(PermanentFailure):
    """The mailbox will not fit in the target's quota; nothing was copied."""

    exit_code = 113  # the same code as imapsync's EXIT_OVERQUOTA, which operators script against


class LeaseLost(TemporaryFailure):
    """Another process took the mailbox (our lease ran out): stop writing, nothing more is recorded."""

    exit_code = 75  # EX_TEMPFAIL, as for a mailbox already held by another run
