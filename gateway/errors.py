"""The gateway's one exception tree (no I/O): permanent (5xx, dead-letter) and temporary (4xx, retry).

Library exceptions are caught in the adapter that calls the library and re-raised as one of
these; each edge translates them once (the SMTP handler into replies, the worker into a retry
or a dead letter).
"""

from __future__ import annotations

from balf.gateway.replies import Reply, replies


class GatewayError(Exception):
    """Base of every gateway failure; ``reply`` is what an SMTP client is told."""

    reply: Reply = replies.TEMPORARY_LOCAL_ERROR

    def __init__(self, detail: str, reply: Reply | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        if reply is not None:
            self.reply = reply


class PermanentFailure(GatewayError):
    """Retrying cannot help: refuse with 5xx, or dead-letter a spooled message."""

    reply = replies.TRANSACTION_FAILED


class TemporaryFailure(GatewayError):
    """Retrying later may help: refuse with 4xx, or retry a spooled message with backoff."""

    reply = replies.TEMPORARY_LOCAL_ERROR


class UnknownRecipient(PermanentFailure):
    reply = replies.UNKNOWN_RECIPIENT


class RejectedContent(PermanentFailure):
    """The DATA itself is refused (bare CR/LF, NUL...)."""


class SpoolUnavailable(TemporaryFailure):
    """The durable spool cannot store a message: never answer 250."""

    reply = replies.SPOOL_UNAVAILABLE


class StoreUnavailable(TemporaryFailure):
    """The IMAP store refused temporarily (one mailbox: quota, login...): that entry retries later."""


class StoreDown(StoreUnavailable):
    """The IMAP server itself cannot be reached: every delivery pauses until it answers again."""


class DatabaseUnavailable(TemporaryFailure):
    """The database cannot be reached."""


class StoreRejected(PermanentFailure):
    """The IMAP store refused the message for good (e.g. no such mailbox)."""
