"""Delivery workers (I/O through the ledger and the store): spool file -> database -> IMAP.

Two loops:

* ``index_spool`` moves acknowledged spool files into ``spool_entries`` rows (bytes included)
  as soon as the database answers, then removes the files. The file is the durable record
  before 250 (it needs no database); the row is what instances sharing PostgreSQL claim.
* ``deliver_loop`` claims due rows in arrival order, a batch at a time, and runs the batch
  through ``STEPS``: one lookup session, one MULTIAPPEND per mailbox, one record transaction
  for the whole batch. Every step is idempotent, so an entry interrupted anywhere (kill -9
  included) is simply run again; each entry of a batch succeeds, retries or is dead-lettered
  on its own.

Arrival order per mailbox is kept by a ticket chain per IMAP account: a batch appends to a
mailbox only after every batch claimed before it has finished its attempt for that mailbox,
and within a batch the copies go in claim order. Two batches are in flight at once, so one is
parsed and looked up while the other waits on IMAP or the database. When the IMAP server (or
the database) is down, a shared breaker pauses claiming and the entries stay due, so when it
comes back they are claimed again oldest first.

Claims are leases. While a batch is in flight ``renew_leases`` extends the leases of every
entry this worker holds, one UPDATE each ``lease / 4``, so another instance cannot claim an
entry whose APPEND is merely slow. Each result is written under the claim (instance and
attempts number, see ledger.py): if the entry was claimed again meanwhile (say this worker
could not reach the database to renew for a whole lease), the write does not apply and the
entry is dropped untouched (``ClaimLost``); an APPEND is not started for an entry whose lease
is not known to last at least another half lease. Every batch runs in ``deliver_loop``'s
TaskGroup: at stop, batches in flight get ``stop_grace`` seconds, then are cancelled (their
entries stay claimed and are run again, idempotently, after the lease or at the next start).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from balf.gateway import tokens
from balf.gateway.acknowledgement import decide_acknowledgement, render_acknowledgement
from balf.gateway.errors import (
    DatabaseUnavailable,
    GatewayError,
    PermanentFailure,
    StoreDown,
    TemporaryFailure,
)
from balf.gateway.ledger import Claimed, ClaimLost, Recorded, RecordRequest, SqlLedger
from balf.gateway.model import Delivered, InboundMail, Outgoing, Routed, SpooledMessage, Target
from balf.gateway.parse import parse_mail
from balf.gateway.services import ServiceTable, resolve_recipients
from balf.gateway.spool import FileSpool
from balf.gateway.store import Copy, MailStore
from balf.gateway.threads import match_thread

log = logging.getLogger("balf.gateway.worker")


@dataclass(frozen=True)
class WorkerSettings:
    secret: bytes
    domain: str
    workers: int = 4  # mailboxes a batch delivers to at the same time
    batch: int = 64  # entries claimed together
    batches_in_flight: int = 2
    lease: float = 300.0
    retry_delay: float = 5.0
    retry_max_delay: float = 600.0
    retry_max_age: float = 432000.0
    acknowledge: bool = True
    acknowledgements_per_day: int = 3
    portal_url: str = "https://www.impots.gouv.fr/"
    idle_poll: float = 1.0
    stop_grace: float = 10.0  # seconds in-flight batches get to finish at stop


class Leases:
    """The claims this worker holds: spool id -> claim's attempts number, and until when (loop
    clock) each is known to be ours: the lease of its last successful claim or renewal."""

    def __init__(self) -> None:
        self.held: dict[str, int] = {}
        self.until: dict[str, float] = {}
        self.lost: set[str] = set()

    def add(self, claimed: list[Claimed], until: float) -> None:
        for c in claimed:
            self.held[c.spool_id] = c.attempts
            self.until[c.spool_id] = until
            self.lost.discard(c.spool_id)

    def release(self, spool_ids: list[str]) -> None:
        for spool_id in spool_ids:
            self.held.pop(spool_id, None)
            self.until.pop(spool_id, None)
            self.lost.discard(spool_id)

    def renewed(self, asked: list[tuple[str, int]], kept: set[str], until: float) -> list[str]:
        """Record a renewal's answer; returns the ids found claimed again by someone else."""
        lost = []
        for spool_id, attempts in asked:
            if self.held.get(spool_id) != attempts:
                continue  # finished meanwhile
            if spool_id in kept:
                self.until[spool_id] = until
            elif spool_id not in self.lost:
                self.lost.add(spool_id)
                lost.append(spool_id)
        return lost

    def safe(self, spool_id: str, now: float, margin: float) -> bool:
        """Still ours for at least ``margin`` seconds (so an APPEND may start)."""
        return spool_id not in self.lost and self.until.get(spool_id, 0.0) - margin > now


