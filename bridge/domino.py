"""Recognising a Domino IMAP source, and settling which Message-ID mode a mailbox uses.

``domino_evidence`` and ``facts_from_transcript`` are pure (values and bytes in, values out);
``read_server_facts`` and ``settle_modes`` do I/O (the source server, the database).

Domino's IMAP service rewrites the domain part of Message-IDs, so a Domino source must be
compared on the local part only (imapsync's ``--domino1``). A mailbox's mode is decided once,
before its first copy, and kept in its options (``domino_detected``, ``domino_evidence``): keys
recorded in one mode never match keys of the other, so changing it later would copy everything
again. ``domino=yes|no`` in the plan overrides the detection.

What counts as a sign of Domino (any one is enough):

- the greeting, e.g. ``* OK Domino IMAP4 Server Release 9.0.1FP9 ready Fri, 14 Dec 2018
  08:38:25 +0100`` (the default greeting documented by HCL; administrators can change it);
- a CAPABILITY token or an RFC 2971 ID value naming Domino (Domino's CAPABILITY line itself,
  ``IMAP4rev1 AUTH=PLAIN LITERAL+ NAMESPACE QUOTA UIDPLUS``, names nothing);
- a hierarchy separator ``\\`` in LIST or NAMESPACE, which Domino uses and the usual Unix
  servers do not.

``read_server_facts`` calls imapclient outside ``bridge/imap.py`` (and catches its exceptions
here) only because that file was being changed by someone else: it belongs there, as
``ImapSource.server_facts()``.
"""

from __future__ import annotations

import asyncio
import imaplib
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from balf.bridge import store
from balf.bridge.errors import BridgeError, SourceUnavailable
from balf.bridge.options import DOMINO_DETECTED, DOMINO_EVIDENCE, MailboxOptions, parse_options
from balf.bridge.sources import is_imap, open_source
from balf.db.models import BasculeJob, BasculeState

if TYPE_CHECKING:
    from balf.bridge.imap import Login

log = logging.getLogger(__name__)

PROBES_AT_ONCE = 8  # Domino detection: sources asked at the same time

_DOMINO = re.compile(rb"domino", re.I)
_QUOTED = re.compile(rb'"((?:[^"\\]|\\.)*)"|NIL', re.I)


@dataclass(frozen=True)
class ServerFacts:
    """What an IMAP server says about itself: greeting line, CAPABILITY tokens, ID pairs
    (RFC 2971), hierarchy separators seen in LIST/NAMESPACE."""

    greeting: bytes = b""
    capabilities: tuple[bytes, ...] = ()
    server_id: tuple[tuple[str, str], ...] = ()
    delimiters: tuple[str, ...] = ()


def _unquote(value: bytes) -> str:
    return re.sub(rb"\\(.)", rb"\1", value).decode("utf-8", "replace")


def facts_from_transcript(data: bytes) -> ServerFacts:
    """The facts in a server's untagged responses (greeting, ``* CAPABILITY``, ``* ID``,
    ``* LIST``/``* LSUB``, ``* NAMESPACE``), as a capture shows them (pure)."""
    greeting = b""
    capabilities: list[bytes] = []
    server_id: list[tuple[str, str]] = []
    delimiters: list[str] = []
    for line in data.splitlines():
        words = line.split(None, 2)
        if len(words) < 2 or words[0] != b"*":
            continue
        verb, rest = words[1].upper(), words[2] if len(words) > 2 else b""
        if not greeting and verb in (b"OK", b"PREAUTH", b"BYE"):
            greeting = line.strip()
            code = re.match(rb"\s*\[CAPABILITY ([^\]]*)\]", rest, re.I)
            if code:
                capabilities.extend(code.group(1).split())
        elif verb == b"CAPABILITY":
            capabilities.extend(rest.split())
        elif verb == b"ID":
            values = [m.group(1) for m in _QUOTED.finditer(rest)]
            server_id.extend(
                (_unquote(k or b""), _unquote(v or b"")) for k, v in zip(values[::2], values[1::2], strict=False)
            )
        elif verb in (b"LIST", b"LSUB"):
            after_flags = rest.split(b")", 1)[-1]
            match = _QUOTED.search(after_flags)
            if match and match.group(1):
                delimiters.append(_unquote(match.group(1)))
        elif verb == b"NAMESPACE":
            quoted = [m.group(1) for m in _QUOTED.finditer(rest)]
            delimiters.extend(_unquote(q) for q in quoted[1::2] if q)
    return ServerFacts(greeting, tuple(capabilities), tuple(server_id), tuple(dict.fromkeys(delimiters)))


def domino_evidence(facts: ServerFacts) -> str | None:
    """Why ``facts`` look like a Domino server (one line for the report), None when they do not (pure)."""
    if _DOMINO.search(facts.greeting):
        text = facts.greeting.decode("utf-8", "replace").strip()
        return f"accueil du serveur « {text[:100]} »"
    for token in facts.capabilities:
        if _DOMINO.search(token):
            return f"CAPABILITY {token.decode('ascii', 'replace')}"
    for key, value in facts.server_id:
        if "domino" in value.lower() or "domino" in key.lower():
            return f"réponse ID {key}={value[:60]}"
    if "\\" in facts.delimiters:
        return "séparateur de dossiers « \\ »"
    return None


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _id_pairs(answer: object) -> tuple[tuple[str, str], ...]:
    """An ID response (RFC 2971) as pairs: imapclient gives a flat tuple (or a dict, or None)."""
    if isinstance(answer, dict):
        return tuple((_text(k), _text(v)) for k, v in answer.items())
    if isinstance(answer, (tuple, list)):
        if len(answer) == 1 and isinstance(answer[0], (tuple, list)):
            answer = answer[0]
        return tuple((_text(k), _text(v)) for k, v in zip(answer[::2], answer[1::2], strict=False))
    return ()


