"""The notification sender (I/O): sends the outbox (acknowledgements, notices) through the relay.

Rows are claimed like spool entries (a lease in ``next_attempt_at``; SKIP LOCKED on
PostgreSQL), sent with aiosmtplib, and marked sent; a 5xx from the relay makes the row dead with
the reason, anything else retries with backoff. At most once per ``dedup_key`` is enforced by the
table's unique constraint when the row is written, in the same transaction as the message.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email.parser
import email.policy
import email.utils
import logging
from collections.abc import Callable
from dataclasses import dataclass

import aiosmtplib

from balf.gateway.errors import DatabaseUnavailable
from balf.gateway.ledger import SqlLedger

log = logging.getLogger("balf.gateway.notify")


@dataclass(frozen=True)
class RelaySettings:
    host: str
    port: int
    tls: str = "none"
    username: str = ""
    password: str = ""
    timeout: float = 30.0
    retry_delay: float = 60.0
    max_attempts: int = 20


async def send_pending(ledger: SqlLedger, relay: RelaySettings,
                       clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC)) -> int:
    """Send what is due; returns how many were sent."""
    sent = 0
    for outbox_id, to_address, content, attempts in await ledger.claim_outbox(20, clock(), lease=300):
        headers = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(content)
        mail_from = email.utils.parseaddr(headers.get("From", ""))[1]
        mid = headers.get("Message-ID")
        try:
            await aiosmtplib.send(
                content, sender=mail_from, recipients=[to_address], hostname=relay.host,
                port=relay.port, use_tls=relay.tls == "ssl", start_tls=relay.tls == "starttls",
                username=relay.username or None, password=relay.password or None,
                timeout=relay.timeout)
        except (aiosmtplib.SMTPResponseException, aiosmtplib.SMTPRecipientsRefused) as exc:
            refusal = exc.recipients[0] if isinstance(exc, aiosmtplib.SMTPRecipientsRefused) else exc
            permanent = refusal.code >= 500 or attempts >= relay.max_attempts
            retry_at = None if permanent else clock() + dt.timedelta(seconds=relay.retry_delay * attempts)
            reply = f"{refusal.code} {refusal.message}"
            await ledger.outbox_result(outbox_id, sent=False, error=reply, now=clock(), retry_at=retry_at)
            log.warning("event=notify.refused outbox_id=%d message_id=%r to=%r reply=%r dead=%s",
                        outbox_id, mid, to_address, reply, permanent)
            continue
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
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