@dataclass(frozen=True)
class Job:
    """One claimed entry on its way through the steps; ``failure`` stops it where it is."""

    claimed: Claimed
    mail: InboundMail | None = None
    targets: tuple[Target, ...] = ()
    routed: tuple[Routed, ...] = ()
    delivered: tuple[tuple[Routed, Delivered], ...] = ()
    failure: Exception | None = None
    failed_step: str = ""

    @property
    def spool_id(self) -> str:
        return self.claimed.message.envelope.spool_id

    def fail(self, step: str, exc: Exception) -> Job:
        if self.failure is not None:
            return self
        return dataclasses.replace(self, failure=exc, failed_step=step)


@dataclass(frozen=True)
class Batch:
    """The entries of one claim, in arrival order; ``key`` holds its mailbox tickets."""

    key: str
    jobs: tuple[Job, ...]

    def live(self) -> list[Job]:
        return [j for j in self.jobs if j.failure is None]

    def replace(self, jobs: list[Job]) -> Batch:
        return Batch(self.key, tuple(jobs))


class Breaker:
    """Pauses every claim while a shared dependency (IMAP server, database) is down."""

    def __init__(self, base: float, cap: float = 60.0) -> None:
        self.base, self.cap = base, cap
        self.failures = 0
        self.until = 0.0

    def trip(self, now: float) -> float:
        if now < self.until:  # already open: concurrent failures of one outage count once
            return self.until - now
        delay = min(self.base * 2 ** min(self.failures, 16), self.cap)
        self.failures += 1
        self.until = max(self.until, now + delay)
        return delay

    def reset(self) -> None:
        self.failures = 0
        self.until = 0.0


class MailboxOrder:
    """Ticket chains per IMAP account, taken in claim (= arrival) order."""

    def __init__(self) -> None:
        self._tails: dict[str, asyncio.Future[None]] = {}
        self._tickets: dict[str, dict[str, tuple[asyncio.Future[None] | None, asyncio.Future[None]]]] = {}

    def take(self, spool_id: str, accounts: list[str]) -> None:
        loop = asyncio.get_running_loop()
        mine: dict[str, tuple[asyncio.Future[None] | None, asyncio.Future[None]]] = {}
        for account in dict.fromkeys(accounts):
            prev = self._tails.get(account)
            fut: asyncio.Future[None] = loop.create_future()
            self._tails[account] = fut
            mine[account] = (None if prev is None or prev.done() else prev, fut)
        self._tickets[spool_id] = mine

    def retarget(self, spool_id: str, accounts: list[str]) -> None:
        """After routing: take a ticket (now, at the tail) for each account of ``accounts``
        not ticketed at claim time, and release the tickets of the accounts no longer used."""
        loop = asyncio.get_running_loop()
        mine = self._tickets.setdefault(spool_id, {})
        wanted = dict.fromkeys(accounts)
        for account in wanted:
            if account not in mine:
                prev = self._tails.get(account)
                fut: asyncio.Future[None] = loop.create_future()
                self._tails[account] = fut
                mine[account] = (None if prev is None or prev.done() else prev, fut)
        for account in [a for a in mine if a not in wanted]:
            self.done(spool_id, account)

    async def wait_turn(self, spool_id: str, account: str) -> None:
        prev = self._tickets.get(spool_id, {}).get(account, (None, None))[0]
        if prev is not None:
            await asyncio.shield(prev)

    def done(self, spool_id: str, account: str | None = None) -> None:
        tickets = self._tickets.get(spool_id, {})
        for name, (_, fut) in list(tickets.items()):
            if account is None or name == account:
                if not fut.done():
                    fut.set_result(None)
                if self._tails.get(name) is fut:
                    del self._tails[name]
        if account is None:
            self._tickets.pop(spool_id, None)


