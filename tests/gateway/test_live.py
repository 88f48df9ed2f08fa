"""The gateway end to end: real SMTP client -> listener -> spool -> database -> private Dovecot.

Runs on SQLite and PostgreSQL (``db_engine``/``db_url``) against the harness's Dovecot.
"""

from __future__ import annotations

import asyncio
import smtplib
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from balf.db.engine import session_factory
from balf.db.models import Message, NotificationOutbox, SpoolEntry, SpoolState, Thread, TrafficEvent
from balf.gateway import tokens
from balf.gateway.daemon import make_ledger, make_store, worker_settings
from balf.gateway.spool import FileSpool
from balf.gateway.worker import Context, deliver_until_empty, index_spool
from tests.gateway.conftest import (
    SECRET,
    imap_messages,
    make_config,
    seed_services,
    spool_ids_in,
    wait_spool_state,
)

pytestmark = pytest.mark.live


def message(sender: str, to: str, subject: str, *, mid: str, extra: str = "") -> bytes:
    return (f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\nMessage-ID: {mid}\r\n"
            f"Date: Wed, 25 Nov 2026 10:00:00 +0100\r\n{extra}"
            f"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
            f"Bonjour, ceci est le message {mid}.\r\n").encode()


def smtp_send(port: int, sender: str, rcpts: list[str], data: bytes) -> str:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
        c.ehlo("citoyen.exemple.fr")
        c.mail(sender)
        for r in rcpts:
            code, _ = c.rcpt(r)
            assert code == 250, (r, code)
        code, text = c.data(data)
        assert code == 250, text
        return text.decode().rsplit(" ", 1)[-1]


async def threads_by_spool(engine: Any) -> dict[str, tuple[str, str | None]]:
    async with session_factory(engine)() as s:
        rows = (await s.execute(select(Message.spool_id, Thread.reference, Thread.related_reference)
                                .join(Thread, Thread.id == Message.thread_id))).all()
    return {r[0]: (r[1], r[2]) for r in rows}


