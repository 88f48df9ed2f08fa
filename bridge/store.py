"""The bascule's state in the database (I/O: SQLAlchemy async, SQLite or PostgreSQL).

Jobs (one per mailbox), their folders with counts and checkpoints, the keys of the messages
present in each target folder, and the issues the report lists. A batch of copied messages, its
issues and the folder's new checkpoint are committed in one transaction.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import async_sessionmaker

from balf.bridge.errors import LeaseLost, PlanError, TemporaryFailure
from balf.bridge.model import PlannedMailbox
from balf.bridge.options import INTERNAL_KEYS
from balf.db.models import BasculeFolder, BasculeIssue, BasculeItem, BasculeJob, BasculeState

Sessions = async_sessionmaker[Any]
IN_CHUNK = 500  # bound the size of IN (...) lists
PRESENT_BEFORE = "present_avant"  # issue kind: evidence that a message was in the target before the bascule
EVIDENCE_TAKEN = "releve_cible"  # marker: the target folder's PRESENT_BEFORE evidence was taken, once
EVIDENCE_REFUSED = "releve_cible_refuse"  # marker: balf had copied there without evidence; none taken
EVIDENCE_MARKERS = (EVIDENCE_TAKEN, EVIDENCE_REFUSED)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class IssueRecord:
    folder: str
    item: str
    kind: str
    detail: str


async def plan_department(
    sessions: Sessions, department: str, planned: Sequence[PlannedMailbox]
) -> tuple[int, int, list[str]]:
    """Create or update the department's jobs; jobs already started keep their source and target.

    Returns (created, updated, names of the mailboxes left unchanged because they started).
    """
    created = updated = 0
    kept: list[str] = []
    async with sessions() as session, session.begin():
        existing = {
            j.mailbox: j
            for j in (await session.scalars(select(BasculeJob).where(BasculeJob.department == department))).all()
        }
        for item in planned:
            job = existing.get(item.mailbox)
            if job is None:
                session.add(
                    BasculeJob(
                        department=department,
                        mailbox=item.mailbox,
                        source=item.source,
                        target_account=item.target_account,
                        planned_date=item.planned_date,
                        options=dict(item.options),
                        state=BasculeState.PLANIFIEE,
                    )
                )
                created += 1
            elif job.state in (BasculeState.PLANIFIEE, BasculeState.EN_ERREUR) and job.started_at is None:
                same_source = job.source == item.source
                job.source, job.target_account = item.source, item.target_account
                job.planned_date = item.planned_date
                job.options = _with_detection(item.options, job.options if same_source else None)
                updated += 1
            else:
                if (job.planned_date, _plan_options(job.options)) != (item.planned_date, dict(item.options)):
                    job.planned_date, job.options = item.planned_date, _with_detection(item.options, job.options)
                    updated += 1
                if (job.source, job.target_account) != (item.source, item.target_account):
                    kept.append(item.mailbox)
    return created, updated, kept


def _plan_options(options: dict[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (options or {}).items() if k not in INTERNAL_KEYS}


def _with_detection(planned: dict[str, str], stored: dict[str, Any] | None) -> dict[str, Any]:
    """The plan's options plus what balf detected about the same source (kept across re-plans so
    a mailbox's Message-ID mode never changes under it)."""
    return {**planned, **{k: v for k, v in (stored or {}).items() if k in INTERNAL_KEYS}}


async def list_jobs(sessions: Sessions, department: str | None = None, mailbox: str | None = None) -> list[BasculeJob]:
    async with sessions() as session:
        query = select(BasculeJob).order_by(BasculeJob.department, BasculeJob.mailbox)
        if department:
            query = query.where(BasculeJob.department == department)
        if mailbox:
            query = query.where(BasculeJob.mailbox == mailbox)
        return list((await session.scalars(query)).all())


async def load_job(sessions: Sessions, job_id: int) -> BasculeJob:
    async with sessions() as session:
        job = await session.get(BasculeJob, job_id)
        if job is None:
            raise PlanError(f"no bascule job {job_id}")
        return job