@dataclass
class Context:
    settings: WorkerSettings
    ledger: SqlLedger
    store: MailStore
    services: Callable[[], ServiceTable | None]
    clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC)
    order: MailboxOrder = field(default_factory=MailboxOrder)
    breaker: Breaker = field(default_factory=lambda: Breaker(1.0))
    leases: Leases = field(default_factory=Leases)
    delivered: int = 0
    dead: int = 0
    batches: int = 0


# --- the steps, in order: each takes a batch and returns it ---------------------------------

async def parse_step(ctx: Context, batch: Batch) -> Batch:
    table = ctx.services()
    jobs = []
    for job in batch.jobs:
        if job.failure is None:
            try:
                job = _parse(ctx, table, job)
            except GatewayError as exc:
                job = job.fail("parse", exc)
        jobs.append(job)
    return batch.replace(jobs)


def _parse(ctx: Context, table: ServiceTable | None, job: Job) -> Job:
    msg = job.claimed.message
    if table is None:
        raise DatabaseUnavailable("service directory not loaded")
    mail = parse_mail(msg.raw, msg.envelope, msg.sha256)
    targets = resolve_recipients(msg.envelope.recipients, table, ctx.settings.secret)
    if not targets:
        raise PermanentFailure("no recipient belongs to a known service any more")
    return dataclasses.replace(job, mail=mail, targets=targets)


async def route_step(ctx: Context, batch: Batch) -> Batch:
    live = batch.live()
    try:
        found = await ctx.ledger.lookups_many([(j.mail, j.targets) for j in live])
    except DatabaseUnavailable as exc:
        return batch.replace([j.fail("route", exc) for j in batch.jobs])
    routed_jobs = {id(j): _route(ctx, j, recorded, candidates)
                   for j, (recorded, candidates) in zip(live, found, strict=True)}
    batch = batch.replace([routed_jobs.get(id(j), j) for j in batch.jobs])
    # The tickets were taken at claim time from the addresses; a redirect (a transferred
    # thread) may have changed the accounts: ticket those too, release those left unused.
    ctx.order.retarget(batch.key, [r.service.imap_account for j in batch.live() for r in j.routed])
    return batch


def _route(ctx: Context, job: Job, recorded: set[int], found: list) -> Job:  # type: ignore[type-arg]
    assert job.mail is not None
    pending = [t for t in job.targets if t.service.id not in recorded]  # others: done earlier
    routed: list[Routed] = []
    for target, candidates in zip(pending, found, strict=True):
        service = target.service
        if candidates.by_token is not None and candidates.by_token.service_id != service.id:
            # The thread was transferred: its replies go to the service that has it now.
            table = ctx.services()
            moved = next((s for s in (table.by_address.values() if table else ())
                          if s.id == candidates.by_token.service_id), None)
            service = moved or service
        if service.id in recorded or any(r.service.id == service.id for r in routed):
            continue  # redirected onto a service this message already goes to: one copy
        routed.append(Routed(job.mail, service, match_thread(job.mail, service, candidates)))
    return dataclasses.replace(job, routed=tuple(routed))


