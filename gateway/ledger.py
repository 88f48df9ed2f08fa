"""The gateway's database side (I/O): the spool index, claims, thread lookups and delivery records.

``SqlLedger`` is the one place the gateway talks SQL. Every SQLAlchemy/driver error becomes
:class:`DatabaseUnavailable`, so the worker retries; nothing here decides routing (that is pure,
in threads.py/acknowledgement.py): it looks up facts before and records results after.

Claims: ``UPDATE spool_entries ... WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED) RETURNING``,
one statement that is atomic on PostgreSQL (row locks, other instances skip claimed rows) and
on SQLite (one writer at a time). A claim is a lease (``claimed_until``): the entries of an
instance killed with -9 are claimed again once it expires, or at once when that instance
restarts (``release_claims``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

import sqlalchemy.exc
from sqlalchemy import and_, func, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from balf.db.engine import session_factory
from balf.db.models import (
    Direction,
    Message,
    NotificationOutbox,
    OutboxState,
    ReferenceCounter,
    Service,
    ServiceAddress,
    SpoolEntry,
    SpoolState,
    Thread,
    ThreadStatus,
    TrafficEvent,
    Usager,
)
from balf.gateway import tokens
from balf.gateway.errors import DatabaseUnavailable
from balf.gateway.model import (
    Candidates,
    Delivered,
    Envelope,
    JoinThread,
    OpenThread,
    Outgoing,
    Routed,
    ServiceRef,
    SpooledMessage,
    SpoolItem,
    ThreadFacts,
)
from balf.gateway.services import ServiceTable
from balf.gateway.threads import cited_message_ids, format_reference, subject_references

log = logging.getLogger("balf.gateway.ledger")
P = ParamSpec("P")
T = TypeVar("T")


def _db_errors(fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await fn(*args, **kwargs)
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError,
                sqlalchemy.exc.TimeoutError, ConnectionError, OSError, TimeoutError) as exc:
            raise DatabaseUnavailable(f"database: {type(exc).__name__}: {str(exc)[:300]}") from None
    return wrapper


@dataclass(frozen=True)
class Claimed:
    """A spool entry this worker now holds the lease of."""

    message: SpooledMessage
    attempts: int  # including this claim: > 1 means an earlier attempt may have stored a copy
    received_at: dt.datetime


@dataclass(frozen=True)
class RecordRequest:
    routed: Routed
    delivered: Delivered
    now: dt.datetime
    outgoing: Callable[[int, str, int], Outgoing | None]
    finish: bool = False


@dataclass(frozen=True)
class Recorded:
    message_row_id: int
    thread_id: int
    reference: str
    opened: bool


def _utc(value: dt.datetime | None) -> dt.datetime | None:
    if value is not None and value.tzinfo is None:  # SQLite returns naive datetimes
        return value.replace(tzinfo=dt.UTC)
    return value


class SqlLedger:
    def __init__(self, engine: AsyncEngine, *, secret: bytes, domain: str, instance: str) -> None:
        self.engine = engine
        self.sessions = session_factory(engine)
        self.secret = secret
        self.domain = domain
        self.instance = instance
        self.postgres = engine.dialect.name == "postgresql"
        # SQLite has one writer at a time and its busy handler sleeps in steps of up to 100 ms:
        # concurrent workers queue here instead, in the event loop, at no cost.
        self._sqlite_writer = asyncio.Lock() if engine.dialect.name == "sqlite" else None

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[AsyncSession]:
        """A write transaction (serialised in-process on SQLite)."""
        if self._sqlite_writer is None:
            async with self.sessions.begin() as s:
                yield s
            return
        async with self._sqlite_writer, self.sessions.begin() as s:
            yield s

    # --- directory --------------------------------------------------------------------------

    @_db_errors
    async def load_services(self) -> ServiceTable:
        async with self.sessions() as s:
            rows = (await s.execute(
                select(ServiceAddress.address_key, ServiceAddress.address, Service)
                .join(Service, Service.id == ServiceAddress.service_id)
                .where(Service.active.is_(True))
                .order_by(ServiceAddress.id))).all()
        table: dict[str, ServiceRef] = {}
        first_address: dict[int, str] = {}
        for key, address, svc in rows:
            first_address.setdefault(svc.id, address)
            table[key] = ServiceRef(svc.id, svc.code, svc.name, svc.imap_account, svc.acknowledge,
                                    first_address[svc.id])
        return ServiceTable(table)

    # --- spool index ------------------------------------------------------------------------

    @_db_errors
    async def index(self, messages: Sequence[SpooledMessage]) -> None:
        """Insert spool rows (bytes included) for files not yet indexed; idempotent."""
        if not messages:
            return
        async with self._write() as s:
            ids = [m.envelope.spool_id for m in messages]
            known = set((await s.execute(select(SpoolEntry.id).where(SpoolEntry.id.in_(ids)))).scalars())
            rows = [dict(id=m.envelope.spool_id, received_at=m.envelope.arrived_at,
                         mail_from=m.envelope.mail_from, recipients=list(m.envelope.recipients),
                         size=len(m.raw), sha256=m.sha256, path="", content=m.raw,
                         peer=m.envelope.peer[:100], state=SpoolState.QUEUED, attempts=0,
                         next_attempt_at=m.envelope.arrived_at)
                    for m in messages if m.envelope.spool_id not in known]
            if rows:
                await s.execute(insert(SpoolEntry), rows)

    @_db_errors
    async def release_claims(self) -> int:
        """At start-up: this instance died holding claims; make them claimable now."""
        async with self._write() as s:
            result = await s.execute(
                update(SpoolEntry)
                .where(SpoolEntry.claimed_by == self.instance, SpoolEntry.state == SpoolState.QUEUED)
                .values(claimed_by=None, claimed_until=None))
        return result.rowcount or 0

    @_db_errors
    async def claim(self, limit: int, lease: float, now: dt.datetime) -> list[Claimed]:
        due = (select(SpoolEntry.id)
               .where(SpoolEntry.state == SpoolState.QUEUED, SpoolEntry.next_attempt_at <= now,
                      or_(SpoolEntry.claimed_until.is_(None), SpoolEntry.claimed_until < now))
               .order_by(SpoolEntry.received_at, SpoolEntry.id)
               .limit(limit))
        if self.postgres:
            due = due.with_for_update(skip_locked=True)
        stmt = (update(SpoolEntry)
                .where(SpoolEntry.id.in_(due.scalar_subquery()))
                .values(claimed_by=self.instance, claimed_until=now + dt.timedelta(seconds=lease),
                        attempts=SpoolEntry.attempts + 1)
                .returning(SpoolEntry.id, SpoolEntry.received_at, SpoolEntry.mail_from,
                           SpoolEntry.recipients, SpoolEntry.peer, SpoolEntry.sha256,
                           SpoolEntry.content, SpoolEntry.attempts)
                .execution_options(synchronize_session=False))
        async with self._write() as s:
            rows = (await s.execute(stmt)).all()
        claimed = []
        for r in sorted(rows, key=lambda r: (_utc(r.received_at), r.id)):
            env = Envelope(spool_id=r.id, mail_from=r.mail_from, recipients=tuple(r.recipients),
                           arrived_at=_utc(r.received_at), peer=r.peer)  # type: ignore[arg-type]
            claimed.append(Claimed(SpooledMessage(env, bytes(r.content or b""), r.sha256),
                                   r.attempts, _utc(r.received_at)))  # type: ignore[arg-type]
        return claimed

    @_db_errors
    async def reschedule(self, spool_id: str, error: str, next_attempt_at: dt.datetime) -> None:
        async with self._write() as s:
            await s.execute(update(SpoolEntry).where(SpoolEntry.id == spool_id).values(
                claimed_by=None, claimed_until=None, last_error=error[:2000],
                next_attempt_at=next_attempt_at))

    @_db_errors
    async def dead_letter(self, spool_id: str, reason: str, now: dt.datetime) -> None:
        async with self._write() as s:
            await s.execute(update(SpoolEntry).where(SpoolEntry.id == spool_id).values(
                state=SpoolState.DEAD, claimed_by=None, claimed_until=None,
                last_error=reason[:2000], done_at=now))

    @_db_errors
    async def mark_done(self, spool_id: str, now: dt.datetime) -> None:
        async with self._write() as s:
            await s.execute(update(SpoolEntry).where(SpoolEntry.id == spool_id).values(
                state=SpoolState.DONE, claimed_by=None, claimed_until=None, done_at=now,
                content=None, last_error=None))

    # --- routing lookups --------------------------------------------------------------------

    @_db_errors
    async def recorded_services(self, spool_id: str) -> set[int]:
        """Services this spool entry was already delivered and recorded for (idempotence)."""
        async with self.sessions() as s:
            return set((await s.execute(select(Message.service_id)
                                        .where(Message.spool_id == spool_id))).scalars())

    @_db_errors
    async def lookups(self, mail: Any, targets: Sequence[Any]) -> tuple[set[int], list[Candidates]]:
        """In one session: the services already recorded for this entry and, for each target,
        the thread candidates."""
        async with self.sessions() as s:
            recorded = set((await s.execute(select(Message.service_id)
                                            .where(Message.spool_id == mail.envelope.spool_id))).scalars())
            found = [await self._candidates(s, mail, t.service, t.token_thread_id)
                     for t in targets if t.service.id not in recorded]
        return recorded, found

    @_db_errors
    async def candidates(self, mail: Any, service: ServiceRef,
                         token_thread_id: int | None) -> Candidates:
        async with self.sessions() as s:
            return await self._candidates(s, mail, service, token_thread_id)

    async def _candidates(self, s: AsyncSession, mail: Any, service: ServiceRef,
                          token_thread_id: int | None) -> Candidates:
        if True:
            by_token = None
            if token_thread_id is not None:
                facts = await self._facts(s, [Thread.id == token_thread_id])
                by_token = facts[0] if facts else None
            refs = subject_references(mail.subject)
            by_ref = await self._facts(s, [Thread.reference.in_(refs)]) if refs else []
            by_ref.sort(key=lambda f: refs.index(f.reference))
            cited = cited_message_ids(mail)
            by_mid: list[ThreadFacts] = []
            if cited:
                ours = [t for t in (tokens.thread_of_message_id(self.secret, m) for m in cited) if t]
                known = (await s.execute(
                    select(Message.message_id, Message.thread_id)
                    .where(Message.service_id == service.id, Message.message_id.in_(cited),
                           Message.thread_id.is_not(None)))).all()
                order = {m: i for i, m in enumerate(cited)}
                thread_ids = ours + [t for _, t in sorted(known, key=lambda r: order.get(r[0], 0))]
                if thread_ids:
                    facts = {f.id: f for f in await self._facts(s, [Thread.id.in_(thread_ids)])}
                    by_mid = [facts[t] for t in dict.fromkeys(thread_ids) if t in facts]
        return Candidates(by_token, tuple(by_ref), tuple(by_mid))

    async def _facts(self, s: AsyncSession, where: list[Any]) -> list[ThreadFacts]:
        rows = (await s.execute(
            select(Thread.id, Thread.reference, Thread.service_id, Usager.address_key, Thread.status)
            .outerjoin(Usager, Usager.id == Thread.usager_id).where(*where))).all()
        return [ThreadFacts(r[0], r[1], r[2], r[3], str(r[4].value if hasattr(r[4], "value") else r[4]))
                for r in rows]

    @_db_errors
    async def acknowledgements_today(self, to_address: str, now: dt.datetime) -> int:
        start = now.astimezone(dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        async with self.sessions() as s:
            return int((await s.execute(
                select(func.count()).select_from(NotificationOutbox).where(
                    NotificationOutbox.kind == "acknowledgement",
                    func.lower(NotificationOutbox.to_address) == to_address.lower(),
                    NotificationOutbox.created_at >= start))).scalar_one())

    # --- recording --------------------------------------------------------------------------

    @_db_errors
    async def record(self, routed: Routed, delivered: Delivered, now: dt.datetime,
                     outgoing: Callable[[int, str, int], Outgoing | None],
                     finish: bool = False) -> Recorded | None:
        """Record one delivered copy: usager, thread (joined or opened), message, traffic event
        and, through ``outgoing(thread_id, reference, acknowledgements sent today)``, the
        acknowledgement; with ``finish`` the spool entry is marked done in the same transaction.
        Idempotent: a copy already recorded (same spool id and service) records nothing."""
        async with self._write() as s:
            return await self._record_in(s, RecordRequest(routed, delivered, now, outgoing, finish))

    @_db_errors
    async def record_many(self, requests: Sequence[RecordRequest]) -> list[Recorded | None]:
        """Several :meth:`record` in one transaction: one commit (one fsync) for the batch."""
        async with self._write() as s:
            return [await self._record_in(s, r) for r in requests]

    async def _record_in(self, s: AsyncSession, req: RecordRequest) -> Recorded | None:
        routed, delivered, now, outgoing, finish = req.routed, req.delivered, req.now, req.outgoing, req.finish
        mail, service = routed.mail, routed.service
        spool_id = mail.envelope.spool_id
        if True:
            exists = (await s.execute(select(Message.id).where(
                Message.spool_id == spool_id, Message.service_id == service.id))).first()
            if exists:
                if finish:
                    await self._finish(s, spool_id, now)
                return None
            usager_id = await self._usager(s, mail) if mail.sender_key else None
            decision = routed.decision
            if isinstance(decision, JoinThread):
                thread = await s.get(Thread, decision.thread.id)
                assert thread is not None
                if thread.status != ThreadStatus.OUVERT:
                    thread.status = ThreadStatus.OUVERT
                    thread.closed_at = None
                thread.updated_at = now
                opened = False
            else:
                assert isinstance(decision, OpenThread)
                reference = await self._next_reference(s, mail.envelope.arrived_at.year)
                thread = Thread(reference=reference, service_id=service.id, usager_id=usager_id,
                                subject=mail.subject[:5000], related_reference=decision.related_reference,
                                opened_at=mail.envelope.arrived_at, updated_at=now)
                s.add(thread)
                await s.flush()
                opened = True
            row = Message(
                thread_id=thread.id, service_id=service.id, direction=Direction.IN,
                message_id=(mail.message_id or "")[:998] or None,
                in_reply_to=" ".join(mail.in_reply_to) or None,
                references=" ".join(mail.references) or None,
                sender=mail.sender_key[:320], recipients=",".join(mail.envelope.recipients),
                subject=mail.subject, size=mail.size, sha256=mail.sha256,
                received_at=mail.envelope.arrived_at, date_header=mail.date,
                mailbox=f"{service.imap_account}/{delivered.mailbox}",
                uidvalidity=delivered.uidvalidity, uid=delivered.uid, spool_id=spool_id)
            s.add(row)
            await s.flush()
            s.add(TrafficEvent(service_id=service.id, direction=Direction.IN,
                               occurred_at=mail.envelope.arrived_at, size=mail.size,
                               thread_id=thread.id, message_id=row.id))
            if opened:
                sent_today = await self._acknowledgements_today(s, mail.envelope.mail_from, now)
                out = outgoing(thread.id, thread.reference, sent_today)
                if out is not None:
                    s.add(NotificationOutbox(dedup_key=out.dedup_key, kind=out.kind,
                                             thread_id=thread.id, to_address=out.to_address,
                                             content=out.content, created_at=now,
                                             next_attempt_at=now))
            if finish:
                await self._finish(s, spool_id, now)
        return Recorded(row.id, thread.id, thread.reference, opened)

    async def _finish(self, s: AsyncSession, spool_id: str, now: dt.datetime) -> None:
        await s.execute(update(SpoolEntry).where(SpoolEntry.id == spool_id).values(
            state=SpoolState.DONE, claimed_by=None, claimed_until=None, done_at=now,
            content=None, last_error=None))

    async def _acknowledgements_today(self, s: AsyncSession, to_address: str, now: dt.datetime) -> int:
        if not to_address:
            return 0
        start = now.astimezone(dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        return int((await s.execute(
            select(func.count()).select_from(NotificationOutbox).where(
                NotificationOutbox.kind == "acknowledgement",
                func.lower(NotificationOutbox.to_address) == to_address.lower(),
                NotificationOutbox.created_at >= start))).scalar_one())

    async def _usager(self, s: AsyncSession, mail: Any) -> int:
        key = mail.sender_key[:320]
        found = (await s.execute(select(Usager.id).where(Usager.address_key == key))).scalar()
        if found is not None:
            return int(found)
        name = mail.sender.name if mail.sender else ""
        address = mail.sender.address if mail.sender else key
        # Another instance may insert the same usager concurrently: ON CONFLICT DO NOTHING.
        if self.postgres:
            from sqlalchemy.dialects.postgresql import insert as dialect_insert
        else:
            from sqlalchemy.dialects.sqlite import insert as dialect_insert  # type: ignore[assignment]
        await s.execute(dialect_insert(Usager).values(
            address=address[:320], address_key=key, display_name=name[:200],
            uses_secure_messaging=False, created_at=mail.envelope.arrived_at,
        ).on_conflict_do_nothing(index_elements=["address_key"]))
        return int((await s.execute(select(Usager.id).where(Usager.address_key == key))).scalar_one())

    async def _next_reference(self, s: AsyncSession, year: int) -> str:
        # The UPDATE takes the counter's row lock: concurrent instances get distinct numbers.
        for _ in range(2):
            number = (await s.execute(
                update(ReferenceCounter).where(ReferenceCounter.year == year)
                .values(last_number=ReferenceCounter.last_number + 1)
                .returning(ReferenceCounter.last_number))).scalar()
            if number is not None:
                return format_reference(year, int(number))
            if self.postgres:
                from sqlalchemy.dialects.postgresql import insert as dialect_insert
            else:
                from sqlalchemy.dialects.sqlite import insert as dialect_insert  # type: ignore[assignment]
            await s.execute(dialect_insert(ReferenceCounter).values(year=year, last_number=0)
                            .on_conflict_do_nothing(index_elements=["year"]))
        raise DatabaseUnavailable("could not allocate a thread reference")

    # --- notifications outbox ---------------------------------------------------------------

    @_db_errors
    async def claim_outbox(self, limit: int, now: dt.datetime, lease: float) -> list[tuple[int, str, bytes, int]]:
        due = (select(NotificationOutbox.id)
               .where(NotificationOutbox.state == OutboxState.PENDING,
                      NotificationOutbox.next_attempt_at <= now)
               .order_by(NotificationOutbox.id).limit(limit))
        if self.postgres:
            due = due.with_for_update(skip_locked=True)
        stmt = (update(NotificationOutbox)
                .where(NotificationOutbox.id.in_(due.scalar_subquery()))
                .values(attempts=NotificationOutbox.attempts + 1,
                        next_attempt_at=now + dt.timedelta(seconds=lease))
                .returning(NotificationOutbox.id, NotificationOutbox.to_address,
                           NotificationOutbox.content, NotificationOutbox.attempts)
                .execution_options(synchronize_session=False))
        async with self._write() as s:
            return [(r[0], r[1], bytes(r[2]), r[3]) for r in (await s.execute(stmt)).all()]

    @_db_errors
    async def outbox_result(self, outbox_id: int, *, sent: bool, error: str | None,
                            now: dt.datetime, retry_at: dt.datetime | None) -> None:
        values: dict[str, Any] = {"last_error": error}
        if sent:
            values.update(state=OutboxState.SENT, sent_at=now)
        elif retry_at is None:
            values.update(state=OutboxState.DEAD)
        else:
            values.update(next_attempt_at=retry_at)
        async with self._write() as s:
            await s.execute(update(NotificationOutbox).where(NotificationOutbox.id == outbox_id)
                            .values(**values))

    # --- administration (`balf spool`) ------------------------------------------------------

    @_db_errors
    async def list_entries(self, states: Iterable[str], limit: int = 100) -> list[SpoolItem]:
        async with self.sessions() as s:
            rows = (await s.execute(
                select(SpoolEntry).where(SpoolEntry.state.in_(list(states)))
                .order_by(SpoolEntry.received_at, SpoolEntry.id).limit(limit))).scalars().all()
        return [_item(r) for r in rows]

    @_db_errors
    async def get_entry(self, spool_id: str) -> tuple[SpoolItem, bytes | None] | None:
        async with self.sessions() as s:
            row = await s.get(SpoolEntry, spool_id)
            if row is None:
                return None
            copies = (await s.execute(
                select(Message.mailbox, Message.uid, Thread.reference)
                .outerjoin(Thread, Thread.id == Message.thread_id)
                .where(Message.spool_id == spool_id))).all()
        deliveries = tuple(f"{m} uid={u} thread={ref}" for m, u, ref in copies)
        return _item(row, deliveries), (bytes(row.content) if row.content is not None else None)

    @_db_errors
    async def retry(self, spool_id: str | None, now: dt.datetime) -> int:
        """Make dead (or waiting) entries due now; ``None``: every dead entry."""
        where = [SpoolEntry.state.in_([SpoolState.DEAD, SpoolState.QUEUED]), SpoolEntry.content.is_not(None)]
        where.append(SpoolEntry.id == spool_id if spool_id else SpoolEntry.state == SpoolState.DEAD)
        async with self._write() as s:
            result = await s.execute(update(SpoolEntry).where(*where).values(
                state=SpoolState.QUEUED, next_attempt_at=now, claimed_by=None, claimed_until=None,
                done_at=None, received_at=SpoolEntry.received_at))
        return result.rowcount or 0

    @_db_errors
    async def purge(self, *, spool_id: str | None, states: Sequence[str], older_than: dt.datetime | None) -> int:
        from sqlalchemy import delete

        where = [SpoolEntry.state.in_(list(states))]
        if spool_id:
            where.append(SpoolEntry.id == spool_id)
        if older_than is not None:
            where.append(SpoolEntry.received_at < older_than)
        async with self._write() as s:
            result = await s.execute(delete(SpoolEntry).where(and_(*where)))
        return result.rowcount or 0


def _item(r: SpoolEntry, deliveries: tuple[str, ...] = ()) -> SpoolItem:
    return SpoolItem(id=r.id, state=str(r.state.value if hasattr(r.state, "value") else r.state),
                     received_at=_utc(r.received_at), mail_from=r.mail_from,  # type: ignore[arg-type]
                     recipients=tuple(r.recipients or ()), size=r.size, attempts=r.attempts,
                     next_attempt_at=_utc(r.next_attempt_at), last_error=r.last_error, peer=r.peer,
                     done_at=_utc(r.done_at), deliveries=deliveries)
