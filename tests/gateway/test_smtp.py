"""The SMTP/LMTP listeners over real sockets with real clients (aiosmtpd on loopback, smtplib).

The spool is a real FileSpool in tmp_path; no database or IMAP is involved: what must hold here
is that every reply is right and that a 250 means the message is on disk.
"""

from __future__ import annotations

import asyncio
import os
import smtplib
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from balf.gateway import tokens
from balf.gateway.smtp import Directory, GatewayHandler, SessionLimits, start_listener, stop_listener
from balf.gateway.spool import FileSpool
from tests.gateway.test_pure import SECRET, TABLE

MSG = (b"From: jean@exemple.fr\r\nTo: sip.paris1@balf.test\r\nSubject: Bonjour\r\n"
       b"Message-ID: <t1@exemple.fr>\r\n\r\nCorps du message.\r\n")


@dataclass
class Listener:
    port: int
    spool: FileSpool
    limits: SessionLimits
    server: asyncio.Server


async def _listen(tmp_path: Path, *, lmtp: bool = False, max_connections: int = 20,
                  size: int = 1_000_000, tls: ssl.SSLContext | None = None,
                  max_recipients: int = 5) -> Listener:
    spool = FileSpool(tmp_path / "spool", group_commit_ms=1)
    spool.open()
    limits = SessionLimits(max_connections, data_timeout=30)
    handler = GatewayHandler(directory=Directory(TABLE), spool=spool, secret=SECRET,
                             hostname="mx.balf.test", max_recipients=max_recipients, lmtp=lmtp)
    server = await start_listener(handler, host="127.0.0.1", port=0, limits=limits, lmtp=lmtp,
                                  hostname="mx.balf.test", data_size_limit=size, tls=tls,
                                  command_timeout=10)
    return Listener(server.sockets[0].getsockname()[1], spool, limits, server)


@pytest.fixture
async def smtp(tmp_path: Path) -> AsyncIterator[Listener]:
    listener = await _listen(tmp_path)
    yield listener
    await stop_listener(listener.server, listener.limits, grace=1)


def spooled(listener: Listener) -> list[bytes]:
    return [p.read_bytes() for p in listener.spool.pending()]


def send(port: int, mail_from: str, rcpts: list[str], data: bytes) -> dict[str, tuple[int, bytes]]:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("client.exemple.fr")
        return client.sendmail(mail_from, rcpts, data)


def raw_session(port: int, lines: list[bytes], *, read_after_each: bool = True) -> list[bytes]:
    """Speak SMTP byte by byte (for what smtplib would normalise away); returns every reply line."""
    out: list[bytes] = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        f = sock.makefile("rb")

        def read_reply() -> None:
            while True:
                line = f.readline()
                out.append(line.rstrip(b"\r\n"))
                if len(line) < 4 or line[3:4] != b"-":
                    return
        read_reply()
        for chunk in lines:
            sock.sendall(chunk)
            if read_after_each:
                read_reply()
    return out


async def test_accepts_and_spools_before_250(smtp: Listener) -> None:
    refused = await asyncio.to_thread(send, smtp.port, "jean@exemple.fr", ["SIP.Paris1@balf.test"], MSG)
    assert refused == {}
    [entry] = spooled(smtp)
    head, _, body = entry.partition(b"\n")
    assert body.startswith(b"Received: from client.exemple.fr ([127.0.0.1]:")
    assert body.endswith(MSG)  # the original bytes, untouched after the Received header
    assert smtp.spool.flushes >= 1


async def test_ehlo_advertises_extensions(smtp: Listener) -> None:
    def ehlo() -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", smtp.port, timeout=10) as c:
            return c.ehlo("x")
    code, text = await asyncio.to_thread(ehlo)
    for ext in (b"SIZE 1000000", b"8BITMIME", b"SMTPUTF8", b"ENHANCEDSTATUSCODES", b"PIPELINING"):
        assert ext in text
    assert b"AUTH" not in text