async def deliver_step(ctx: Context, batch: Batch) -> Batch:
    """Each mailbox's copies in claim order on one connection (one MULTIAPPEND), mailboxes
    ``settings.workers`` at a time, each after the batches claimed earlier."""
    per_account: dict[str, list[tuple[int, Routed]]] = {}
    for n, job in enumerate(batch.jobs):
        if job.failure is None:
            for routed in job.routed:
                per_account.setdefault(routed.service.imap_account, []).append((n, routed))
    results: dict[tuple[int, int], Delivered | Exception] = {}  # (job index, id(routed))
    slots = asyncio.Semaphore(max(1, ctx.settings.workers))

    async def one(account: str, items: list[tuple[int, Routed]]) -> None:
        async with slots:
            await ctx.order.wait_turn(batch.key, account)
            try:
                # Never start an APPEND the lease may not outlast: a second claim could then
                # APPEND too (its "already there?" search cannot see an APPEND in flight).
                now = asyncio.get_running_loop().time()
                margin = ctx.settings.lease / 2
                for n, r in items:
                    if not ctx.leases.safe(batch.jobs[n].spool_id, now, margin):
                        results[(n, id(r))] = ClaimLost("lease not renewed: not appended")
                todo = [(n, r) for n, r in items if (n, id(r)) not in results]
                copies = [Copy(r.mail.raw, r.mail.envelope.arrived_at, r.mail.envelope.spool_id,
                               batch.jobs[n].claimed.attempts > 1) for n, r in todo]
                try:
                    out: list[Delivered | GatewayError] | list[Exception] = \
                        await ctx.store.deliver_many(account, copies) if copies else []
                except Exception as exc:  # noqa: BLE001 - a bug: these copies retry, loudly
                    log.exception("event=worker.bug step=deliver account=%s", account)
                    out = [TemporaryFailure(f"internal error: {exc!r}")] * len(todo)
            finally:
                ctx.order.done(batch.key, account)
            for (n, routed), result in zip(todo, out, strict=True):
                results[(n, id(routed))] = result

    await asyncio.gather(*(one(a, items) for a, items in per_account.items()))
    jobs = []
    for n, job in enumerate(batch.jobs):
        if job.failure is None:
            delivered = []
            for routed in job.routed:
                result = results[(n, id(routed))]
                if isinstance(result, Exception):
                    job = job.fail("deliver", result)
                    continue
                _log(job, "delivered", account=routed.service.imap_account, uid=result.uid,
                     uidvalidity=result.uidvalidity, already_there=result.already_there)
                delivered.append((routed, result))
            job = dataclasses.replace(job, delivered=tuple(delivered))
        jobs.append(job)
    return batch.replace(jobs)


async def record_step(ctx: Context, batch: Batch) -> Batch:
    """Every delivered copy of the batch in one transaction; an entry with no failure is
    marked done in it. Copies delivered by an entry that failed elsewhere are recorded too.

    If that transaction fails as a whole, the copies are replayed one per transaction, none
    of them finishing its entry: an entry is marked done afterwards only when every one of
    its copies was recorded (one copy's DONE must never hide a sibling that was not)."""
    now = ctx.clock()
    requests: list[RecordRequest] = []
    owners: list[int] = []
    for n, job in enumerate(batch.jobs):
        last = len(job.delivered) - 1
        for i, (routed, copy) in enumerate(job.delivered):
            finish = i == last and job.failure is None  # the spool entry is done in the same commit
            requests.append(RecordRequest(routed, copy, now, _acknowledgement_maker(ctx, routed, now), finish,
                                          job.claimed.attempts))
            owners.append(n)
    outcomes, finished = await _record_all(ctx.ledger, requests)
    jobs = list(batch.jobs)
    for n, request, outcome in zip(owners, requests, outcomes, strict=True):
        if isinstance(outcome, Exception):
            jobs[n] = jobs[n].fail("record", outcome)
        elif outcome is not None:
            _log(jobs[n], "recorded", service=request.routed.service.code, thread=outcome.reference,
                 rule=request.routed.decision.rule.value, opened=outcome.opened)
    for n, job in enumerate(jobs):
        # Not finished in the record transaction: every copy recorded before, or replayed.
        if job.failure is None and (not job.delivered or not finished):
            try:
                if not await ctx.ledger.mark_done(job.spool_id, now, attempts=job.claimed.attempts):
                    jobs[n] = job.fail("record", ClaimLost("no longer claimed by this worker"))
            except DatabaseUnavailable as exc:
                jobs[n] = job.fail("record", exc)
    return batch.replace(jobs)


