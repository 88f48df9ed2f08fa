"""The relational model of balf's domain (SQLAlchemy 2 declarative; no I/O).

One module for every table so the Alembic migrations and the tests see one metadata.
Times are timezone-aware UTC; addresses are stored lower-cased in their ``*_key``
columns so lookups never depend on the case a client typed.
"""

from __future__ import annotations

import datetime as dt
import enum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Enum,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from balf.db.states import BasculeState

# Stable constraint names, so migrations can alter them on both SQLite and PostgreSQL.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dt.datetime: DateTime(timezone=True), dict[str, Any]: JSON}


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    # Stored as short strings (no native PostgreSQL enum) so adding a value needs no migration.
    return Enum(
        cls,
        name=name,
        native_enum=False,
        length=40,
        values_callable=lambda e: [m.value for m in e],
        validate_strings=True,
    )


class ServiceKind(enum.StrEnum):
    SIP = "SIP"
    SIE = "SIE"
    SIP_SIE = "SIP-SIE"
    CDIF = "CDIF"
    SPF = "SPF"
    TRESORERIE = "trésorerie"
    CIS = "CIS"
    CPS = "CPS"
    IFU_DGE = "IFU DGE"
    DIRECTION = "direction"
    AUTRE = "autre"


class Direction(enum.StrEnum):
    IN = "in"
    OUT = "out"
    NOTE = "note"


class Channel(enum.StrEnum):
    COURRIEL = "courriel"
    MESSAGERIE = "messagerie sécurisée"
    TELEPHONE = "téléphone"
    GUICHET = "guichet"


class ThreadStatus(enum.StrEnum):
    OUVERT = "ouvert"
    EN_ATTENTE_USAGER = "en attente usager"
    CLOS = "clos"


class Category(enum.StrEnum):
    RECLAMATION = "réclamation"
    DIFFICULTE = "signaler une difficulté"
    QUESTION = "question générale"
    INFORMATION = "transmettre une information"


class SpoolState(enum.StrEnum):
    QUEUED = "queued"
    DONE = "done"
    DEAD = "dead"


class OutboxState(enum.StrEnum):
    PENDING = "pending"
    SENT = "sent"
    DEAD = "dead"


# --- service directory -------------------------------------------------------------------


class Service(Base):
    """A local service (SIP, SIE, CDIF...) and its shared BALF mailbox."""

    __tablename__ = "services"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    code: Mapped[str] = mapped_column(String(32), unique=True)
    kind: Mapped[ServiceKind] = mapped_column(_enum(ServiceKind, "service_kind"))
    department: Mapped[str] = mapped_column(String(3), index=True)  # INSEE: 75, 2A, 971
    name: Mapped[str] = mapped_column(String(200))
    imap_account: Mapped[str] = mapped_column(String(200))
    acknowledge: Mapped[bool] = mapped_column(Boolean, default=True)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    addresses: Mapped[list[ServiceAddress]] = relationship(
        back_populates="service", cascade="all, delete-orphan", order_by="ServiceAddress.id"
    )


class ServiceAddress(Base):
    """One BALF address of a service; an address belongs to one service only."""

    __tablename__ = "service_addresses"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    service_id: Mapped[int] = mapped_column(ForeignKey("services.id", ondelete="CASCADE"), index=True)
    address: Mapped[str] = mapped_column(String(320))
    address_key: Mapped[str] = mapped_column(String(320), unique=True)  # lower-cased

    service: Mapped[Service] = relationship(back_populates="addresses")


# --- e-contacts ----------------------------------------------------------------------------


class Usager(Base):
    """A citizen or partner writing to the services."""

    __tablename__ = "usagers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    address: Mapped[str] = mapped_column(String(320))
    address_key: Mapped[str] = mapped_column(String(320), unique=True)
    display_name: Mapped[str] = mapped_column(String(200), default="")
    notification_address: Mapped[str | None] = mapped_column(String(320))
    uses_secure_messaging: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Thread(Base):
    """A conversation (fil de discussion) between one usager and one service."""

    __tablename__ = "threads"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    reference: Mapped[str] = mapped_column(String(32), unique=True)  # EC-2026-000123
    service_id: Mapped[int] = mapped_column(ForeignKey("services.id"), index=True)
    usager_id: Mapped[int | None] = mapped_column(ForeignKey("usagers.id"), index=True)
    subject: Mapped[str] = mapped_column(Text, default="")
    category: Mapped[Category | None] = mapped_column(_enum(Category, "thread_category"))
    channel: Mapped[Channel] = mapped_column(_enum(Channel, "channel"), default=Channel.COURRIEL)
    status: Mapped[ThreadStatus] = mapped_column(_enum(ThreadStatus, "thread_status"), default=ThreadStatus.OUVERT)
    related_reference: Mapped[str | None] = mapped_column(String(32))  # a reference it mentions
    opened_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    first_response_at: Mapped[dt.datetime | None]
    closed_at: Mapped[dt.datetime | None]
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class ThreadTransfer(Base):
    """A thread handed from one service to another (accueil de proximité)."""

    __tablename__ = "thread_transfers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    thread_id: Mapped[int] = mapped_column(ForeignKey("threads.id", ondelete="CASCADE"), index=True)
    from_service_id: Mapped[int] = mapped_column(ForeignKey("services.id"))
    to_service_id: Mapped[int] = mapped_column(ForeignKey("services.id"))
    transferred_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    agent: Mapped[str] = mapped_column(String(200), default="")
    reason: Mapped[str] = mapped_column(Text, default="")


