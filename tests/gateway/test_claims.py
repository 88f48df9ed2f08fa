"""Claims are leases that live workers renew and that every write checks (both databases, the
private Dovecot): a worker whose lease ended changes nothing, a slow APPEND keeps its entry,
two gateways sharing PostgreSQL and Dovecot deliver each message once; `balf spool retry`
leaves an entry being delivered alone; the daily acknowledgement count is the Paris day; the
delivery loop leaves no task behind at stop."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select

from balf.cli.group import cli
from balf.db.engine import create_engine, session_factory
from balf.db.models import Message, NotificationOutbox, Service, ServiceAddress, ServiceKind, SpoolEntry, SpoolState
from balf.gateway.daemon import make_store
from balf.gateway.errors import GatewayError
from balf.gateway.ledger import ClaimLost, RecordRequest, SqlLedger
from balf.gateway.model import Delivered, Envelope, OpenThread, Outgoing, Routed, ServiceRef, SpooledMessage
from balf.gateway.parse import parse_mail, sha256_of
from balf.gateway.store import Copy, ImapStore
from balf.gateway.worker import Context, WorkerSettings, deliver_loop
from tests.gateway.conftest import (
    SECRET,
    imap_messages,
    make_config,
    seed_services,
    spool_ids_in,
    wait_spool_state,
)
from tests.gateway.test_live import message, smtp_send

T0 = dt.datetime(2026, 1, 15, 10, 0, tzinfo=dt.UTC)


def raw_with_id(spool_id: str, to: str, n: int = 0) -> bytes:
    """A message as the listener spools it: our Received header names the spool id."""
    return (f"Received: from x by mx.balf.test (balf) with ESMTP id {spool_id};\r\n"
            f"\tThu, 15 Jan 2026 10:00:00 +0000\r\n").encode() + \
        message("jean@exemple.fr", to, f"sujet {n}", mid=f"<{spool_id.lower()}@exemple.fr>")


async def index_entries(ledger: SqlLedger, ids: Sequence[str], to: str,
                        at: dt.datetime = T0) -> None:
    msgs = []
    for n, spool_id in enumerate(ids):
        raw = raw_with_id(spool_id, to, n)
        msgs.append(SpooledMessage(Envelope(spool_id, "jean@exemple.fr", (to,),
                                            at + dt.timedelta(milliseconds=n)), raw, sha256_of(raw)))
    await ledger.index(msgs)


async def add_service(engine: Any, account: str = "sip-nobody") -> ServiceRef:
    address = "service0@balf.test"
    async with session_factory(engine).begin() as s:
        svc = Service(code="SIP00000", kind=ServiceKind.SIP, department="75", name="SIP Paris",
                      imap_account=account)
        svc.addresses.append(ServiceAddress(address=address, address_key=address))
        s.add(svc)
        await s.flush()
        return ServiceRef(svc.id, svc.code, svc.name, account, True, address)


async def entry(engine: Any, spool_id: str) -> SpoolEntry:
    async with session_factory(engine)() as s:
        row = await s.get(SpoolEntry, spool_id)
        assert row is not None
        return row


def no_acknowledgement(thread_id: int, reference: str, sent_today: int) -> Outgoing | None:
    return None


# --- 1. a late result of an expired claim never applies -------------------------------------------

async def test_late_results_of_an_expired_claim_do_not_apply(db_engine: Any) -> None:
    service = await add_service(db_engine)
    a = SqlLedger(db_engine, secret=SECRET.encode(), domain="balf.test", instance="gw-a")
    b = SqlLedger(db_engine, secret=SECRET.encode(), domain="balf.test", instance="gw-b")
    await index_entries(a, ["E1", "E2"], service.address)

    claimed_a = {c.spool_id: c for c in await a.claim(10, 1.0, T0 + dt.timedelta(seconds=0.1))}
    assert set(claimed_a) == {"E1", "E2"}
    # Within A's lease, B gets nothing; past it (A stalled on a hung Dovecot), B claims both.
    assert await b.claim(10, 60.0, T0 + dt.timedelta(seconds=0.6)) == []
    later = T0 + dt.timedelta(seconds=2)
    claimed_b = {c.spool_id: c for c in await b.claim(10, 60.0, later)}
    assert set(claimed_b) == {"E1", "E2"}
    assert claimed_b["E1"].attempts == claimed_a["E1"].attempts + 1

    # A comes back: nothing it writes applies, not even re-queueing or finishing.
    e1 = claimed_a["E1"]
    assert await a.mark_done("E1", later, attempts=e1.attempts) is False
    assert await a.reschedule("E1", "deliver: late", later, attempts=e1.attempts) is False
    assert await a.dead_letter("E1", "deliver: late", later, attempts=e1.attempts) is False
    mail = parse_mail(e1.message.raw, e1.message.envelope, e1.message.sha256)
    routed = Routed(mail, service, OpenThread())
    [outcome] = await a.record_many([RecordRequest(routed, Delivered("INBOX", 1, 1), later,
                                                   no_acknowledgement, True, e1.attempts)])
    assert isinstance(outcome, ClaimLost)
    assert isinstance(await a.record(routed, Delivered("INBOX", 1, 1), later, no_acknowledgement,
                                     True, e1.attempts), ClaimLost)
    assert await a.renew([("E1", e1.attempts)], 60.0, later) == set()
    row = await entry(db_engine, "E1")
    assert (row.state, row.claimed_by, row.last_error) == (SpoolState.QUEUED, "gw-b", None)
    async with session_factory(db_engine)() as s:
        assert (await s.execute(select(func.count()).select_from(Message))).scalar_one() == 0

    # B, the holder, can.
    e1b = claimed_b["E1"]
    assert await b.renew([("E1", e1b.attempts), ("E2", claimed_b["E2"].attempts)], 60.0, later) == {"E1", "E2"}
    [done] = await b.record_many([RecordRequest(routed, Delivered("INBOX", 1, 1), later,
                                                no_acknowledgement, True, e1b.attempts)])
    assert done is not None and not isinstance(done, Exception)
    assert (await entry(db_engine, "E1")).state == SpoolState.DONE
    assert await b.reschedule("E2", "deliver: x", later, attempts=claimed_b["E2"].attempts) is True


async def test_a_worker_never_uses_its_own_expired_claim(db_engine: Any) -> None:
    """The same instance claiming an entry again (its lease ended) gets a new claim number:
    the batch that still holds the old one cannot finish or re-queue it."""
    a = SqlLedger(db_engine, secret=SECRET.encode(), domain="balf.test", instance="gw-a")
    await index_entries(a, ["S1"], "service0@balf.test")
    [old] = await a.claim(10, 1.0, T0)
    [new] = await a.claim(10, 60.0, T0 + dt.timedelta(seconds=5))
    assert new.attempts == old.attempts + 1
    assert await a.reschedule("S1", "late", T0, attempts=old.attempts) is False
    assert await a.mark_done("S1", T0, attempts=new.attempts) is True
    # A process never claims again what it has in flight, whatever the lease says.
    await index_entries(a, ["S2"], "service0@balf.test")
    assert await a.claim(10, 1.0, T0, exclude=["S2"]) == []


# --- the worker renews its leases: a slow Dovecot does not let another instance in -----------------

class SlowStore:
    """The real IMAP store, after a stall (a Dovecot that hangs before answering)."""

    def __init__(self, inner: ImapStore, stall: float) -> None:
        self.inner, self.stall = inner, stall
        self.started = asyncio.Event()

    async def deliver(self, account: str, raw: bytes, **kw: Any) -> Delivered:
        raise NotImplementedError

    async def deliver_many(self, account: str, copies: Sequence[Copy]) -> list[Delivered | GatewayError]:
        self.started.set()
        await asyncio.sleep(self.stall)
        return await self.inner.deliver_many(account, copies)

    async def close(self) -> None:
        await self.inner.close()


async def test_a_slow_delivery_keeps_its_claim(db_engine: Any, db_url: str, dovecot: Any,
                                               tmp_path: Path) -> None:
    (sip,) = await seed_services(db_engine, dovecot, 1)
    config = make_config(tmp_path, db_url, dovecot)
    lease = 1.0
    a = SqlLedger(db_engine, secret=SECRET.encode(), domain="balf.test", instance="gw-a")
    b = SqlLedger(db_engine, secret=SECRET.encode(), domain="balf.test", instance="gw-b")
    ids = [f"SLOW{i:04d}" for i in range(5)]
    now = dt.datetime.now(dt.UTC)
    await index_entries(a, ids, sip.address, at=now)
    table = await a.load_services()
    store = SlowStore(make_store(config), stall=3 * lease)
    settings = WorkerSettings(secret=SECRET.encode(), domain="balf.test", lease=lease, idle_poll=0.05)
    ctx = Context(settings, a, store, lambda: table)
    stop = asyncio.Event()
    worker = asyncio.create_task(deliver_loop(ctx, stop))
    try:
        await asyncio.wait_for(store.started.wait(), 10)
        # A is stuck in Dovecot for three leases; B keeps trying to claim its entries.
        loop = asyncio.get_running_loop()
        end = loop.time() + 2.5 * lease
        while loop.time() < end:
            assert await b.claim(10, 60.0, dt.datetime.now(dt.UTC)) == [], "B claimed a live entry"
            await asyncio.sleep(0.1)
        await wait_spool_state(db_engine, total=len(ids), timeout=20)
    finally:
        stop.set()
        await asyncio.wait_for(worker, 20)
        await store.close()
    assert spool_ids_in(await asyncio.to_thread(imap_messages, dovecot, sip.account)) == ids
    async with session_factory(db_engine)() as s:
        assert sorted((await s.execute(select(Message.spool_id))).scalars()) == ids
        assert {r for r in (await s.execute(select(SpoolEntry.state))).scalars()} == {SpoolState.DONE}
    assert ctx.delivered == len(ids)


# --- two gateways on one PostgreSQL and one Dovecot ------------------------------------------------

@pytest.fixture
def pg_url(postgres_databases: Any) -> str:
    return str(postgres_databases.fresh())


@pytest.fixture
async def pg_engine(pg_url: str) -> AsyncIterator[Any]:
    engine = create_engine(pg_url)
    yield engine
    await engine.dispose()


@pytest.mark.slow
async def test_two_gateways_deliver_each_message_once(pg_url: str, pg_engine: Any, dovecot: Any,
                                                       tmp_path: Path, gateway_factory: Any) -> None:
    """Two instances (each with its delivery process) share PostgreSQL and Dovecot, with a
    short lease and small batches so that claims interleave; every message ends in IMAP once
    (FETCH) and in ``messages`` once."""
    engine = pg_engine
    sip, sie = await seed_services(engine, dovecot, 2)
    gateways = []
    for name in ("gw-a", "gw-b"):
        config = make_config(tmp_path / name, pg_url, dovecot,
                             gateway={"instance": name, "claim_lease": 0.4, "batch": 4})
        gateways.append(await gateway_factory(config, engine))
    ports = [gw.smtp_server.sockets[0].getsockname()[1] for gw in gateways]

    def client(n: int) -> list[str]:
        out = []
        for i in range(25):
            to = [sip.address] if i % 3 else [sip.address, sie.address]
            out.append(smtp_send(ports[n % 2], "jean@exemple.fr", to, message(
                "jean@exemple.fr", to[0], f"t{n}-{i}", mid=f"<t{n}.{i}@exemple.fr>")))
        return out

    # The clients' own threads: the default executor is the gateways' (spool writes, fsyncs).
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(4) as clients:
        sent = [sid for ids in await asyncio.gather(*(loop.run_in_executor(clients, client, n)
                                                      for n in range(4))) for sid in ids]
    await wait_spool_state(engine, total=len(sent), timeout=120)
    in_sip = spool_ids_in(await asyncio.to_thread(imap_messages, dovecot, sip.account))
    in_sie = spool_ids_in(await asyncio.to_thread(imap_messages, dovecot, sie.account))
    assert sorted(in_sip) == sorted(sent), "a message is missing or stored twice (sip)"
    both = [sid for n in range(4) for i, sid in enumerate(sent[n * 25:(n + 1) * 25]) if not i % 3]
    assert sorted(in_sie) == sorted(both), "a message is missing or stored twice (sie)"
    async with session_factory(engine)() as s:
        recorded = (await s.execute(select(Message.spool_id, Message.service_id))).all()
        claimers = set((await s.execute(select(SpoolEntry.state).distinct())).scalars())
    assert len(recorded) == len(set(recorded)) == len(in_sip) + len(in_sie)
    assert claimers == {SpoolState.DONE}


# --- 2. `balf spool retry` leaves an entry being delivered alone ------------------------------------

async def _claimed_entries(url: str) -> None:
    engine = create_engine(url)
    ledger = SqlLedger(engine, secret=SECRET.encode(), domain="balf.test", instance="gw-a")
    now = dt.datetime.now(dt.UTC)
    await index_entries(ledger, ["LIVE", "DEAD", "STALE"], "service0@balf.test",
                        at=now - dt.timedelta(minutes=10))
    [live] = await ledger.claim(1, 300.0, now)  # being delivered right now
    [dead] = await ledger.claim(1, 300.0, now)
    [stale] = await ledger.claim(1, 1.0, now - dt.timedelta(minutes=5))  # its holder died
    assert (live.spool_id, stale.spool_id, dead.spool_id) == ("LIVE", "STALE", "DEAD")
    assert await ledger.dead_letter("DEAD", "deliver: refused", now, attempts=dead.attempts)
    await engine.dispose()


async def _state(url: str, spool_id: str) -> tuple[SpoolState, str | None]:
    engine = create_engine(url)
    try:
        row = await entry(engine, spool_id)
        return row.state, row.claimed_by
    finally:
        await engine.dispose()


def test_spool_retry_leaves_an_entry_being_delivered_alone(db_url: str, tmp_path: Path) -> None:
    asyncio.run(_claimed_entries(db_url))
    conf = tmp_path / "balf.toml"
    conf.write_text(f'data_dir = "{tmp_path}"\n[database]\nurl = "{db_url}"\n[gateway]\nsecret = "{SECRET}"\n')
    run = lambda *args: CliRunner().invoke(cli, ["--config", str(conf), "spool", *args])  # noqa: E731

    busy = run("retry", "LIVE")
    assert busy.exit_code == 1, busy.output
    assert "LIVE is being delivered by gw-a" in busy.output and "not changed" in busy.output
    assert asyncio.run(_state(db_url, "LIVE")) == (SpoolState.QUEUED, "gw-a")

    assert "1 entry due now" in run("retry", "STALE").output
    assert asyncio.run(_state(db_url, "STALE")) == (SpoolState.QUEUED, None)
    assert "1 entry due now" in run("retry", "DEAD").output
    assert asyncio.run(_state(db_url, "DEAD")) == (SpoolState.QUEUED, None)
    assert run("retry", "NOPE").exit_code == 1


# --- 3. the daily acknowledgement limit counts the Paris day -------------------------------------

async def test_acknowledgements_at_2330_utc_in_winter_count_toward_the_next_paris_day(db_engine: Any) -> None:
    service = await add_service(db_engine)
    ledger = SqlLedger(db_engine, secret=SECRET.encode(), domain="balf.test", instance="t")
    evening = dt.datetime(2026, 1, 15, 22, 40, tzinfo=dt.UTC)  # 23:40 in Paris, 15 January
    async with session_factory(db_engine).begin() as s:
        for n in range(3):
            s.add(NotificationOutbox(dedup_key=f"ack:old{n}", kind="acknowledgement",
                                     to_address="Jean@exemple.fr", content=b"x", created_at=evening))
    await index_entries(ledger, ["P1", "P2"], service.address, at=evening)
    seen: dict[str, int] = {}

    async def record(spool_id: str, now: dt.datetime) -> None:
        e = await entry(db_engine, spool_id)
        raw = bytes(e.content or b"")
        env = Envelope(spool_id, "jean@exemple.fr", (service.address,), now)
        mail = parse_mail(raw, env, sha256_of(raw))

        def outgoing(thread_id: int, reference: str, sent_today: int) -> Outgoing | None:
            seen[spool_id] = sent_today
            return None
        [r] = await ledger.record_many([RecordRequest(Routed(mail, service, OpenThread()),
                                                      Delivered("INBOX", 1, 1), now, outgoing, True)])
        assert r is not None and not isinstance(r, Exception)

    await record("P1", dt.datetime(2026, 1, 15, 22, 50, tzinfo=dt.UTC))  # still the 15th in Paris
    await record("P2", dt.datetime(2026, 1, 15, 23, 30, tzinfo=dt.UTC))  # 00:30 on the 16th in Paris
    assert seen == {"P1": 3, "P2": 0}
    assert await ledger.acknowledgements_today("jean@exemple.fr", dt.datetime(2026, 1, 15, 23, 30, tzinfo=dt.UTC)) == 0
    assert await ledger.acknowledgements_today("jean@exemple.fr", dt.datetime(2026, 1, 15, 22, 50, tzinfo=dt.UTC)) == 3


# --- 4. the delivery loop leaves no task behind --------------------------------------------------

class HungStore:
    """An IMAP server that never answers; notes whether the APPEND was cancelled."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.cancelled = False

    async def deliver(self, account: str, raw: bytes, **kw: Any) -> Delivered:
        raise NotImplementedError

    async def deliver_many(self, account: str, copies: Sequence[Copy]) -> list[Delivered | GatewayError]:
        self.started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        raise AssertionError("unreachable")

    async def close(self) -> None:
        pass


async def test_stop_cancels_batches_past_the_grace_and_leaves_no_task(db_engine: Any) -> None:
    service = await add_service(db_engine, "sip-hung")
    ledger = SqlLedger(db_engine, secret=SECRET.encode(), domain="balf.test", instance="gw-a")
    await index_entries(ledger, ["H1"], service.address, at=dt.datetime.now(dt.UTC))
    table = await ledger.load_services()
    store = HungStore()
    settings = WorkerSettings(secret=SECRET.encode(), domain="balf.test", lease=30.0, idle_poll=0.05,
                              stop_grace=0.3)
    ctx = Context(settings, ledger, store, lambda: table)
    stop = asyncio.Event()
    before = asyncio.all_tasks()
    worker = asyncio.create_task(deliver_loop(ctx, stop))
    await asyncio.wait_for(store.started.wait(), 10)
    stop.set()
    await asyncio.wait_for(worker, 5)
    await asyncio.sleep(0)
    assert asyncio.all_tasks() - before == set(), "deliver_loop left tasks running"
    assert store.cancelled
    row = await entry(db_engine, "H1")  # left claimed: run again after the lease or a restart
    assert (row.state, row.claimed_by) == (SpoolState.QUEUED, "gw-a")
    assert ctx.leases.held == {}

