"""Lotus Notes documents (as read from DXL) turned into RFC 5322 messages (no I/O).

A Memo or Reply document is a bag of items; this module maps them to headers the way Domino's
own MIME converter does: ``From``/``InetFrom``/``Principal`` -> From, ``SendTo``/``CopyTo``/
``BlindCopyTo`` (or their ``INet*`` Internet forms) -> To/Cc/Bcc, ``PostedDate`` -> Date,
``$MessageID`` -> Message-ID, the parent's Message-ID (``$Ref``) -> In-Reply-To, rich-text
``Body`` -> text/plain and text/html, ``$FILE`` objects -> attachments. Notes names
(``CN=Jean Dupont/OU=SIP/O=DGFIP``) become addresses through the mapping given by the plan.
"""

from __future__ import annotations

import datetime as dt
import email.policy
import email.utils
import html
import mimetypes
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.headerregistry import Address
from email.message import EmailMessage

MAIL_FORMS = frozenset(
    {"memo", "reply", "reply with history", "nondelivery report", "delivery report", "return receipt", "phone message"}
)

# DXL <datetime>: 20151203T101500,00+01 (hundredths, zone in hours or hhmm), or a date alone.
_DXL_DATETIME = re.compile(
    r"^(\d{4})(\d{2})(\d{2})(?:T(\d{2})(\d{2})(\d{2})(?:,(\d{1,2}))?)?\s*(Z|[+-]\d{2}(?::?\d{2})?)?$"
)

POLICY = email.policy.SMTP.clone(max_line_length=78, raise_on_defect=False)


@dataclass(frozen=True)
class Attachment:
    name: str
    data: bytes


@dataclass(frozen=True)
class NotesDocument:
    """A Notes document as read from DXL: its UNID, form, items (text values) and contents."""

    unid: str
    form: str
    items: Mapping[str, tuple[str, ...]]
    body_paragraphs: tuple[str, ...] = ()
    attachments: tuple[Attachment, ...] = ()
    mime: bytes | None = None  # a native MIME note's whole RFC 822 stream
    created: str | None = None  # noteinfo <created> datetime
    defects: tuple[str, ...] = ()

    def first(self, *names: str) -> str | None:
        for name in names:
            for value in self.items.get(name.casefold(), ()):
                if value.strip():
                    return value.strip()
        return None

    def values(self, *names: str) -> tuple[str, ...]:
        for name in names:
            found = tuple(v.strip() for v in self.items.get(name.casefold(), ()) if v.strip())
            if found:
                return found
        return ()

    @property
    def is_mail(self) -> bool:
        return self.form.casefold() in MAIL_FORMS


@dataclass(frozen=True)
class Converted:
    """A document made into a message: bytes, flags, INTERNALDATE and what was guessed."""

    raw: bytes
    flags: tuple[str, ...]
    internaldate: dt.datetime | None
    notes: tuple[str, ...] = field(default=())


def parse_dxl_datetime(value: str) -> dt.datetime | None:
    """``20151203T101500,00+01`` -> an aware datetime; None when invalid.

    A value without a zone is taken as UTC (DXL always writes the zone for stored times).
    """
    match = _DXL_DATETIME.match(value.strip())
    if not match:
        return None
    year, month, day, hh, mm, ss, hundredths, zone = match.groups()
    tz = dt.UTC
    if zone and zone != "Z":
        sign = -1 if zone[0] == "-" else 1
        digits = zone[1:].replace(":", "")
        hours, minutes = int(digits[:2]), int(digits[2:4] or 0)
        tz = dt.timezone(sign * dt.timedelta(hours=hours, minutes=minutes))
    try:
        return dt.datetime(
            int(year),
            int(month),
            int(day),
            int(hh or 0),
            int(mm or 0),
            int(ss or 0),
            int((hundredths or "0").ljust(2, "0")) * 10000,
            tzinfo=tz,
        )
    except ValueError:
        return None


