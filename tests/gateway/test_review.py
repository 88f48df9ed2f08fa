"""Second review's findings, each proved against the real pieces (both databases, real
sockets, the spool on disk): a replayed record never finishes an entry whose other copy was
not recorded; an over-long path is refused at MAIL/RCPT and a spool file the index refuses is
moved aside; a cancelled store is withdrawn only after its file reached queue/; equal copies
get their own results; store login failures are per-copy results; the relay password stays
out of reprs."""

from __future__ import annotations

import asyncio
import datetime as dt
import multiprocessing
import secrets
import signal
import smtplib
import threading
import time
from collections.abc import Sequence
from typing import Any

from click.testing import CliRunner
from sqlalchemy import select

from balf.cli.group import cli
from balf.db.engine import session_factory
from balf.db.models import Message, Service, ServiceAddress, ServiceKind, SpoolState, Thread
from balf.gateway import tokens
from balf.gateway.daemon import make_store
from balf.gateway.delivery import DeliveryProcess
from balf.gateway.errors import DatabaseUnavailable, GatewayError, SpoolUnavailable, StoreUnavailable
from balf.gateway.ledger import SqlLedger
from balf.gateway.model import Delivered, Envelope, ServiceRef, SpooledMessage
from balf.gateway.notify import RelaySettings
from balf.gateway.parse import sha256_of
from balf.gateway.spool import FileSpool, encode_entry
from balf.gateway.store import Copy
from balf.gateway.worker import Context, WorkerSettings, claim_batch, deliver_until_empty, index_loop, process_batch
from tests.gateway.conftest import SECRET, imap_messages, make_config, seed_services, wait_spool_state
from tests.gateway.test_claims import entry, index_entries, raw_with_id
from tests.gateway.test_live import message, smtp_send

# --- 1. a replayed record never finishes an entry one of whose copies failed ---------------------


class CountingStore:
    """Files every copy (no IMAP needed to reach the record step); counts them per account."""

    def __init__(self) -> None:
        self.filed: dict[str, int] = {}

    async def deliver(self, account: str, raw: bytes, **kw: Any) -> Delivered:
        raise NotImplementedError

    async def deliver_many(self, account: str, copies: Sequence[Copy]) -> list[Delivered | GatewayError]:
        out: list[Delivered | GatewayError] = []
        for _ in copies:
            self.filed[account] = self.filed.get(account, 0) + 1
            out.append(Delivered("INBOX", 7, self.filed[account]))
        return out

    async def close(self) -> None:
        pass


class FlakyLedger(SqlLedger):
    """The batch transaction fails (a constraint error, say), and so does the replay of the
    copy for service ``bad``; every other replay goes through."""

    bad = -1
    fail = True

    async def record_many(self, requests: Any) -> Any:
        if self.fail:
            raise RuntimeError("IntegrityError: simulated")
        return await super().record_many(requests)

    async def record(self, routed: Any, *args: Any, **kw: Any) -> Any:
        if self.fail and routed.service.id == self.bad:
            raise RuntimeError("IntegrityError: simulated, one copy")
        return await super().record(routed, *args, **kw)


async def two_services(engine: Any) -> list[ServiceRef]:
    refs = []
    async with session_factory(engine).begin() as s:
        for i in range(2):
            address = f"service{i}@balf.test"
            svc = Service(code=f"SIP0000{i}", kind=ServiceKind.SIP, department="75",
                          name=f"SIP {i}", imap_account=f"sip-{i}")
            svc.addresses.append(ServiceAddress(address=address, address_key=address))
            s.add(svc)
            await s.flush()
            refs.append(ServiceRef(svc.id, svc.code, svc.name, svc.imap_account, False, address))
    return refs


