"""A rerun with nothing to copy, answered without loading the database layer (I/O: database
driver, IMAP).

`balf bascule run` asks here first. The answer is "nothing to do" only when every mailbox the
run would take is an IMAP source, migrated or verified, held by no other run, its Message-ID
mode settled, the schema at its head revision, and the plan and both servers give the digest its
last run recorded (``balf.bridge.snapshot``). Otherwise the answer is None and the full run
decides, as it always can; this path writes nothing. A full run spends about a second importing
SQLAlchemy and the models before its first IMAP command; this spends the interpreter's start,
imaplib and one STATUS per folder.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from balf.bridge.errors import BridgeError
from balf.bridge.login import TargetAccess
from balf.bridge.options import DOMINO_DETECTED, parse_options
from balf.bridge.outcome import JobOutcome
from balf.bridge.snapshot import digest, plan_fingerprint, server_state
from balf.bridge.sources import imap_login, is_imap
from balf.db.jobrows import JobRow, bascule_jobs
from balf.db.states import BasculeState

log = logging.getLogger(__name__)

_SETTLED = (BasculeState.MIGREE.value, BasculeState.VERIFIEE.value)


@dataclass(frozen=True)
class QuickAnswer:
    """What `balf bascule run` prints when nothing changed: the mode notes and the outcomes."""

    notes: tuple[tuple[str, str], ...]  # (mailbox, Message-ID mode in words)
    outcomes: tuple[JobOutcome, ...]


def selected(rows: Sequence[JobRow], mailboxes: Sequence[str], again: bool) -> list[JobRow] | None:
    """The rows a full run would take, by its own rules; None when it would stop with an error (pure)."""
    if mailboxes:
        if set(mailboxes) - {r.mailbox for r in rows}:
            return None
        rows = [r for r in rows if r.mailbox in mailboxes]
    elif not again:
        rows = [r for r in rows if r.state != BasculeState.VERIFIEE.value]
    return list(rows) or None


def eligible(row: JobRow, now: dt.datetime) -> bool:
    """True when nothing but the servers' state can make a full run of ``row`` do something (pure)."""
    if row.state not in _SETTLED or not row.rerun_digest or not is_imap(row.source):
        return False
    return row.claimed_until is None or row.claimed_until <= now  # else another run holds it


def quick_rerun(
    database_url: str, department: str, mailboxes: Sequence[str], again: bool, access: TargetAccess, parallel: int = 8
) -> QuickAnswer | None:
    """The answer "nothing to copy" for the selected mailboxes, or None: take the full path."""
    started = time.monotonic()
    rows = bascule_jobs(database_url, department)
    jobs = selected(rows, mailboxes, again) if rows is not None else None
    now = dt.datetime.now(dt.UTC)
    if not jobs or not all(eligible(j, now) for j in jobs):
        return None
    try:
        options = [parse_options(dict(j.options), f"mailbox {j.mailbox}") for j in jobs]
        logins = [imap_login(j.source, o, timeout=access.timeout) for j, o in zip(jobs, options, strict=True)]
    except BridgeError:
        return None  # a bad plan or a missing password: the full path reports it
    if any(o.domino is None and DOMINO_DETECTED not in j.options for j, o in zip(jobs, options, strict=True)):
        return None  # the full path detects the Message-ID mode first
    with ThreadPoolExecutor(max_workers=max(1, min(parallel, 2 * len(jobs)))) as pool:
        sources = [pool.submit(server_state, login, source=True) for login in logins]
        targets = [pool.submit(server_state, access.login(j.target_account), source=False) for j in jobs]
        states = [(s.result(), t.result()) for s, t in zip(sources, targets, strict=True)]
    for job, (source, target) in zip(jobs, states, strict=True):
        if source is None or target is None:
            return None
        if digest(plan_fingerprint(job.source, job.target_account, job.options), source, target) != job.rerun_digest:
            log.info("bascule %s: changed since its last run", job.mailbox)
            return None
    seconds = time.monotonic() - started
    return QuickAnswer(
        tuple((j.mailbox, o.dedup_mode) for j, o in zip(jobs, options, strict=True)),
        tuple(JobOutcome(j.department, j.mailbox, BasculeState(j.state), (), seconds) for j in jobs),
    )