async def claim_job(sessions: Sessions, job_id: int, worker: str, lease: dt.timedelta) -> bool:
    """Take the job for ``worker`` unless another worker holds an unexpired lease (one UPDATE,
    atomic on SQLite and PostgreSQL, so several workers can split a campaign)."""
    now = utcnow()
    async with sessions() as session, session.begin():
        result = await session.execute(
            update(BasculeJob)
            .where(
                BasculeJob.id == job_id,
                or_(
                    BasculeJob.claimed_until.is_(None), BasculeJob.claimed_until < now, BasculeJob.claimed_by == worker
                ),
            )
            .values(claimed_by=worker, claimed_until=now + lease)
        )
        return bool(result.rowcount)


async def take_over_job(sessions: Sessions, job_id: int, worker: str, previous: str, lease: dt.timedelta) -> bool:
    """Take the job from ``previous`` (a worker known to be dead) if it still holds it."""
    async with sessions() as session, session.begin():
        result = await session.execute(
            update(BasculeJob)
            .where(BasculeJob.id == job_id, BasculeJob.claimed_by == previous)
            .values(claimed_by=worker, claimed_until=utcnow() + lease)
        )
        return bool(result.rowcount)


async def renew_job(sessions: Sessions, job_id: int, worker: str, lease: dt.timedelta) -> bool:
    """Extend ``worker``'s lease; False when another process holds the job now (the lease ran
    out and was taken): the holder must stop writing."""
    async with sessions() as session, session.begin():
        return await _renew(session, job_id, worker, lease)


async def _renew(session: Any, job_id: int, worker: str, lease: dt.timedelta) -> bool:
    result = await session.execute(
        update(BasculeJob)
        .where(
            BasculeJob.id == job_id,
            BasculeJob.claimed_by == worker,
            BasculeJob.claimed_until.is_not(None),  # released: a late heartbeat must not take it again
        )
        .values(claimed_until=utcnow() + lease)
    )
    return bool(result.rowcount)


async def release_job(sessions: Sessions, job_id: int, worker: str) -> None:
    async with sessions() as session, session.begin():
        await session.execute(
            update(BasculeJob)
            .where(BasculeJob.id == job_id, BasculeJob.claimed_by == worker)
            .values(claimed_until=None)
        )


async def finish_job(sessions: Sessions, job_id: int, worker: str, *, release: bool = True, **values: Any) -> None:
    """The holder's last word on the job (``values``) and, with ``release``, the end of its
    lease, in one statement; LeaseLost (nothing written) when another process holds the job."""
    if release:
        values = {**values, "claimed_until": None}
    async with sessions() as session, session.begin():
        result = await session.execute(
            update(BasculeJob).where(BasculeJob.id == job_id, BasculeJob.claimed_by == worker).values(**values)
        )
        if not result.rowcount:
            raise LeaseLost("la boîte a été reprise par un autre poste: son état n'est pas modifié")


async def set_job(sessions: Sessions, job_id: int, **values: Any) -> None:
    async with sessions() as session, session.begin():
        await session.execute(update(BasculeJob).where(BasculeJob.id == job_id).values(**values))


async def folder_row(
    sessions: Sessions, job_id: int, source_name: str, target_name: str, *, create: bool = True
) -> BasculeFolder:
    """The folder's row, created when missing (``create=False``, for dry runs: an unsaved row)."""
    async with sessions() as session, session.begin():
        row = await session.scalar(
            select(BasculeFolder).where(BasculeFolder.job_id == job_id, BasculeFolder.source_name == source_name)
        )
        if not create and (row is None or row.target_name != target_name):
            # A dry run writes nothing; a folder the plan now maps elsewhere starts over there.
            return BasculeFolder(
                id=-1,
                job_id=job_id,
                source_name=source_name,
                target_name=target_name,
                checkpoint=None,
                target_uidvalidity=None,
            )
        if row is None:
            row = BasculeFolder(job_id=job_id, source_name=source_name, target_name=target_name)
            session.add(row)
            await session.flush()
        return row


@dataclass(frozen=True)
class PreparedFolder:
    """A folder's row as a run starts copying into it, and what its setup found."""

    row: BasculeFolder
    recreated: bool  # another target folder (new UIDVALIDITY, or moved by the plan): its records were dropped
    evidence_settled: bool  # the target folder's evidence was already taken (or refused)
    last_target_uid: int  # the highest target UID recorded for this folder (0: none)


