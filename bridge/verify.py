"""Verification of a migrated mailbox: per-folder counts and key sets, source against target
(I/O: reads the source and the target; the comparison itself is ``compare_folder``, pure).

A difference is *explained* when the report already says why (a message too big, damaged,
deleted in the source, refused by the target). A mailbox is "vérifiée" only when every source
message is in the target or explained.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

from balf.bridge import store
from balf.bridge.campaign import parse_options
from balf.bridge.errors import BridgeError
from balf.bridge.folders import plan_folders
from balf.bridge.imap import ImapSource, ImapTarget
from balf.bridge.keys import dedup_key
from balf.bridge.migrate import TargetAccess
from balf.bridge.model import FolderPlan, FolderVerdict, SourceDamage
from balf.bridge.sources import MailSource, open_source
from balf.bridge.store import IssueRecord, Sessions
from balf.db.models import BasculeState

VERIFY_KINDS = ("manquant_cible", "verification")
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


def compare_folder(
    source_names: Sequence[str],
    target: str,
    source_keys: Iterable[str],
    target_keys: Iterable[str],
    explanations: Mapping[str, str],
) -> FolderVerdict:
    """Compare one target folder with the source folders copied into it (pure)."""
    counts = Counter(source_keys)
    target_list = list(target_keys)
    target_set = set(target_list)
    missing, explained = [], []
    for key in sorted(counts):
        if key in target_set:
            continue
        if key in explanations:
            explained.append((key, explanations[key]))
        else:
            missing.append(key)
    extra = sorted(target_set - set(counts))
    return FolderVerdict(
        tuple(source_names),
        target,
        sum(counts.values()),
        len(target_list),
        tuple(missing),
        tuple(explained),
        tuple(extra),
        sum(c - 1 for c in counts.values() if c > 1),
    )


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


async def verify_job(sessions: Sessions, job_id: int, access: TargetAccess) -> tuple[list[FolderVerdict], str | None]:
    """Verify one job, record the verdict (state vérifiée, target counts, issues); returns the
    verdicts and an error line when the verification itself could not be done."""
    job = await store.load_job(sessions, job_id)
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
        rows = {r.source_name: r for r in await store.folders_of(sessions, job.id)}
        by_target: dict[str, list[FolderPlan]] = {}
        for plan in plans:
            if not plan.skip:
                by_target.setdefault(plan.target, []).append(plan)
        verdicts: list[FolderVerdict] = []
        for name, group in by_target.items():
            source_keys: list[str] = []
            for plan in group:
                keys, _damaged = await asyncio.to_thread(_source_keys, opened, plan, local)
                source_keys.extend(keys)
                row = rows.get(plan.source.display)
                if row is not None:
                    await store.set_folder_source_count(sessions, row.id, len(keys))
            exists = await asyncio.to_thread(connection.exists, name)
            target_keys = (
                [k for _u, k, _s in await asyncio.to_thread(connection.keys_after, name, 0, local_part_only=local)]
                if exists
                else []
            )
            verdict = compare_folder([p.source.display for p in group], name, source_keys, target_keys, explanations)
            verdicts.append(verdict)
            if verdict.missing:
                await store.forget_keys(
                    sessions,
                    [rows[p.source.display].id for p in group if p.source.display in rows],
                    list(verdict.missing),
                )
            for plan in group:
                row = rows.get(plan.source.display)
                if row is not None:
                    await store.set_folder_target_count(sessions, row.id, verdict.target_count)
        new_issues = [
            IssueRecord(v.target, key, "manquant_cible", "présent dans la source, absent de la cible, sans explication")
            for v in verdicts
            for key in v.missing
        ]
        await store.replace_issues(sessions, job.id, VERIFY_KINDS, new_issues)
        if all(v.ok for v in verdicts) and job.state in (BasculeState.MIGREE, BasculeState.VERIFIEE):
            await store.set_job(sessions, job.id, state=BasculeState.VERIFIEE, verified_at=store.utcnow())
        elif job.state is BasculeState.VERIFIEE:
            await store.set_job(sessions, job.id, state=BasculeState.MIGREE, verified_at=None)
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