async def test_a_failed_replayed_copy_keeps_its_entry_queued(db_engine: Any) -> None:
    first, second = await two_services(db_engine)
    ledger = FlakyLedger(db_engine, secret=SECRET.encode(), domain="balf.test", instance="gw-a")
    ledger.bad = first.id  # copy 1 fails, copy 2 (the entry's last copy) is recorded
    now = dt.datetime.now(dt.UTC)
    msgs = []
    raw = raw_with_id("TWO1", first.address)
    msgs.append(SpooledMessage(Envelope("TWO1", "jean@exemple.fr", (first.address, second.address), now),
                               raw, sha256_of(raw)))
    await ledger.index(msgs)
    table = await ledger.load_services()
    store = CountingStore()
    settings = WorkerSettings(secret=SECRET.encode(), domain="balf.test", lease=30.0, acknowledge=False)
    ctx = Context(settings, ledger, store, lambda: table)

    batch = await claim_batch(ctx)
    assert batch is not None
    assert await process_batch(ctx, batch) == ["retry"]
    row = await entry(db_engine, "TWO1")
    assert (row.state, row.claimed_by) == (SpoolState.QUEUED, None)
    async with session_factory(db_engine)() as s:
        assert (await s.execute(select(Message.service_id))).scalars().all() == [second.id]

    # The retry records the missing copy and only then finishes the entry.
    ledger.fail = False
    async with session_factory(db_engine).begin() as s:
        (await s.get(type(row), "TWO1")).next_attempt_at = now  # type: ignore[union-attr]
    batch = await claim_batch(ctx)
    assert batch is not None
    assert await process_batch(ctx, batch) == ["done"]
    assert (await entry(db_engine, "TWO1")).state == SpoolState.DONE
    async with session_factory(db_engine)() as s:
        assert sorted((await s.execute(select(Message.service_id))).scalars()) == sorted([first.id, second.id])


class DeadLedger(SqlLedger):
    """The database goes away between delivery and record."""

    calls = 0

    async def record_many(self, requests: Any) -> Any:
        self.calls += 1
        raise DatabaseUnavailable("database: ConnectionRefusedError")

    async def record(self, *args: Any, **kw: Any) -> Any:
        self.calls += 1
        raise AssertionError("replayed against a dead database")


async def test_record_with_the_database_down_fails_the_batch_at_once(db_engine: Any) -> None:
    first, _ = await two_services(db_engine)
    ledger = DeadLedger(db_engine, secret=SECRET.encode(), domain="balf.test", instance="gw-a")
    now = dt.datetime.now(dt.UTC)
    await index_entries(ledger, ["D1", "D2", "D3"], first.address, at=now)
    table = await ledger.load_services()
    settings = WorkerSettings(secret=SECRET.encode(), domain="balf.test", lease=30.0, acknowledge=False)
    ctx = Context(settings, ledger, CountingStore(), lambda: table)
    batch = await claim_batch(ctx)
    assert batch is not None
    assert await process_batch(ctx, batch) == ["retry"] * 3
    assert ledger.calls == 1
    assert {(await entry(db_engine, i)).state for i in ("D1", "D2", "D3")} == {SpoolState.QUEUED}


# --- 2. an over-long path is refused; a file the index refuses is set aside ------------------------

def long_address(octets: int) -> str:
    """An address whose path (angle brackets included) is ``octets`` long."""
    return "j" * (octets - 2 - len("@exemple.fr")) + "@exemple.fr"


def _session(port: int, sender: str, rcpt: str) -> tuple[tuple[int, bytes], tuple[int, bytes]]:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
        c.ehlo("citoyen.exemple.fr")
        mail = c.mail(sender)
        if mail[0] != 250:
            c.rset()
            c.mail("jean@exemple.fr")
        return mail, c.rcpt(rcpt)