async def prepare_folder(
    sessions: Sessions,
    job_id: int,
    source_name: str,
    target_name: str,
    uidvalidity: int,
    evidence: Sequence[tuple[int, str, int]] | None = None,
) -> PreparedFolder:
    """Everything a run records and reads before copying into a folder it has just selected, in
    one transaction: the folder's row (created when missing), the target's UIDVALIDITY (a new
    one drops the recorded target UIDs and the checkpoint, and says so in the report),
    whether the target folder's evidence is settled, and the last recorded target UID.

    ``evidence``, the target folder's listing read before any APPEND of this run, is taken as
    :func:`take_evidence` would when the evidence was not settled yet (``evidence_settled``
    then says False: the caller knows its listing was used)."""
    async with sessions() as session, session.begin():
        return await _prepare(session, job_id, source_name, target_name, uidvalidity, evidence)


async def prepare_folders(
    sessions: Sessions, job_id: int, folders: Sequence[tuple[str, str, int]]
) -> list[PreparedFolder]:
    """:func:`prepare_folder` for several folders (source, target, UIDVALIDITY) in one
    transaction: the folders a run found empty at the source, recorded together at its end."""
    if not folders:
        return []
    async with sessions() as session, session.begin():
        return [await _prepare(session, job_id, *folder) for folder in folders]


async def _prepare(
    session: Any,
    job_id: int,
    source_name: str,
    target_name: str,
    uidvalidity: int,
    evidence: Sequence[tuple[int, str, int]] | None = None,
) -> PreparedFolder:
    row = await session.scalar(
        select(BasculeFolder).where(BasculeFolder.job_id == job_id, BasculeFolder.source_name == source_name)
    )
    if row is None:
        row = BasculeFolder(job_id=job_id, source_name=source_name, target_name=target_name)
        session.add(row)
    recorded = row.target_uidvalidity is not None
    moved = recorded and row.target_name != target_name  # the plan maps the folder elsewhere now
    recreated = recorded and not moved and row.target_uidvalidity != uidvalidity
    if moved or recreated:
        # What was recorded is about another folder (or another incarnation of it): drop it
        # and learn presence from this one, even when its UIDVALIDITY happens to be the same.
        await session.execute(delete(BasculeItem).where(BasculeItem.folder_id == row.id))
        row.checkpoint = None
        if moved:  # it starts over in the new target: what it copied was into another folder
            row.copied = row.skipped = row.failed = row.bytes_copied = 0
            kind = "cible_changee"
            detail = (
                f"dossier cible changé par le plan ({row.target_name} -> {target_name}): "
                "présence relue dans la nouvelle cible"
            )
        else:
            kind = "uidvalidity_cible"
            detail = "le dossier cible a été recréé (UIDVALIDITY changé): présence relue dans la cible"
        session.add(_issue_row(job_id, IssueRecord(source_name, target_name, kind, detail)))
    row.target_name = target_name
    row.target_uidvalidity = uidvalidity
    await session.flush()
    settled = await _evidence_marker(session, job_id, target_name) is not None
    if not settled and evidence is not None:
        await _take_evidence(session, job_id, target_name, evidence)
    last = await session.scalar(select(func.max(BasculeItem.target_uid)).where(BasculeItem.folder_id == row.id))
    return PreparedFolder(row, moved or recreated, settled, int(last or 0))


async def folders_of(sessions: Sessions, job_id: int) -> list[BasculeFolder]:
    async with sessions() as session:
        return list(
            (
                await session.scalars(
                    select(BasculeFolder).where(BasculeFolder.job_id == job_id).order_by(BasculeFolder.id)
                )
            ).all()
        )


async def known_keys(sessions: Sessions, folder_id: int, keys: Iterable[str]) -> set[str]:
    wanted = list(dict.fromkeys(keys))
    found: set[str] = set()
    async with sessions() as session:
        for start in range(0, len(wanted), IN_CHUNK):
            chunk = wanted[start : start + IN_CHUNK]
            found.update(
                (
                    await session.scalars(
                        select(BasculeItem.dedup_key).where(
                            BasculeItem.folder_id == folder_id, BasculeItem.dedup_key.in_(chunk)
                        )
                    )
                ).all()
            )
    return found


