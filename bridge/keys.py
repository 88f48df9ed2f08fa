"""Duplicate keys and the few header facts the bascule needs, read from raw bytes (no I/O).

A message is recognised in the target by its Message-ID (RFC 5322 3.6.4); a message without one
by a hash of its whole content. Domino's IMAP service rewrites the domain part of Message-IDs,
so for Domino sources only the local part is compared (imapsync's ``--domino1`` does the same).
Headers are read as bytes: 8-bit or undecodable header bytes never stop the bascule.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import hashlib
import re

KEY_MAX = 200  # BasculeItem.dedup_key

_HEADER_END = re.compile(rb"\r?\n\r?\n")
_MESSAGE_ID = re.compile(rb"^message-id[ \t]*:[ \t]*((?:.*)(?:\r?\n[ \t].*)*)", re.I | re.M)
_DATE = re.compile(rb"^date[ \t]*:[ \t]*((?:.*)(?:\r?\n[ \t].*)*)", re.I | re.M)
_ANGLE = re.compile(rb"<([^<>\s]+)>")
_BARE_LF = re.compile(rb"(?<!\r)\n")


def to_crlf(raw: bytes) -> bytes:
    """Line ends as IMAP wants them (RFC 3501 2.2): files written with bare LF get CRLF.

    Only line ends change: the server stores and serves the same bytes either way.
    """
    return _BARE_LF.sub(b"\r\n", raw)


def header_section(raw: bytes) -> bytes:
    """The header section of ``raw`` (up to the first empty line), without the separator."""
    match = _HEADER_END.search(raw)
    return raw[: match.start()] if match else raw


def message_id(raw: bytes) -> str | None:
    """The Message-ID of ``raw`` without angle brackets, or None when absent or empty.

    Tolerates folded headers and missing brackets; undecodable bytes are kept as escapes.
    """
    match = _MESSAGE_ID.search(header_section(raw))
    if not match:
        return None
    value = re.sub(rb"\r?\n[ \t]+", b" ", match.group(1)).strip()
    angled = _ANGLE.search(value)
    token = angled.group(1) if angled else value.split()[0] if value.split() else b""
    if not token.strip(b"<>"):
        return None
    return token.decode("utf-8", "backslashreplace")


def date_header(raw: bytes) -> dt.datetime | None:
    """The Date header as an aware datetime, or None when absent or unparseable."""
    match = _DATE.search(header_section(raw))
    if not match:
        return None
    value = re.sub(rb"\r?\n[ \t]+", b" ", match.group(1)).strip().decode("ascii", "replace")
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if parsed is None or not 1970 <= parsed.year <= 2200:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def content_hash(raw: bytes) -> str:
    """A hash of the whole message, line ends normalised (a file with LF equals its CRLF copy)."""
    return hashlib.sha256(to_crlf(raw)).hexdigest()


def dedup_key(raw: bytes, *, local_part_only: bool = False) -> str:
    """The key under which ``raw`` is recorded as present in a target folder.

    ``m:<Message-ID>``, ``l:<local part>`` (Domino sources), or ``h:<sha256>`` without a
    Message-ID; keys longer than KEY_MAX are replaced by a hash of themselves.
    """
    mid = message_id(raw)
    if mid is None:
        return "h:" + content_hash(raw)
    if local_part_only and "@" in mid:
        key = "l:" + mid.rsplit("@", 1)[0]
    else:
        key = "m:" + mid
    if len(key) > KEY_MAX:
        key = key[:1] + "#" + hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()
    return key


def key_from_message_id_header(header: bytes, *, local_part_only: bool = False) -> str | None:
    """The key from a fetched ``BODY[HEADER.FIELDS (MESSAGE-ID)]``; None when there is no ID
    (the caller then needs the whole message to hash it)."""
    if message_id(header) is None:
        return None
    return dedup_key(header, local_part_only=local_part_only)
