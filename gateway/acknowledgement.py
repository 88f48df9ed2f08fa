"""Automatic acknowledgements (no I/O): the RFC 3834 decision and the French message.

RFC 3834: never answer auto-submitted mail (2), mailing lists and bulk mail (2), the null
reverse-path or system senders (3.1.5); answer the Return-Path (3.1.5), at most N per sender
per day (5); mark ours ``Auto-Submitted: auto-replied`` (5) and keep the thread's Message-IDs.
They are sent with the null reverse-path (3.3, see notify.py).

Days and times are those of the users, Europe/Paris: the date in the message and the day the
per-sender limit counts (:func:`day_start`).

Nothing the sender wrote reaches a header or the text unchecked: the subject is put on one
line (parse.one_line: a decoded ``=0D=0A`` would otherwise start a new header), the
Message-ID is cited only if it has the msg-id form, and a sender address that cannot be
written back as an addr-spec gets no acknowledgement.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import re
from email.headerregistry import Address as HeaderAddress
from email.message import EmailMessage
from email.policy import SMTP, SMTPUTF8
from zoneinfo import ZoneInfo

import jinja2

from balf.gateway.model import AckDecision, InboundMail, ServiceRef
from balf.gateway.parse import one_line

USERS_TIMEZONE = ZoneInfo("Europe/Paris")
SUBJECT_QUOTED = 200  # characters of the citizen's subject quoted back

# An addr-spec we can put back in a header and a RCPT command: dot-atom-ish local part (UTF-8
# allowed, RFC 6531), no quoting, no comments, no spaces or controls, a domain.
_ADDR_SPEC = re.compile(r"[^\s\x00-\x1f\x7f-\x9f<>()\[\],;:\"\\@]+@[^\s\x00-\x1f\x7f-\x9f<>()\[\],;:\"\\@]+")
_MSG_ID = re.compile(r"<[!-;=?-~]+>")  # RFC 5322 3.6.4, printable ASCII without < >

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
    sender = "" if sender == "<>" else sender  # as spooled before the SMTP layer said ""
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
        (_ADDR_SPEC.fullmatch(sender) is None, "sender address cannot be answered"),
        (sent_today >= per_day, f"already {sent_today} acknowledgements today"),
    )
    for refused, reason in checks:
        if refused:
            return AckDecision(False, reason)
    return AckDecision(True, "ok")


def day_start(now: dt.datetime) -> dt.datetime:
    """The start (in UTC) of the users' day that ``now`` falls in: what the per-sender daily
    limit counts from. 23:30 UTC on a winter evening is already the next day in Paris."""
    local = now.astimezone(USERS_TIMEZONE)
    midnight = dt.datetime.combine(local.date(), dt.time(0), tzinfo=USERS_TIMEZONE)
    return midnight.astimezone(dt.UTC)


def ascii_address(address: str) -> str:
    """``address`` with an internationalised domain written as A-labels (RFC 5891) when the
    local part is ASCII, so that it needs no SMTPUTF8; otherwise ``address`` unchanged."""
    local, at, domain = address.rpartition("@")
    if not at or domain.isascii() or not local.isascii():
        return address
    try:
        return f"{local}@{domain.encode('idna').decode('ascii')}"
    except UnicodeError:
        return address


def render_acknowledgement(mail: InboundMail, service: ServiceRef, *, reference: str,
                           reply_to: str, message_id: str, portal_url: str,
                           now: dt.datetime) -> bytes:
    """The acknowledgement's bytes, ready for the outbox.

    A recipient whose local part is not ASCII is written as is in ``To:`` (RFC 6532 UTF-8
    headers: the message then needs SMTPUTF8, which notify.py checks), never RFC 2047-encoded
    inside the addr-spec, which no one could answer.
    """
    subject = one_line(mail.subject)
    if len(subject) > SUBJECT_QUOTED:
        subject = subject[:SUBJECT_QUOTED - 1].rstrip() + "…"
    received = mail.envelope.arrived_at.astimezone(USERS_TIMEZONE)
    body = _env.get_template("acknowledgement.txt").render(
        service_name=one_line(service.name), reference=reference, subject=subject,
        received_at=received.strftime("%d/%m/%Y à %H:%M"), portal_url=portal_url,
    )
    to = ascii_address(mail.envelope.mail_from)
    msg = EmailMessage(policy=SMTP if to.isascii() else SMTPUTF8)
    msg["From"] = HeaderAddress(display_name=one_line(service.name), addr_spec=service.address)
    msg["To"] = to
    msg["Reply-To"] = reply_to
    msg["Subject"] = f"[{reference}] Accusé de réception" + (f" : {subject}" if subject else "")
    msg["Date"] = email.utils.format_datetime(now.astimezone(USERS_TIMEZONE))
    msg["Message-ID"] = message_id
    if mail.message_id and _MSG_ID.fullmatch(mail.message_id):
        msg["In-Reply-To"] = mail.message_id
        msg["References"] = mail.message_id
    msg["Auto-Submitted"] = "auto-replied"
    msg["X-Auto-Response-Suppress"] = "All"
    msg.set_content(body, charset="utf-8", cte="quoted-printable")
    return msg.as_bytes()