async def _record_all(ledger: SqlLedger, requests: list[RecordRequest]
                      ) -> tuple[list[Recorded | None | Exception], bool]:
    """One transaction for all; if it fails as a whole (say a concurrent instance recorded one
    of the copies), each is replayed alone, without finishing any entry, so each copy gets its
    own outcome. Returns the outcomes and whether the entries asked to be finished were (the
    one transaction committed). A database that cannot be reached fails the whole batch at
    once: replaying every copy against it would only wait N times."""
    if not requests:
        return [], True
    try:
        return list(await ledger.record_many(requests)), True
    except DatabaseUnavailable as exc:
        log.warning("event=worker.record_batch_failed count=%d error=%r", len(requests), exc.detail)
        return [exc] * len(requests), False
    except Exception as exc:  # noqa: BLE001 - replayed one by one below
        log.warning("event=worker.record_batch_failed count=%d error=%r", len(requests), exc,
                    exc_info=not isinstance(exc, GatewayError))
    outcomes: list[Recorded | None | Exception] = []
    for r in requests:
        if outcomes and isinstance(outcomes[-1], DatabaseUnavailable):
            outcomes.append(outcomes[-1])  # the database went away meanwhile: no more waits
            continue
        try:
            outcomes.append(await ledger.record(r.routed, r.delivered, r.now, r.outgoing, False,
                                                r.attempts))
        except Exception as exc:  # noqa: BLE001 - that entry retries (or is a bug, logged there)
            outcomes.append(exc)
    return outcomes, False


STEPS: tuple[tuple[str, Callable[[Context, Batch], Awaitable[Batch]]], ...] = (
    ("parse", parse_step),
    ("route", route_step),
    ("deliver", deliver_step),
    ("record", record_step),
)


def _acknowledgement_maker(ctx: Context, routed: Routed,
                          now: dt.datetime) -> Callable[[int, str, int], Outgoing | None]:
    s = ctx.settings
    mail = routed.mail

    def make(thread_id: int, reference: str, sent_today: int) -> Outgoing | None:
        decision = decide_acknowledgement(mail, routed.service, enabled=s.acknowledge,
                                          sent_today=sent_today, per_day=s.acknowledgements_per_day,
                                          own_domain=s.domain)
        if not decision.send:
            _log_mail(mail, "acknowledgement_skipped", reason=decision.reason)
            return None
        local = routed.service.address.split("@")[0] or "balf"
        try:
            content = render_acknowledgement(
                mail, routed.service, reference=reference,
                reply_to=tokens.reply_address(s.secret, local, s.domain, thread_id),
                message_id=tokens.make_message_id(s.secret, s.domain, thread_id),
                portal_url=s.portal_url, now=now)
        except Exception as exc:  # noqa: BLE001 - no acknowledgement; the message is still recorded
            log.error("event=worker.acknowledgement_failed spool_id=%s service=%s error=%r",
                      mail.envelope.spool_id, routed.service.code, exc)
            return None
        return Outgoing("acknowledgement", f"ack:{mail.envelope.spool_id}:{routed.service.id}",
                        routed.service.address or f"balf@{s.domain}", mail.envelope.mail_from, content)
    return make


# --- running the steps --------------------------------------------------------------------

async def process_batch(ctx: Context, batch: Batch) -> list[str]:
    """Run a batch through STEPS; one outcome per entry: "done", "retry", "dead" or "lost"
    (claimed again elsewhere: left as it is)."""
    try:
        return await _process_batch(ctx, batch)
    finally:
        ctx.leases.release([j.spool_id for j in batch.jobs])


async def _process_batch(ctx: Context, batch: Batch) -> list[str]:
    try:
        for name, step in STEPS:
            try:
                batch = await step(ctx, batch)
            except Exception as exc:  # a bug must not lose the messages: retry them, loudly
                log.exception("event=worker.bug step=%s spool_ids=%s", name,
                              ",".join(j.spool_id for j in batch.live()))
                batch = batch.replace([j.fail(name, TemporaryFailure(f"internal error: {exc!r}"))
                                       for j in batch.jobs])
            if not batch.live() and not any(j.delivered for j in batch.jobs):
                break
    finally:
        ctx.order.done(batch.key)
    ctx.batches += 1
    return [await _outcome(ctx, job) for job in batch.jobs]


