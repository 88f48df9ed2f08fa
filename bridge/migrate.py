"""Run the bascule of one mailbox or of a department (I/O: source, target IMAP, database).

For each folder: create and subscribe the target folder, learn what the target already holds
beyond the last UID recorded (a crash between APPEND and the database commit leaves exactly
that), then stream the source from the folder's checkpoint in bounded batches. Each batch is
filtered against the recorded keys, spread over several target connections (MULTIAPPEND where
offered), and recorded with its new checkpoint in one transaction. The next batch is read from
the source while the current one is appended. Memory is bounded by the batch size, not by the
mailbox size. A folder whose source shows nothing after its checkpoint (IMAP STATUS) is skipped
on reruns; a target that drops its connections gets new ones and the folder starts again from its
checkpoint (``copy_folder_again_on_drop``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from balf.bridge import store
from balf.bridge.errors import (
    BridgeError,
    LeaseLost,
    PermanentFailure,
    QuotaExceeded,
    TargetRefused,
    TargetUnavailable,
    TemporaryFailure,
)
from balf.bridge.folders import parents, plan_folders
from balf.bridge.imap import ImapTarget, TargetInfo
from balf.bridge.keys import dedup_key
from balf.bridge.lease import LeaseWatch, describe_holder, held, take_job, worker_name
from balf.bridge.login import TargetAccess
from balf.bridge.model import FolderPlan, SourceDamage, SourceItem, SourceMessage
from balf.bridge.options import MailboxOptions, parse_options
from balf.bridge.outcome import FolderOutcome, JobOutcome
from balf.bridge.snapshot import digest, plan_fingerprint, server_state, status_numbers
from balf.bridge.sources import MailSource, imap_login, is_imap, open_source
from balf.bridge.store import IssueRecord, Sessions
from balf.db.models import BasculeFolder, BasculeJob, BasculeState

log = logging.getLogger(__name__)

TARGET_RECONNECT_DELAYS = (1.0, 3.0, 6.0)  # seconds before new target connections after a drop
KEPT_FLAGS = frozenset({"\\seen", "\\answered", "\\flagged", "\\draft"})


@dataclass(frozen=True)
class RunSettings:
    connections: int = 4
    batch_messages: int = 200
    batch_bytes: int = 8 * 1024 * 1024
    max_message_size: int = 52428800
    dry_run: bool = False
    worker: str = field(default_factory=worker_name)
    lease: dt.timedelta = dt.timedelta(minutes=10)


class Progress(Protocol):
    """What the terminal (or a test) is told while a mailbox is copied."""

    def start(self, mailbox: str, messages: int, size: int) -> None: ...

    def advance(self, mailbox: str, messages: int, size: int) -> None: ...

    def finish(self, outcome: JobOutcome) -> None: ...


class NoProgress:
    def start(self, mailbox: str, messages: int, size: int) -> None:
        pass

    def advance(self, mailbox: str, messages: int, size: int) -> None:
        pass

    def finish(self, outcome: JobOutcome) -> None:
        pass


def ended_state(before: BasculeState, folders: Sequence[FolderOutcome], remarks: Sequence[object]) -> BasculeState:
    """A verified mailbox stays verified through a rerun that copied and reported nothing: what
    the verification compared is unchanged. Otherwise the run leaves it migrated (pure)."""
    if before is BasculeState.VERIFIEE and not remarks and not any(f.copied or f.failed for f in folders):
        return BasculeState.VERIFIEE
    return BasculeState.MIGREE


def connections_for(plan: FolderPlan, settings: RunSettings) -> int:
    """Target connections worth having for a folder: one per batch it fills, up to
    ``connections`` (pure). Each costs a login, and on Dovecot an imap process, that a folder of
    a few messages does not repay: over a department of small mailboxes, four per mailbox made
    the first pass CPU-bound on two cores. Unknown sizes: all of them."""
    count, size = plan.source.estimated_count, plan.source.estimated_bytes
    if count is None and size is None:
        return settings.connections
    batches = max(
        math.ceil((size or 0) / max(1, settings.batch_bytes)),
        math.ceil((count or 0) / max(1, settings.batch_messages)),
    )
    return max(1, min(settings.connections, batches))


class BatchReader:
    """Cuts a folder's stream of items into batches of at most ``max_count`` items and at most
    ``max_bytes`` of message bytes; a message bigger than ``max_bytes`` makes a batch alone.

    The byte bound is strict (the item that would cross it starts the next batch), so what a run
    holds at once (the batch being appended plus the one read ahead) has a ceiling that does not
    depend on the mailbox: 2 x max(max_bytes, largest message).
    """

    def __init__(self, items: Iterator[SourceItem], max_count: int, max_bytes: int) -> None:
        self._items = items
        self._max_count = max(1, max_count)
        self._max_bytes = max_bytes
        self._carried: SourceItem | None = None

    def next(self) -> list[SourceItem]:
        """The next batch; empty at the end of the stream."""
        batch: list[SourceItem] = []
        size = 0
        while len(batch) < self._max_count:
            item, self._carried = self._carried, None
            if item is None:
                item = next(self._items, None)
                if item is None:
                    break
            item_size = item.size if isinstance(item, SourceMessage) else 0
            if batch and size + item_size > self._max_bytes:
                self._carried = item
                break
            batch.append(item)
            size += item_size
        return batch

    def close(self) -> None:
        close = getattr(self._items, "close", None)
        if close is not None:
            close()


def storable_flags(flags: Sequence[str], permanent: Sequence[str]) -> tuple[str, ...]:
    """The flags the target keeps (PERMANENTFLAGS, RFC 3501 7.1): keywords only if it lists
    them or ``\\*``; \\Recent never; \\Deleted never (a deleted message is not copied)."""
    allowed = {p.lower() for p in permanent}
    keywords_ok = "\\*" in allowed or not allowed
    result = []
    for flag in flags:
        low = flag.lower()
        if low in ("\\recent", "\\deleted"):
            continue
        if low in KEPT_FLAGS or low in allowed or (keywords_ok and not low.startswith("\\")):
            result.append(flag)
    return tuple(dict.fromkeys(result))


def split_evenly(items: Sequence[tuple[str, SourceMessage]], parts: int) -> list[list[tuple[str, SourceMessage]]]:
    """Contiguous chunks of about the same byte size, one per connection."""
    parts = max(1, min(parts, len(items)))
    total = sum(m.size for _k, m in items) or 1
    chunks: list[list[tuple[str, SourceMessage]]] = [[] for _ in range(parts)]
    acc = 0
    for key, message in items:
        index = min(parts - 1, acc * parts // total)
        chunks[index].append((key, message))
        acc += message.size
    return [c for c in chunks if c]


class MailboxRun:
    """The copy of one job (a mailbox): holds its source, target connections and settings."""

    def __init__(
        self, sessions: Sessions, job: BasculeJob, settings: RunSettings, access: TargetAccess, progress: Progress
    ) -> None:
        self.sessions = sessions
        self.job = job
        self.settings = settings
        self.access = access
        self.progress = progress
        self.options: MailboxOptions = parse_options(dict(job.options or {}), f"mailbox {job.mailbox}")
        self.max_size = self.options.max_message_size or settings.max_message_size
        self.source: MailSource | None = None
        self.targets: list[ImapTarget] = []
        self.info: TargetInfo | None = None
        self.folder_outcome: FolderOutcome | None = None  # the folder being copied, so far
        self.recorded_folders: dict[str, BasculeFolder] = {}  # by source name, as the run started
        self.lease: LeaseWatch | None = None  # set while the job's lease is held (not for a dry run)
        # Folders found empty at the source, created in the target, whose rows wait for the end
        # of the run: (source, target, UIDVALIDITY).
        self.empty_folders: dict[str, tuple[str, str, int]] = {}

    async def source_state(self) -> bytes | None:
        """The source's part of the rerun digest (IMAP sources only; not for dry runs)."""
        if self.settings.dry_run or not is_imap(self.job.source):
            return None
        login = imap_login(self.job.source, self.options, timeout=self.access.timeout)
        return await asyncio.to_thread(server_state, login, source=True)

    async def rerun_digest(self, source_before: bytes | None, plans: Sequence[FolderPlan]) -> str | None:
        """The digest a rerun compares against (``balf.bridge.snapshot``), or None.

        The target's state is taken first; then, against the target as it is from then on, the
        run must be one a full rerun over unchanged servers would skip folder by folder: the
        same folder plan, every target folder there with the UIDVALIDITY recorded, every
        checkpoint past the source's UIDNEXT as listed; and the source's snapshot must show the
        numbers the run listed. A change at any moment makes the check fail or the next digest
        differ: the quick answer never differs from the full one."""
        if source_before is None or self.info is None or not self._source_agrees(source_before):
            return None
        target = await asyncio.to_thread(server_state, self.access.login(self.job.target_account), source=False)
        if target is None:
            return None
        try:
            await self.open_targets(1)
            info = await asyncio.to_thread(self.targets[0].info)
            again = plan_folders(
                [p.source for p in plans],
                delimiter=info.delimiter,
                special=info.special,
                prefix=info.prefix,
                folder_map=self.options.folder_map,
                exclude=self.options.exclude,
            )
            if [(p.source.display, p.target, p.skip) for p in again] != [
                (p.source.display, p.target, p.skip) for p in plans
            ]:
                return None
            rows = {f.source_name: f for f in await store.folders_of(self.sessions, self.job.id)}
            for plan in plans:  # the very rule by which a full rerun skips a folder
                if not plan.skip and not await self.unchanged(plan, rows.get(plan.source.display)):
                    return None
        except BridgeError as exc:
            log.info("bascule %s: no rerun digest (%s)", self.job.mailbox, exc)
            return None
        return digest(
            plan_fingerprint(self.job.source, self.job.target_account, self.job.options), source_before, target
        )

    def _source_agrees(self, source_before: bytes) -> bool:
        """True when the source's snapshot shows, for every folder the run listed, the STATUS
        numbers the run decided from (a server answering SELECT and STATUS differently, or a
        folder renamed between the two, gets no digest)."""
        listed = getattr(self.source, "listed_status", None)
        if listed is None:
            return False
        from imapclient.imap_utf7 import encode

        seen = status_numbers(source_before)
        return all(seen.get(encode(name)) == numbers for name, numbers in listed().items())

    async def open(self) -> list[FolderPlan]:
        source = await asyncio.to_thread(open_source, self.job.source, self.options, timeout=self.access.timeout)
        self.source = source
        folders = await asyncio.to_thread(source.folders)
        await self.open_targets(1)  # the others when a folder has something to copy
        self.recorded_folders = {f.source_name: f for f in await store.folders_of(self.sessions, self.job.id)}
        info = await asyncio.to_thread(self.targets[0].info)
        self.info = info
        if info.append_limit:
            self.max_size = min(self.max_size, info.append_limit)
        return plan_folders(
            folders,
            delimiter=info.delimiter,
            special=info.special,
            prefix=info.prefix,
            folder_map=self.options.folder_map,
            exclude=self.options.exclude,
        )

    async def close(self) -> None:
        await self.close_targets()
        if self.source is not None:
            await asyncio.to_thread(self.source.close)

    async def check_quota(self, plans: Sequence[FolderPlan]) -> None:
        """Stop before copying anything when the rest of the mailbox cannot fit (RFC 9208)."""
        assert self.info is not None
        if not self.info.quota:
            return
        total = sum(p.source.estimated_bytes or 0 for p in plans if not p.skip)
        needed = max(0, total - self.job.bytes_copied)
        if not needed:  # a rerun over a migrated mailbox: nothing more to fit (and GETQUOTAROOT may scan)
            return
        quota = await asyncio.to_thread(self.targets[0].quota)
        if quota is None or quota.limit is None:
            return
        if quota.usage + needed > quota.limit:
            raise QuotaExceeded(
                f"{self.job.mailbox}: the mailbox needs {_mb(needed)} more but the target account "
                f"{self.job.target_account} has {_mb(max(0, quota.limit - quota.usage))} free of a "
                f"{_mb(quota.limit)} quota; raise the quota or clean the source, then run again"
            )

    async def unchanged(self, plan: FolderPlan, row: BasculeFolder | None) -> bool:
        """True when a rerun has nothing to do in this folder, known from two STATUS replies
        instead of a SELECT and a SEARCH on each side: the source has no message after the
        folder's checkpoint (``unchanged_since``; IMAP sources only) and the target folder is
        still the one recorded (same UIDVALIDITY). A crash between APPEND and commit leaves the
        checkpoint behind the source, so such a folder is never skipped."""
        check = getattr(self.source, "unchanged_since", None)
        if (
            row is None
            or check is None
            or row.target_uidvalidity is None
            or row.target_name != plan.target
            or not check(plan.source, row.checkpoint)
        ):
            return False
        validity = await asyncio.to_thread(self.targets[0].uidvalidity, plan.target)
        return validity == row.target_uidvalidity

    async def copy_folder(self, plan: FolderPlan, resumed: FolderOutcome | None = None) -> FolderOutcome:
        assert self.source is not None and self.info is not None
        job, settings, sessions = self.job, self.settings, self.sessions
        local = self.options.dedup_local_part
        name = plan.target
        if resumed is None and await self.unchanged(plan, self.recorded_folders.get(plan.source.display)):
            return FolderOutcome(plan.source.display, name)
        created = False
        if settings.dry_run:
            row = await store.folder_row(sessions, job.id, plan.source.display, name, create=False)
            permanent: Sequence[str] = ("\\*",)
        else:
            await self.open_targets(connections_for(plan, settings))  # the others, now that there may be work
            primary = self.targets[0]
            created = await asyncio.to_thread(primary.ensure_folder, name, parents(name, self.info.delimiter))
            selected = await asyncio.to_thread(primary.select, name)
            empty = plan.source.estimated_count == 0 and self.source.kind == "imap"
            listing: list[tuple[int, str, int]] | None = None
            if not empty and plan.source.display not in self.recorded_folders:
                # A folder this job never recorded: its target's evidence is almost surely still
                # to take, so read it now (before any APPEND) and record it with the row.
                listing = await asyncio.to_thread(primary.keys_after, name, 0, local_part_only=local)
            if empty:
                # Empty at the source when listed (IMAP STATUS; a file or DXL source may still
                # have damage to report): the folder exists and is subscribed, and its row is
                # recorded with the other empty ones at the end of the run, in one transaction
                # (a crash before that only means doing this again). The target's evidence waits
                # for a run that has something to append; a message that arrived since the
                # listing changes the source's STATUS, so the next run (and its digest) sees it.
                validity = selected["uidvalidity"]
                self.empty_folders[plan.source.display] = (plan.source.display, name, validity)
                return FolderOutcome(plan.source.display, name, created=created)
            # One transaction for the folder's row, its UIDVALIDITY (a recreated target folder
            # is learnt again from the target) and what the rest of the setup needs to know.
            prepared = await store.prepare_folder(
                sessions, job.id, plan.source.display, name, selected["uidvalidity"], evidence=listing
            )
            row = prepared.row
            permanent = selected["permanentflags"]
            before: list[tuple[int, str, int]] | None = None
            if not prepared.evidence_settled:
                # Before balf's first APPEND to this target folder (whichever source folder
                # feeds it): what it holds now was there before the bascule.
                before = listing
                if before is None:
                    before = await asyncio.to_thread(primary.keys_after, name, 0, local_part_only=local)
                    await store.take_evidence(sessions, job.id, name, before)
            after = prepared.last_target_uid
            if before is not None and after == 0:
                present = before
            else:
                present = await asyncio.to_thread(primary.keys_after, name, after, local_part_only=local)
            if present:
                await store.record_present(sessions, row.id, present)

        items = iter(self.source.messages(plan.source, row.checkpoint))
        outcome = FolderOutcome(plan.source.display, name, created=created)
        if resumed is not None:  # a previous attempt on this folder copied some before failing
            outcome = replace(resumed, created=resumed.created or created)
        self.folder_outcome = outcome
        reader = BatchReader(items, settings.batch_messages, settings.batch_bytes)
        pending = asyncio.ensure_future(asyncio.to_thread(reader.next))
        try:
            while True:
                batch = await pending
                if not batch:
                    break
                pending = asyncio.ensure_future(asyncio.to_thread(reader.next))  # read ahead while appending
                outcome = await self._copy_batch(plan, row.id, batch, permanent, outcome)
                self.folder_outcome = outcome
        finally:
            # A failed append must not leave the read-ahead thread using the source connection
            # while the folder is retried or the source closed: wait for it, then end the reader.
            await asyncio.gather(pending, return_exceptions=True)
            await asyncio.to_thread(reader.close)
        return outcome

    async def open_targets(self, count: int | None = None) -> None:
        """Open target connections up to ``count`` (default: ``connections``, one for a dry run);
        all or none of the new ones."""
        if count is None:
            count = 1 if self.settings.dry_run else max(1, self.settings.connections)
        if len(self.targets) >= count:
            return
        login = self.access.login(self.job.target_account)
        opened = await asyncio.gather(
            *(asyncio.to_thread(ImapTarget, login) for _ in range(count - len(self.targets))), return_exceptions=True
        )
        failures = [t for t in opened if isinstance(t, BaseException)]
        self.targets.extend(t for t in opened if isinstance(t, ImapTarget))
        if failures:
            await self.close_targets()
            raise failures[0]

    async def close_targets(self) -> None:
        targets, self.targets = self.targets, []
        for target in targets:
            await asyncio.to_thread(target.close)

    async def copy_folder_again_on_drop(self, plan: FolderPlan) -> FolderOutcome:
        """``copy_folder``, started again on new target connections when the target drops them
        (a server restart): up to len(TARGET_RECONNECT_DELAYS) times. Starting again is safe:
        the folder resumes from its checkpoint after learning what the target already holds
        beyond the last recorded UID, so an APPEND whose reply was lost is not made twice."""
        delays = iter(TARGET_RECONNECT_DELAYS)
        self.folder_outcome = None
        while True:
            try:
                if not self.targets:
                    await self.open_targets(1)
                return await self.copy_folder(plan, resumed=self.folder_outcome)
            except TargetUnavailable as exc:
                delay = next(delays, None)
                if delay is None:
                    raise
                log.warning("%s, %s: %s; new connections in %.0f s", self.job.mailbox, plan.source.display, exc, delay)
                await self.close_targets()
                await asyncio.sleep(delay)

    async def _copy_batch(
        self,
        plan: FolderPlan,
        folder_id: int,
        batch: list[SourceItem],
        permanent: Sequence[str],
        outcome: FolderOutcome,
    ) -> FolderOutcome:
        local = self.options.dedup_local_part
        folder = plan.source.display
        issues: list[IssueRecord] = []
        keyed: list[tuple[str, SourceMessage]] = []
        skipped = failed = 0
        for item in batch:
            if isinstance(item, SourceDamage):
                issues.append(IssueRecord(folder, item.position, item.kind, item.detail))
                failed += 1
                continue
            keyed.append((dedup_key(item.raw, local_part_only=local), item))
        known = await store.known_keys(self.sessions, folder_id, (k for k, _m in keyed))
        to_copy: list[tuple[str, SourceMessage]] = []
        chosen: set[str] = set()
        for key, message in keyed:
            if key in known or key in chosen:
                skipped += 1
                continue
            if any(f.lower() == "\\deleted" for f in message.flags):
                issues.append(
                    IssueRecord(
                        folder, key, "supprime_source", "message marqué supprimé (\\Deleted) dans la source: non copié"
                    )
                )
                skipped += 1
                chosen.add(key)
                continue
            if message.size > self.max_size:
                issues.append(
                    IssueRecord(
                        folder, key, "trop_volumineux", f"{_mb(message.size)} > limite {_mb(self.max_size)}: non copié"
                    )
                )
                failed += 1
                chosen.add(key)
                continue
            chosen.add(key)
            to_copy.append((key, message))
        recorded: list[tuple[str, int | None, int]] = []
        if to_copy and self.lease is not None and self.lease.lost:
            # Another process holds the mailbox now: appending would race its own copies.
            raise LeaseLost("la boîte a été reprise par un autre poste (bail expiré): arrêt avant d'ajouter")
        if to_copy and not self.settings.dry_run:
            chunks = split_evenly(to_copy, len(self.targets))
            results = await asyncio.gather(
                *(self._append_chunk(self.targets[i], plan.target, chunk, permanent) for i, chunk in enumerate(chunks)),
                return_exceptions=True,
            )
            for result in results:
                if isinstance(result, BaseException):
                    raise result
                done, refused = result
                recorded.extend(done)
                issues.extend(refused)
                failed += len(refused)
            for key, message in to_copy:
                for note in message.notes:
                    issues.append(IssueRecord(folder, key, "repare", note))
        elif to_copy:
            recorded = [(k, None, m.size) for k, m in to_copy]
        if not self.settings.dry_run:
            checkpoint = batch[-1].position
            await store.record_batch(
                self.sessions,
                job_id=self.job.id,
                folder_id=folder_id,
                items=recorded,
                skipped=skipped,
                failed=failed,
                checkpoint=checkpoint,
                issues=issues,
                worker=self.settings.worker,
                lease=self.settings.lease,
            )
        size = sum(s for _k, _u, s in recorded)
        self.progress.advance(self.job.mailbox, len(batch), sum(m.size for _k, m in keyed))
        return replace(
            outcome,
            seen=outcome.seen + len(batch),
            copied=outcome.copied + len(recorded),
            skipped=outcome.skipped + skipped,
            failed=outcome.failed + failed,
            bytes=outcome.bytes + size,
        )

    async def _append_chunk(
        self, target: ImapTarget, name: str, chunk: list[tuple[str, SourceMessage]], permanent: Sequence[str]
    ) -> tuple[list[tuple[str, int | None, int]], list[IssueRecord]]:
        """APPEND one chunk on one connection; a refused MULTIAPPEND is retried one by one so a
        single bad message is reported instead of failing its neighbours."""
        assert self.info is not None
        payload = [(m.raw, storable_flags(m.flags, permanent), m.internaldate) for _k, m in chunk]
        try:
            uids = await asyncio.to_thread(target.append, name, payload, multiappend=self.info.multiappend)
            return [(k, uids[i] if uids else None, m.size) for i, (k, m) in enumerate(chunk)], []
        except QuotaExceeded:
            raise
        except TargetRefused:
            if len(chunk) == 1:
                pass
        done: list[tuple[str, int | None, int]] = []
        refused: list[IssueRecord] = []
        for (key, message), one in zip(chunk, payload, strict=True):
            try:
                uids = await asyncio.to_thread(target.append, name, [one], multiappend=False)
                done.append((key, uids[0] if uids else None, message.size))
            except QuotaExceeded:
                raise
            except TargetRefused as exc:
                refused.append(IssueRecord(name, key, "refuse_cible", str(exc)))
        return done, refused


