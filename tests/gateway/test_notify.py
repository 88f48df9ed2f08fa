"""The notification sender against a real SMTP relay on loopback (aiosmtpd sink)."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

from aiosmtpd.smtp import SMTP
from sqlalchemy import select

from balf.db.engine import session_factory
from balf.db.models import NotificationOutbox, OutboxState
from balf.gateway.ledger import SqlLedger
from balf.gateway.notify import RelaySettings, send_pending

ACK = (b"From: SIP <sip@balf.test>\r\nTo: jean@exemple.fr\r\nSubject: [EC-2026-000001] Accuse\r\n"
       b"Message-ID: <n1@balf.test>\r\nAuto-Submitted: auto-replied\r\n\r\nBonjour\r\n")


class Sink:
    def __init__(self, refuse: bool = False) -> None:
        self.received: list[tuple[str, list[str], bytes]] = []
        self.refuse = refuse

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, options: Any) -> str:
        if self.refuse:
            return "550 5.1.1 no such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.received.append((envelope.mail_from, envelope.rcpt_tos, envelope.original_content))
        return "250 OK"


async def _relay(sink: Sink) -> tuple[asyncio.Server, int]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SMTP(sink, hostname="relay"), "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _outbox(engine: Any, key: str) -> None:
    async with session_factory(engine).begin() as s:
        s.add(NotificationOutbox(dedup_key=key, kind="acknowledgement", to_address="jean@exemple.fr",
                                 content=ACK))


async def test_outbox_sent_once_and_refusals_dead(db_engine: Any) -> None:
    ledger = SqlLedger(db_engine, secret=b"s" * 32, domain="balf.test", instance="t")
    sink = Sink()
    server, port = await _relay(sink)
    try:
        await _outbox(db_engine, "ack:1")
        assert await send_pending(ledger, RelaySettings("127.0.0.1", port)) == 1
        assert await send_pending(ledger, RelaySettings("127.0.0.1", port)) == 0
        assert sink.received == [("<>", ["jean@exemple.fr"], ACK)]  # RFC 3834 3.3: MAIL FROM:<>
        sink.refuse = True
        await _outbox(db_engine, "ack:2")
        assert await send_pending(ledger, RelaySettings("127.0.0.1", port)) == 0
    finally:
        server.close()
    await _outbox(db_engine, "ack:3")  # relay down: retried later, not lost
    assert await send_pending(ledger, RelaySettings("127.0.0.1", port, timeout=2)) == 0
    async with session_factory(db_engine)() as s:
        rows = {r.dedup_key: r for r in (await s.execute(select(NotificationOutbox))).scalars()}
    assert rows["ack:1"].state == OutboxState.SENT
    assert rows["ack:2"].state == OutboxState.DEAD and "550" in (rows["ack:2"].last_error or "")
    assert rows["ack:3"].state == OutboxState.PENDING and rows["ack:3"].attempts == 1
    next_at = rows["ack:3"].next_attempt_at
    assert (next_at if next_at.tzinfo else next_at.replace(tzinfo=dt.UTC)) > dt.datetime.now(dt.UTC)
