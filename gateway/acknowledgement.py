"""Automatic acknowledgements (no I/O): the RFC 3834 decision and the French message.

RFC 3834: never answer auto-submitted mail (2), mailing lists and bulk mail (2), the null
reverse-path or system senders (3.1.5); answer the Return-Path (3.1.5), at most N per sender
per day (5); mark ours ``Auto-Submitted: auto-replied`` (5) and keep the thread's Message-IDs.
"""

from __future__ import annotations

import datetime as dt
import email.utils
from email.headerregistry import Address as HeaderAddress
from email.message import EmailMessage
from email.policy import SMTP

import jinja2

from balf.gateway.model import AckDecision, InboundMail, ServiceRef

_SYSTEM_LOCALS = ("mailer-daemon", "postmaster", "nobody", "noreply", "no-reply", "donotreply",
                  "do-not-reply", "listserv", "majordomo", "root")

_env = jinja2.Environment(
    loader=jinja2.PackageLoader("balf.gateway", "templates"),
    autoescape=False, keep_trailing_newline=True, undefined=jinja2.StrictUndefined,
)


def decide_acknowledgement(mail: InboundMail, service: ServiceRef, *, enabled: bool,
                           sent_today: int, per_day: int, own_domain: str) -> AckDecision:
    """Whether to acknowledge ``mail`` for ``service`` (new thread opened)."""
    sender = mail.envelope.mail_from.lower()
    local, _, domain = sender.rpartition("@")
    checks = (
        (not enabled or not service.acknowledge, "acknowledgements off"),
        (not sender, "null reverse-path"),
        (mail.auto_submitted not in (None, "no"), f"Auto-Submitted: {mail.auto_submitted}"),
        (mail.precedence in ("bulk", "list", "junk"), f"Precedence: {mail.precedence}"),
        (mail.is_list, "mailing list"),
        (mail.suppress_auto_reply, "auto-reply suppressed by the sender"),
        (local in _SYSTEM_LOCALS or local.startswith("owner-") or local.endswith("-request")
         or local.startswith("bounce"), "system sender"),
        (domain == own_domain.lower(), "sender in our own domain"),
        (sent_today >= per_day, f"already {sent_today} acknowledgements today"),
    )
    for refused, reason in checks:
        if refused:
            return AckDecision(False, reason)
    return AckDecision(True, "ok")


def render_acknowledgement(mail: InboundMail, service: ServiceRef, *, reference: str,
                           reply_to: str, message_id: str, portal_url: str,
                           now: dt.datetime) -> bytes:
    """The acknowledgement's bytes, ready for the outbox."""
    body = _env.get_template("acknowledgement.txt").render(
        service_name=service.name, reference=reference, subject=mail.subject,
        received_at=mail.envelope.arrived_at.astimezone(dt.UTC).strftime("%d/%m/%Y à %H:%M UTC"),
        portal_url=portal_url,
    )
    msg = EmailMessage(policy=SMTP)
    msg["From"] = HeaderAddress(display_name=service.name, addr_spec=service.address)
    msg["To"] = mail.envelope.mail_from
    msg["Reply-To"] = reply_to
    msg["Subject"] = f"[{reference}] Accusé de réception" + (f" : {mail.subject}" if mail.subject else "")
    msg["Date"] = email.utils.format_datetime(now)
    msg["Message-ID"] = message_id
    if mail.message_id:
        msg["In-Reply-To"] = mail.message_id
        msg["References"] = mail.message_id
    msg["Auto-Submitted"] = "auto-replied"
    msg["X-Auto-Response-Suppress"] = "All"
    msg.set_content(body, charset="utf-8", cte="quoted-printable")
    return msg.as_bytes()
