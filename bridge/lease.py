"""Who holds a mailbox: one run or one verification at a time (I/O: the database, os.kill).

A run and a verification of the same mailbox must not interleave: verify forgets the keys of
messages it finds missing so that the next run copies them again, and a message a run appends
between verify's two listings would look missing, be forgotten, and be copied twice. Both take
the job's lease (``bascule_jobs.claimed_by`` / ``claimed_until``) for their whole work, renewed
in the background so that a long folder does not let it lapse (``held``); what they write that
depends on it (a batch's record, forgotten keys) is written only while they still hold it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

from balf.bridge import store
from balf.db.models import BasculeJob

log = logging.getLogger(__name__)


def worker_name(role: str = "copie") -> str:
    """This process as a lease holder: "role@host:pid" (what ``holder_is_dead`` can check and
    ``describe_holder`` can put in words)."""
    return f"{role}@{socket.gethostname()}:{os.getpid()}"


def _host_pid(holder: str) -> tuple[str, str]:
    host, _, pid = holder.rpartition("@")[2].rpartition(":")  # "host:pid" from older runs too
    return host, pid


def holder_is_dead(holder: str, me: str) -> bool:
    """True when ``holder`` is a process of this host that no longer exists (a run killed with
    -9 or by a power cut): its lease need not be waited for."""
    host, pid = _host_pid(holder)
    if host != _host_pid(me)[0] or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def describe_holder(holder: str | None) -> str:
    """Who holds a mailbox, for the coordinator: "une vérification sur poste-12 (processus 4242)"."""
    if not holder:
        return "un autre processus"
    role, at, _rest = holder.partition("@")
    host, pid = _host_pid(holder)
    what = {"copie": "une copie", "verification": "une vérification"}.get(role) if at else None
    if what is None or not pid.isdigit():
        return f"un autre poste ({holder})"
    return f"{what} sur {host} (processus {pid})"


async def take_job(sessions: store.Sessions, job: BasculeJob, worker: str, lease: dt.timedelta) -> bool:
    """Claim ``job`` for ``worker``, or take it over from a holder of this host that died;
    False when another process holds it."""
    if await store.claim_job(sessions, job.id, worker, lease):
        return True
    return bool(
        job.claimed_by
        and holder_is_dead(job.claimed_by, worker)
        and await store.take_over_job(sessions, job.id, worker, job.claimed_by, lease)
    )


@dataclass
class LeaseWatch:
    """What the background renewal learnt: ``lost`` once another process holds the job."""

    lost: bool = False
    finished: bool = False  # set by the holder before it releases: a failed renewal is then expected


@contextlib.asynccontextmanager
async def held(sessions: store.Sessions, job_id: int, worker: str, lease: dt.timedelta) -> AsyncIterator[LeaseWatch]:
    """Renew ``worker``'s lease on the job every third of its length while the body runs. A
    lost lease sets ``LeaseWatch.lost``, which the holder checks before each APPEND; its next
    conditional write would raise LeaseLost anyway."""
    watch = LeaseWatch()

    async def beat() -> None:
        while True:
            await asyncio.sleep(max(1.0, lease.total_seconds() / 3))
            try:
                if not await store.renew_job(sessions, job_id, worker, lease):
                    if not watch.finished:
                        watch.lost = True
                        log.warning("job %s: lease taken by another process; no more appends", job_id)
                    return
            except Exception as exc:  # noqa: BLE001 - a database hiccup: try again at the next beat
                log.warning("job %s: lease not renewed (%s); trying again", job_id, exc)

    task = asyncio.create_task(beat())
    try:
        yield watch
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
