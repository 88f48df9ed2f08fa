"""The gateway's frozen values (no I/O): what an SMTP transaction, a parsed mail and a routing
decision are, passed between the pipeline steps instead of dicts."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from enum import StrEnum


@dataclass(frozen=True)
class Envelope:
    """One accepted SMTP/LMTP transaction, as spooled."""

    spool_id: str
    mail_from: str  # "" for the null reverse-path <>
    recipients: tuple[str, ...]
    arrived_at: dt.datetime
    peer: str = ""
    helo: str = ""
    protocol: str = "ESMTP"  # ESMTP, ESMTPS, ESMTPSA, LMTP, UTF8ESMTP... (RFC 3848)
    smtputf8: bool = False


@dataclass(frozen=True)
class SpooledMessage:
    """An envelope and the exact bytes stored for it (Received header included)."""

    envelope: Envelope
    raw: bytes
    sha256: str


@dataclass(frozen=True)
class Address:
    address: str  # as written
    name: str = ""

    @property
    def key(self) -> str:
        return self.address.strip().lower()


@dataclass(frozen=True)
class InboundMail:
    """What routing needs from a message; ``raw`` stays byte-exact for IMAP."""

    envelope: Envelope
    raw: bytes
    sha256: str
    message_id: str | None
    in_reply_to: tuple[str, ...]
    references: tuple[str, ...]
    subject: str
    sender: Address | None  # From:, else the envelope sender
    date: dt.datetime | None
    auto_submitted: str | None  # RFC 3834 Auto-Submitted value, lower-cased
    precedence: str | None
    is_list: bool  # List-Id or List-* headers present
    suppress_auto_reply: bool  # X-Auto-Response-Suppress / X-Autoreply and the like
    defects: tuple[str, ...] = ()

    @property
    def size(self) -> int:
        return len(self.raw)

    @property
    def sender_key(self) -> str:
        if self.sender is not None:
            return self.sender.key
        return self.envelope.mail_from.lower()


@dataclass(frozen=True)
class ServiceRef:
    """A service as the gateway sees it: where its mail goes and whether it acknowledges."""

    id: int
    code: str
    name: str
    imap_account: str
    acknowledge: bool = True
    address: str = ""  # the BALF address mail is answered from


@dataclass(frozen=True)
class Target:
    """A recipient resolved to a service, with the thread its reply token names, if any."""

    recipient: str
    service: ServiceRef
    token_thread_id: int | None = None


@dataclass(frozen=True)
class ThreadFacts:
    """What matching needs to know about an existing thread."""

    id: int
    reference: str
    service_id: int
    usager_key: str | None
    status: str = "ouvert"


@dataclass(frozen=True)
class Candidates:
    """Threads a mail might belong to, looked up before matching (so matching stays pure).

    ``by_token``: the thread named by a valid reply token; ``by_reference``: threads whose
    reference appears as a tag in the Subject; ``by_message_id``: threads of known Message-IDs
    (this service's messages, and balf's own keyed Message-IDs) cited in In-Reply-To/References.
    """

    by_token: ThreadFacts | None = None
    by_reference: tuple[ThreadFacts, ...] = ()
    by_message_id: tuple[ThreadFacts, ...] = ()


class Rule(StrEnum):
    TOKEN = "token"
    SUBJECT_TAG = "subject-tag"
    REFERENCES = "references"
    NEW = "new"


@dataclass(frozen=True)
class JoinThread:
    thread: ThreadFacts
    rule: Rule


@dataclass(frozen=True)
class OpenThread:
    rule: Rule = Rule.NEW
    related_reference: str | None = None  # a reference the mail cited but may not join
    reason: str = ""


ThreadDecision = JoinThread | OpenThread


@dataclass(frozen=True)
class Routed:
    """One copy of a mail for one service, with its thread decision."""

    mail: InboundMail
    service: ServiceRef
    decision: ThreadDecision


@dataclass(frozen=True)
class Delivered:
    """Where the store put one copy (UIDPLUS APPENDUID; uid None when the server has no UIDPLUS)."""

    mailbox: str
    uidvalidity: int | None
    uid: int | None
    already_there: bool = False


@dataclass(frozen=True)
class AckDecision:
    send: bool
    reason: str


@dataclass(frozen=True)
class Outgoing:
    """A message balf sends (acknowledgement or notice)."""

    kind: str
    dedup_key: str
    mail_from: str
    to_address: str
    content: bytes


@dataclass(frozen=True)
class SpoolItem:
    """A spool entry as the worker and `balf spool` see it."""

    id: str
    state: str
    received_at: dt.datetime
    mail_from: str
    recipients: tuple[str, ...]
    size: int
    attempts: int
    next_attempt_at: dt.datetime | None
    last_error: str | None
    peer: str = ""
    done_at: dt.datetime | None = None
    deliveries: tuple[str, ...] = field(default=())