async def test_recipients(smtp: Listener) -> None:
    reply = tokens.reply_address(SECRET, "sip.paris1", "balf.test", 12)

    def go() -> list[tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", smtp.port, timeout=10) as c:
            c.ehlo("x")
            c.mail("jean@exemple.fr")
            return [c.rcpt("nobody@balf.test"), c.rcpt("sip.paris1+12-aaaaaaaaaaaaaaaa@balf.test"),
                    c.rcpt(reply), c.rcpt("sie.paris2@balf.test"), c.rcpt("sip.paris1@balf.test"),
                    c.rcpt("accueil.paris1@balf.test"), c.rcpt("sie.paris2@balf.test"),
                    c.rcpt("sie.paris2@balf.test")]
    r = await asyncio.to_thread(go)
    assert r[0] == (550, b"5.1.1 Recipient address rejected: user unknown")
    assert r[1][0] == 550
    assert [x[0] for x in r[2:7]] == [250] * 5
    assert r[7] == (452, b"4.5.3 Too many recipients")


@pytest.mark.parametrize("payload", [
    b"From: a@b.fr\r\n\r\nhello\n.\nMAIL FROM:<evil@x>\r\nRCPT TO:<sip.paris1@balf.test>\r\n",
    b"From: a@b.fr\r\n\r\nhello\r\n.\nMAIL FROM:<evil@x>\r\n",
    b"From: a@b.fr\r\n\r\nhello\n.\r\nMAIL FROM:<evil@x>\r\n",
    b"From: a@b.fr\r\n\r\nhello\r.\r\nMAIL FROM:<evil@x>\r\n",
])
async def test_smuggling_refused(smtp: Listener, payload: bytes) -> None:
    lines = [b"EHLO x\r\n", b"MAIL FROM:<a@b.fr>\r\n", b"RCPT TO:<sip.paris1@balf.test>\r\n",
             b"DATA\r\n", payload + b".\r\n", b"NOOP\r\n", b"QUIT\r\n"]
    replies = await asyncio.to_thread(raw_session, smtp.port, lines)
    assert replies[-3].startswith(b"550 5.5.2")
    assert replies[-2].startswith(b"250 2.0.0")  # the session goes on: only one reply per DATA
    assert replies[-1].startswith(b"221")
    assert spooled(smtp) == []


async def test_bad_input_gets_right_reply(smtp: Listener) -> None:
    base = [b"EHLO x\r\n", b"MAIL FROM:<a@b.fr>\r\n", b"RCPT TO:<sip.paris1@balf.test>\r\n", b"DATA\r\n"]
    cases = [
        (b"From: a@b.fr\r\n\r\nx\x00y\r\n.\r\n", b"550 5.6.0"),                     # NUL
        (b"From: a@b.fr\r\n\r\n" + b"x" * 10_000 + b"\r\n.\r\n", b"500 5.5.2"),      # long line
        ("From: a@b.fr\r\nSubject: été\r\n\r\n8-bit headers, no SMTPUTF8\r\n.\r\n".encode(), b"250 2.0.0"),
        (b"Content-Type: multipart/mixed; boundary=zz\r\n\r\n--yy\r\nbroken\r\n.\r\n", b"250 2.0.0"),
    ]
    for data, expected in cases:
        replies = await asyncio.to_thread(raw_session, smtp.port, [*base, data, b"QUIT\r\n"])
        assert replies[-2].startswith(expected), (data[:40], replies)
    assert len(spooled(smtp)) == 2


async def test_size_limit(tmp_path: Path) -> None:
    listener = await _listen(tmp_path, size=50_000)
    try:
        big = b"From: a@b.fr\r\n\r\n" + (b"y" * 998 + b"\r\n") * 60

        def declared() -> tuple[int, bytes]:
            with smtplib.SMTP("127.0.0.1", listener.port, timeout=10) as c:
                c.ehlo("x")
                return c.mail("a@b.fr", ["SIZE=60000"])
        assert (await asyncio.to_thread(declared))[0] == 552
        with pytest.raises(smtplib.SMTPSenderRefused):  # smtplib declares SIZE=
            await asyncio.to_thread(send, listener.port, "a@b.fr", ["sip.paris1@balf.test"], big)
        lines = [b"EHLO x\r\n", b"MAIL FROM:<a@b.fr>\r\n", b"RCPT TO:<sip.paris1@balf.test>\r\n",
                 b"DATA\r\n", big + b".\r\n", b"QUIT\r\n"]  # undeclared size
        replies = await asyncio.to_thread(raw_session, listener.port, lines)
        assert replies[-2].startswith(b"552 5.3.4")
        assert spooled(listener) == []
    finally:
        await stop_listener(listener.server, listener.limits, grace=1)


@pytest.mark.slow
async def test_fifty_megabytes_refused_without_memory_blowup(smtp: Listener) -> None:
    chunk = (b"z" * 998 + b"\r\n") * 1000  # ~1 MB
    def go() -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", smtp.port, timeout=60) as c:
            c.ehlo("x")
            c.mail("a@b.fr")
            c.rcpt("sip.paris1@balf.test")
            c.putcmd("data")
            assert c.getreply()[0] == 354
            c.send(b"From: a@b.fr\r\n\r\n")
            for _ in range(50):
                c.send(chunk)
            c.send(b".\r\n")
            reply = c.getreply()
            assert c.noop()[0] == 250  # the daemon is still there
            return reply
    code, text = await asyncio.to_thread(go)
    assert (code, text[:5]) == (552, b"5.3.4")


async def test_unwritable_spool_gets_451(smtp: Listener) -> None:
    if os.geteuid() == 0:
        smtp.spool.min_free_bytes = 1 << 62  # root ignores permissions: make the disk "full"
    else:
        smtp.spool.tmp.chmod(0o500)
    with pytest.raises(smtplib.SMTPDataError) as info:
        await asyncio.to_thread(send, smtp.port, "a@b.fr", ["sip.paris1@balf.test"], MSG)
    assert (info.value.smtp_code, info.value.smtp_error) == (
        451, b"4.3.0 Cannot store the message now, try again later")
    assert spooled(smtp) == []


async def test_read_only_spool_directory_gets_451(tmp_path: Path) -> None:
    listener = await _listen(tmp_path)
    try:
        # A file where the directory should be: every write fails, even for root.
        tmp = listener.spool.tmp
        for p in tmp.iterdir():
            p.unlink()
        tmp.rmdir()
        tmp.write_text("not a directory")
        with pytest.raises(smtplib.SMTPDataError) as info:
            await asyncio.to_thread(send, listener.port, "a@b.fr", ["sip.paris1@balf.test"], MSG)
        assert info.value.smtp_code == 451
    finally:
        await stop_listener(listener.server, listener.limits, grace=1)


async def test_connection_cap_gives_421(tmp_path: Path) -> None:
    listener = await _listen(tmp_path, max_connections=2)
    try:
        held = [await asyncio.open_connection("127.0.0.1", listener.port) for _ in range(2)]
        for reader, _ in held:
            assert (await reader.readline()).startswith(b"220 ")
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        assert (await reader.readline()).startswith(b"421 4.7.0 mx.balf.test Too many connections")
        assert await reader.read() == b""  # and closed
        writer.close()
        for _, w in held:
            w.close()
        await asyncio.sleep(0.2)
        assert (await asyncio.to_thread(send, listener.port, "a@b.fr", ["sip.paris1@balf.test"], MSG)) == {}
    finally:
        await stop_listener(listener.server, listener.limits, grace=1)


async def test_starttls(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("mx.balf.test", "127.0.0.1")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    listener = await _listen(tmp_path, tls=server_ctx)
    try:
        def go() -> tuple[bytes, dict[str, tuple[int, bytes]]]:
            client_ctx = ssl.create_default_context()
            ca.configure_trust(client_ctx)
            with smtplib.SMTP("127.0.0.1", listener.port, timeout=10) as c:
                c.ehlo("x")
                assert c.has_extn("starttls")
                c.starttls(context=client_ctx)
                code, text = c.ehlo("x")
                return text, c.sendmail("a@b.fr", ["sip.paris1@balf.test"], MSG)
        text, refused = await asyncio.to_thread(go)
        assert b"STARTTLS" not in text and refused == {}
        [entry] = spooled(listener)
        assert b"with ESMTPS id" in entry
    finally:
        await stop_listener(listener.server, listener.limits, grace=1)


async def test_lmtp_one_reply_per_recipient(tmp_path: Path) -> None:
    listener = await _listen(tmp_path, lmtp=True)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)

        async def reply() -> bytes:
            while (line := await reader.readline())[3:4] == b"-":
                pass
            return line
        assert (await reply()).startswith(b"220")
        for line in (b"LHLO postfix\r\n", b"MAIL FROM:<a@b.fr>\r\n", b"RCPT TO:<sip.paris1@balf.test>\r\n",
                     b"RCPT TO:<sie.paris2@balf.test>\r\n", b"DATA\r\n"):
            writer.write(line)
            assert (await reply())[:1] in (b"2", b"3")
        writer.write(MSG + b".\r\n")
        first, second = await reply(), await reply()
        assert first.startswith(b"250 2.0.0") and second.startswith(b"250 2.0.0")
        writer.write(b"EHLO x\r\n")
        assert (await reply()).startswith(b"500")  # LMTP has LHLO only
        writer.close()
        assert [b"with LMTP id" in e for e in spooled(listener)] == [True]
    finally:
        await stop_listener(listener.server, listener.limits, grace=1)


async def test_shutdown_refuses_new_sessions(tmp_path: Path) -> None:
    listener = await _listen(tmp_path)
    await stop_listener(listener.server, listener.limits, grace=0.1)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", listener.port), timeout=2)