async def test_over_long_paths_are_refused_and_the_gateway_keeps_going(
        db_engine: Any, db_url: str, dovecot: Any, tmp_path: Any, gateway_factory: Any) -> None:

    (sip,) = await seed_services(db_engine, dovecot, 1)
    gw = await gateway_factory(make_config(tmp_path, db_url, dovecot), db_engine)
    port = gw.smtp_server.sockets[0].getsockname()[1]
    too_long = long_address(257)
    assert len(too_long) + 2 == 257
    mail, rcpt = await asyncio.to_thread(_session, port, too_long, sip.address)
    assert (mail[0], mail[1][:5]) == (501, b"5.1.7")
    mail, rcpt = await asyncio.to_thread(_session, port, "jean@exemple.fr", "x" * 300 + "@balf.test")
    assert mail[0] == 250 and (rcpt[0], rcpt[1][:5]) == (501, b"5.1.3")
    mail, rcpt = await asyncio.to_thread(_session, port, long_address(480), sip.address)
    assert mail[0] == 501
    # The longest path allowed is indexed and delivered (both databases), and so is the next one.
    longest = long_address(256)
    ids = [await asyncio.to_thread(smtp_send, port, s, [sip.address],
                                   message(s, sip.address, "long", mid=f"<long{n}@exemple.fr>"))
           for n, s in enumerate([longest, "jean@exemple.fr"])]
    await wait_spool_state(db_engine, total=2, timeout=30)
    for spool_id in ids:
        assert (await entry(db_engine, spool_id)).state == SpoolState.DONE


async def test_a_file_the_index_refuses_is_set_aside_and_indexing_goes_on(
        db_engine: Any, db_backend: str, tmp_path: Any) -> None:

    spool = FileSpool(tmp_path / "spool")
    spool.open()
    ledger = SqlLedger(db_engine, secret=SECRET.encode(), domain="balf.test", instance="gw-a")
    now = dt.datetime.now(dt.UTC)

    def put(spool_id: str, mail_from: str) -> None:
        raw = message("jean@exemple.fr", "service0@balf.test", spool_id, mid=f"<{spool_id}@x>")
        env = Envelope(spool_id, mail_from, ("service0@balf.test",), now)
        (spool.queue / spool_id).write_bytes(encode_entry(env, raw, sha256_of(raw)))

    put("A1GOOD", "jean@exemple.fr")
    put("A2LONG", "j" * 400 + "@exemple.fr")  # spooled before MAIL checked lengths
    (spool.queue / "A3DIR").mkdir()  # cannot be read (EISDIR)
    put("A4GOOD", "jean@exemple.fr")
    stop, indexed = asyncio.Event(), asyncio.Event()
    loop_task = asyncio.create_task(index_loop(spool, ledger, stop, indexed))
    try:
        await asyncio.wait_for(indexed.wait(), 10)
        for _ in range(50):
            if not list(spool.queue.iterdir()):
                break
            await asyncio.sleep(0.05)
        assert not loop_task.done(), "the indexer stopped"
    finally:
        stop.set()
        await asyncio.wait_for(loop_task, 10)
        spool.close()
    assert list(spool.queue.iterdir()) == []
    assert (await entry(db_engine, "A1GOOD")).state == SpoolState.QUEUED
    assert (await entry(db_engine, "A4GOOD")).state == SpoolState.QUEUED
    set_aside = [p.name for p in spool.corrupt()]
    if db_backend == "postgresql":  # mail_from is String(320): PostgreSQL refuses the row
        assert set_aside == ["A2LONG", "A3DIR"]
    else:  # SQLite does not check lengths: indexed
        assert set_aside == ["A3DIR"]
        assert (await entry(db_engine, "A2LONG")).state == SpoolState.QUEUED


def test_spool_list_shows_files_set_aside(db_url: str, tmp_path: Any) -> None:


    (tmp_path / "spool" / "corrupt").mkdir(parents=True)
    (tmp_path / "spool" / "corrupt" / "B1BAD").write_bytes(b"torn")
    conf = tmp_path / "balf.toml"
    conf.write_text(f'data_dir = "{tmp_path}"\n[database]\nurl = "{db_url}"\n[gateway]\nsecret = "{SECRET}"\n')
    out = CliRunner().invoke(cli, ["--config", str(conf), "spool", "list"])
    assert out.exit_code == 0, out.output
    assert "1 file(s) set aside" in out.output and "B1BAD" in out.output