async def run_job(
    sessions: Sessions, job_id: int, settings: RunSettings, access: TargetAccess, progress: Progress | None = None
) -> JobOutcome:
    """Copy one mailbox (resuming from its checkpoints); never raises a BridgeError: the outcome
    carries the state (migrée, en erreur) and the one-line message."""
    progress = progress or NoProgress()
    job = await store.load_job(sessions, job_id)
    started = time.monotonic()
    if not settings.dry_run and not await take_job(sessions, job, settings.worker, settings.lease):
        return JobOutcome(
            job.department,
            job.mailbox,
            job.state,
            (),
            0.0,
            f"{job.mailbox}: déjà tenue par {describe_holder(job.claimed_by)}",
            75,
        )
    run = MailboxRun(sessions, job, settings, access, progress)
    holding = (
        held(sessions, job.id, settings.worker, settings.lease) if not settings.dry_run else contextlib.nullcontext()
    )
    async with holding as watch:
        run.lease = watch
        return await _run_held(run, settings, progress, started)


async def _run_held(run: MailboxRun, settings: RunSettings, progress: Progress, started: float) -> JobOutcome:
    sessions, job = run.sessions, run.job
    folders: list[FolderOutcome] = []
    current: FolderPlan | None = None
    try:
        source_before = await run.source_state()  # before the source is read: see bridge.snapshot
        plans = await run.open()
        await run.check_quota(plans)
        active = [p for p in plans if not p.skip]
        progress.start(
            job.mailbox,
            sum(p.source.estimated_count or 0 for p in active),
            sum(p.source.estimated_bytes or 0 for p in active),
        )
        if not settings.dry_run:
            await store.set_job(
                sessions,
                job.id,
                state=BasculeState.EN_COURS,
                last_error=None,
                rerun_digest=None,  # until this run ends with nothing left to copy
                started_at=job.started_at or store.utcnow(),
                bytes_total=sum(p.source.estimated_bytes or 0 for p in active),
            )
        for plan in plans:
            if plan.skip:
                folders.append(FolderOutcome(plan.source.display, "", skipped=0))
                continue
            current = plan
            folders.append(await run.copy_folder_again_on_drop(plan))
        current = None
        remarks = list(getattr(run.source, "remarks", []))
        final = job.state
        if not settings.dry_run:
            await store.prepare_folders(sessions, job.id, list(run.empty_folders.values()))
            total = sum(f.seen for f in folders)
            await store.add_issues(sessions, job.id, [IssueRecord("", "", kind, detail) for kind, detail in remarks])
            fresh = await store.load_job(sessions, job.id)
            rerun_digest = await run.rerun_digest(source_before, plans)
            final = ended_state(job.state, folders, remarks)
            if rerun_digest is None:  # cannot show nothing moved (a verify may have rewound a checkpoint)
                final = BasculeState.MIGREE
            if run.lease is not None:
                run.lease.finished = True
            await store.finish_job(
                sessions,
                job.id,
                settings.worker,
                state=final,
                finished_at=store.utcnow(),
                messages_total=max(fresh.messages_total, fresh.messages_copied, total),
                rerun_digest=rerun_digest,
            )
        outcome = JobOutcome(
            job.department,
            job.mailbox,
            final,
            tuple(folders),
            time.monotonic() - started,
        )
    except Exception as exc:  # noqa: BLE001 - one mailbox's failure must not stop the campaign
        if isinstance(exc, BridgeError):
            message, code = str(exc), exc.exit_code
            if current is not None:  # name the folder; a temporary failure resumes on the next run
                message = f"{job.mailbox}, dossier {current.source.display}: {message}"
                if isinstance(exc, TemporaryFailure):
                    message += " (relancer `balf bascule run`: reprise au point de reprise)"
                if run.folder_outcome is not None:
                    folders.append(run.folder_outcome)
        else:  # a bug: keep the traceback in the log, the coordinator gets one line
            log.exception("bascule of %s failed", job.mailbox)
            message, code = f"{job.mailbox}: erreur interne {type(exc).__name__}: {exc}", 1
        if not settings.dry_run and not isinstance(exc, LeaseLost):  # else the job is another's now
            if run.lease is not None:
                run.lease.finished = True
            with contextlib.suppress(LeaseLost):  # lost meanwhile: the holder decides its state
                await store.finish_job(
                    sessions, job.id, settings.worker, state=BasculeState.EN_ERREUR, last_error=message
                )
        outcome = JobOutcome(
            job.department,
            job.mailbox,
            BasculeState.EN_ERREUR,
            tuple(folders),
            time.monotonic() - started,
            message,
            code,
        )
    finally:
        try:
            await run.close()
        except BridgeError:
            pass
    progress.finish(outcome)
    return outcome


async def run_department(
    sessions: Sessions,
    jobs: Sequence[BasculeJob],
    settings: RunSettings,
    access: TargetAccess,
    parallel: int,
    progress: Progress | None = None,
) -> list[JobOutcome]:
    """Run ``jobs`` with at most ``parallel`` mailboxes at a time; outcomes in the jobs' order."""
    gate = asyncio.Semaphore(max(1, parallel))

    async def one(job: BasculeJob) -> JobOutcome:
        async with gate:
            return await run_job(sessions, job.id, settings, access, progress)

    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(one(job)) for job in jobs]
    return [t.result() for t in tasks]


def _mb(size: int) -> str:
    return f"{size / 1_000_000:.1f} Mo"


__all__ = [
    "run_job",
    "run_department",
    "RunSettings",
    "TargetAccess",
    "JobOutcome",
    "FolderOutcome",
    "PermanentFailure",
]