async def test_routing_rules_end_to_end(db_engine: Any, db_url: str, dovecot: Any, tmp_path: Path,
                                        gateway_factory: Any) -> None:
    sip, sie = await seed_services(db_engine, dovecot)
    config = make_config(tmp_path, db_url, dovecot)
    gw = await gateway_factory(config, db_engine)
    port = gw.smtp_server.sockets[0].getsockname()[1]
    send = lambda *a, **k: asyncio.to_thread(smtp_send, port, *a, **k)  # noqa: E731

    first = await send("jean@exemple.fr", [sip.address], message(
        "Jean <jean@exemple.fr>", sip.address, "Ma taxe foncière", mid="<m1@exemple.fr>"))
    await wait_spool_state(db_engine, total=1)
    threads = await threads_by_spool(db_engine)
    ref = threads[first][0]
    assert ref.startswith("EC-2026-") and threads[first][1] is None

    async with session_factory(db_engine)() as s:
        thread_id = (await s.execute(select(Thread.id).where(Thread.reference == ref))).scalar_one()
        ack = (await s.execute(select(NotificationOutbox))).scalar_one()
    assert ack.kind == "acknowledgement" and ack.to_address == "jean@exemple.fr"
    assert f"[{ref}]".encode() in ack.content and b"Auto-Submitted: auto-replied" in ack.content

    token_addr = tokens.reply_address(SECRET.encode(), "service0", "balf.test", thread_id)
    by_token = await send("autre@exemple.fr", [token_addr], message(
        "autre@exemple.fr", token_addr, "sans référence", mid="<m2@exemple.fr>"))
    by_tag = await send("jean@exemple.fr", [sip.address], message(
        "jean@exemple.fr", sip.address, f"Re: [{ref}] complément", mid="<m3@exemple.fr>"))
    tag_intruder = await send("intrus@exemple.fr", [sip.address], message(
        "intrus@exemple.fr", sip.address, f"Re: [{ref}]", mid="<m4@exemple.fr>"))
    by_refs = await send("jean@exemple.fr", [sip.address], message(
        "jean@exemple.fr", sip.address, "Re: suite", mid="<m5@exemple.fr>",
        extra="In-Reply-To: <m1@exemple.fr>\r\nReferences: <m1@exemple.fr>\r\n"))
    refs_forged = await send("intrus@exemple.fr", [sip.address], message(
        "intrus@exemple.fr", sip.address, "Re: suite", mid="<m6@exemple.fr>",
        extra="References: <m1@exemple.fr>\r\n"))
    two = await send("jean@exemple.fr", [sip.address, sie.address], message(
        "jean@exemple.fr", f"{sip.address}, {sie.address}", "Aux deux services", mid="<m7@exemple.fr>"))
    auto = await send("robot@exemple.fr", [sie.address], message(
        "robot@exemple.fr", sie.address, "Absence", mid="<m8@exemple.fr>",
        extra="Auto-Submitted: auto-replied\r\n"))
    await wait_spool_state(db_engine, total=8)

    threads = await threads_by_spool(db_engine)
    assert threads[by_token][0] == ref
    assert threads[by_tag][0] == ref
    assert threads[tag_intruder][0] != ref and threads[tag_intruder][1] == ref
    assert threads[by_refs][0] == ref
    assert threads[refs_forged][0] != ref and threads[refs_forged][1] == ref

    async with session_factory(db_engine)() as s:
        copies = (await s.execute(select(Message.service_id, Message.uid)
                                  .where(Message.spool_id == two))).all()
        assert len(copies) == 2 and all(uid for _, uid in copies)
        assert (await s.execute(select(func.count()).select_from(TrafficEvent))).scalar_one() == 9
        acks = (await s.execute(select(NotificationOutbox.to_address))).scalars().all()
        states = set((await s.execute(select(SpoolEntry.state))).scalars())
    assert states == {SpoolState.DONE}
    # Acknowledged: each new thread whose sender is a person, not the auto-reply.
    assert "robot@exemple.fr" not in acks and acks.count("intrus@exemple.fr") == 2

    sip_ids = spool_ids_in(await asyncio.to_thread(imap_messages, dovecot, sip.account))
    sie_ids = spool_ids_in(await asyncio.to_thread(imap_messages, dovecot, sie.account))
    assert sip_ids == [first, by_token, by_tag, tag_intruder, by_refs, refs_forged, two]
    assert sie_ids == [two, auto]


async def test_redelivery_after_crash_is_not_duplicated(db_engine: Any, db_url: str, dovecot: Any,
                                                        tmp_path: Path) -> None:
    """A crash after APPEND, before the record: the retry finds the copy instead of adding one."""
    (sip,) = await seed_services(db_engine, dovecot, 1)
    config = make_config(tmp_path, db_url, dovecot)
    ledger = make_ledger(config, db_engine)
    store = make_store(config)
    spool = FileSpool(config.spool_dir)
    spool.open()
    import datetime as dt

    from balf.gateway.model import Envelope

    raw = b"Received: from x by mx (balf) with ESMTP id CRASH0001;\r\n\tWed, 25 Nov 2026 10:00:00 +0000\r\n" + \
        message("jean@exemple.fr", sip.address, "x", mid="<c1@exemple.fr>")
    env = Envelope("CRASH0001", "jean@exemple.fr", (sip.address,), dt.datetime.now(dt.UTC))
    await spool.store(env, raw)
    await index_spool(spool, ledger)
    [claimed] = await ledger.claim(10, 30, dt.datetime.now(dt.UTC))
    await store.deliver(sip.account, claimed.message.raw, internaldate=env.arrived_at,
                        spool_id="CRASH0001", check_existing=False)
    # ... crash here: nothing recorded; the restarted instance releases its claims.
    assert await ledger.release_claims() == 1
    ctx = Context(worker_settings(config), ledger, store, lambda: table)
    table = await ledger.load_services()
    await deliver_until_empty(ctx, spool)
    await store.close()
    assert spool_ids_in(await asyncio.to_thread(imap_messages, dovecot, sip.account)) == ["CRASH0001"]
    async with session_factory(db_engine)() as s:
        assert (await s.execute(select(func.count()).select_from(Message))).scalar_one() == 1
        assert (await s.execute(select(SpoolEntry.state))).scalar_one() == SpoolState.DONE


