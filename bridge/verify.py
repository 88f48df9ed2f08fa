"""Verification of a migrated mailbox: per-folder counts and key multisets, source against target
(I/O: reads the source and the target; the comparison itself is ``compare_folder``, pure).

Every target folder is compared with the source folders copied into it, both ways: messages
missing from the target, messages only in the target, and surplus copies in the target. A
difference is *explained* when the bascule's own records say why:

- missing: the report already lists the message (too big, damaged, deleted in the source,
  refused by the target: ``EXPLAINING_KINDS``);
- only in the target, or more copies than the source has: the message was already in the target
  folder when the bascule first looked at it, before copying anything into it from any source
  folder (``store.take_evidence`` keeps that evidence once per job and target folder, as
  ``present_avant`` records, one per copy found, with a ``releve_cible`` marker); mail that
  reaches the target afterwards, balf's own copies, or a message put there by hand, is not
  explained; a folder balf had copied into before evidence was kept (``releve_cible_refuse``)
  has none, so every extra there is a difference;
- several source messages with the same Message-ID: copied once, by design.

A mailbox is "vérifiée" only when every difference is explained.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence

from balf.bridge import store
from balf.bridge.errors import BridgeError, LeaseLost
from balf.bridge.folders import plan_folders
from balf.bridge.imap import ImapSource, ImapTarget
from balf.bridge.keys import dedup_key
from balf.bridge.lease import describe_holder, held, take_job, worker_name
from balf.bridge.login import TargetAccess
from balf.bridge.model import Difference, FolderPlan, FolderVerdict, SourceDamage
from balf.bridge.options import parse_options
from balf.bridge.sources import MailSource, open_source
from balf.bridge.store import EVIDENCE_TAKEN, PRESENT_BEFORE, IssueRecord, Sessions
from balf.db.models import BasculeJob, BasculeState

DEFAULT_LEASE = dt.timedelta(minutes=10)  # as bascule.lease_seconds defaults

# What verify writes (and replaces on each verification); the first three block "vérifiée".
UNEXPLAINED_KINDS = ("manquant_cible", "en_plus_cible", "double_cible")
VERIFY_KINDS = (*UNEXPLAINED_KINDS, "ecart_explique", "verification")
EXPLAINING_KINDS = {
    "trop_volumineux",
    "supprime_source",
    "refuse_cible",
    "mbox_illisible",
    "message_illisible",
    "fichier_illisible",
    "document_illisible",
    "dxl_tronque",
}
WAS_THERE = "déjà dans le dossier cible quand la bascule l'a lu la première fois, avant toute copie"
DIFFERENCE_LABELS = {
    "manquant": "absent de la cible",
    "en_plus": "dans la cible, absent de la source",
    "en_double": "en double dans la cible",
    "doublon_source": "en double dans la source",
}


def compare_folder(
    source_names: Sequence[str],
    target: str,
    source_keys: Iterable[str],
    target_keys: Iterable[str],
    explanations: Mapping[str, str],
    found_before: Mapping[str, int] | None = None,
) -> FolderVerdict:
    """Compare one target folder with the source folders copied into it (pure).

    ``explanations``: key -> why a source message was not copied; ``found_before``: key -> how
    many copies were in the target folder before the bascule copied anything.
    """
    before = found_before or {}
    source = Counter(source_keys)
    held = Counter(target_keys)
    differences: list[Difference] = []
    for key in sorted(source):
        wanted, got = source[key], held.get(key, 0)
        if got == 0:
            differences.append(Difference("manquant", key, 1, explanations.get(key)))
            continue
        if got < wanted:
            differences.append(
                Difference(
                    "doublon_source", key, wanted - got, f"{wanted} messages de la source ont cette clé: copié une fois"
                )
            )
        allowed = max(wanted, before.get(key, 0))
        if got > wanted:
            explained = min(got, allowed) - wanted
            if explained:
                differences.append(
                    Difference("en_double", key, explained, f"{WAS_THERE} ({before[key]} exemplaire(s))")
                )
            if got > allowed:
                differences.append(Difference("en_double", key, got - allowed, None))
    for key in sorted(set(held) - set(source)):
        got, was = held[key], min(held[key], before.get(key, 0))
        if was:
            differences.append(Difference("en_plus", key, was, WAS_THERE))
        if got > was:
            differences.append(Difference("en_plus", key, got - was, None))
    return FolderVerdict(tuple(source_names), target, sum(source.values()), sum(held.values()), tuple(differences))


def difference_issues(verdict: FolderVerdict, uids: Mapping[str, Sequence[int]]) -> list[IssueRecord]:
    """The report's lines for a verdict's differences (pure): unexplained ones under their own
    kind, explained ones as ``ecart_explique`` with the explanation; target UIDs named."""
    records = []
    for d in verdict.differences:
        where = uids.get(d.key, ())
        at = f" (UID {', '.join(map(str, where[:20]))} dans la cible)" if where and d.kind != "manquant" else ""
        if d.explanation is not None:
            detail = f"{DIFFERENCE_LABELS[d.kind]}, {d.copies} message(s){at}: {d.explanation}"
            records.append(IssueRecord(verdict.target, d.key, "ecart_explique", detail))
        elif d.kind == "manquant":
            detail = "présent dans la source, absent de la cible, sans explication"
            records.append(IssueRecord(verdict.target, d.key, "manquant_cible", detail))
        elif d.kind == "en_plus":
            detail = (
                f"{d.copies} message(s) dans la cible absent(s) de la source{at}, "
                "pas là avant la bascule: ajouté(s) depuis, à la main ou par une autre copie"
            )
            records.append(IssueRecord(verdict.target, d.key, "en_plus_cible", detail))
        else:
            detail = f"{d.copies} exemplaire(s) de trop dans la cible{at}: à supprimer de la cible"
            records.append(IssueRecord(verdict.target, d.key, "double_cible", detail))
    return records


def _source_keys(source: MailSource, plan: FolderPlan, local: bool) -> tuple[list[str], int]:
    if isinstance(source, ImapSource):
        return [k for _p, k, _s in source.keys(plan.source, local_part_only=local)], 0
    keys, damaged = [], 0
    for item in source.messages(plan.source, None):
        if isinstance(item, SourceDamage):
            damaged += 1
            continue
        keys.append(dedup_key(item.raw, local_part_only=local))
    return keys, damaged


async def verify_job(
    sessions: Sessions,
    job_id: int,
    access: TargetAccess,
    *,
    lease: dt.timedelta = DEFAULT_LEASE,
    worker: str | None = None,
) -> tuple[list[FolderVerdict], str | None]:
    """Verify one job, record the verdict (state vérifiée, target counts, issues); returns the
    verdicts and an error line when the verification itself could not be done.

    It holds the job's lease while it works, like a run (``balf.bridge.lease``): a mailbox being
    copied is not verified, and it is not copied while being verified."""
    job = await store.load_job(sessions, job_id)
    worker = worker or worker_name("verification")
    if not await take_job(sessions, job, worker, lease):
        return [], (
            f"{job.mailbox}: déjà tenue par {describe_holder(job.claimed_by)}; vérifier une fois qu'elle a fini"
        )
    try:
        async with held(sessions, job.id, worker, lease):
            job = await store.load_job(sessions, job_id)  # as it is now that nobody else can change it
            return await _verify_held(sessions, job, access, lease, worker)
    finally:
        await store.release_job(sessions, job.id, worker)


async def _verify_held(
    sessions: Sessions, job: BasculeJob, access: TargetAccess, lease: dt.timedelta, worker: str
) -> tuple[list[FolderVerdict], str | None]:
    options = parse_options(dict(job.options or {}), f"mailbox {job.mailbox}")
    local = options.dedup_local_part
    source: MailSource | None = None
    target: ImapTarget | None = None
    try:
        opened = await asyncio.to_thread(open_source, job.source, options, timeout=access.timeout)
        source = opened
        folders = await asyncio.to_thread(opened.folders)
        connection = await asyncio.to_thread(ImapTarget, access.login(job.target_account))
        target = connection
        info = await asyncio.to_thread(connection.info)
        plans = plan_folders(
            folders,
            delimiter=info.delimiter,
            special=info.special,
            prefix=info.prefix,
            folder_map=options.folder_map,
            exclude=options.exclude,
        )
        issues = await store.issues_of(sessions, job.id)
        explanations = {i.item: f"{i.kind}: {i.detail}" for i in issues if i.kind in EXPLAINING_KINDS}
        # Evidence counts only where it was taken once, before balf's first APPEND (the marker).
        taken = {i.folder for i in issues if i.kind == EVIDENCE_TAKEN}
        found_before: dict[str, Counter[str]] = defaultdict(Counter)
        for i in issues:
            if i.kind == PRESENT_BEFORE and i.folder in taken:
                found_before[i.folder][i.item] += 1
        rows = {r.source_name: r for r in await store.folders_of(sessions, job.id)}
        by_target: dict[str, list[FolderPlan]] = {}
        for plan in plans:
            if not plan.skip:
                by_target.setdefault(plan.target, []).append(plan)
        verdicts: list[FolderVerdict] = []
        new_issues: list[IssueRecord] = []
        for name, group in by_target.items():
            if not await store.renew_job(sessions, job.id, worker, lease):  # and in the background (held)
                raise LeaseLost(f"{job.mailbox}: reprise par un autre poste pendant la vérification")
            source_keys: list[str] = []
            for plan in group:
                keys, _damaged = await asyncio.to_thread(_source_keys, opened, plan, local)
                source_keys.extend(keys)
                row = rows.get(plan.source.display)
                if row is not None:
                    await store.set_folder_source_count(sessions, row.id, len(keys))
            exists = await asyncio.to_thread(connection.exists, name)
            listing = await asyncio.to_thread(connection.keys_after, name, 0, local_part_only=local) if exists else []
            uids: dict[str, list[int]] = defaultdict(list)
            for uid, key, _size in listing:
                uids[key].append(uid)
            verdict = compare_folder(
                [p.source.display for p in group],
                name,
                source_keys,
                [k for _u, k, _s in listing],
                explanations,
                found_before.get(name, {}),
            )
            verdicts.append(verdict)
            new_issues.extend(difference_issues(verdict, uids))
            if verdict.missing:
                await store.forget_keys(
                    sessions,
                    [rows[p.source.display].id for p in group if p.source.display in rows],
                    list(verdict.missing),
                    holder=(job.id, worker, lease),
                )
            for plan in group:
                row = rows.get(plan.source.display)
                if row is not None:
                    await store.set_folder_target_count(sessions, row.id, verdict.target_count)
        await store.replace_issues(sessions, job.id, VERIFY_KINDS, new_issues)
        # Only while still holding the mailbox: a stale "vérifiée" would make later runs skip it.
        if all(v.ok for v in verdicts) and job.state in (BasculeState.MIGREE, BasculeState.VERIFIEE):
            await store.finish_job(
                sessions, job.id, worker, release=False, state=BasculeState.VERIFIEE, verified_at=store.utcnow()
            )
        elif job.state is BasculeState.VERIFIEE:
            await store.finish_job(sessions, job.id, worker, release=False, state=BasculeState.MIGREE, verified_at=None)
        return verdicts, None
    except BridgeError as exc:
        await store.replace_issues(
            sessions,
            job.id,
            ("verification",),
            [IssueRecord("", "", "verification", f"vérification impossible: {exc}")],
        )
        return [], str(exc)
    finally:
        if target is not None:
            await asyncio.to_thread(target.close)
        if source is not None:
            await asyncio.to_thread(source.close)