async def _outcome(ctx: Context, job: Job) -> str:
    exc = job.failure
    if isinstance(exc, ClaimLost):
        return _lost(job, job.failed_step, exc.detail)
    if exc is None:
        ctx.breaker.reset()
        ctx.delivered += 1
        _log(job, "done", attempts=job.claimed.attempts)
        return "done"
    if isinstance(exc, PermanentFailure):
        return await _dead(ctx, job, f"{job.failed_step}: {exc.detail}")
    if isinstance(exc, TemporaryFailure):
        return await _retry(ctx, job, job.failed_step, exc)
    log.error("event=worker.bug spool_id=%s step=%s error=%r", job.spool_id, job.failed_step, exc)
    return await _retry(ctx, job, job.failed_step, TemporaryFailure(f"internal error: {exc!r}"))


def _lost(job: Job, step: str, detail: str) -> str:
    _log(job, "claim_lost", level=logging.WARNING, step=step, detail=detail,
         attempts=job.claimed.attempts)
    return "lost"


async def _dead(ctx: Context, job: Job, reason: str) -> str:
    try:
        if not await ctx.ledger.dead_letter(job.spool_id, reason, ctx.clock(), attempts=job.claimed.attempts):
            return _lost(job, "dead_letter", reason)
    except DatabaseUnavailable:
        return "retry"  # the lease expires and the entry is tried again
    ctx.dead += 1
    _log(job, "dead_letter", level=logging.ERROR, reason=reason)
    return "dead"


async def _retry(ctx: Context, job: Job, step: str, exc: TemporaryFailure) -> str:
    now = ctx.clock()
    s = ctx.settings
    age = (now - job.claimed.received_at).total_seconds()
    if age > s.retry_max_age:
        return await _dead(ctx, job, f"{step}: gave up after {age:.0f} s: {exc.detail}")
    loop_now = asyncio.get_running_loop().time()
    if isinstance(exc, StoreDown | DatabaseUnavailable):
        pause = ctx.breaker.trip(loop_now)
        next_at = now  # stays due: claimed again oldest first once the breaker closes
    else:
        pause = 0.0
        next_at = now + dt.timedelta(seconds=min(s.retry_delay * 2 ** (job.claimed.attempts - 1),
                                                 s.retry_max_delay))
    try:
        if not await ctx.ledger.reschedule(job.spool_id, f"{step}: {exc.detail}", next_at,
                                           attempts=job.claimed.attempts):
            return _lost(job, "retry", exc.detail)
    except DatabaseUnavailable:
        ctx.breaker.trip(loop_now)
    _log(job, "retry", level=logging.WARNING, step=step, error=exc.detail,
         attempts=job.claimed.attempts, pause=round(pause, 2), next_attempt=next_at.isoformat())
    return "retry"


def _log(job: Job, event: str, level: int = logging.INFO, **fields: object) -> None:
    if not log.isEnabledFor(level):
        return
    mid = job.mail.message_id if job.mail else None
    extra = " ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in fields.items())
    log.log(level, "event=worker.%s spool_id=%s message_id=%r %s", event, job.spool_id, mid, extra)


def _log_mail(mail: InboundMail, event: str, **fields: object) -> None:
    if not log.isEnabledFor(logging.INFO):
        return
    extra = " ".join(f"{k}={v!r}" for k, v in fields.items())
    log.info("event=worker.%s spool_id=%s message_id=%r %s", event, mail.envelope.spool_id,
             mail.message_id, extra)


def _accounts(ctx: Context, claimed: Claimed) -> list[str]:
    table = ctx.services()
    if table is None:
        return []
    return [t.service.imap_account for t in
            resolve_recipients(claimed.message.envelope.recipients, table, ctx.settings.secret)]


