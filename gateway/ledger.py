"""The gateway's database side (I/O): the spool index, claims, thread lookups and delivery records.

``SqlLedger`` is the one place the gateway talks SQL. Every SQLAlchemy/driver error becomes
:class:`DatabaseUnavailable`, so the worker retries; nothing here decides routing (that is pure,
in threads.py/acknowledgement.py): it looks up facts before and records results after.

Claims: ``UPDATE spool_entries ... WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED) RETURNING``,
one statement that is atomic on PostgreSQL (row locks, other instances skip claimed rows) and
on SQLite (one writer at a time). A claim is a lease (``claimed_until``): the entries of an
instance killed with -9 are claimed again once it expires, or at once when that instance
restarts (``release_claims``). A live worker renews the leases it holds (``renew``).

Fencing: a claim is identified by the instance (``claimed_by``) and by the entry's ``attempts``
counter, which every claim increments. Every statement that changes a claimed entry
(``reschedule``, ``dead_letter``, ``mark_done``, the record transaction, ``renew``) matches
both and says whether it applied: a worker whose lease expired and whose entry was claimed
again (by another instance, or by itself) changes nothing and drops the entry.
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
from sqlalchemy import ColumnElement, and_, func, insert, or_, select, tuple_, update
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
from balf.gateway.acknowledgement import day_start
from balf.gateway.errors import DatabaseUnavailable, GatewayError
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
# Core tables for the batched record (no ORM unit of work on the hot path).
_THREADS = Thread.__table__
_MESSAGES = Message.__table__
_EVENTS = TrafficEvent.__table__
_OUTBOX = NotificationOutbox.__table__
_USAGERS = Usager.__table__
_SPOOL = SpoolEntry.__table__
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


class ClaimLost(GatewayError):
    """The entry is no longer this worker's (its lease ended and it was claimed again, or an
    administrator released it): the worker drops it without changing anything."""


@dataclass(frozen=True)
class Claimed:
    """A spool entry this worker now holds the lease of."""

    message: SpooledMessage
    attempts: int  # including this claim: > 1 means an earlier attempt may have stored a copy;
    #                with the instance name, it identifies this claim (the fencing token)
    received_at: dt.datetime

    @property
    def spool_id(self) -> str:
        return self.message.envelope.spool_id


@dataclass(frozen=True)
class RecordRequest:
    routed: Routed
    delivered: Delivered
    now: dt.datetime
    outgoing: Callable[[int, str, int], Outgoing | None]
    finish: bool = False
    attempts: int | None = None  # the claim this copy was delivered under (None: unclaimed entry)


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
    async def claim(self, limit: int, lease: float, now: dt.datetime,
                    exclude: Iterable[str] = ()) -> list[Claimed]:
        """Claim up to ``limit`` due entries, oldest first, for ``lease`` seconds. ``exclude``:
        the entries this process still has in flight (never claimed a second time by it, even
        if their lease ended while the database could not be reached to renew it)."""
        where = [SpoolEntry.state == SpoolState.QUEUED, SpoolEntry.next_attempt_at <= now,
                 or_(SpoolEntry.claimed_until.is_(None), SpoolEntry.claimed_until < now)]
        skip = sorted(set(exclude))
        if skip:
            where.append(SpoolEntry.id.not_in(skip))
        due = (select(SpoolEntry.id)
               .where(*where)
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

    def _held(self, spool_id: str, attempts: int | None) -> list[ColumnElement[bool]]:
        """Rows of ``spool_id`` this worker may change: queued and held under its claim number
        ``attempts`` by this instance; ``attempts=None``: queued and claimed by no one."""
        where = [SpoolEntry.id == spool_id, SpoolEntry.state == SpoolState.QUEUED]
        if attempts is None:
            where.append(SpoolEntry.claimed_by.is_(None))
        else:
            where += [SpoolEntry.claimed_by == self.instance, SpoolEntry.attempts == attempts]
        return where

    async def _update_held(self, spool_id: str, attempts: int | None, **values: Any) -> bool:
        async with self._write() as s:
            result = await s.execute(update(SpoolEntry).where(*self._held(spool_id, attempts))
                                     .values(**values).execution_options(synchronize_session=False))
        return (result.rowcount or 0) == 1

    @_db_errors
    async def renew(self, held: Sequence[tuple[str, int]], lease: float, now: dt.datetime) -> set[str]:
        """Extend the lease of the claims ``held`` ((spool id, attempts) pairs) to ``now +
        lease``, in one statement; returns the ids still held (the others were claimed again)."""
        if not held:
            return set()
        stmt = (update(SpoolEntry)
                .where(tuple_(SpoolEntry.id, SpoolEntry.attempts).in_(list(held)),
                       SpoolEntry.claimed_by == self.instance, SpoolEntry.state == SpoolState.QUEUED)
                .values(claimed_until=now + dt.timedelta(seconds=lease))
                .returning(SpoolEntry.id)
                .execution_options(synchronize_session=False))
        async with self._write() as s:
            return {str(x) for x in (await s.execute(stmt)).scalars()}

    @_db_errors
    async def reschedule(self, spool_id: str, error: str, next_attempt_at: dt.datetime, *,
                         attempts: int | None = None) -> bool:
        """Release the claim and retry at ``next_attempt_at``; False: not ours any more."""
        return await self._update_held(spool_id, attempts, claimed_by=None, claimed_until=None,
                                       last_error=error[:2000], next_attempt_at=next_attempt_at)

    @_db_errors
    async def dead_letter(self, spool_id: str, reason: str, now: dt.datetime, *,
                          attempts: int | None = None) -> bool:
        """Give up on the entry (kept, with ``reason``); False: not ours any more."""
        return await self._update_held(spool_id, attempts, state=SpoolState.DEAD, claimed_by=None,
                                       claimed_until=None, last_error=reason[:2000], done_at=now)

    @_db_errors
    async def mark_done(self, spool_id: str, now: dt.datetime, *, attempts: int | None = None) -> bool:
        """The entry is delivered and recorded; False: not ours any more."""
        return await self._update_held(spool_id, attempts, state=SpoolState.DONE, claimed_by=None,
                                       claimed_until=None, done_at=now, content=None, last_error=None)

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
    async def lookups_many(self, items: Sequence[tuple[Any, Sequence[Any]]]
                           ) -> list[tuple[set[int], list[Candidates]]]:
        """:meth:`lookups` for a batch of (mail, targets) in one session: one query for the
        copies already recorded; thread candidates only where the mail names a thread (token,
        subject tag, In-Reply-To/References), so a mail that names none costs no query."""
        if not items:
            return []
        async with self.sessions() as s:
            recorded: dict[str, set[int]] = {}
            ids = [mail.envelope.spool_id for mail, _ in items]
            for spool_id, service_id in (await s.execute(
                    select(Message.spool_id, Message.service_id).where(Message.spool_id.in_(ids)))).all():
                recorded.setdefault(spool_id, set()).add(service_id)
            out = []
            for mail, targets in items:
                done = recorded.get(mail.envelope.spool_id, set())
                out.append((done, [await self._candidates(s, mail, t.service, t.token_thread_id)
                                   for t in targets if t.service.id not in done]))
        return out

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
        """Acknowledgements queued for ``to_address`` since the start of the users' day."""
        start = day_start(now)
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
                     finish: bool = False, attempts: int | None = None) -> Recorded | None | ClaimLost:
        """Record one delivered copy: usager, thread (joined or opened), message, traffic event
        and, through ``outgoing(thread_id, reference, acknowledgements sent today)``, the
        acknowledgement; with ``finish`` the spool entry is marked done in the same transaction.
        Idempotent: a copy already recorded (same spool id and service) records nothing.
        ``attempts``: the claim the copy was delivered under; if the entry is no longer held
        under it, nothing is recorded and the result is a :class:`ClaimLost`."""
        async with self._write() as s:
            return (await self._record_batch(
                s, [RecordRequest(routed, delivered, now, outgoing, finish, attempts)]))[0]

    @_db_errors
    async def record_many(self, requests: Sequence[RecordRequest]) -> list[Recorded | None | ClaimLost]:
        """Several :meth:`record` in one transaction (one commit, one fsync) and a fixed number
        of statements for the whole batch (Core executemany, not one ORM flush per row).
        Requests are recorded in order: thread references are numbered in arrival order."""
        if not requests:
            return []
        async with self._write() as s:
            return await self._record_batch(s, requests)

    async def _hold(self, s: AsyncSession, claims: dict[str, int | None]) -> set[str]:
        """First statement of a record transaction: the entries of ``claims`` still held
        under those claims, row-locked until the commit (a concurrent claim skips them, and on
        SQLite the write lock is taken at once). A no-op UPDATE, so both databases lock."""
        held: set[str] = set()
        mine = [(i, a) for i, a in claims.items() if a is not None]
        free = [i for i, a in claims.items() if a is None]
        if mine:
            held |= {str(x) for x in (await s.execute(
                update(_SPOOL).where(tuple_(_SPOOL.c.id, _SPOOL.c.attempts).in_(mine),
                                     _SPOOL.c.claimed_by == self.instance,
                                     _SPOOL.c.state == SpoolState.QUEUED)
                .values(claimed_until=_SPOOL.c.claimed_until).returning(_SPOOL.c.id))).scalars()}
        if free:
            held |= {str(x) for x in (await s.execute(
                update(_SPOOL).where(_SPOOL.c.id.in_(free), _SPOOL.c.claimed_by.is_(None),
                                     _SPOOL.c.state == SpoolState.QUEUED)
                .values(claimed_until=None).returning(_SPOOL.c.id))).scalars()}
        return held

    async def _record_batch(self, s: AsyncSession,
                            all_reqs: Sequence[RecordRequest]) -> list[Recorded | None | ClaimLost]:
        held = await self._hold(s, {r.routed.mail.envelope.spool_id: r.attempts for r in all_reqs})
        reqs = [r for r in all_reqs if r.routed.mail.envelope.spool_id in held]
        if not reqs:
            return [ClaimLost("no longer claimed by this worker") for _ in all_reqs]
        now = max(r.now for r in reqs)
        spool_ids = list(dict.fromkeys(r.routed.mail.envelope.spool_id for r in reqs))
        seen: set[tuple[str, int]] = {(str(a), int(b)) for a, b in (await s.execute(
            select(Message.spool_id, Message.service_id).where(Message.spool_id.in_(spool_ids)))).all()}
        todo: list[RecordRequest] = []
        for r in reqs:
            key = (r.routed.mail.envelope.spool_id, r.routed.service.id)
            if key not in seen:  # already recorded (an earlier attempt): nothing to add
                seen.add(key)
                todo.append(r)
        results: dict[int, Recorded] = {}
        if todo:
            usagers = await self._usager_ids(s, [r.routed.mail for r in todo])
            joined = {r.routed.decision.thread.id for r in todo if isinstance(r.routed.decision, JoinThread)}
            if joined:
                await s.execute(update(_THREADS).where(_THREADS.c.id.in_(joined)).values(
                    status=ThreadStatus.OUVERT, closed_at=None, updated_at=now))
            opening = [r for r in todo if isinstance(r.routed.decision, OpenThread)]
            references = await self._next_references(s, [r.routed.mail.envelope.arrived_at.year for r in opening])
            opened: dict[int, tuple[int, str]] = {}  # id(request) -> (thread id, reference)
            if opening:
                rows = [dict(reference=ref, service_id=r.routed.service.id,
                             usager_id=usagers.get(r.routed.mail.sender_key[:320]),
                             subject=r.routed.mail.subject[:5000],
                             related_reference=r.routed.decision.related_reference,  # type: ignore[union-attr]
                             opened_at=r.routed.mail.envelope.arrived_at, updated_at=now)
                        for r, ref in zip(opening, references, strict=True)]
                ids = await self._insert_returning(s, _THREADS, rows)
                opened = {id(r): (tid, ref) for r, tid, ref in zip(opening, ids, references, strict=True)}
            threads: list[tuple[int, str, bool]] = []
            for r in todo:
                if id(r) in opened:
                    threads.append((*opened[id(r)], True))
                else:
                    facts = r.routed.decision.thread  # type: ignore[union-attr]
                    threads.append((facts.id, facts.reference, False))
            message_ids = await self._insert_returning(s, _MESSAGES, [
                _message_row(r, tid) for r, (tid, _, _) in zip(todo, threads, strict=True)])
            await s.execute(insert(_EVENTS), [
                dict(service_id=r.routed.service.id, direction=Direction.IN,
                     occurred_at=r.routed.mail.envelope.arrived_at, size=r.routed.mail.size,
                     thread_id=tid, message_id=mid)
                for r, (tid, _, _), mid in zip(todo, threads, message_ids, strict=True)])
            outbox = await self._acknowledgements(s, todo, threads, now)
            if outbox:
                await s.execute(insert(_OUTBOX), outbox)
            for r, (tid, ref, new), mid in zip(todo, threads, message_ids, strict=True):
                results[id(r)] = Recorded(mid, tid, ref, new)
        finished = list(dict.fromkeys(r.routed.mail.envelope.spool_id for r in reqs if r.finish))
        if finished:  # held and row-locked since _hold: these updates apply
            await self._finish_many(s, finished, now)
        return [results.get(id(r)) if r.routed.mail.envelope.spool_id in held
                else ClaimLost("no longer claimed by this worker") for r in all_reqs]

    async def _insert_returning(self, s: AsyncSession, table: Any, rows: list[dict[str, Any]]) -> list[int]:
        """INSERT rows, their new ids in the order given (SQLAlchemy "insertmanyvalues")."""
        result = await s.execute(insert(table).returning(table.c.id, sort_by_parameter_order=True), rows)
        return [int(x) for x in result.scalars().all()]

    async def _acknowledgements(self, s: AsyncSession, todo: list[RecordRequest],
                                threads: list[tuple[int, str, bool]], now: dt.datetime) -> list[dict[str, Any]]:
        """Outbox rows for the new threads; the per-sender daily count includes this batch."""
        senders = {r.routed.mail.envelope.mail_from.lower() for r, t in zip(todo, threads, strict=True)
                   if t[2] and r.routed.mail.envelope.mail_from}
        sent = await self._acknowledgements_by_sender(s, senders, now) if senders else {}
        rows = []
        for r, (tid, ref, new) in zip(todo, threads, strict=True):
            if not new:
                continue
            sender = r.routed.mail.envelope.mail_from.lower()
            out = r.outgoing(tid, ref, sent.get(sender, 0) if sender else 0)
            if out is not None:
                sent[out.to_address.lower()] = sent.get(out.to_address.lower(), 0) + 1
                rows.append(dict(dedup_key=out.dedup_key, kind=out.kind, thread_id=tid,
                                 to_address=out.to_address, content=out.content, created_at=now,
                                 next_attempt_at=now, state=OutboxState.PENDING, attempts=0))
        return rows

    async def _acknowledgements_by_sender(self, s: AsyncSession, senders: set[str],
                                          now: dt.datetime) -> dict[str, int]:
        start = day_start(now)  # the users' (Paris) day, as acknowledgements_today counts it
        low = func.lower(NotificationOutbox.to_address)
        rows = (await s.execute(
            select(low, func.count()).where(
                NotificationOutbox.kind == "acknowledgement", low.in_(sorted(senders)),
                NotificationOutbox.created_at >= start).group_by(low))).all()
        return {str(k): int(n) for k, n in rows}

    async def _finish(self, s: AsyncSession, spool_id: str, now: dt.datetime) -> None:
        await self._finish_many(s, [spool_id], now)

    async def _finish_many(self, s: AsyncSession, spool_ids: list[str], now: dt.datetime) -> None:
        await s.execute(update(_SPOOL).where(_SPOOL.c.id.in_(spool_ids)).values(
            state=SpoolState.DONE, claimed_by=None, claimed_until=None, done_at=now,
            content=None, last_error=None))

    async def _usager_ids(self, s: AsyncSession, mails: Sequence[Any]) -> dict[str, int]:
        """The usager id of each sender key, inserting the unknown ones."""
        first: dict[str, Any] = {}
        for mail in mails:
            key = mail.sender_key[:320]
            if key:
                first.setdefault(key, mail)
        if not first:
            return {}
        found: dict[str, int] = {str(k): int(v) for k, v in (await s.execute(
            select(Usager.address_key, Usager.id).where(Usager.address_key.in_(list(first))))).all()}
        missing = [k for k in first if k not in found]
        if missing:
            rows = []
            for key in missing:
                mail = first[key]
                rows.append(dict(address=(mail.sender.address if mail.sender else key)[:320], address_key=key,
                                 display_name=(mail.sender.name if mail.sender else "")[:200],
                                 uses_secure_messaging=False, created_at=mail.envelope.arrived_at))
            # Another instance may insert the same usager concurrently: ON CONFLICT DO NOTHING.
            await s.execute(self._dialect_insert(_USAGERS).on_conflict_do_nothing(
                index_elements=["address_key"]), rows)
            found.update({str(k): int(v) for k, v in (await s.execute(
                select(Usager.address_key, Usager.id).where(Usager.address_key.in_(missing)))).all()})
        return {k: int(v) for k, v in found.items()}

    def _dialect_insert(self, table: Any) -> Any:
        if self.postgres:
            from sqlalchemy.dialects.postgresql import insert as dialect_insert
        else:
            from sqlalchemy.dialects.sqlite import insert as dialect_insert  # type: ignore[assignment]
        return dialect_insert(table)

    async def _next_references(self, s: AsyncSession, years: list[int]) -> list[str]:
        """One new reference per item of ``years``, numbered in that order."""
        counts: dict[int, int] = {}
        for year in years:
            counts[year] = counts.get(year, 0) + 1
        last: dict[int, int] = {}
        for year, n in counts.items():
            last[year] = await self._reserve_numbers(s, year, n) - n
        out = []
        for year in years:
            last[year] += 1
            out.append(format_reference(year, last[year]))
        return out

    async def _reserve_numbers(self, s: AsyncSession, year: int, n: int) -> int:
        # The UPDATE takes the counter's row lock: concurrent instances get distinct numbers.
        for _ in range(2):
            number = (await s.execute(
                update(ReferenceCounter).where(ReferenceCounter.year == year)
                .values(last_number=ReferenceCounter.last_number + n)
                .returning(ReferenceCounter.last_number))).scalar()
            if number is not None:
                return int(number)
            await s.execute(self._dialect_insert(ReferenceCounter).values(year=year, last_number=0)
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
        """Make dead entries, or a waiting one, due now; ``None``: every dead entry.

        A queued entry is made due only when no one holds it (unclaimed, or its lease ended
        before ``now``): releasing a live claim would let a second worker deliver it while the
        first is still appending it."""
        idle = and_(SpoolEntry.state == SpoolState.QUEUED,
                    or_(SpoolEntry.claimed_until.is_(None), SpoolEntry.claimed_until < now))
        where = [or_(SpoolEntry.state == SpoolState.DEAD, idle), SpoolEntry.content.is_not(None)]
        where.append(SpoolEntry.id == spool_id if spool_id else SpoolEntry.state == SpoolState.DEAD)
        async with self._write() as s:
            result = await s.execute(update(SpoolEntry).where(*where).values(
                state=SpoolState.QUEUED, next_attempt_at=now, claimed_by=None, claimed_until=None,
                done_at=None, received_at=SpoolEntry.received_at))
        return result.rowcount or 0

    @_db_errors
    async def holder(self, spool_id: str, now: dt.datetime) -> tuple[str, dt.datetime] | None:
        """Who holds a live claim on ``spool_id`` and until when (None: no one)."""
        async with self.sessions() as s:
            row = (await s.execute(select(SpoolEntry.claimed_by, SpoolEntry.claimed_until).where(
                SpoolEntry.id == spool_id, SpoolEntry.state == SpoolState.QUEUED,
                SpoolEntry.claimed_until >= now))).first()
        if row is None:
            return None
        return str(row[0] or "?"), _utc(row[1])  # type: ignore[return-value]

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


def _message_row(r: RecordRequest, thread_id: int) -> dict[str, Any]:
    mail, service, delivered = r.routed.mail, r.routed.service, r.delivered
    return dict(thread_id=thread_id, service_id=service.id, direction=Direction.IN,
                message_id=(mail.message_id or "")[:998] or None,
                in_reply_to=" ".join(mail.in_reply_to) or None,
                references=" ".join(mail.references) or None,
                sender=mail.sender_key[:320], recipients=",".join(mail.envelope.recipients),
                subject=mail.subject, size=mail.size, sha256=mail.sha256,
                received_at=mail.envelope.arrived_at, date_header=mail.date,
                mailbox=f"{service.imap_account}/{delivered.mailbox}",
                uidvalidity=delivered.uidvalidity, uid=delivered.uid, spool_id=mail.envelope.spool_id)


def _item(r: SpoolEntry, deliveries: tuple[str, ...] = ()) -> SpoolItem:
    return SpoolItem(id=r.id, state=str(r.state.value if hasattr(r.state, "value") else r.state),
                     received_at=_utc(r.received_at), mail_from=r.mail_from,  # type: ignore[arg-type]
                     recipients=tuple(r.recipients or ()), size=r.size, attempts=r.attempts,
                     next_attempt_at=_utc(r.next_attempt_at), last_error=r.last_error, peer=r.peer,
                     done_at=_utc(r.done_at), deliveries=deliveries)
