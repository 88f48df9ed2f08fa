"""What a rerun of the bascule depends on, as one digest (I/O: IMAP through imaplib).

A rerun decides everything from three things: the plan (source, target account, options), the
source's folders as listed with their STATUS (MESSAGES, UIDNEXT, UIDVALIDITY) and the target's
CAPABILITY, NAMESPACE, folder list and each folder's UIDVALIDITY (folder mapping, "nothing after
the checkpoint", "same target folder"). When a run ends with nothing left to copy it records
the digest of the three, the source taken *before* it read the folders and the target after
its last APPEND; a message that reaches the source during the run changes UIDNEXT and so the
next digest. A later run that computes the same digest knows a full run would copy nothing,
without loading the database layer (``balf.bridge.quickrun``). Any doubt (a server error, a
name that needs a literal) gives no digest, never a wrong one: the full run then decides.

imaplib (standard library) rather than imapclient: the check must stay cheap to start, and both
the recording and the check use these same functions, so they see the same bytes.
"""

from __future__ import annotations

import hashlib
import imaplib
import json
import logging
import re
import ssl
from collections.abc import Mapping
from typing import Any

from balf.bridge.login import Login

log = logging.getLogger(__name__)

VERSION = b"balf-rerun-1"  # change when what goes into a digest changes: old digests then never match
_LIST = re.compile(rb'^\((?P<flags>[^)]*)\) (?P<delim>NIL|"(?:[^"\\]|\\.)*") (?P<name>.+)$', re.I | re.S)
_LITERAL = re.compile(rb"\{(\d+)\+?\}$")
_NOT_SELECTABLE = (b"\\noselect", b"\\nonexistent")
_VOLATILE = (b"\\marked", b"\\unmarked")


class NoSnapshot(Exception):
    """The state could not be read with certainty; the caller takes the full path."""


def plan_fingerprint(source: str, target_account: str, options: Mapping[str, Any]) -> bytes:
    """The plan's part of the digest: what a rerun reads from the job's row (pure)."""
    return json.dumps([source, target_account, dict(options)], sort_keys=True, ensure_ascii=False).encode()


def digest(plan: bytes, source_state: bytes, target_state: bytes) -> str:
    """The 64-hex-digit digest kept in ``bascule_jobs.rerun_digest`` (pure)."""
    h = hashlib.sha256(VERSION)
    for part in (plan, source_state, target_state):
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()


def list_entry(item: bytes | tuple[bytes, bytes]) -> tuple[tuple[bytes, ...], bytes, bytes]:
    """(lower-cased flags, delimiter as sent, mailbox name) of one LIST reply from imaplib (pure).

    imaplib gives a plain line, or a (line ending in ``{n}``, literal) pair when the name came as
    a literal. Raises NoSnapshot on anything else."""
    if isinstance(item, tuple):
        head, name = item
        if not _LITERAL.search(head):
            raise NoSnapshot(f"unexpected LIST reply {item!r:.80}")
        match = _LIST.match(_LITERAL.sub(b'"?"', head))
        if not match:
            raise NoSnapshot(f"unexpected LIST reply {head!r:.80}")
    else:
        match = _LIST.match(item)
        if not match:
            raise NoSnapshot(f"unexpected LIST reply {item!r:.80}")
        name = match.group("name")
        if name.startswith(b'"'):
            if not name.endswith(b'"') or len(name) < 2:
                raise NoSnapshot(f"unexpected LIST reply {item!r:.80}")
            name = re.sub(rb"\\(.)", rb"\1", name[1:-1])
    return tuple(match.group("flags").lower().split()), match.group("delim"), name


def list_line(flags: tuple[bytes, ...], delimiter: bytes, name: bytes) -> bytes:
    """One LIST reply in the form the digest keeps (pure): flags sorted, without \\Marked and
    \\UnMarked, which say whether mail arrived since a folder was last selected (RFC 3501
    7.2.2) and change when a run merely reads the folder."""
    kept = sorted(f for f in flags if f not in _VOLATILE)
    return b" ".join(kept) + b"\0" + delimiter + b"\0" + name


_STATUS = re.compile(rb'^(?:"(?P<quoted>(?:[^"\\]|\\.)*)"|(?P<atom>[^\s"(){]+)) \((?P<items>[A-Z0-9 ]*)\)$', re.I)