async def record_present(sessions: Sessions, folder_id: int, present: Sequence[tuple[int, str, int]]) -> int:
    """Record keys found in the target folder and not yet known (after a crash between APPEND
    and commit, mail already there, or copies of another source folder mapped to the same
    target); returns how many were new. What makes a rerun copy nothing: never evidence of what
    was there before the bascule (``take_evidence`` keeps that, once)."""
    known = await known_keys(sessions, folder_id, (k for _u, k, _s in present))
    fresh: dict[str, tuple[int, int]] = {}
    for uid, key, size in present:
        if key not in known and key not in fresh:
            fresh[key] = (uid, size)
    if fresh:
        async with sessions() as session, session.begin():
            session.add_all(
                BasculeItem(folder_id=folder_id, dedup_key=k, target_uid=u, size=s) for k, (u, s) in fresh.items()
            )
    return len(fresh)


async def evidence_settled(sessions: Sessions, job_id: int, target_name: str) -> bool:
    """True when the job's evidence for this target folder was already taken (or refused)."""
    async with sessions() as session:
        return await _evidence_marker(session, job_id, target_name) is not None


async def _evidence_marker(session: Any, job_id: int, target_name: str) -> str | None:
    return await session.scalar(
        select(BasculeIssue.kind)
        .where(
            BasculeIssue.job_id == job_id,
            BasculeIssue.folder == target_name,
            BasculeIssue.kind.in_(EVIDENCE_MARKERS),
        )
        .limit(1)
    )


async def take_evidence(
    sessions: Sessions, job_id: int, target_name: str, present: Sequence[tuple[int, str, int]]
) -> bool:
    """Keep, once per (job, target folder), what the target folder held before balf appended
    anything to it: one ``PRESENT_BEFORE`` record per copy found, and the ``EVIDENCE_TAKEN``
    marker, in one transaction (a crash before the commit means "not yet taken"; after it, the
    evidence is never taken again, deleted or rewritten: not by a retry, not after the target
    folder is recreated, not for a second source folder mapped to the same target).

    ``present`` must be read from the target before balf's first APPEND to that folder. When
    balf's records show it has already copied into that folder without evidence (a job started
    before evidence was kept this way), no evidence is taken: the ``EVIDENCE_REFUSED`` marker
    says so in the report and any extra message in that folder fails verification.
    Returns True when evidence was taken now.
    """
    async with sessions() as session, session.begin():
        return await _take_evidence(session, job_id, target_name, present)


async def _take_evidence(session: Any, job_id: int, target_name: str, present: Sequence[tuple[int, str, int]]) -> bool:
    if await _evidence_marker(session, job_id, target_name) is not None:
        return False
    same_target = and_(BasculeFolder.job_id == job_id, BasculeFolder.target_name == target_name)
    progressed = await session.scalar(
        select(func.count()).where(same_target, or_(BasculeFolder.checkpoint.is_not(None), BasculeFolder.copied > 0))
    )
    recorded = await session.scalar(
        select(func.count()).where(BasculeItem.folder_id.in_(select(BasculeFolder.id).where(same_target)))
    )
    if progressed or recorded:
        session.add(
            BasculeIssue(
                job_id=job_id,
                folder=target_name,
                item="",
                kind=EVIDENCE_REFUSED,
                detail=(
                    "balf avait déjà copié dans ce dossier cible sans relever ce qu'il contenait avant: "
                    "aucun message n'y est tenu pour présent avant la bascule, tout message en plus "
                    "ou en double y sera un écart"
                ),
            )
        )
        return False
    session.add(
        BasculeIssue(
            job_id=job_id,
            folder=target_name,
            item="",
            kind=EVIDENCE_TAKEN,
            detail=f"{len(present)} message(s) dans le dossier cible avant toute copie",
        )
    )
    session.add_all(
        BasculeIssue(job_id=job_id, folder=target_name, item=k[:1000], kind=PRESENT_BEFORE, detail=f"UID {u}")
        for u, k, _s in present
    )
    return True