def parse_notes_name(name: str) -> dict[str, str]:
    """``CN=Jean Dupont/OU=SIP/O=DGFIP`` -> {"CN": "Jean Dupont", "OU": "SIP", "O": "DGFIP"}.

    Abbreviated names (``Jean Dupont/SIP/DGFIP``) give CN, then OU..., then O last.
    """
    parts = [p for p in name.split("/") if p]
    result: dict[str, str] = {}
    if parts and all("=" in p for p in parts):
        for part in parts:
            label, _, value = part.partition("=")
            label = label.strip().upper()
            result[label] = f"{result[label]}/{value.strip()}" if label in result else value.strip()
        return result
    if parts:
        result["CN"] = parts[0].strip()
        if len(parts) > 1:
            result["O"] = parts[-1].strip()
        if len(parts) > 2:
            result["OU"] = "/".join(p.strip() for p in parts[1:-1])
    return result


def canonical_name(name: str) -> str:
    """The form mapping files are looked up by: ``cn=jean dupont/ou=sip/o=dgfip``, casefolded,
    whatever the input's form (canonical or abbreviated, with an ``@DOMAIN`` suffix or not)."""
    bare = name.split("@", 1)[0] if "=" in name or "/" in name else name
    fields = parse_notes_name(bare.strip())
    order = [("CN", fields.get("CN"))] + [("OU", ou) for ou in fields.get("OU", "").split("/") if ou]
    order += [("O", fields.get("O")), ("C", fields.get("C"))]
    return "/".join(f"{k}={v}" for k, v in order if v).casefold()


def _ascii_word(text: str) -> str:
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    return re.sub(r"[^a-z0-9]+", ".", folded.lower()).strip(".") or "inconnu"


def notes_address(name: str, mapping: Mapping[str, str]) -> tuple[Address, bool]:
    """The address for a Notes name or Internet address; the flag is False when it was guessed.

    Internet addresses pass through; Notes names are looked up in ``mapping`` (keys from
    ``canonical_name``); an unmapped name becomes ``jean.dupont@sip.dgfip.invalid`` (RFC 2606:
    visibly not deliverable) so the message stays readable and the report lists the name.
    """
    text = name.strip()
    display, addr = email.utils.parseaddr(text)
    if addr and "@" in addr and "=" not in addr and "/" not in addr:
        return _address(display, addr), True
    mapped = mapping.get(canonical_name(text))
    fields = parse_notes_name(text.split("@", 1)[0])
    common = fields.get("CN", text)
    if mapped:
        return _address(common, mapped), True
    domain = ".".join(_ascii_word(p) for p in [*fields.get("OU", "").split("/"), fields.get("O", "")] if p)
    return _address(common, f"{_ascii_word(common)}@{domain or 'notes'}.invalid"), False


def _address(display: str, addr: str) -> Address:
    local, _, domain = addr.partition("@")
    try:
        return Address(display_name=display, username=local, domain=domain)
    except (ValueError, IndexError):
        return Address(display_name=display, username=_ascii_word(local), domain=_ascii_word(domain) or "invalid")


def render_html(paragraphs: tuple[str, ...]) -> str:
    body = "\n".join(f"<p>{html.escape(p).replace(chr(10), '<br>')}</p>" for p in paragraphs)
    return f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"></head><body>\n{body}\n</body></html>\n'