# --- 3. a store whose task group is aborted is withdrawn after its file reached queue/ -------------

class Boom(Exception):
    pass


async def test_aborted_group_withdraws_the_store_after_the_rename(tmp_path: Any) -> None:


    entered, release = threading.Event(), threading.Event()
    spool: FileSpool

    def slow_write(spool_id: str, data: bytes) -> None:
        entered.set()
        release.wait(10)
        spool._write(spool_id, data)  # renames into queue/, after the group was aborted

    spool = FileSpool(tmp_path / "spool", group_commit_ms=1, write_file=slow_write)
    spool.open()
    raw = message("jean@exemple.fr", "service0@balf.test", "x", mid="<c1@x>")
    env = Envelope("C1SLOW", "jean@exemple.fr", ("service0@balf.test",), dt.datetime.now(dt.UTC))
    try:
        try:
            async with asyncio.TaskGroup() as tg:
                spool.tasks = tg
                tg.create_task(spool.store(env, raw))
                assert await asyncio.to_thread(entered.wait, 10)
                raise Boom  # the group is aborted: the session and the background store are cancelled
        except* Boom:
            pass
        spool.tasks = None
        assert list(spool.pending()) == []  # still unconfirmed: the indexer keeps off it
        release.set()
        await asyncio.to_thread(spool.close)  # the writer thread has renamed the file
        for _ in range(20):
            await asyncio.sleep(0.01)
        assert list(spool.queue.iterdir()) == [] and list(spool.pending()) == []
    finally:
        release.set()


# --- 4. equal copies get their own results; a redirect onto a service already targeted: one copy ---

async def test_equal_copies_in_one_multiappend_are_each_filed_once(dovecot: Any, db_url: str,
                                                                   tmp_path: Any) -> None:


    account = dovecot.add_user(f"balf-equal-{secrets.token_hex(3)}").username
    store = make_store(make_config(tmp_path, db_url, dovecot))
    copy = Copy(raw_with_id("EQ1", "service0@balf.test"), dt.datetime.now(dt.UTC), "EQ1")
    try:
        results = await store.deliver_many(account, [copy, copy])
    finally:
        await store.close()
    assert all(isinstance(r, Delivered) for r in results), results
    assert len({r.uid for r in results if isinstance(r, Delivered)}) == 2
    assert len(await asyncio.to_thread(imap_messages, dovecot, account)) == 2


async def test_a_token_redirect_onto_a_targeted_service_delivers_one_copy(
        db_engine: Any, db_url: str, dovecot: Any, tmp_path: Any) -> None:

    old, new = await seed_services(db_engine, dovecot, 2)
    now = dt.datetime.now(dt.UTC)
    async with session_factory(db_engine).begin() as s:
        new_id = (await s.execute(select(Service.id).where(Service.imap_account == new.account))).scalar_one()
        thread = Thread(reference="EC-2026-000001", service_id=new_id, subject="x", opened_at=now, updated_at=now)
        s.add(thread)
        await s.flush()
        tid = thread.id
    # A reply to a thread transferred from ``old`` to ``new``, copied to ``new`` as well.
    token = tokens.reply_address(SECRET.encode(), old.address.split("@")[0], "balf.test", tid)
    raw = raw_with_id("RDR1", token)
    ledger = SqlLedger(db_engine, secret=SECRET.encode(), domain="balf.test", instance="gw-a")
    await ledger.index([SpooledMessage(Envelope("RDR1", "jean@exemple.fr", (token, new.address), now),
                                       raw, sha256_of(raw))])
    table = await ledger.load_services()
    store = make_store(make_config(tmp_path, db_url, dovecot))
    ctx = Context(WorkerSettings(secret=SECRET.encode(), domain="balf.test", acknowledge=False),
                  ledger, store, lambda: table)
    try:
        await deliver_until_empty(ctx, timeout=20)
    finally:
        await store.close()
    assert (await entry(db_engine, "RDR1")).state == SpoolState.DONE
    assert len(await asyncio.to_thread(imap_messages, dovecot, new.account)) == 1
    assert await asyncio.to_thread(imap_messages, dovecot, old.account) == []
    async with session_factory(db_engine)() as s:
        assert (await s.execute(select(Message.service_id))).scalars().all() == [new_id]
    assert ctx.order._tails == {}  # every ticket, claim-time or post-redirect, released


