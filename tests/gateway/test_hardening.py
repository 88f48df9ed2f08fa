"""Reviewer findings, each proved over real sockets (and the private Dovecot and both databases
where they matter): no 451 that still delivers, no header injection through a decoded
Subject, acknowledgements from the null reverse-path and without RFC 2047 inside addresses,
the users' day in Europe/Paris."""

from __future__ import annotations

import asyncio
import datetime as dt
import email
import email.policy
import logging
import smtplib
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP
from sqlalchemy import select

from balf.db.engine import session_factory
from balf.db.models import Message, NotificationOutbox, OutboxState, SpoolEntry, SpoolState, Thread
from balf.gateway import tokens
from balf.gateway.acknowledgement import day_start, decide_acknowledgement, render_acknowledgement
from balf.gateway.ledger import SqlLedger
from balf.gateway.notify import RelaySettings, send_pending
from balf.gateway.parse import parse_mail
from balf.gateway.smtp import Directory, GatewayHandler, SessionLimits, start_listener, stop_listener
from balf.gateway.spool import FileSpool, _fsync_dir
from tests.gateway.conftest import imap_messages, make_config, seed_services, spool_ids_in, wait_spool_state
from tests.gateway.test_live import smtp_send
from tests.gateway.test_pure import SECRET, SIP, TABLE, envelope
from tests.gateway.test_smtp import MSG, send

# --- A. a 451 (or no reply) never leaves a queued copy ----------------------------------------


