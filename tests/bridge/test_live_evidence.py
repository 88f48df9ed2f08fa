"""Evidence of mail already in the target before the bascule, kept once per target folder (live).

Verification explains a target message that the source lacks (or a surplus copy) only by what
the target folder held before balf appended anything to it. These tests make sure balf's own
copies never become that evidence: not those of another source folder mapped to the same target,
not those appended before a target drop and a resumed run.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections import Counter
from pathlib import Path

import pytest

from balf.bridge import store
from balf.bridge.errors import TargetUnavailable
from balf.bridge.model import PlannedMailbox
from balf.bridge.report import snapshot
from balf.bridge.store import IssueRecord
from balf.db.engine import create_engine, session_factory
from tests.bridge.helpers import balf, fetch_all, imap, new_user, write_config, write_plan
from tests.bridge.test_live_drops import TOTAL, _fill
from tests.bridge.test_review_fixes import _append, _delete
from tests.harness.dovecot import Dovecot

pytestmark = pytest.mark.live


def _plan(tmp_path: Path, config: Path, source, target, options: str = "") -> None:
    plan = write_plan(
        tmp_path,
        [
            (
                "sip-bdx",
                f"imap://{source.username}@{source.host}:{source.port}",
                target.username,
                f"password_env=SRC_PW {options}".strip(),
            )
        ],
    )
    assert balf(config, "bascule", "plan", "-d", "33", str(plan)).exit_code == 0


def _verify(config: Path, out: Path, env: dict[str, str]) -> tuple[int, str, dict]:
    result = balf(config, "bascule", "verify", "-d", "33", "-o", str(out), env=env)
    report = json.loads((out / "bascule-33.json").read_text("utf-8"))[0]
    return result.exit_code, result.output, report


def _evidence(db_url: str, folder: str) -> Counter[str]:
    """The kinds of the evidence records and markers of one target folder, over every job."""

    async def read() -> Counter[str]:
        engine = create_engine(db_url)
        try:
            sessions = session_factory(engine)
            found: Counter[str] = Counter()
            for job in await store.list_jobs(sessions, "33"):
                for i in await store.issues_of(sessions, job.id):
                    if i.folder == folder and i.kind in (store.PRESENT_BEFORE, *store.EVIDENCE_MARKERS):
                        found[i.kind] += 1
            return found
        finally:
            await engine.dispose()

    return asyncio.run(read())


def fetch_all_after_start(server: Dovecot, account) -> list:
    """The target folder's messages once the stopped server is back."""
    server.start()
    return fetch_all(account)["Réclamations"]


def test_merged_source_folders_do_not_count_each_other_as_there_before(tmp_path: Path, dovecot, db_url: str) -> None:
    source, target = new_user(dovecot, "ev-src"), new_user(dovecot, "ev-dst")
    _append(source, "Contentieux", ["a-1", "a-2"])
    _append(source, "Recours", ["b-1", "b-2"])
    _append(target, "Dossiers", ["deja-la"])  # genuinely there before the bascule
    config = write_config(tmp_path, db_url, dovecot)
    _plan(tmp_path, config, source, target, "folder_map=Contentieux>Dossiers|Recours>Dossiers")
    env = {"SRC_PW": source.password}
    ran = balf(config, "bascule", "run", "-d", "33", env=env)
    assert ran.exit_code == 0 and "4 copiés" in ran.output, ran.output
    assert len(fetch_all(target)["Dossiers"]) == 5
    assert _evidence(db_url, "Dossiers") == Counter({"present_avant": 1, "releve_cible": 1})
    out = tmp_path / "rapport"

    code, output, report = _verify(config, out, env)
    assert code == 0 and "sip-bdx: vérifiée" in output, output
    assert report["found_in_target"] == 1 and report["unexplained"] == 0
    assert all(i["kind"] != "releve_cible" for i in report["issues"])

    # a copy of a message from the other merged source folder, added by hand: not "there before"
    for mid in ("a-1", "b-1"):
        _append(target, "Dossiers", [mid])
        code, output, report = _verify(config, out, env)
        assert code == 1 and f"en double: m:{mid}@example.org" in output, output
        _delete(target, "Dossiers", mid, last_only=True)

    # a foreign message added by hand after the run, even after a rerun over the merged folders
    _append(target, "Dossiers", ["intrus"])
    assert balf(config, "bascule", "run", "-d", "33", "--again", env=env).exit_code == 0
    code, output, report = _verify(config, out, env)
    assert code == 1 and "en plus: m:intrus@example.org" in output, output
    assert report["state"] == "migrée" and report["unexplained"] == 1
    assert _evidence(db_url, "Dossiers") == Counter({"present_avant": 1, "releve_cible": 1})
    _delete(target, "Dossiers", "intrus")
    assert _verify(config, out, env)[0] == 0