async def claim_batch(ctx: Context) -> Batch | None:
    """Claim the oldest due entries (none this worker still has in flight), note their
    leases and take their mailbox tickets (in claim order)."""
    until = asyncio.get_running_loop().time() + ctx.settings.lease  # taken before the claim
    claimed = await ctx.ledger.claim(ctx.settings.batch, ctx.settings.lease, ctx.clock(),
                                     exclude=ctx.leases.held)
    if not claimed:
        return None
    ctx.leases.add(claimed, until)
    batch = Batch(f"batch:{claimed[0].message.envelope.spool_id}", tuple(Job(c) for c in claimed))
    accounts: list[str] = []
    for c in claimed:
        accounts.extend(_accounts(ctx, c))
    ctx.order.take(batch.key, accounts)
    return batch


async def deliver_loop(ctx: Context, stop: asyncio.Event, wake: asyncio.Event | None = None) -> None:
    """Claim and deliver until ``stop`` is set. Batches and the lease renewal run in one
    TaskGroup; at stop, in-flight batches get ``stop_grace`` seconds to finish, then are
    cancelled (left claimed: their lease expires, or the next start releases them, and they
    are run again, idempotently)."""
    loop = asyncio.get_running_loop()
    running: set[asyncio.Task[None]] = set()
    idle = asyncio.Event()  # set when the loop has ended and no batch is left: renewal stops
    async with asyncio.TaskGroup() as tg:
        tg.create_task(renew_leases(ctx, idle))
        try:
            while not stop.is_set():
                if loop.time() < ctx.breaker.until:
                    await _wait(stop, ctx.breaker.until - loop.time())
                    continue
                if len(running) >= ctx.settings.batches_in_flight:
                    await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                    continue
                try:
                    batch = await claim_batch(ctx)
                except DatabaseUnavailable as exc:
                    delay = ctx.breaker.trip(loop.time())
                    log.warning("event=worker.database_down error=%r pause=%.1f", exc.detail, delay)
                    continue
                if batch is None:
                    await _wait(stop, ctx.settings.idle_poll if not running else 0.05, wake)
                    continue
                task = tg.create_task(_run_batch(ctx, batch))
                running.add(task)
                task.add_done_callback(running.discard)
                await asyncio.sleep(0)
        finally:
            if running:
                _, late = await asyncio.wait(running, timeout=ctx.settings.stop_grace)
                for task in late:
                    log.warning("event=worker.batch_cancelled_at_stop grace=%.1f", ctx.settings.stop_grace)
                    task.cancel()
            idle.set()


async def _run_batch(ctx: Context, batch: Batch) -> None:
    """One batch as a task of deliver_loop's group: a bug is logged, never raised into the
    group (that would stop every other batch); its entries stay claimed and run again."""
    try:
        await process_batch(ctx, batch)
    except Exception:  # noqa: BLE001 - see above
        log.exception("event=worker.bug step=batch spool_ids=%s", ",".join(j.spool_id for j in batch.jobs))


async def renew_leases(ctx: Context, stop: asyncio.Event) -> None:
    """Every ``lease / 4`` seconds, extend the leases of the entries in flight (one UPDATE);
    entries found claimed again elsewhere are marked lost (their batch drops them)."""
    loop = asyncio.get_running_loop()
    every = max(ctx.settings.lease / 4, 0.05)
    while not stop.is_set():
        await _wait(stop, every)
        asked = list(ctx.leases.held.items())
        if not asked:
            continue
        until = loop.time() + ctx.settings.lease  # taken before the UPDATE
        try:
            kept = await ctx.ledger.renew(asked, ctx.settings.lease, ctx.clock())
        except DatabaseUnavailable as exc:
            # Not renewed: the APPENDs not yet started wait for a renewal (Leases.safe).
            log.warning("event=worker.lease_renewal_failed count=%d error=%r", len(asked), exc.detail)
            continue
        for spool_id in ctx.leases.renewed(asked, kept, until):
            log.warning("event=worker.claim_lost spool_id=%s step=renew", spool_id)


async def _wait(stop: asyncio.Event, timeout: float, wake: asyncio.Event | None = None) -> None:
    """Until ``stop`` (or ``wake``) is set or ``timeout`` seconds pass."""
    events = [stop] if wake is None else [stop, wake]
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, timeout=max(timeout, 0.0), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
    if wake is not None:
        wake.clear()