class ReferenceCounter(Base):
    """The last thread reference number issued per year (EC-<year>-<number>)."""

    __tablename__ = "reference_counters"

    year: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    last_number: Mapped[int] = mapped_column(Integer, default=0)


class Message(Base):
    """One message of a thread, and where its bytes are stored."""

    __tablename__ = "messages"
    __table_args__ = (
        UniqueConstraint("spool_id", "service_id", name="uq_messages_spool_service"),
        Index("ix_messages_service_message_id", "service_id", "message_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    thread_id: Mapped[int | None] = mapped_column(ForeignKey("threads.id"), index=True)
    service_id: Mapped[int] = mapped_column(ForeignKey("services.id"))
    direction: Mapped[Direction] = mapped_column(_enum(Direction, "direction"))
    channel: Mapped[Channel] = mapped_column(_enum(Channel, "channel"), default=Channel.COURRIEL)
    message_id: Mapped[str | None] = mapped_column(String(998))
    in_reply_to: Mapped[str | None] = mapped_column(Text)
    references: Mapped[str | None] = mapped_column(Text)
    sender: Mapped[str] = mapped_column(String(320), default="")
    recipients: Mapped[str] = mapped_column(Text, default="")
    subject: Mapped[str] = mapped_column(Text, default="")
    size: Mapped[int] = mapped_column(BigInteger, default=0)
    sha256: Mapped[str | None] = mapped_column(String(64))
    received_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    date_header: Mapped[dt.datetime | None]
    mailbox: Mapped[str | None] = mapped_column(String(500))
    uidvalidity: Mapped[int | None] = mapped_column(BigInteger)
    uid: Mapped[int | None] = mapped_column(BigInteger)
    spool_id: Mapped[str | None] = mapped_column(String(64))


class ContactTrace(Base):
    """A phone or counter contact recorded by an agent, part of a thread's history."""

    __tablename__ = "contact_traces"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    thread_id: Mapped[int | None] = mapped_column(ForeignKey("threads.id"), index=True)
    usager_id: Mapped[int] = mapped_column(ForeignKey("usagers.id"), index=True)
    service_id: Mapped[int] = mapped_column(ForeignKey("services.id"))
    channel: Mapped[Channel] = mapped_column(_enum(Channel, "channel"))
    agent: Mapped[str] = mapped_column(String(200), default="")
    summary: Mapped[str] = mapped_column(Text, default="")
    occurred_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


# --- counters ------------------------------------------------------------------------------


class TrafficEvent(Base):
    """One message in or out of a service: the raw material of every count."""

    __tablename__ = "traffic_events"
    __table_args__ = (
        UniqueConstraint("message_id", name="uq_traffic_events_message"),
        Index("ix_traffic_events_service_time", "service_id", "occurred_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    service_id: Mapped[int] = mapped_column(ForeignKey("services.id"))
    direction: Mapped[Direction] = mapped_column(_enum(Direction, "direction"))
    occurred_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    size: Mapped[int] = mapped_column(BigInteger, default=0)
    thread_id: Mapped[int | None] = mapped_column(ForeignKey("threads.id"))
    message_id: Mapped[int | None] = mapped_column(ForeignKey("messages.id"))
    reply_to_event_id: Mapped[int | None] = mapped_column(ForeignKey("traffic_events.id"))


class DailyRollup(Base):
    """Counts per service, day and direction, consolidated from traffic events."""

    __tablename__ = "daily_rollups"

    service_id: Mapped[int] = mapped_column(ForeignKey("services.id"), primary_key=True)
    day: Mapped[dt.date] = mapped_column(Date, primary_key=True)
    direction: Mapped[Direction] = mapped_column(_enum(Direction, "direction"), primary_key=True)
    messages: Mapped[int] = mapped_column(Integer, default=0)
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)


# --- gateway state -------------------------------------------------------------------------


class SpoolEntry(Base):
    """A message accepted with 250 and not yet fully delivered (the spool's index)."""

    __tablename__ = "spool_entries"
    __table_args__ = (Index("ix_spool_entries_state_next", "state", "next_attempt_at"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    received_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    mail_from: Mapped[str] = mapped_column(String(320), default="")
    recipients: Mapped[list[str]] = mapped_column(JSON, default=list)
    size: Mapped[int] = mapped_column(BigInteger, default=0)
    sha256: Mapped[str] = mapped_column(String(64), default="")
    path: Mapped[str] = mapped_column(String(1000), default="")
    content: Mapped[bytes | None] = mapped_column(LargeBinary)
    peer: Mapped[str] = mapped_column(String(100), default="")
    state: Mapped[SpoolState] = mapped_column(_enum(SpoolState, "spool_state"), default=SpoolState.QUEUED)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_error: Mapped[str | None] = mapped_column(Text)
    claimed_by: Mapped[str | None] = mapped_column(String(100))
    claimed_until: Mapped[dt.datetime | None]
    done_at: Mapped[dt.datetime | None]


class NotificationOutbox(Base):
    """An acknowledgement or notice to send; sent at most once per ``dedup_key``."""

    __tablename__ = "notification_outbox"
    __table_args__ = (Index("ix_notification_outbox_state_next", "state", "next_attempt_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    dedup_key: Mapped[str] = mapped_column(String(200), unique=True)
    kind: Mapped[str] = mapped_column(String(24))  # acknowledgement, notice
    thread_id: Mapped[int | None] = mapped_column(ForeignKey("threads.id"))
    to_address: Mapped[str] = mapped_column(String(320))
    content: Mapped[bytes] = mapped_column(LargeBinary)
    state: Mapped[OutboxState] = mapped_column(_enum(OutboxState, "outbox_state"), default=OutboxState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    sent_at: Mapped[dt.datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)


# --- bascule -------------------------------------------------------------------------------


class BasculeJob(Base):
    """One mailbox to migrate: a source, a target IMAP account, a planned date."""

    __tablename__ = "bascule_jobs"
    __table_args__ = (UniqueConstraint("department", "mailbox", name="uq_bascule_jobs_department_mailbox"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    department: Mapped[str] = mapped_column(String(3), index=True)
    mailbox: Mapped[str] = mapped_column(String(200))  # the name the coordinator uses
    source: Mapped[str] = mapped_column(Text)  # imap://user@host:port, mbox:/path, maildir:/path, eml:/path, dxl:/path
    target_account: Mapped[str] = mapped_column(String(200))
    planned_date: Mapped[dt.date | None] = mapped_column(Date)
    options: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    state: Mapped[BasculeState] = mapped_column(_enum(BasculeState, "bascule_state"), default=BasculeState.PLANIFIEE)
    messages_total: Mapped[int] = mapped_column(Integer, default=0)
    messages_copied: Mapped[int] = mapped_column(Integer, default=0)
    bytes_copied: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_total: Mapped[int] = mapped_column(BigInteger, default=0)
    errors: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    claimed_by: Mapped[str | None] = mapped_column(String(100))
    claimed_until: Mapped[dt.datetime | None]  # a worker's lease; expired: another may resume the job
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    started_at: Mapped[dt.datetime | None]
    finished_at: Mapped[dt.datetime | None]
    verified_at: Mapped[dt.datetime | None]
    # The plan and both servers' state when the last run left nothing to copy (balf.bridge.snapshot):
    # a rerun that finds them unchanged has nothing to do and need not load the rest.
    rerun_digest: Mapped[str | None] = mapped_column(String(64))


class BasculeFolder(Base):
    """Per-folder counts and checkpoint of a bascule job."""

    __tablename__ = "bascule_folders"
    __table_args__ = (UniqueConstraint("job_id", "source_name", name="uq_bascule_folders_job_source"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("bascule_jobs.id", ondelete="CASCADE"), index=True)
    source_name: Mapped[str] = mapped_column(String(1000))
    target_name: Mapped[str] = mapped_column(String(1000))
    source_count: Mapped[int] = mapped_column(Integer, default=0)
    copied: Mapped[int] = mapped_column(Integer, default=0)
    skipped: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    bytes_copied: Mapped[int] = mapped_column(BigInteger, default=0)
    checkpoint: Mapped[str | None] = mapped_column(Text)  # source position to resume from
    target_count: Mapped[int | None] = mapped_column(Integer)  # messages found in the target by verify
    target_uidvalidity: Mapped[int | None] = mapped_column(BigInteger)


class BasculeItem(Base):
    """A message already present in the target, by its duplicate key: what makes reruns copy nothing."""

    __tablename__ = "bascule_items"
    __table_args__ = (UniqueConstraint("folder_id", "dedup_key", name="uq_bascule_items_folder_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    folder_id: Mapped[int] = mapped_column(ForeignKey("bascule_folders.id", ondelete="CASCADE"))
    dedup_key: Mapped[str] = mapped_column(String(200))
    target_uid: Mapped[int | None] = mapped_column(BigInteger)
    size: Mapped[int] = mapped_column(BigInteger, default=0)


class BasculeIssue(Base):
    """Something the report must show: a message not copied, too big, damaged, or a difference."""

    __tablename__ = "bascule_issues"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("bascule_jobs.id", ondelete="CASCADE"), index=True)
    folder: Mapped[str] = mapped_column(String(1000), default="")
    item: Mapped[str] = mapped_column(String(1000), default="")
    kind: Mapped[str] = mapped_column(String(40))
    detail: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