def status_numbers(state: bytes) -> dict[bytes, tuple[int, int | None, int | None]]:
    """(MESSAGES, UIDVALIDITY, UIDNEXT) by mailbox name (as sent) from a source state (pure).

    Names sent as literals are left out: the caller then finds a folder missing and records no
    digest, the safe side."""
    found: dict[bytes, tuple[int, int | None, int | None]] = {}
    for line in state.split(b"\n"):
        match = _STATUS.match(line)
        if not match or b"\0" in line:
            continue
        words = match.group("items").split()
        items = {k.upper(): int(v) for k, v in zip(words[::2], words[1::2], strict=False) if v.isdigit()}
        name = match.group("atom")
        if name is None:
            name = re.sub(rb"\\(.)", rb"\1", match.group("quoted"))
        found[name] = (items.get(b"MESSAGES", 0), items.get(b"UIDVALIDITY"), items.get(b"UIDNEXT"))
    return found


def quoted(name: bytes) -> bytes:
    """``name`` as an IMAP quoted string (RFC 3501 4.3); NoSnapshot when it needs a literal (pure)."""
    if any(b > 0x7E or b < 0x20 for b in name):
        raise NoSnapshot("a folder name needs a literal")
    return b'"' + name.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def _check(typ: str, data: list[Any], what: str) -> list[Any]:
    if typ != "OK":
        raise NoSnapshot(f"{what}: {typ} {data!r:.120}")
    return [d for d in data if d is not None]


def _open(login: Login) -> imaplib.IMAP4:
    if login.tls == "ssl":
        conn: imaplib.IMAP4 = imaplib.IMAP4_SSL(
            login.host, login.port, ssl_context=ssl.create_default_context(), timeout=login.timeout
        )
    else:
        conn = imaplib.IMAP4(login.host, login.port, timeout=login.timeout)
        if login.tls == "starttls":
            conn.starttls(ssl.create_default_context())
    try:
        user = quoted(login.username.encode("utf-8")).decode("ascii")
        conn.login(user, login.password)
    except BaseException:
        _close(conn)
        raise
    return conn


def _close(conn: imaplib.IMAP4) -> None:
    try:
        conn.logout()
    except (OSError, imaplib.IMAP4.error):
        pass


def _folders(conn: imaplib.IMAP4) -> tuple[list[bytes], list[bytes]]:
    """(the LIST replies in the digest's form and order, the selectable folders' names)."""
    lines: list[bytes] = []
    names: list[bytes] = []
    for item in _check(*conn.list('""', "*"), "LIST"):
        if item == b"":  # what imaplib leaves of the line after a literal name
            continue
        flags, delimiter, name = list_entry(item)
        lines.append(list_line(flags, delimiter, name))
        if not any(f in flags for f in _NOT_SELECTABLE):
            names.append(name)
    return sorted(lines), sorted(names)


def _state(login: Login, *, source: bool) -> bytes:
    conn = _open(login)
    try:
        parts: list[bytes] = []
        if not source:
            capabilities = sorted(set(b" ".join(_check(*conn.capability(), "CAPABILITY")).upper().split()))
            parts.append(b" ".join(capabilities))
            if b"NAMESPACE" in capabilities:  # after login: Dovecot announces it only then
                parts.extend(_check(*conn.namespace(), "NAMESPACE"))
        lines, names = _folders(conn)
        parts.extend(lines)
        items = "(MESSAGES UIDNEXT UIDVALIDITY)" if source else "(UIDVALIDITY)"
        for name in names:
            status = _check(*conn.status(quoted(name).decode("ascii"), items), f"STATUS {name!r}")
            parts.extend(s[0] + s[1] if isinstance(s, tuple) else s for s in status)
        return b"\n".join(parts)
    finally:
        _close(conn)


def server_state(login: Login, *, source: bool) -> bytes | None:
    """The source's (``source=True``) or the target's part of the digest; None when it cannot be
    read with certainty (logged: the full path then decides)."""
    try:
        return _state(login, source=source)
    except (NoSnapshot, OSError, imaplib.IMAP4.error, UnicodeError) as exc:
        side = "source" if source else "target"
        log.info("bascule: no rerun snapshot of the %s %s@%s: %s", side, login.username, login.host, exc)
        return None
