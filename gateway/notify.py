"""The notification sender (I/O): sends the outbox (acknowledgements, notices) through the relay.

Rows are claimed like spool entries (a lease in ``next_attempt_at``; SKIP LOCKED on
PostgreSQL), sent with aiosmtplib, and marked sent; a 5xx from the relay makes the row dead with
the reason, anything else retries with backoff. At most once per ``dedup_key`` is enforced by the
table's unique constraint when the row is written, in the same transaction as the message.

Envelope: ``MAIL FROM:<>``. Acknowledgements and notices are automatic replies, sent with the
null reverse-path (RFC 3834 3.3, RFC 5321 4.5.5) so that a bounce is never sent back to the
service's address, where it would open a thread of its own. A recipient whose local part is
not ASCII is sent with SMTPUTF8 (RFC 6531) when the relay offers it; when it does not, that
notification is dead at once with the reason (never an RFC 2047 word inside an address).
An internationalised domain with an ASCII local part is written as A-labels and needs nothing.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email.parser
import email.policy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import aiosmtplib

from balf.gateway.acknowledgement import ascii_address
from balf.gateway.errors import DatabaseUnavailable, PermanentFailure
from balf.gateway.ledger import SqlLedger

log = logging.getLogger("balf.gateway.notify")


@dataclass(frozen=True)
class RelaySettings:
    host: str
    port: int
    tls: str = "none"
    username: str = ""
    password: str = field(default="", repr=False)  # never in logs or tracebacks
    timeout: float = 30.0
    retry_delay: float = 60.0
    max_attempts: int = 20


async def send_pending(ledger: SqlLedger, relay: RelaySettings,
                       clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC)) -> int:
    """Send what is due; returns how many were sent."""
    sent = 0
    for outbox_id, to_address, content, attempts in await ledger.claim_outbox(20, clock(), lease=300):
        headers = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(content)
        mid = headers.get("Message-ID")
        try:
            await send_one(relay, to_address, content)
        except PermanentFailure as exc:
            await ledger.outbox_result(outbox_id, sent=False, error=exc.detail, now=clock(), retry_at=None)
            log.warning("event=notify.refused outbox_id=%d message_id=%r to=%r reply=%r dead=True",
                        outbox_id, mid, to_address, exc.detail)
            continue
        except (aiosmtplib.SMTPResponseException, aiosmtplib.SMTPRecipientsRefused) as exc:
            refusal = exc.recipients[0] if isinstance(exc, aiosmtplib.SMTPRecipientsRefused) else exc
            permanent = refusal.code >= 500 or attempts >= relay.max_attempts
            retry_at = None if permanent else clock() + dt.timedelta(seconds=relay.retry_delay * attempts)
            reply = f"{refusal.code} {refusal.message}"
            await ledger.outbox_result(outbox_id, sent=False, error=reply, now=clock(), retry_at=retry_at)
            log.warning("event=notify.refused outbox_id=%d message_id=%r to=%r reply=%r dead=%s",
                        outbox_id, mid, to_address, reply, permanent)
            continue
        except Exception as exc:  # noqa: BLE001 - connection trouble; a bug must not stop the notifier
            if not isinstance(exc, aiosmtplib.SMTPException | OSError | TimeoutError):
                log.exception("event=notify.bug outbox_id=%d", outbox_id)
            retry_at = (None if attempts >= relay.max_attempts
                        else clock() + dt.timedelta(seconds=relay.retry_delay * attempts))
            await ledger.outbox_result(outbox_id, sent=False, error=repr(exc)[:500], now=clock(),
                                       retry_at=retry_at)
            log.warning("event=notify.retry outbox_id=%d message_id=%r to=%r error=%r",
                        outbox_id, mid, to_address, repr(exc)[:200])
            continue
        await ledger.outbox_result(outbox_id, sent=True, error=None, now=clock(), retry_at=None)
        log.info("event=notify.sent outbox_id=%d message_id=%r to=%r", outbox_id, mid, to_address)
        sent += 1
    return sent


async def send_one(relay: RelaySettings, to_address: str, content: bytes) -> None:
    """One message to one recipient through the relay, from the null reverse-path.

    Raises :class:`PermanentFailure` when it can never be sent as it is (an address that
    cannot go on a RCPT line, SMTPUTF8 needed and not offered); aiosmtplib's exceptions for
    the relay's replies and for connection trouble.
    """
    rcpt = ascii_address(to_address)
    header_section = content.split(b"\r\n\r\n", 1)[0]
    utf8 = not rcpt.isascii() or not header_section.isascii()
    client = aiosmtplib.SMTP(
        hostname=relay.host, port=relay.port, use_tls=relay.tls == "ssl",
        start_tls=relay.tls == "starttls", username=relay.username or None,
        password=relay.password or None, timeout=relay.timeout)
    async with client:
        if client.is_ehlo_or_helo_needed:
            await client.ehlo()
        options = []
        if utf8:
            if not client.supports_extension("smtputf8"):
                raise PermanentFailure(
                    f"recipient {to_address!r} needs SMTPUTF8 (RFC 6531), which the relay "
                    f"{relay.host}:{relay.port} does not offer")
            options.append("SMTPUTF8")
            if client.supports_extension("8bitmime"):
                options.append("BODY=8BITMIME")
        try:
            # RFC 3834 3.3: automatic replies go out with the null reverse-path.
            await client.sendmail("", [rcpt], content, mail_options=options)
        except ValueError as exc:  # aiosmtplib: not something a RCPT line can carry
            raise PermanentFailure(f"recipient {to_address!r} cannot be sent to: {exc}") from None


async def notify_loop(ledger: SqlLedger, relay: RelaySettings, stop: asyncio.Event,
                      poll: float = 2.0) -> None:
    while not stop.is_set():
        try:
            n = await send_pending(ledger, relay)
        except DatabaseUnavailable as exc:
            log.warning("event=notify.database_down error=%r", exc.detail)
            n = 0
        if n == 0:
            try:
                await asyncio.wait_for(stop.wait(), poll)
            except TimeoutError:
                pass
