"""The SMTP and LMTP listeners (I/O): a thin adapter from aiosmtpd to the gateway.

The handler turns an aiosmtpd transaction into our own values, calls the pure checks and the
spool, and maps our exceptions to the named replies of :mod:`balf.gateway.replies`. The
``GatewaySMTP``/``GatewayLMTP`` subclasses add what aiosmtpd does not do: enhanced status codes
on its own replies (RFC 2034), a cap on concurrent sessions (421), a DATA time limit, and a
graceful shutdown.

The DATA time limit applies to receiving the data only; storing it is never cut short
(:meth:`FileSpool.store` is shielded and withdraws a message whose session was cancelled), so
a 250 or a 451 is only ever sent for a known outcome.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, Session
from aiosmtpd.smtp import Envelope as SmtpEnvelope

from balf.gateway import tokens
from balf.gateway.errors import GatewayError
from balf.gateway.model import Envelope
from balf.gateway.parse import check_data
from balf.gateway.received import received_header
from balf.gateway.replies import Reply, add_enhanced_code, replies
from balf.gateway.services import ServiceTable, resolve_recipient
from balf.gateway.spool import FileSpool

log = logging.getLogger("balf.gateway.smtp")


@dataclass
class Directory:
    """The latest snapshot of BALF addresses (refreshed from the database by the daemon;
    kept while the database is down so RCPT checks go on)."""

    table: ServiceTable | None = None


@dataclass
class SessionLimits:
    """Shared by every session of one listener: counts them and closes them at shutdown."""

    max_connections: int
    data_timeout: float = 600.0
    sessions: set[GatewaySMTP] = field(default_factory=set)
    closing: bool = False

    @property
    def active(self) -> int:
        return len(self.sessions)


class GatewayHandler:
    """aiosmtpd ``handle_*`` hooks for one listener."""

    def __init__(self, *, directory: Directory, spool: FileSpool, secret: bytes, hostname: str,
                 max_recipients: int, lmtp: bool = False,
                 clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC)) -> None:
        self.directory = directory
        self.spool = spool
        self.secret = secret
        self.hostname = hostname
        self.max_recipients = max_recipients
        self.lmtp = lmtp
        self.clock = clock

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: SmtpEnvelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        # No AUTH on the inbound listener; advertise what we do (RFC 2034, RFC 2920).
        kept = [r for r in responses if not r[4:].upper().startswith("AUTH")]
        return [*kept[:-1], "250-PIPELINING", "250-ENHANCEDSTATUSCODES", kept[-1]]

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: SmtpEnvelope,
                          address: str, mail_options: list[str]) -> str:
        if _path_too_long(address):
            log.info("event=smtp.mail_refused peer=%s reason='path too long' length=%d",
                     _peer(session), len(address))
            return str(replies.SENDER_PATH_TOO_LONG)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return str(replies.SENDER_OK)

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: SmtpEnvelope,
                          address: str, rcpt_options: list[str]) -> str:
        if _path_too_long(address):
            log.info("event=smtp.rcpt_refused peer=%s reason='path too long' length=%d",
                     _peer(session), len(address))
            return str(replies.RECIPIENT_PATH_TOO_LONG)
        if len(envelope.rcpt_tos) >= self.max_recipients:
            return str(replies.TOO_MANY_RECIPIENTS)  # RFC 5321 4.5.3.1.10: 452, client retries the rest
        table = self.directory.table
        if table is None:
            return str(replies.DIRECTORY_UNAVAILABLE)
        try:
            resolve_recipient(address, table, self.secret)
        except GatewayError as exc:
            log.info("event=smtp.rcpt_refused peer=%s rcpt=%r reply=%r", _peer(session), address,
                     str(exc.reply))
            return str(exc.reply)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return str(replies.RECIPIENT_OK)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: SmtpEnvelope) -> str:
        reply = await self._accept(server, session, envelope)
        if self.lmtp:  # RFC 2033 4.2: one reply per accepted recipient
            return "\r\n".join([str(reply)] * len(envelope.rcpt_tos))
        return str(reply)

    async def _accept(self, server: SMTP, session: Session, envelope: SmtpEnvelope) -> Reply:
        raw = envelope.original_content or b""
        spool_id = tokens.new_spool_id()
        try:
            check_data(raw)
            env = Envelope(
                spool_id=spool_id,
                # aiosmtpd keeps the null reverse-path as "<>" (it needs a true value there);
                # ours is "", so bounces are known as such and never acknowledged (RFC 3834 3.1.5).
                mail_from="" if envelope.mail_from in (None, "<>") else envelope.mail_from,
                recipients=tuple(envelope.rcpt_tos),
                arrived_at=self.clock(),
                peer=_peer(session),
                helo=session.host_name or "",
                protocol=_protocol(session, envelope, self.lmtp),
                smtputf8=bool(envelope.smtp_utf8),
            )
            recipient = env.recipients[0] if len(env.recipients) == 1 else None
            await self.spool.store(env, received_header(env, self.hostname, recipient) + raw)
        except GatewayError as exc:
            log.warning("event=smtp.data_refused spool_id=%s peer=%s from=%r reason=%r reply=%r",
                        spool_id, _peer(session), envelope.mail_from, exc.detail, str(exc.reply))
            return exc.reply
        log.info("event=smtp.accepted spool_id=%s peer=%s from=%r rcpt=%r size=%d",
                 spool_id, env.peer, env.mail_from, ",".join(env.recipients), len(raw))
        return replies.QUEUED.with_text(f"Ok: queued as {spool_id}")

    async def handle_exception(self, error: Exception) -> str:
        log.exception("event=smtp.session_error error=%r", error)
        return str(replies.TEMPORARY_LOCAL_ERROR)


MAX_PATH_OCTETS = 256  # RFC 5321 4.5.3.1.3, angle brackets included


def _path_too_long(address: str | None) -> bool:
    """The reverse- or forward-path would exceed 256 octets (and the database's columns)."""
    return address is not None and len(address.encode("utf-8", "surrogateescape")) + 2 > MAX_PATH_OCTETS


def _peer(session: Session) -> str:
    peer = session.peer
    if isinstance(peer, tuple):
        return f"[{peer[0]}]:{peer[1]}"
    return str(peer or "")


def _protocol(session: Session, envelope: SmtpEnvelope, lmtp: bool) -> str:
    # RFC 3848 / RFC 6531 with-protocol names.
    if lmtp:
        return "LMTP"
    base = "ESMTP" if session.extended_smtp else "SMTP"
    if envelope.smtp_utf8:
        base = "UTF8" + base
    return base + ("S" if session.ssl else "")


class GatewaySMTP(SMTP):
    """aiosmtpd's SMTP with enhanced codes on every reply, a session cap and a DATA deadline."""

    def __init__(self, handler: Any, *, limits: SessionLimits, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._limits = limits
        self._refuse: Reply | None = None
        self._bare_replies = False
        self._data_deadline: asyncio.Timeout | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        if first:
            if self._limits.closing:
                self._refuse = replies.SHUTTING_DOWN
            elif self._limits.active >= self._limits.max_connections:
                self._refuse = replies.TOO_MANY_CONNECTIONS
            else:
                self._limits.sessions.add(self)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self._limits.sessions.discard(self)
        super().connection_lost(error)

    async def _handle_client(self) -> None:
        if self._refuse is not None:
            # RFC 5321 3.8: a server that cannot serve answers 421 instead of the greeting.
            log.warning("event=smtp.connection_refused peer=%r reason=%r", self.session.peer if self.session else None,
                        self._refuse.text.split(" ", 1)[1])
            self._writer.write(str(self._refuse).format(host=self.hostname).encode() + b"\r\n")
            await self._writer.drain()
            assert self.transport is not None
            self.transport.close()
            return
        await super()._handle_client()

    async def push(self, status: Any) -> None:
        if isinstance(status, bytes):
            status = status.decode("utf-8", "surrogateescape")
        if not self._bare_replies and not status.startswith("220 "):
            status = "\r\n".join(add_enhanced_code(line) for line in status.split("\r\n"))
        await super().push(status)

    async def smtp_EHLO(self, hostname: str) -> None:
        self._bare_replies = True  # RFC 2034 3: no enhanced codes on EHLO/HELO replies
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._bare_replies = False

    async def smtp_HELO(self, hostname: str) -> None:
        self._bare_replies = True
        try:
            await super().smtp_HELO(hostname)
        finally:
            self._bare_replies = False

    async def smtp_DATA(self, arg: str) -> None:
        # The deadline covers reading the data only. Once the final dot is in, the handler
        # stores the message to a known outcome and the client hears it (250 or 451): a
        # deadline that fired during the spool write would hang up on a message that is then
        # delivered anyway, and the client's retry would deliver it twice.
        try:
            async with asyncio.timeout(self._limits.data_timeout) as deadline:
                self._data_deadline = deadline
                await super().smtp_DATA(arg)
        except TimeoutError:
            log.warning("event=smtp.data_timeout peer=%r", self.session.peer if self.session else None)
            if self.transport is not None:
                self.transport.close()
        finally:
            self._data_deadline = None

    async def _call_handler_hook(self, command: str, *args: Any) -> Any:
        if command == "DATA" and self._data_deadline is not None:
            self._data_deadline.reschedule(None)  # all data read: the deadline is over
        return await super()._call_handler_hook(command, *args)

    def close_now(self) -> None:
        if self.transport is not None:
            self.transport.close()


class GatewayLMTP(GatewaySMTP, LMTP):
    """LMTP (RFC 2033) for sitting behind Postfix as its delivery transport."""

    async def smtp_LHLO(self, arg: str) -> None:
        self._bare_replies = True
        try:
            await SMTP.smtp_EHLO(self, arg)
        finally:
            self._bare_replies = False

    async def smtp_HELO(self, arg: str) -> None:
        await LMTP.smtp_HELO(self, arg)

    async def smtp_EHLO(self, arg: str) -> None:
        await LMTP.smtp_EHLO(self, arg)


def tls_context(cert: str, key: str) -> ssl.SSLContext | None:
    if not cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key or None)
    return ctx


async def start_listener(handler: GatewayHandler, *, host: str, port: int, limits: SessionLimits,
                         lmtp: bool = False, hostname: str | None = None,
                         data_size_limit: int = 26214400, command_timeout: float = 300.0,
                         tls: ssl.SSLContext | None = None) -> asyncio.Server:
    """Listen on ``host:port``; the returned server is closed with :func:`stop_listener`."""
    loop = asyncio.get_running_loop()
    cls = GatewayLMTP if lmtp else GatewaySMTP

    def factory() -> GatewaySMTP:
        return cls(handler, limits=limits, data_size_limit=data_size_limit, enable_SMTPUTF8=True,
                   decode_data=False, hostname=hostname or socket.getfqdn(), ident="ESMTP balf",
                   tls_context=None if lmtp else tls, timeout=command_timeout, loop=loop)

    server = await loop.create_server(factory, host=host, port=port, reuse_address=True)
    log.info("event=listener.started protocol=%s address=%s:%d", "LMTP" if lmtp else "SMTP", host, port)
    return server


async def stop_listener(server: asyncio.Server, limits: SessionLimits, grace: float = 5.0) -> None:
    """Stop accepting, let sessions finish for ``grace`` seconds, then close the rest."""
    limits.closing = True
    server.close()
    deadline = asyncio.get_running_loop().time() + grace
    while limits.active and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    for session in list(limits.sessions):
        session.close_now()
    await server.wait_closed()