class GatedFsync:
    """The spool's directory fsync, held until the test releases it, or failing."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.entered = threading.Event()
        self.release = threading.Event()
        self.queued_when_called: list[list[str]] = []

    def __call__(self, path: Path) -> None:
        self.queued_when_called.append(sorted(p.name for p in path.iterdir()))
        self.entered.set()
        self.release.wait(10)
        if self.fail:
            raise OSError(5, "Input/output error")
        _fsync_dir(path)


async def _listener(tmp_path: Path, fsync: Callable[[Path], None], data_timeout: float = 30.0
                    ) -> tuple[asyncio.Server, SessionLimits, FileSpool, int]:
    spool = FileSpool(tmp_path / "spool", group_commit_ms=1, fsync_dir=fsync)
    spool.open()
    limits = SessionLimits(10, data_timeout=data_timeout)
    handler = GatewayHandler(directory=Directory(TABLE), spool=spool, secret=SECRET,
                             hostname="mx.balf.test", max_recipients=5)
    server = await start_listener(handler, host="127.0.0.1", port=0, limits=limits,
                                  hostname="mx.balf.test", command_timeout=10)
    return server, limits, spool, server.sockets[0].getsockname()[1]


def _files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


async def test_directory_fsync_failure_gives_451_and_leaves_nothing_queued(tmp_path: Path) -> None:
    fsync = GatedFsync(fail=True)
    fsync.release.set()
    server, limits, spool, port = await _listener(tmp_path, fsync)
    try:
        with pytest.raises(smtplib.SMTPDataError) as info:
            await asyncio.to_thread(send, port, "a@b.fr", ["sip.paris1@balf.test"], MSG)
        assert (info.value.smtp_code, info.value.smtp_error[:5]) == (451, b"4.3.0")
        assert len(fsync.queued_when_called[0]) == 1  # the failure came after the rename
        assert _files(spool.queue) == [] and _files(spool.tmp) == []
        assert list(spool.pending()) == []
    finally:
        await stop_listener(server, limits, grace=1)


async def test_data_deadline_does_not_cut_the_store_short(tmp_path: Path) -> None:
    """The deadline covers reading DATA; a store slower than it still ends in a 250 (and the
    file is not indexable before that)."""
    fsync = GatedFsync()
    server, limits, spool, port = await _listener(tmp_path, fsync, data_timeout=0.3)
    try:
        client = asyncio.ensure_future(asyncio.to_thread(send, port, "a@b.fr", ["sip.paris1@balf.test"], MSG))
        assert await asyncio.to_thread(fsync.entered.wait, 10)
        [name] = _files(spool.queue)
        assert list(spool.pending()) == []  # renamed, not yet acknowledged: the indexer waits
        await asyncio.sleep(0.6)  # twice the DATA deadline, inside the store
        fsync.release.set()
        assert await client == {}
        assert [p.name for p in spool.pending()] == [name]
    finally:
        fsync.release.set()
        await stop_listener(server, limits, grace=1)


async def test_client_gone_during_store_withdraws_the_message(tmp_path: Path) -> None:
    fsync = GatedFsync()
    server, limits, spool, port = await _listener(tmp_path, fsync)
    try:
        def session() -> None:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                f = sock.makefile("rb")
                f.readline()
                for line in (b"HELO x\r\n", b"MAIL FROM:<a@b.fr>\r\n",
                             b"RCPT TO:<sip.paris1@balf.test>\r\n", b"DATA\r\n"):
                    sock.sendall(line)
                    f.readline()
                sock.sendall(MSG + b".\r\n")
                assert fsync.entered.wait(10)
            # closed before any reply: the client will send it again
        await asyncio.to_thread(session)
        await asyncio.sleep(0.2)
        fsync.release.set()
        for _ in range(50):
            if not _files(spool.queue):
                break
            await asyncio.sleep(0.05)
        assert _files(spool.queue) == [] and list(spool.pending()) == []
    finally:
        fsync.release.set()
        await stop_listener(server, limits, grace=1)


# --- B. a decoded Subject cannot inject headers -------------------------------------------------

INJECTING = (b"From: jean@exemple.fr\r\nTo: sip.paris1@balf.test\r\n"
             b"Subject: =?utf-8?q?hello=0D=0ABcc:_x?=\r\nMessage-ID: <inj1@exemple.fr>\r\n"
             b"Date: Wed, 25 Nov 2026 10:00:00 +0100\r\n\r\nBonjour.\r\n")


def _render(raw: bytes, mail_from: str = "jean@exemple.fr") -> bytes:
    m = parse_mail(raw, envelope(mail_from=mail_from))
    return render_acknowledgement(
        m, SIP, reference="EC-2026-000009", reply_to=tokens.reply_address(SECRET, "sip.paris1", "balf.test", 9),
        message_id=tokens.make_message_id(SECRET, "balf.test", 9), portal_url="https://portail.test/",
        now=dt.datetime(2026, 11, 25, 9, 30, tzinfo=dt.UTC))


@pytest.mark.parametrize("subject", [
    b"=?utf-8?q?hello=0D=0ABcc:_x?=",
    b"=?utf-8?b?aGVsbG8NCkJjYzogeA==?=",            # the same in base64
    b"=?utf-8?q?a=0Ab?= =?utf-8?q?=0Dc=1B=C2=85d=E2=80=A8e?=",  # LF, CR, ESC, NEL, U+2028
])
def test_decoded_subject_is_one_line_and_renders(subject: bytes) -> None:
    raw = INJECTING.replace(b"=?utf-8?q?hello=0D=0ABcc:_x?=", subject)
    m = parse_mail(raw, envelope())
    assert m.subject.isprintable() and "\r" not in m.subject and "\n" not in m.subject
    ack = _render(raw)
    head = ack.split(b"\r\n\r\n", 1)[0]
    assert b"\r\nBcc:" not in head
    parsed = email.message_from_bytes(ack, policy=email.policy.default)
    assert parsed["Bcc"] is None and "EC-2026-000009" in parsed["Subject"]


def test_cited_message_id_must_be_a_msg_id() -> None:
    raw = INJECTING.replace(b"<inj1@exemple.fr>", b"=?utf-8?q?x=0D=0AX-Evil:_1?=")
    assert parse_mail(raw, envelope()).message_id == "=?utf-8?q?x=0D=0AX-Evil:_1?="  # kept for lookup
    ack = _render(raw)
    assert b"In-Reply-To" not in ack and b"X-Evil" not in ack.split(b"\r\n\r\n", 1)[0]


@pytest.mark.parametrize("mail_from", ['"jean dupont"@exemple.fr', "jean@exemple.fr\x1b", "a@b@c"])
def test_unanswerable_sender_gets_no_acknowledgement(mail_from: str) -> None:
    m = parse_mail(INJECTING, envelope(mail_from=mail_from))
    d = decide_acknowledgement(m, SIP, enabled=True, sent_today=0, per_day=3, own_domain="balf.test")
    assert not d.send and "cannot be answered" in d.reason


@pytest.mark.live
async def test_injecting_subject_end_to_end(db_engine: Any, db_url: str, dovecot: Any, tmp_path: Path,
                                            gateway_factory: Any, caplog: pytest.LogCaptureFixture) -> None:
    """Over SMTP to a running gateway: in IMAP, recorded once, threaded, acknowledged, no retry."""
    caplog.set_level(logging.INFO, logger="balf")
    (sip,) = await seed_services(db_engine, dovecot, 1)
    gw = await gateway_factory(make_config(tmp_path, db_url, dovecot), db_engine)
    port = gw.smtp_server.sockets[0].getsockname()[1]
    raw = INJECTING.replace(b"sip.paris1@balf.test", sip.address.encode())
    spool_id = await asyncio.to_thread(smtp_send, port, "jean@exemple.fr", [sip.address], raw)
    await wait_spool_state(db_engine, total=1)
    assert spool_ids_in(await asyncio.to_thread(imap_messages, dovecot, sip.account)) == [spool_id]
    async with session_factory(db_engine)() as s:
        entry = (await s.execute(select(SpoolEntry))).scalar_one()
        thread = (await s.execute(select(Thread).join(Message, Message.thread_id == Thread.id)
                                  .where(Message.spool_id == spool_id))).scalar_one()
        ack = (await s.execute(select(NotificationOutbox))).scalar_one()
    assert (entry.state, entry.attempts, entry.last_error) == (SpoolState.DONE, 1, None)
    assert thread.reference.startswith("EC-") and thread.subject == "hello Bcc: x"
    assert ack.to_address == "jean@exemple.fr" and f"[{thread.reference}]".encode() in ack.content
    assert b"\r\nBcc:" not in ack.content.split(b"\r\n\r\n", 1)[0]
    bad = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR
           or "worker.retry" in r.getMessage() or "worker.bug" in r.getMessage()]
    assert bad == []


# --- C. acknowledgements: MAIL FROM:<>, SMTPUTF8 or a clear refusal --------------------------------


class Relay:
    """A loopback relay recording envelopes; SMTPUTF8 offered or not."""

    def __init__(self, smtputf8: bool) -> None:
        self.smtputf8 = smtputf8
        self.received: list[tuple[str, list[str], list[str], bytes]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.received.append((envelope.mail_from, list(envelope.rcpt_tos), list(envelope.mail_options),
                              envelope.original_content))
        return "250 OK"

    async def start(self) -> tuple[asyncio.Server, int]:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: SMTP(self, hostname="relay", enable_SMTPUTF8=self.smtputf8, decode_data=False),
            "127.0.0.1", 0)
        return server, server.sockets[0].getsockname()[1]


PLAIN = INJECTING.replace(b"=?utf-8?q?hello=0D=0ABcc:_x?=", "Ma taxe foncière".encode())


async def _queue_ack(engine: Any, key: str, mail_from: str, now: dt.datetime | None = None) -> None:
    content = _render(PLAIN, mail_from)
    async with session_factory(engine).begin() as s:
        s.add(NotificationOutbox(dedup_key=key, kind="acknowledgement", to_address=mail_from,
                                 content=content, **({"created_at": now} if now else {})))


async def _outbox_rows(engine: Any) -> dict[str, NotificationOutbox]:
    async with session_factory(engine)() as s:
        return {r.dedup_key: r for r in (await s.execute(select(NotificationOutbox))).scalars()}


async def test_acknowledgements_go_from_the_null_reverse_path(db_engine: Any) -> None:
    ledger = SqlLedger(db_engine, secret=SECRET, domain="balf.test", instance="t")
    relay = Relay(smtputf8=False)
    server, port = await relay.start()
    try:
        await _queue_ack(db_engine, "ack:ascii", "jean@exemple.fr")
        await _queue_ack(db_engine, "ack:idn", "jean@exémple.fr")
        assert await send_pending(ledger, RelaySettings("127.0.0.1", port)) == 2
    finally:
        server.close()
    by_rcpt = {r[1][0]: r for r in relay.received}
    assert set(by_rcpt) == {"jean@exemple.fr", "jean@xn--exmple-cva.fr"}
    for mail_from, _, options, content in relay.received:
        assert mail_from == "<>" and "SMTPUTF8" not in options  # RFC 3834 3.3 (aiosmtpd: "<>")
        assert content.split(b"\r\n\r\n", 1)[0].isascii()
    assert b"\r\nTo: jean@xn--exmple-cva.fr\r\n" in by_rcpt["jean@xn--exmple-cva.fr"][3]


async def test_non_ascii_recipient_uses_smtputf8_never_rfc2047(db_engine: Any) -> None:
    ledger = SqlLedger(db_engine, secret=SECRET, domain="balf.test", instance="t")
    relay = Relay(smtputf8=True)
    server, port = await relay.start()
    try:
        await _queue_ack(db_engine, "ack:utf8", "jéan@exemple.fr")
        assert await send_pending(ledger, RelaySettings("127.0.0.1", port)) == 1
    finally:
        server.close()
    [(mail_from, rcpts, options, content)] = relay.received
    assert mail_from == "<>" and rcpts == ["jéan@exemple.fr"] and "SMTPUTF8" in options
    head = content.split(b"\r\n\r\n", 1)[0]
    assert "\r\nTo: jéan@exemple.fr\r\n".encode() in head and b"=?utf-8?" not in head.lower()


async def test_non_ascii_recipient_without_smtputf8_is_refused_for_good(db_engine: Any) -> None:
    ledger = SqlLedger(db_engine, secret=SECRET, domain="balf.test", instance="t")
    relay = Relay(smtputf8=False)
    server, port = await relay.start()
    try:
        await _queue_ack(db_engine, "ack:utf8", "jéan@exemple.fr")
        assert await send_pending(ledger, RelaySettings("127.0.0.1", port)) == 0
    finally:
        server.close()
    assert relay.received == []
    row = (await _outbox_rows(db_engine))["ack:utf8"]
    assert row.state == OutboxState.DEAD and "SMTPUTF8" in (row.last_error or "")
    assert "jéan@exemple.fr" in (row.last_error or "")


# --- E. the users' day is Europe/Paris -----------------------------------------------------------

@pytest.mark.parametrize("now, start", [
    # winter, UTC+1: 23:30 UTC is 00:30 the next day in Paris
    (dt.datetime(2026, 1, 15, 23, 30, tzinfo=dt.UTC), dt.datetime(2026, 1, 15, 23, 0, tzinfo=dt.UTC)),
    (dt.datetime(2026, 1, 15, 22, 59, tzinfo=dt.UTC), dt.datetime(2026, 1, 14, 23, 0, tzinfo=dt.UTC)),
    # summer, UTC+2
    (dt.datetime(2026, 7, 15, 22, 30, tzinfo=dt.UTC), dt.datetime(2026, 7, 15, 22, 0, tzinfo=dt.UTC)),
    # the night the clocks go forward (29 March 2026): the day began at 00:00 CET
    (dt.datetime(2026, 3, 29, 12, 0, tzinfo=dt.UTC), dt.datetime(2026, 3, 28, 23, 0, tzinfo=dt.UTC)),
])
def test_day_starts_at_midnight_in_paris(now: dt.datetime, start: dt.datetime) -> None:
    assert day_start(now) == start


def test_acknowledgement_dates_are_paris_time() -> None:
    m = parse_mail(INJECTING, envelope())  # arrived 25 Nov 2026 09:30 UTC
    ack = email.message_from_bytes(_render(INJECTING), policy=email.policy.default)
    assert ack["Date"].endswith("+0100")
    assert "25/11/2026 à 10:30" in ack.get_content() and m.envelope.arrived_at.hour == 9


async def test_daily_limit_counts_the_paris_day(db_engine: Any) -> None:
    ledger = SqlLedger(db_engine, secret=SECRET, domain="balf.test", instance="t")
    evening = dt.datetime(2026, 1, 15, 22, 40, tzinfo=dt.UTC)  # 23:40 in Paris, 15 January
    for n in range(3):
        await _queue_ack(db_engine, f"ack:{n}", "jean@exemple.fr", now=evening)
    late = dt.datetime(2026, 1, 15, 23, 30, tzinfo=dt.UTC)  # 00:30 in Paris: a new day
    assert await ledger.acknowledgements_today("jean@exemple.fr", late) == 0
    earlier = dt.datetime(2026, 1, 15, 22, 50, tzinfo=dt.UTC)  # still the 15th in Paris
    assert await ledger.acknowledgements_today("jean@exemple.fr", earlier) == 3


# --- the null reverse-path is "" from the socket on: bounces are never acknowledged ---------------

async def test_null_reverse_path_is_spooled_empty_and_not_acknowledged(tmp_path: Path) -> None:
    server, limits, spool, port = await _listener(tmp_path, _fsync_dir)
    try:
        assert await asyncio.to_thread(send, port, "", ["sip.paris1@balf.test"], MSG) == {}
        [path] = spool.pending()
        message = spool.read(path)
    finally:
        await stop_listener(server, limits, grace=1)
    assert message.envelope.mail_from == ""
    m = parse_mail(message.raw, message.envelope)
    d = decide_acknowledgement(m, SIP, enabled=True, sent_today=0, per_day=3, own_domain="balf.test")
    assert (d.send, d.reason) == (False, "null reverse-path")


def test_null_reverse_path_spooled_as_angle_brackets_is_not_acknowledged() -> None:
    m = parse_mail(INJECTING, envelope(mail_from="<>"))  # spooled by an earlier version
    d = decide_acknowledgement(m, SIP, enabled=True, sent_today=0, per_day=3, own_domain="balf.test")
    assert (d.send, d.reason) == (False, "null reverse-path")


def test_rendering_failure_means_no_acknowledgement_not_a_failed_record() -> None:
    from balf.gateway.model import OpenThread, Routed, ServiceRef
    from balf.gateway.worker import Context, WorkerSettings, _acknowledgement_maker

    broken = ServiceRef(1, "SIP75001", "SIP Paris 1er", "sip75001", True, "not an address")
    routed = Routed(parse_mail(PLAIN, envelope()), broken, OpenThread())
    ctx = Context(WorkerSettings(secret=SECRET, domain="balf.test"), None, None, lambda: TABLE)  # type: ignore[arg-type]
    make = _acknowledgement_maker(ctx, routed, dt.datetime(2026, 11, 25, 9, 30, tzinfo=dt.UTC))
    assert make(1, "EC-2026-000001", 0) is None