async def record_batch(
    sessions: Sessions,
    *,
    job_id: int,
    folder_id: int,
    items: Sequence[tuple[str, int | None, int]],
    skipped: int,
    failed: int,
    checkpoint: str | None,
    issues: Sequence[IssueRecord],
    worker: str,
    lease: dt.timedelta,
) -> None:
    """One batch done: its items, counters, issues and the folder checkpoint, in one transaction."""
    copied = len(items)
    size = sum(s for _k, _u, s in items)
    try:
        async with sessions() as session, session.begin():
            session.add_all(BasculeItem(folder_id=folder_id, dedup_key=k, target_uid=u, size=s) for k, u, s in items)
            session.add_all(_issue_row(job_id, i) for i in issues)
            values: dict[str, Any] = {
                "copied": BasculeFolder.copied + copied,
                "skipped": BasculeFolder.skipped + skipped,
                "failed": BasculeFolder.failed + failed,
                "bytes_copied": BasculeFolder.bytes_copied + size,
            }
            if checkpoint is not None:
                values["checkpoint"] = checkpoint
            await session.execute(update(BasculeFolder).where(BasculeFolder.id == folder_id).values(**values))
            held = await session.execute(
                update(BasculeJob)
                .where(BasculeJob.id == job_id, BasculeJob.claimed_by == worker)
                .values(
                    messages_copied=BasculeJob.messages_copied + copied,
                    bytes_copied=BasculeJob.bytes_copied + size,
                    errors=BasculeJob.errors + failed,
                    claimed_until=utcnow() + lease,
                )
            )
            if not held.rowcount:  # rolls the batch back: the next run learns it from the target
                raise LeaseLost("la boîte a été reprise par un autre poste (bail expiré): ce lot n'est pas enregistré")
    except SQLAlchemyError as exc:
        raise TemporaryFailure(f"database error while recording a batch: {exc}") from exc


def _issue_row(job_id: int, issue: IssueRecord) -> BasculeIssue:
    return BasculeIssue(
        job_id=job_id, folder=issue.folder, item=issue.item[:1000], kind=issue.kind, detail=issue.detail
    )


async def add_issues(sessions: Sessions, job_id: int, issues: Sequence[IssueRecord]) -> None:
    if not issues:
        return
    async with sessions() as session, session.begin():
        session.add_all(_issue_row(job_id, i) for i in issues)


async def replace_issues(sessions: Sessions, job_id: int, kinds: Sequence[str], issues: Sequence[IssueRecord]) -> None:
    async with sessions() as session, session.begin():
        await session.execute(
            delete(BasculeIssue).where(and_(BasculeIssue.job_id == job_id, BasculeIssue.kind.in_(kinds)))
        )
        session.add_all(_issue_row(job_id, i) for i in issues)


async def issues_of(sessions: Sessions, job_id: int) -> list[BasculeIssue]:
    async with sessions() as session:
        return list(
            (
                await session.scalars(
                    select(BasculeIssue).where(BasculeIssue.job_id == job_id).order_by(BasculeIssue.id)
                )
            ).all()
        )


async def set_folder_target_count(sessions: Sessions, folder_id: int, count: int) -> None:
    async with sessions() as session, session.begin():
        await session.execute(update(BasculeFolder).where(BasculeFolder.id == folder_id).values(target_count=count))


async def set_folder_source_count(sessions: Sessions, folder_id: int, count: int) -> None:
    async with sessions() as session, session.begin():
        await session.execute(update(BasculeFolder).where(BasculeFolder.id == folder_id).values(source_count=count))


async def forget_keys(
    sessions: Sessions,
    folder_ids: Sequence[int],
    keys: Sequence[str],
    holder: tuple[int, str, dt.timedelta] | None = None,
) -> None:
    """Verification found these keys missing from the target: forget them and rewind the folders'
    checkpoints (and forget the jobs' rerun digest) so the next run reads the source again and
    copies exactly them. ``holder`` (job id, worker, lease): only while that worker holds the
    job's lease, checked in the same transaction (a run's messages in flight would look missing)."""
    if not keys or not folder_ids:
        return
    async with sessions() as session, session.begin():
        if holder is not None and not await _renew(session, *holder):
            raise LeaseLost("la boîte a été reprise par un autre poste pendant la vérification")
        for start in range(0, len(keys), IN_CHUNK):
            await session.execute(
                delete(BasculeItem).where(
                    BasculeItem.folder_id.in_(folder_ids), BasculeItem.dedup_key.in_(keys[start : start + IN_CHUNK])
                )
            )
        await session.execute(update(BasculeFolder).where(BasculeFolder.id.in_(folder_ids)).values(checkpoint=None))
        # A rewound checkpoint is work for the next run: its recorded "nothing changed" no longer holds.
        jobs = select(BasculeFolder.job_id).where(BasculeFolder.id.in_(folder_ids))
        await session.execute(update(BasculeJob).where(BasculeJob.id.in_(jobs)).values(rerun_digest=None))