# --- spool files -> database rows ----------------------------------------------------------

async def index_spool(spool: FileSpool, ledger: SqlLedger, *, batch: int = 256) -> int:
    """Index every spool file in the database and remove the files; returns how many.

    Only :class:`DatabaseUnavailable` is raised (the files stay and are indexed later). A file
    that cannot be read, or whose row the database refuses (DataError, IntegrityError...), is
    moved to ``corrupt/`` with the reason logged, and indexing goes on: one bad file must not
    stop the indexer (nor, at every restart, the daemon)."""
    done = 0
    while True:
        paths = []
        for path in spool.pending():
            paths.append(path)
            if len(paths) >= batch:
                break
        if not paths:
            return done
        # One thread hop for the whole batch: a hop per file costs the listener's loop more
        # than the reads themselves.
        found = await asyncio.to_thread(_read_files, spool, paths)
        try:
            await ledger.index([m for _, m in found])
        except DatabaseUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - a row refused: find which, one by one
            log.warning("event=spool.index_batch_refused count=%d error=%r", len(found), exc)
            found = await _index_one_by_one(spool, ledger, found)
        await asyncio.to_thread(spool.remove_files, [p for p, _ in found])
        for _, m in found:
            log.debug("event=spool.indexed spool_id=%s", m.envelope.spool_id)
        done += len(found)
        if len(paths) < batch:
            return done


def _read_files(spool: FileSpool, paths: list[Path]) -> list[tuple[Path, SpooledMessage]]:
    """Read spool files (in a worker thread); unreadable ones go to ``corrupt/``, vanished ones
    (indexed meanwhile by another pass) are skipped."""
    found: list[tuple[Path, SpooledMessage]] = []
    for path in paths:
        try:
            found.append((path, spool.read(path)))
        except FileNotFoundError:
            continue
        except PermanentFailure as exc:
            spool.quarantine(path, exc.detail)
        except OSError as exc:
            spool.quarantine(path, f"unreadable: {exc!r}")
    return found


async def _index_one_by_one(spool: FileSpool, ledger: SqlLedger,
                            found: list[tuple[Path, SpooledMessage]]) -> list[tuple[Path, SpooledMessage]]:
    """Index each file alone; those the database refuses go to ``corrupt/``. Returns the
    indexed ones."""
    kept = []
    for path, message in found:
        try:
            await ledger.index([message])
        except DatabaseUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - this row can never be indexed as it is
            await asyncio.to_thread(spool.quarantine, path, f"database refused the row: {exc!r}"[:1000])
            continue
        kept.append((path, message))
    return kept


async def index_loop(spool: FileSpool, ledger: SqlLedger, stop: asyncio.Event,
                     indexed: asyncio.Event, breaker_base: float = 1.0) -> None:
    """Keep the database index in step with the spool directory until ``stop``."""
    breaker = Breaker(breaker_base, cap=30.0)
    while not stop.is_set():
        spool.new_entries.clear()
        try:
            if await index_spool(spool, ledger):
                indexed.set()
            breaker.reset()
        except DatabaseUnavailable as exc:
            delay = breaker.trip(asyncio.get_running_loop().time())
            log.warning("event=spool.index_waiting error=%r pause=%.1f", exc.detail, delay)
            await _wait(stop, delay)
            continue
        await _wait(stop, 1.0, spool.new_entries)
    try:
        await index_spool(spool, ledger)  # what arrived during shutdown
    except DatabaseUnavailable:
        pass  # the files stay; indexed at next start


async def deliver_until_empty(ctx: Context, spool: FileSpool | None = None,
                              timeout: float = 60.0) -> None:
    """Tests and `balf spool retry --now`: index, then deliver until nothing is due."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if spool is not None:
            await index_spool(spool, ctx.ledger)
        if loop.time() < ctx.breaker.until:
            await asyncio.sleep(min(ctx.breaker.until - loop.time(), 0.5))
            continue
        batch = await claim_batch(ctx)
        if batch is None:
            return
        await process_batch(ctx, batch)
    raise TimeoutError("spool not empty after deliver_until_empty timeout")