async def test_dovecot_down_then_back(db_engine: Any, db_url: str, fresh_dovecot: Any, tmp_path: Path,
                                      gateway_factory: Any) -> None:
    """Mail is accepted while Dovecot is down and delivered, in arrival order, when it returns."""
    (sip,) = await seed_services(db_engine, fresh_dovecot, 1)
    gw = await gateway_factory(make_config(tmp_path, db_url, fresh_dovecot), db_engine)
    port = gw.smtp_server.sockets[0].getsockname()[1]
    await asyncio.to_thread(fresh_dovecot.stop)
    ids = [await asyncio.to_thread(smtp_send, port, "jean@exemple.fr", [sip.address], message(
        "jean@exemple.fr", sip.address, f"n{i}", mid=f"<d{i}@exemple.fr>")) for i in range(6)]
    await asyncio.sleep(1.5)
    async with session_factory(db_engine)() as s:
        rows = (await s.execute(select(SpoolEntry.state, SpoolEntry.last_error))).all()
    assert len(rows) == 6 and {r[0] for r in rows} == {SpoolState.QUEUED}
    assert any(r[1] and "connect" in r[1] for r in rows)
    await asyncio.to_thread(fresh_dovecot.start)
    await wait_spool_state(db_engine, total=6, timeout=60)
    assert spool_ids_in(await asyncio.to_thread(imap_messages, fresh_dovecot, sip.account)) == ids


@pytest.mark.slow
async def test_kill_9_mid_load_then_restart(db_engine: Any, db_url: str, dovecot: Any,
                                            tmp_path: Path) -> None:
    """kill -9 of a gateway process under load; after a restart every accepted message is in IMAP
    exactly once, and recorded once."""
    import os
    import signal
    import subprocess
    import sys
    import threading

    from tests.harness.ports import free_ports

    (sip,) = await seed_services(db_engine, dovecot, 1)
    [port] = free_ports(1)
    conf = tmp_path / "balf.toml"
    conf.write_text(f"""
data_dir = "{tmp_path / 'data'}"
[database]
url = "{db_url}"
[smtp]
port = {port}
hostname = "mx.balf.test"
[imap]
host = "{dovecot.host}"
port = {dovecot.imap_port}
master_user = "{dovecot.master_user}"
master_password = "{dovecot.master_password}"
[gateway]
domain = "balf.test"
secret = "{SECRET}"
retry_delay = 0.2
claim_lease = 600.0
[relay]
port = 1
[spool]
min_free_bytes = 0
""")

    def start() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, "-m", "balf.gateway.daemon", "--config", str(conf)],
                                stdout=subprocess.DEVNULL, stderr=open(tmp_path / "daemon.log", "ab"))
        import socket
        import time
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return proc
            except OSError:
                time.sleep(0.05)
        proc.kill()
        raise AssertionError((tmp_path / "daemon.log").read_text())

    accepted: list[str] = []
    lock = threading.Lock()

    def client(n: int) -> None:
        for i in range(40):
            try:
                sid = smtp_send(port, "jean@exemple.fr", [sip.address], message(
                    "jean@exemple.fr", sip.address, f"k{n}-{i}", mid=f"<k{n}.{i}@exemple.fr>"))
            except (OSError, smtplib.SMTPException):
                return
            with lock:
                accepted.append(sid)

    proc = await asyncio.to_thread(start)
    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    while len(accepted) < 60:
        await asyncio.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    for t in threads:
        await asyncio.to_thread(t.join)
    assert 60 <= len(accepted) < 160
    proc = await asyncio.to_thread(start)
    try:
        await wait_spool_state(db_engine, total=len(accepted), timeout=90)
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(proc.wait, 30)
    in_imap = spool_ids_in(await asyncio.to_thread(imap_messages, dovecot, sip.account))
    assert len(in_imap) == len(set(in_imap)), "a message was stored twice"
    assert set(accepted) <= set(in_imap), "an accepted message was lost"
    async with session_factory(db_engine)() as s:
        recorded = (await s.execute(select(Message.spool_id))).scalars().all()
        events = (await s.execute(select(func.count()).select_from(TrafficEvent))).scalar_one()
    assert sorted(recorded) == sorted(in_imap) and events == len(recorded)
    assert proc.returncode == 0