def read_server_facts(login: Login) -> ServerFacts:
    """Log in to the source and read its greeting, CAPABILITY, ID and separators (I/O)."""
    from imapclient.exceptions import IMAPClientError  # on use, as sources.open_source does

    from balf.bridge.imap import connect

    client = connect(login, for_source=True)
    try:
        capabilities = tuple(bytes(c) for c in client.capabilities())
        server_id: tuple[tuple[str, str], ...] = ()
        if client.has_capability("ID"):
            server_id = _id_pairs(client.id_())
        delimiters = tuple(
            dict.fromkeys(d.decode() if isinstance(d, bytes) else str(d) for _f, d, _n in client.list_folders() if d)
        )
        return ServerFacts(bytes(client.welcome or b""), capabilities, server_id, delimiters)
    except (OSError, IMAPClientError, imaplib.IMAP4.error) as exc:
        where = f"{login.username}@{login.host}:{login.port}"
        raise SourceUnavailable(f"source IMAP {where}: cannot read what the server says of itself: {exc}") from exc
    finally:
        try:
            client.logout()
        except (OSError, IMAPClientError, imaplib.IMAP4.error):
            pass


def facts_of_source(uri: str, options: MailboxOptions, timeout: float) -> ServerFacts:
    """``read_server_facts`` for a plan's IMAP source URI (I/O)."""
    from balf.bridge.imap import ImapSource

    source = open_source(uri, options, timeout=timeout)
    assert isinstance(source, ImapSource)
    return read_server_facts(source.login)


@dataclass(frozen=True)
class ModeNote:
    """The Message-ID mode of one mailbox, in words; ``error`` when it could not be decided
    (the mailbox must not be copied before it is)."""

    mailbox: str
    mode: str
    error: str | None = None


async def settle_modes(
    sessions: store.Sessions,
    jobs: Sequence[BasculeJob],
    *,
    timeout: float,
    record: bool,
    probe: Callable[[str, MailboxOptions, float], ServerFacts] = facts_of_source,
) -> list[ModeNote]:
    """Decide the Message-ID mode of each IMAP job that has none yet, and keep it in the job's
    options (``record``; a dry run records nothing). A job already started without a decision
    keeps whole Message-IDs, the mode it was copied in. Returns one note per IMAP job."""
    notes: list[ModeNote] = []
    gate = asyncio.Semaphore(PROBES_AT_ONCE)

    async def probed(job: BasculeJob, options: MailboxOptions) -> ServerFacts:
        async with gate:
            return await asyncio.to_thread(probe, job.source, options, timeout)

    # The servers are asked all at once (a department's first run meets dozens of sources, a
    # login each); the decisions are then recorded one by one, in the jobs' order.
    imap_jobs: list[tuple[BasculeJob, dict[str, Any], MailboxOptions]] = []
    for job in jobs:
        raw = dict(job.options or {})
        if not is_imap(job.source):
            continue
        try:
            imap_jobs.append((job, raw, parse_options(raw, f"mailbox {job.mailbox}")))
        except BridgeError:
            continue  # the run reports a bad plan itself
    pending = {
        job.id: asyncio.ensure_future(probed(job, options))
        for job, raw, options in imap_jobs
        if options.domino is None and DOMINO_DETECTED not in raw and job.started_at is None
    }
    try:
        for job, raw, options in imap_jobs:
            if options.domino is not None or DOMINO_DETECTED in raw:
                notes.append(ModeNote(job.mailbox, options.dedup_mode))
                continue
            if job.started_at is not None:
                detected, evidence = "no", "boîte commencée avant la détection automatique, mode gardé"
            else:
                try:
                    facts = await pending[job.id]
                except BridgeError as exc:
                    error = f"{job.mailbox}: source Domino ou non? impossible de le savoir: {exc}"
                    if record:
                        await store.set_job(sessions, job.id, state=BasculeState.EN_ERREUR, last_error=error)
                    notes.append(ModeNote(job.mailbox, "", error))
                    continue
                found = domino_evidence(facts)
                detected, evidence = (
                    ("yes", found) if found else ("no", "ni l'accueil, ni CAPABILITY, ni ID, ni le séparateur")
                )
            decided = {**raw, DOMINO_DETECTED: detected, DOMINO_EVIDENCE: evidence}
            if record:
                await store.set_job(sessions, job.id, options=decided)
            mode = parse_options(decided).dedup_mode
            log.info("bascule %s: %s", job.mailbox, mode)
            notes.append(ModeNote(job.mailbox, mode))
    finally:  # a failure above must not leave probes running unheard
        for future in pending.values():
            future.cancel()
    return notes