# --- 5. the spool's writer threads are joined at close -------------------------------------------

def test_close_joins_the_writer_threads(tmp_path: Any) -> None:


    spool = FileSpool(tmp_path / "spool", group_commit_ms=0)
    spool.open()
    raw = message("jean@exemple.fr", "service0@balf.test", "x", mid="<w1@x>")
    env = Envelope("W1", "jean@exemple.fr", ("service0@balf.test",), dt.datetime.now(dt.UTC))
    asyncio.run(spool.store(env, raw))
    assert any(t.name.startswith("spool-write") for t in threading.enumerate())
    spool.close()
    assert not any(t.name.startswith("spool-write") for t in threading.enumerate())
    env2 = Envelope("W2", "jean@exemple.fr", ("service0@balf.test",), dt.datetime.now(dt.UTC))
    try:
        asyncio.run(spool.store(env2, raw))
    except SpoolUnavailable:
        pass
    else:
        raise AssertionError("stored after close")
    assert [p.name for p in spool.pending()] == ["W1"]


# --- 6. the delivery process has one reaper ------------------------------------------------------

async def test_delivery_process_is_reaped_by_the_loop_alone(tmp_path: Any, dovecot: Any) -> None:


    child = DeliveryProcess(make_config(tmp_path, f"sqlite+aiosqlite:///{tmp_path}/x.db", dovecot))
    child.process = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(60,))
    child.start()
    threads = threading.active_count()
    watcher = asyncio.create_task(child.watch())
    await asyncio.sleep(0.2)
    assert threading.active_count() == threads, "a thread joins the process"
    assert not watcher.done()
    await child.stop(timeout=10)
    await asyncio.wait_for(watcher, 5)
    assert child.process.exitcode == -signal.SIGTERM
    assert threading.active_count() == threads


# --- 7. a refused LOGIN is a result for each copy, not a worker bug --------------------------------

async def test_a_refused_login_retries_the_copies_without_a_worker_bug(
        db_engine: Any, db_url: str, dovecot: Any, tmp_path: Any, caplog: Any) -> None:

    (sip,) = await seed_services(db_engine, dovecot, 1)
    config = make_config(tmp_path, db_url, dovecot, imap={"master_password": "wrong"})
    store = make_store(config)
    ledger = SqlLedger(db_engine, secret=SECRET.encode(), domain="balf.test", instance="gw-a")
    await index_entries(ledger, ["L1", "L2"], sip.address, at=dt.datetime.now(dt.UTC))
    table = await ledger.load_services()
    ctx = Context(WorkerSettings(secret=SECRET.encode(), domain="balf.test", acknowledge=False),
                  ledger, store, lambda: table)
    try:
        copy = Copy(raw_with_id("L0", sip.address), dt.datetime.now(dt.UTC), "L0")
        results = await store.deliver_many(sip.account, [copy, copy])
        assert [type(r) for r in results] == [StoreUnavailable, StoreUnavailable]
        batch = await claim_batch(ctx)
        assert batch is not None
        assert await process_batch(ctx, batch) == ["retry", "retry"]
    finally:
        await store.close()
    assert not [r for r in caplog.records if "worker.bug" in r.getMessage()]
    row = await entry(db_engine, "L1")
    assert row.state == SpoolState.QUEUED and "login" in (row.last_error or "")


# --- 8. the relay password stays out of reprs ------------------------------------------------------

def test_relay_password_is_not_in_the_repr() -> None:

    assert "s3cret" not in repr(RelaySettings("relay.test", 587, username="balf", password="s3cret"))