def test_target_recreated_evidence_not_taken_again(tmp_path: Path, dovecot, db_url: str) -> None:
    """The target folder deleted and recreated (new UIDVALIDITY): presence is learnt again, the
    evidence is not; balf's copies there and anything put there by hand are not "there before"."""
    source, target = new_user(dovecot, "ev-src"), new_user(dovecot, "ev-dst")
    _append(source, "Contentieux", ["c-1", "c-2"])
    config = write_config(tmp_path, db_url, dovecot)
    _plan(tmp_path, config, source, target)
    env = {"SRC_PW": source.password}
    assert balf(config, "bascule", "run", "-d", "33", env=env).exit_code == 0
    client = imap(target)
    client.delete_folder("Contentieux")
    client.logout()
    _append(target, "Contentieux", ["c-1", "venu-apres"])  # recreated: one copy and a stranger
    assert balf(config, "bascule", "run", "-d", "33", "--again", env=env).exit_code == 0
    assert _evidence(db_url, "Contentieux") == Counter({"releve_cible": 1})
    code, output, _report = _verify(config, tmp_path / "r", env)
    assert code == 1 and "en plus: m:venu-apres@example.org" in output, output


@pytest.mark.parametrize("db_backend", ["sqlite"])  # the stopped target waits out every delay (10 s)
def test_target_drop_in_first_batch_then_resume_keeps_own_copies_out_of_evidence(
    tmp_path: Path, fresh_dovecot: Dovecot, dovecot: Dovecot, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    source, target = new_user(dovecot, "src"), new_user(fresh_dovecot, "dst")
    _fill(source)
    _append(target, "Réclamations", ["deja-la"])  # genuinely there before the bascule
    # one batch for the whole folder, so all of it is appended before the first checkpoint
    config = write_config(tmp_path, db_url, fresh_dovecot, batch_messages=5000, batch_bytes=64 * 1024 * 1024)
    _plan(tmp_path, config, source, target)
    env = {"SRC_PW": source.password}
    record_batch = store.record_batch

    async def drop_before_first_commit(*args, **kwargs) -> None:  # noqa: ANN002, ANN003
        if kwargs["items"]:  # the APPENDs are done; the target goes down before the commit
            fresh_dovecot.stop()
            raise TargetUnavailable("target IMAP server: connection lost")
        await record_batch(*args, **kwargs)

    monkeypatch.setattr(store, "record_batch", drop_before_first_commit)
    failed = balf(config, "bascule", "run", "-d", "33", env=env)
    assert failed.exit_code == 1, failed.output
    monkeypatch.setattr(store, "record_batch", record_batch)
    assert len(fetch_all_after_start(fresh_dovecot, target)) == TOTAL + 1  # balf's copies are in the target
    assert _evidence(db_url, "Réclamations") == Counter({"present_avant": 1, "releve_cible": 1})

    resumed = balf(config, "bascule", "run", "-d", "33", env=env)
    assert resumed.exit_code == 0 and "0 copiés" in resumed.output, resumed.output  # none appended twice
    assert len(fetch_all(target)["Réclamations"]) == TOTAL + 1
    # balf's own copies are not evidence
    assert _evidence(db_url, "Réclamations") == Counter({"present_avant": 1, "releve_cible": 1})
    out_dir = tmp_path / "rapport"
    code, output, report = _verify(config, out_dir, env)
    assert code == 0 and "sip-bdx: vérifiée" in output, output
    assert report["found_in_target"] == 1 and "expliqués 1 (en_plus 1)" in output

    # a copy of one of the messages appended before the drop: a difference, not "there before"
    client = imap(target)
    client.select_folder("Réclamations", readonly=True)
    first = min(client.search(["HEADER", "Message-ID", "drop-"]))
    raw = client.fetch([first], [b"BODY.PEEK[]"])[first][b"BODY[]"]
    client.append("Réclamations", raw)
    client.logout()
    code, output, report = _verify(config, out_dir, env)
    assert code == 1 and "en double: m:drop-" in output, output
    assert report["state"] == "migrée"


async def test_folder_copied_into_without_evidence_takes_none_and_says_so(db_url: str) -> None:
    """A job that copied into a target folder before evidence was kept this way (no marker): no
    evidence is taken, whatever the folder holds, the report says so, and old records explain nothing."""
    engine = create_engine(db_url)
    sessions = session_factory(engine)
    try:
        await store.plan_department(sessions, "33", [PlannedMailbox("old", "imap://balf@src33", "old.1", None, {})])
        (job,) = await store.list_jobs(sessions, "33")
        row = await store.folder_row(sessions, job.id, "Contentieux", "Contentieux")
        assert await store.claim_job(sessions, job.id, "w", dt.timedelta(minutes=5))  # a batch needs the lease
        await store.record_batch(
            sessions,
            job_id=job.id,
            folder_id=row.id,
            items=[("m:c-1@example.org", 7, 100)],
            skipped=0,
            failed=0,
            checkpoint="1:7",
            issues=[IssueRecord("Contentieux", "m:c-1@example.org", store.PRESENT_BEFORE, "UID 7")],  # old style
            worker="w",
            lease=dt.timedelta(minutes=5),
        )
        present = [(7, "m:c-1@example.org", 100), (8, "m:intrus@example.org", 100)]
        assert not await store.take_evidence(sessions, job.id, "Contentieux", present)
        assert await store.evidence_settled(sessions, job.id, "Contentieux")
        assert not await store.take_evidence(sessions, job.id, "Contentieux", present)  # never taken later
        issues = await store.issues_of(sessions, job.id)
        assert [i.kind for i in issues].count(store.EVIDENCE_REFUSED) == 1
        report = snapshot(job, await store.folders_of(sessions, job.id), issues)
        assert report.found_in_target == 0
        assert any(i.kind == store.EVIDENCE_REFUSED and "aucun relevé" in i.label for i in report.issues)
        # a fresh target folder of the same job: taken once, balf's later copies never added
        assert await store.take_evidence(sessions, job.id, "Recours", present[1:])
        assert not await store.take_evidence(sessions, job.id, "Recours", present)
        issues = await store.issues_of(sessions, job.id)
        assert [(i.kind, i.item) for i in issues if i.folder == "Recours"] == [
            (store.EVIDENCE_TAKEN, ""),
            (store.PRESENT_BEFORE, "m:intrus@example.org"),
        ]
        assert snapshot(job, await store.folders_of(sessions, job.id), issues).found_in_target == 1
    finally:
        await engine.dispose()


async def test_a_folder_mapped_to_another_target_forgets_what_it_recorded(db_url: str) -> None:
    """Found by review: the plan's folder_map changed, and the new target folder happened to have
    the old one's UIDVALIDITY (servers number by creation time, some always say 1): the folder
    kept its records and checkpoint and nothing was copied into the new target."""
    engine = create_engine(db_url)
    sessions = session_factory(engine)
    try:
        await store.plan_department(sessions, "33", [PlannedMailbox("moved", "imap://balf@src33", "m.1", None, {})])
        (job,) = await store.list_jobs(sessions, "33")
        assert await store.claim_job(sessions, job.id, "w", dt.timedelta(minutes=5))
        first = await store.prepare_folder(sessions, job.id, "Contentieux", "Contentieux", 1, evidence=[])
        assert not first.evidence_settled and first.last_target_uid == 0
        await store.record_batch(
            sessions,
            job_id=job.id,
            folder_id=first.row.id,
            items=[("m:c-1@example.org", 7, 100)],
            skipped=0,
            failed=0,
            checkpoint="1:7",
            issues=[],
            worker="w",
            lease=dt.timedelta(minutes=5),
        )
        same = await store.prepare_folder(sessions, job.id, "Contentieux", "Contentieux", 1)
        assert same.last_target_uid == 7 and same.row.checkpoint == "1:7" and not same.recreated

        # A dry run of the new plan writes nothing and sees the folder as starting over.
        dry = await store.folder_row(sessions, job.id, "Contentieux", "Archives/Contentieux", create=False)
        assert dry.id == -1 and dry.checkpoint is None

        moved = await store.prepare_folder(sessions, job.id, "Contentieux", "Archives/Contentieux", 1)
        assert moved.recreated and moved.last_target_uid == 0 and moved.row.checkpoint is None
        assert moved.row.target_name == "Archives/Contentieux"
        assert await store.known_keys(sessions, moved.row.id, ["m:c-1@example.org"]) == set()
        kinds = [i.kind for i in await store.issues_of(sessions, job.id)]
        assert kinds.count("cible_changee") == 1 and "uidvalidity_cible" not in kinds
        # It starts over there: what the new folder already holds is its evidence, not refused.
        assert not moved.evidence_settled
        assert await store.take_evidence(sessions, job.id, "Archives/Contentieux", [(3, "m:deja@example.org", 10)])
    finally:
        await engine.dispose()
