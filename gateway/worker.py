"""Delivery workers (I/O through the ledger and the store): spool file -> database -> IMAP.

Two loops:

* ``index_spool`` moves acknowledged spool files into ``spool_entries`` rows (bytes included)
  as soon as the database answers, then removes the files. The file is the durable record
  before 250 (it needs no database); the row is what instances sharing PostgreSQL claim.
* ``deliver_loop`` claims due rows in arrival order and runs each through ``STEPS``; every step
  is idempotent, so an entry interrupted anywhere (kill -9 included) is simply run again.

Arrival order per mailbox is kept by a ticket chain per IMAP account: an entry appends to a
mailbox only after every entry claimed before it for that mailbox has finished its attempt.
When the IMAP server (or the database) is down, a shared breaker pauses claiming and the entries
stay due, so when it comes back they are claimed again oldest first.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from balf.gateway import tokens
from balf.gateway.acknowledgement import decide_acknowledgement, render_acknowledgement
from balf.gateway.errors import (
    DatabaseUnavailable,
    GatewayError,
    PermanentFailure,
    StoreDown,
    TemporaryFailure,
)
from balf.gateway.ledger import Claimed, Recorded, RecordRequest, SqlLedger
from balf.gateway.model import Delivered, InboundMail, Outgoing, Routed, Target
from balf.gateway.parse import parse_mail
from balf.gateway.services import ServiceTable, resolve_recipients
from balf.gateway.spool import FileSpool
from balf.gateway.store import MailStore
from balf.gateway.threads import match_thread

log = logging.getLogger("balf.gateway.worker")


@dataclass(frozen=True)
class WorkerSettings:
    secret: bytes
    domain: str
    workers: int = 4
    batch: int = 32
    lease: float = 300.0
    retry_delay: float = 5.0
    retry_max_delay: float = 600.0
    retry_max_age: float = 432000.0
    acknowledge: bool = True
    acknowledgements_per_day: int = 3
    portal_url: str = "https://www.impots.gouv.fr/"
    idle_poll: float = 1.0


@dataclass(frozen=True)
class Job:
    """One claimed entry on its way through the steps."""

    claimed: Claimed
    mail: InboundMail | None = None
    targets: tuple[Target, ...] = ()
    routed: tuple[Routed, ...] = ()
    delivered: tuple[tuple[Routed, Delivered], ...] = ()
    failure: GatewayError | None = None

    @property
    def spool_id(self) -> str:
        return self.claimed.message.envelope.spool_id


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


class Recorder:
    """Group commit for delivery records: the records of concurrent workers share a transaction.

    While one batch commits, the next accumulates; a batch that fails as a whole (say a
    concurrent instance recorded one of its copies) is replayed one record at a time so each
    worker gets its own outcome.
    """

    def __init__(self, ledger: SqlLedger, max_batch: int = 64) -> None:
        self.ledger = ledger
        self.max_batch = max_batch
        self._pending: list[tuple[RecordRequest, asyncio.Future[Recorded | None]]] = []
        self._task: asyncio.Task[None] | None = None
        self.commits = 0

    async def record(self, request: RecordRequest) -> Recorded | None:
        fut: asyncio.Future[Recorded | None] = asyncio.get_running_loop().create_future()
        self._pending.append((request, fut))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())
        return await fut

    async def _run(self) -> None:
        while self._pending:
            await asyncio.sleep(0)  # let the workers that are ready join this batch
            batch, self._pending = self._pending[:self.max_batch], self._pending[self.max_batch:]
            try:
                results = await self.ledger.record_many([r for r, _ in batch])
                self.commits += 1
            except Exception:  # noqa: BLE001 - replayed one by one, each waiter gets its own error
                for request, fut in batch:
                    try:
                        result = await self.ledger.record(request.routed, request.delivered, request.now,
                                                          request.outgoing, request.finish)
                    except Exception as exc:  # noqa: BLE001
                        if not fut.done():
                            fut.set_exception(exc)
                    else:
                        if not fut.done():
                            fut.set_result(result)
                continue
            for (_, fut), result in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_result(result)


@dataclass
class Context:
    settings: WorkerSettings
    ledger: SqlLedger
    store: MailStore
    services: Callable[[], ServiceTable | None]
    clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC)
    order: MailboxOrder = field(default_factory=MailboxOrder)
    breaker: Breaker = field(default_factory=lambda: Breaker(1.0))
    delivered: int = 0
    dead: int = 0
    slots: asyncio.Semaphore | None = None
    recorder: Recorder | None = None


# --- the steps, in order ------------------------------------------------------------------

async def parse_step(ctx: Context, job: Job) -> Job:
    msg = job.claimed.message
    mail = parse_mail(msg.raw, msg.envelope, msg.sha256)
    table = ctx.services()
    if table is None:
        raise DatabaseUnavailable("service directory not loaded")
    targets = resolve_recipients(msg.envelope.recipients, table, ctx.settings.secret)
    if not targets:
        raise PermanentFailure("no recipient belongs to a known service any more")
    return dataclasses.replace(job, mail=mail, targets=targets)


async def route_step(ctx: Context, job: Job) -> Job:
    assert job.mail is not None
    recorded, found = await ctx.ledger.lookups(job.mail, job.targets)
    pending = [t for t in job.targets if t.service.id not in recorded]  # others: done earlier
    routed = []
    for target, candidates in zip(pending, found, strict=True):
        service = target.service
        if candidates.by_token is not None and candidates.by_token.service_id != service.id:
            # The thread was transferred: its replies go to the service that has it now.
            table = ctx.services()
            moved = next((s for s in (table.by_address.values() if table else ())
                          if s.id == candidates.by_token.service_id), None)
            service = moved or service
        routed.append(Routed(job.mail, service, match_thread(job.mail, service, candidates)))
    return dataclasses.replace(job, routed=tuple(routed))


async def deliver_step(ctx: Context, job: Job) -> Job:
    assert job.mail is not None
    delivered: list[tuple[Routed, Delivered]] = []
    failure: GatewayError | None = None
    for routed in job.routed:
        account = routed.service.imap_account
        await ctx.order.wait_turn(job.spool_id, account)
        try:
            copy = await ctx.store.deliver(
                account, job.mail.raw, internaldate=job.mail.envelope.arrived_at,
                spool_id=job.spool_id, check_existing=job.claimed.attempts > 1)
        except GatewayError as exc:
            failure = failure or exc
            continue
        finally:
            ctx.order.done(job.spool_id, account)
        _log(job, "delivered", account=account, uid=copy.uid, uidvalidity=copy.uidvalidity,
             already_there=copy.already_there)
        delivered.append((routed, copy))
    return dataclasses.replace(job, delivered=tuple(delivered), failure=failure)


async def record_step(ctx: Context, job: Job) -> Job:
    now = ctx.clock()
    last = len(job.delivered) - 1
    for i, (routed, copy) in enumerate(job.delivered):
        finish = i == last and job.failure is None  # the spool entry is done in the same commit
        if ctx.recorder is None:
            ctx.recorder = Recorder(ctx.ledger)
        rec = await ctx.recorder.record(RecordRequest(
            routed, copy, now, _acknowledgement_maker(ctx, routed, now), finish))
        if rec is not None:
            _log(job, "recorded", service=routed.service.code, thread=rec.reference,
                 rule=routed.decision.rule.value, opened=rec.opened)
    if job.failure is not None:
        raise job.failure
    if not job.delivered:
        await ctx.ledger.mark_done(job.spool_id, now)
    return dataclasses.replace(job, routed=())


STEPS: tuple[tuple[str, Callable[[Context, Job], Awaitable[Job]]], ...] = (
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
        content = render_acknowledgement(
            mail, routed.service, reference=reference,
            reply_to=tokens.reply_address(s.secret, local, s.domain, thread_id),
            message_id=tokens.make_message_id(s.secret, s.domain, thread_id),
            portal_url=s.portal_url, now=now)
        return Outgoing("acknowledgement", f"ack:{mail.envelope.spool_id}:{routed.service.id}",
                        routed.service.address or f"balf@{s.domain}", mail.envelope.mail_from, content)
    return make


# --- running the steps --------------------------------------------------------------------

async def process(ctx: Context, claimed: Claimed) -> str:
    """Run one claimed entry through STEPS; returns "done", "retry" or "dead"."""
    job = Job(claimed)
    step_name = ""
    try:
        for name, step in STEPS:
            step_name = name
            job = await step(ctx, job)
        ctx.breaker.reset()
        ctx.delivered += 1
        _log(job, "done", attempts=claimed.attempts)
        return "done"
    except PermanentFailure as exc:
        return await _dead(ctx, job, f"{_step_of(job, exc, step_name)}: {exc.detail}")
    except TemporaryFailure as exc:
        return await _retry(ctx, job, _step_of(job, exc, step_name), exc)
    except Exception as exc:  # a bug must not lose the message: retry it, loudly
        log.exception("event=worker.bug spool_id=%s step=%s", job.spool_id, step_name)
        return await _retry(ctx, job, step_name, TemporaryFailure(f"internal error: {exc!r}"))
    finally:
        ctx.order.done(job.spool_id)


def _step_of(job: Job, exc: Exception, step_name: str) -> str:
    return "deliver" if job.failure is exc else step_name


async def _dead(ctx: Context, job: Job, reason: str) -> str:
    try:
        await ctx.ledger.dead_letter(job.spool_id, reason, ctx.clock())
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
        await ctx.ledger.reschedule(job.spool_id, f"{step}: {exc.detail}", next_at)
    except DatabaseUnavailable:
        ctx.breaker.trip(loop_now)
    _log(job, "retry", level=logging.WARNING, step=step, error=exc.detail,
         attempts=job.claimed.attempts, pause=round(pause, 2), next_attempt=next_at.isoformat())
    return "retry"


def _log(job: Job, event: str, level: int = logging.INFO, **fields: object) -> None:
    mid = job.mail.message_id if job.mail else None
    extra = " ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in fields.items())
    log.log(level, "event=worker.%s spool_id=%s message_id=%r %s", event, job.spool_id, mid, extra)


def _log_mail(mail: InboundMail, event: str, **fields: object) -> None:
    extra = " ".join(f"{k}={v!r}" for k, v in fields.items())
    log.info("event=worker.%s spool_id=%s message_id=%r %s", event, mail.envelope.spool_id,
             mail.message_id, extra)


def _accounts(ctx: Context, claimed: Claimed) -> list[str]:
    table = ctx.services()
    if table is None:
        return []
    return [t.service.imap_account for t in
            resolve_recipients(claimed.message.envelope.recipients, table, ctx.settings.secret)]


async def deliver_batch(ctx: Context, tasks: set[asyncio.Task[str]]) -> int:
    """Claim up to the free worker slots and start them; returns how many were claimed."""
    free = ctx.settings.workers * 2 - len(tasks)
    if free <= 0:
        return 0
    claimed = await ctx.ledger.claim(min(free, ctx.settings.batch), ctx.settings.lease, ctx.clock())
    for c in claimed:
        ctx.order.take(c.message.envelope.spool_id, _accounts(ctx, c))
        task = asyncio.create_task(_bounded(ctx, c))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    return len(claimed)


async def _bounded(ctx: Context, claimed: Claimed) -> str:
    if ctx.slots is None:
        ctx.slots = asyncio.Semaphore(ctx.settings.workers)
    async with ctx.slots:
        return await process(ctx, claimed)


async def deliver_loop(ctx: Context, stop: asyncio.Event, wake: asyncio.Event | None = None) -> None:
    """Claim and deliver until ``stop`` is set; in-flight entries are finished (or, past the
    grace period, left claimed: their lease expires and they are run again, idempotently)."""
    tasks: set[asyncio.Task[str]] = set()
    loop = asyncio.get_running_loop()
    try:
        while not stop.is_set():
            if loop.time() < ctx.breaker.until:
                await _wait(stop, ctx.breaker.until - loop.time())
                continue
            try:
                n = await deliver_batch(ctx, tasks)
            except DatabaseUnavailable as exc:
                delay = ctx.breaker.trip(loop.time())
                log.warning("event=worker.database_down error=%r pause=%.1f", exc.detail, delay)
                continue
            if n == 0:
                await _wait(stop, ctx.settings.idle_poll if not tasks else 0.05, wake)
            else:
                await asyncio.sleep(0)
    finally:
        if tasks:
            await asyncio.wait(tasks, timeout=10)


async def _wait(stop: asyncio.Event, timeout: float, wake: asyncio.Event | None = None) -> None:
    waiters = [asyncio.ensure_future(stop.wait())]
    if wake is not None:
        waiters.append(asyncio.ensure_future(wake.wait()))
    done, pending = await asyncio.wait(waiters, timeout=max(timeout, 0.0),
                                       return_when=asyncio.FIRST_COMPLETED)
    for w in pending:
        w.cancel()
    if wake is not None:
        wake.clear()


# --- spool files -> database rows ----------------------------------------------------------

async def index_spool(spool: FileSpool, ledger: SqlLedger, *, batch: int = 256) -> int:
    """Index every spool file in the database and remove the files; returns how many."""
    done = 0
    while True:
        paths = []
        for path in spool.pending():
            paths.append(path)
            if len(paths) >= batch:
                break
        if not paths:
            return done
        messages = []
        for path in paths:
            try:
                messages.append(spool.read(path))
            except FileNotFoundError:
                continue
            except PermanentFailure as exc:
                spool.quarantine(path, exc.detail)
        await ledger.index(messages)
        await asyncio.to_thread(spool.remove, [m.envelope.spool_id for m in messages])
        for m in messages:
            log.debug("event=spool.indexed spool_id=%s", m.envelope.spool_id)
        done += len(messages)
        if len(paths) < batch:
            return done


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
    tasks: set[asyncio.Task[str]] = set()
    while loop.time() < deadline:
        if spool is not None:
            await index_spool(spool, ctx.ledger)
        if loop.time() < ctx.breaker.until:
            await asyncio.sleep(min(ctx.breaker.until - loop.time(), 0.5))
            continue
        n = await deliver_batch(ctx, tasks)
        if n == 0 and not tasks:
            return
        if tasks:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    raise TimeoutError("spool not empty after deliver_until_empty timeout")