def convert_document(
    doc: NotesDocument,
    *,
    names: Mapping[str, str],
    parent_message_id: str | None = None,
) -> Converted:
    """Turn a mail document into an RFC 5322 message (native MIME notes keep their own stream)."""
    notes: list[str] = list(doc.defects)
    posted = parse_dxl_datetime(doc.first("PostedDate") or "")
    delivered = parse_dxl_datetime(doc.first("DeliveredDate") or "")
    for item in ("PostedDate", "DeliveredDate"):
        value = doc.first(item)
        if value and parse_dxl_datetime(value) is None:
            notes.append(f"date invalide dans {item}: {value!r}")
    created = parse_dxl_datetime(doc.created or "")
    internaldate = delivered or posted or created
    flags = _flags(doc, posted, delivered)

    if doc.mime is not None:
        return Converted(_crlf(doc.mime), flags, internaldate, tuple(notes))

    msg = EmailMessage(policy=POLICY)
    sender = doc.first("InetFrom", "Principal", "From")
    if sender:
        address, known = notes_address(sender, names)
        if not known:
            notes.append(f"nom Notes sans adresse: {sender}")
        msg["From"] = address
    for header, items in (
        ("To", ("INetSendTo", "SendTo")),
        ("Cc", ("INetCopyTo", "CopyTo")),
        ("Bcc", ("INetBlindCopyTo", "BlindCopyTo")),
    ):
        values = [v for v in doc.values(*items) if v != "."]
        if values:
            resolved = []
            for value in values:
                address, known = notes_address(value, names)
                if not known:
                    notes.append(f"nom Notes sans adresse: {value}")
                resolved.append(address)
            msg[header] = resolved
    msg["Subject"] = re.sub(r"\s*[\r\n]+\s*", " ", doc.first("Subject") or "")  # a <break/> in the item
    if posted or internaldate:
        msg["Date"] = email.utils.format_datetime(posted or internaldate)  # type: ignore[arg-type]
    mid = doc.first("$MessageID")
    msg["Message-ID"] = _angle(mid) if mid else f"<{doc.unid}@dxl.invalid>"
    if parent_message_id:
        msg["In-Reply-To"] = _angle(parent_message_id)
        msg["References"] = _angle(parent_message_id)
    importance = doc.first("Importance")
    if importance == "1":
        msg["Importance"] = "high"
    text = "\n\n".join(doc.body_paragraphs)
    msg.set_content(text + ("\n" if text and not text.endswith("\n") else ""), charset="utf-8")
    if doc.body_paragraphs:
        msg.add_alternative(render_html(doc.body_paragraphs), subtype="html", charset="utf-8")
    for attachment in doc.attachments:
        ctype = mimetypes.guess_type(attachment.name)[0] or "application/octet-stream"
        maintype, _, subtype = ctype.partition("/")
        msg.add_attachment(attachment.data, maintype=maintype, subtype=subtype, filename=attachment.name)
    for index, part in enumerate(p for p in msg.walk() if p.is_multipart()):
        part.set_boundary(f"=_balf_{doc.unid}_{index}")  # the same document gives the same bytes
    raw = msg.as_bytes(policy=POLICY)
    return Converted(raw, flags, internaldate, tuple(notes))


def _flags(doc: NotesDocument, posted: dt.datetime | None, delivered: dt.datetime | None) -> tuple[str, ...]:
    # Unread marks are per user and not exported in DXL: an archived BALF reads as read.
    flags = ["\\Seen"]
    if not posted and not delivered:
        flags.append("\\Draft")
    if doc.first("$RespondedTo", "$Replied", "$Answered"):
        flags.append("\\Answered")
    if doc.first("$Forwarded", "$ForwardedTo"):
        flags.append("$Forwarded")
    if doc.first("FollowUpStatus", "$FollowUpStatus", "$Flagged"):
        flags.append("\\Flagged")
    return tuple(flags)


def default_role_hint(doc: NotesDocument) -> str:
    """Where a document goes when the export says nothing of folders (Domino's view rules):
    posted and never delivered -> Sent; neither posted nor delivered -> Drafts; else Inbox."""
    posted, delivered = doc.first("PostedDate"), doc.first("DeliveredDate")
    if posted and not delivered:
        return "($Sent)"
    if not posted and not delivered:
        return "($Drafts)"
    return "($Inbox)"


def _angle(mid: str) -> str:
    mid = mid.strip()
    return mid if mid.startswith("<") else f"<{mid}>"


def _crlf(raw: bytes) -> bytes:
    return re.sub(rb"(?<!\r)\n", b"\r\n", raw)
