"""A rerun over unchanged mailboxes is answered from the servers' state without the database
layer, and any change sends it down the full path (live: Dovecot, SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from balf.db.states import BasculeState
from tests.bridge.helpers import balf, fetch_all, imap, new_user, write_config, write_plan

pytestmark = pytest.mark.live
WHEN = dt.datetime(2024, 3, 4, 10, 0, tzinfo=dt.UTC)


def _message(n: int) -> bytes:
    return (
        f"From: usager{n}@example.org\r\nTo: sip@dgfip.finances.gouv.fr\r\nSubject: relance {n}\r\n"
        f"Message-ID: <quick-{n}@example.org>\r\n\r\nCorps {n}.\r\n"
    ).encode()


def _migrated(tmp_path: Path, dovecot, db_url: str, stem: str, options: str = "password_env=SRC_PW"):
    source, target = new_user(dovecot, f"{stem}-src"), new_user(dovecot, f"{stem}-dst")
    client = imap(source)
    client.create_folder("Réclamations/Été 2024")
    for n in range(3):
        client.append("INBOX", _message(n), flags=("\\Seen",), msg_time=WHEN)
    client.append("Réclamations/Été 2024", _message(10), msg_time=WHEN)
    client.logout()
    config = write_config(tmp_path, db_url, dovecot)
    uri = f"imap://{source.username}@{source.host}:{source.port}"
    plan = write_plan(tmp_path, [("sip", uri, target.username, options)])
    env = {"SRC_PW": source.password}
    balf(config, "bascule", "plan", "-d", "33", str(plan))
    first = balf(config, "bascule", "run", "-d", "33", env=env)
    assert "4 copiés" in first.output, first.output
    return source, target, config, env, uri


def _set_jobs(db_url: str, **values: object) -> None:
    """Change every job's row behind balf's back (another run's claim, a forgotten digest)."""
    from sqlalchemy import update

    from balf.db.engine import create_engine
    from balf.db.models import BasculeJob

    async def go() -> None:
        engine = create_engine(db_url)
        async with engine.begin() as conn:
            await conn.execute(update(BasculeJob).values(**values))
        await engine.dispose()

    asyncio.run(go())


def _job(config: Path) -> dict:
    return json.loads(balf(config, "bascule", "status", "-d", "33", "--json").output)[0]


def _run_process(config: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`balf bascule run` in a fresh interpreter that lists every module it imports."""
    return subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "balf.cli.main", "-c", str(config), "bascule", "run", "-d", "33"]
        + list(args),
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
        check=False,
    )


def _imported(stderr: str) -> set[str]:
    return {line.rsplit("|", 1)[-1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


def test_unchanged_rerun_needs_neither_sqlalchemy_nor_a_write(tmp_path: Path, dovecot, db_url: str) -> None:
    _source, target, config, env, _uri = _migrated(tmp_path, dovecot, db_url, "quick")
    before = _job(config)

    done = _run_process(config, env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "sip: migrée - 0 copiés, 0 déjà présents, 0 signalés" in done.stdout
    assert "sip: doublons reconnus par" in done.stdout  # the same lines as the full path prints
    imported = _imported(done.stderr)
    assert "balf.bridge.quickrun" in imported
    assert not {m for m in imported if m.split(".")[0] in ("sqlalchemy", "imapclient", "alembic", "click")}
    assert "balf.cli.shortcut" in imported  # answered by the entry point, before click
    assert _job(config) == before  # nothing written: the full path would have set finished_at

    # A locale that cannot spell "migrée" gets UTF-8, as click.echo gives it, not a traceback.
    ascii_out = _run_process(config, {**env, "PYTHONIOENCODING": "ascii"})
    assert ascii_out.returncode == 0, ascii_out.stderr[-2000:]
    assert "sip: migrée - 0 copiés" in ascii_out.stdout
    assert sum(len(v) for v in fetch_all(target).values()) == 4


def test_every_change_takes_the_full_path_then_quick_again(tmp_path: Path, dovecot, db_url: str) -> None:
    source, target, config, env, uri = _migrated(tmp_path, dovecot, db_url, "change")

    # A message reaches the source: copied by the full path, which records a new digest.
    client = imap(source)
    client.append("Réclamations/Été 2024", _message(11), msg_time=WHEN)
    client.logout()
    first = _run_process(config, env)
    assert "1 copiés" in first.stdout, first.stdout + first.stderr[-1500:]
    assert "sqlalchemy" in _imported(first.stderr)
    again = _run_process(config, env)
    assert "0 copiés" in again.stdout and "sqlalchemy" not in _imported(again.stderr)

    # The target folder is deleted: UIDVALIDITY and LIST change, the full path fills it again.
    client = imap(target)
    client.delete_folder("Réclamations/Été 2024")
    client.logout()
    refill = _run_process(config, env)
    assert "2 copiés" in refill.stdout, refill.stdout + refill.stderr[-1500:]
    assert len(fetch_all(target)["Réclamations/Été 2024"]) == 2
    assert _issue_kinds(db_url).count("uidvalidity_cible") == 1  # said once, in the report

    # The plan changes (a folder excluded): the digest covers the plan, the full path decides.
    plan = write_plan(tmp_path, [("sip", uri, target.username, "password_env=SRC_PW exclude=Réclamations*")])
    balf(config, "bascule", "plan", "-d", "33", str(plan))
    replanned = _run_process(config, env)
    assert replanned.returncode == 0 and "sqlalchemy" in _imported(replanned.stderr)
    assert "0 copiés" in _run_process(config, env).stdout

    # No password: the quick path cannot log in to the source, the full path says why.
    missing = _run_process(config, {}, "--again")
    assert "SRC_PW" in missing.stdout + missing.stderr


def test_a_rerun_of_a_verified_mailbox_leaves_it_verified(tmp_path: Path, dovecot, db_url: str) -> None:
    source, _target, config, env, _uri = _migrated(tmp_path, dovecot, db_url, "verified")
    assert balf(config, "bascule", "verify", "-d", "33", "-o", str(tmp_path / "r"), env=env).exit_code == 0
    assert _job(config)["state"] == "vérifiée"

    quick = _run_process(config, env, "--again")
    assert "sip: vérifiée - 0 copiés" in quick.stdout and "sqlalchemy" not in _imported(quick.stderr)
    # The full path over an unchanged mailbox (no digest to compare: forget it) keeps it verified too.
    _set_jobs(db_url, rerun_digest=None)
    full = balf(config, "bascule", "run", "-d", "33", "--again", env=env)
    assert "sip: vérifiée - 0 copiés" in full.output, full.output
    assert _job(config)["state"] == "vérifiée"

    client = imap(source)
    client.append("INBOX", _message(5), msg_time=WHEN)
    client.logout()
    changed = balf(config, "bascule", "run", "-d", "33", "--again", env=env)
    assert "sip: migrée - 1 copiés" in changed.output, changed.output
    assert _job(config)["state"] == "migrée"  # to verify again


def test_a_mailbox_held_by_another_run_is_left_to_the_full_path(tmp_path: Path, dovecot, db_url: str) -> None:
    _source, _target, config, env, _uri = _migrated(tmp_path, dovecot, db_url, "held")
    _set_jobs(db_url, claimed_by="autre-poste:1", claimed_until=dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5))
    held = _run_process(config, env)
    assert held.returncode == 75, held.stdout + held.stderr[-1500:]
    assert "sip: déjà tenue par un autre poste (autre-poste:1)" in held.stdout + held.stderr


def test_a_target_folder_deleted_while_the_run_ends_gets_no_digest(
    tmp_path: Path, dovecot, db_url: str, monkeypatch
) -> None:
    """Found by review: the digest once trusted the recorded rows, so a folder deleted in the
    target after the run had filled it was recorded as "nothing to do" for good."""
    from balf.bridge import migrate

    source, target, config, env, _uri = _migrated(tmp_path, dovecot, db_url, "race")
    client = imap(source)
    client.append("INBOX", _message(20), msg_time=WHEN)  # the next run is a full one
    client.logout()
    original = migrate.MailboxRun.rerun_digest

    async def deleted_meanwhile(self, before, plans):  # the agent, in Thunderbird, meanwhile
        client = imap(target)
        client.delete_folder("Réclamations/Été 2024")
        client.logout()
        return await original(self, before, plans)

    monkeypatch.setattr(migrate.MailboxRun, "rerun_digest", deleted_meanwhile)
    assert "1 copiés" in balf(config, "bascule", "run", "-d", "33", env=env).output
    monkeypatch.setattr(migrate.MailboxRun, "rerun_digest", original)

    again = _run_process(config, env)
    assert "sqlalchemy" in _imported(again.stderr)  # no digest: the full path, which refills it
    assert "1 copiés" in again.stdout, again.stdout + again.stderr[-1500:]
    assert len(fetch_all(target)["Réclamations/Été 2024"]) == 1


def _claims(db_url: str) -> list[tuple[str | None, dt.datetime | None]]:
    from sqlalchemy import select

    from balf.db.engine import create_engine
    from balf.db.models import BasculeJob

    async def go() -> list[tuple[str | None, dt.datetime | None]]:
        engine = create_engine(db_url)
        async with engine.connect() as conn:
            rows = (await conn.execute(select(BasculeJob.claimed_by, BasculeJob.claimed_until))).all()
        await engine.dispose()
        return [(r[0], r[1]) for r in rows]

    return asyncio.run(go())


def test_verify_and_run_never_work_on_one_mailbox_at_once(tmp_path: Path, dovecot, db_url: str, monkeypatch) -> None:
    """A message appended by a run between verify's two listings would look missing, be
    forgotten, and be copied twice: verify holds the mailbox's lease as a run does."""
    from balf.bridge import verify

    _source, target, config, env, _uri = _migrated(tmp_path, dovecot, db_url, "lease")

    # Another machine's run holds the mailbox: verify says so, changes nothing, exits 1.
    until = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5)
    _set_jobs(db_url, claimed_by="autre-poste:1", claimed_until=until)
    held = balf(config, "bascule", "verify", "-d", "33", "-o", str(tmp_path / "r"), env=env)
    assert held.exit_code == 1
    assert "sip: NON VÉRIFIÉE - sip: déjà tenue par un autre poste (autre-poste:1)" in held.output
    assert _job(config)["state"] == "migrée"
    assert _claims(db_url)[0][0] == "autre-poste:1"

    # While verify works, a run started from another process is turned away (75), and the
    # lease is released when verify ends: the next run proceeds.
    _set_jobs(db_url, claimed_by=None, claimed_until=None)
    during: list[subprocess.CompletedProcess[str]] = []
    read_source = verify._source_keys

    def source_keys_then_a_run(*args, **kwargs):
        if not during:
            during.append(_run_process(config, env))
        return read_source(*args, **kwargs)

    monkeypatch.setattr(verify, "_source_keys", source_keys_then_a_run)
    verified = balf(config, "bascule", "verify", "-d", "33", "-o", str(tmp_path / "r"), env=env)
    assert verified.exit_code == 0, verified.output
    assert during[0].returncode == 75, during[0].stdout + during[0].stderr[-1500:]
    assert "sip: déjà tenue par une vérification sur " in during[0].stdout + during[0].stderr  # says who
    assert _claims(db_url)[0][1] is None  # released
    after = _run_process(config, env, "--again")
    assert after.returncode == 0 and "sip: vérifiée - 0 copiés" in after.stdout, after.stdout + after.stderr[-1500:]
    assert sum(len(v) for v in fetch_all(target).values()) == 4


def _issue_kinds(db_url: str) -> list[str]:
    from sqlalchemy import select

    from balf.db.engine import create_engine
    from balf.db.models import BasculeIssue

    async def go() -> list[str]:
        engine = create_engine(db_url)
        async with engine.connect() as conn:
            kinds = list((await conn.execute(select(BasculeIssue.kind))).scalars())
        await engine.dispose()
        return kinds

    return asyncio.run(go())


def test_a_run_that_loses_its_lease_stops_and_nothing_is_copied_twice(
    tmp_path: Path, dovecot, db_url: str, monkeypatch
) -> None:
    """Found by review: a run renewed its lease unconditionally at each batch, so after a lapse
    it took the mailbox back from whoever held it. Now its next record fails, nothing more is
    written, and the messages already appended are learnt from the target by the next run."""
    from sqlalchemy import update

    from balf.bridge import migrate
    from balf.db.engine import create_engine
    from balf.db.models import BasculeJob

    source, target = new_user(dovecot, "lost-src"), new_user(dovecot, "lost-dst")
    client = imap(source)
    for n in range(6):
        client.append("INBOX", _message(100 + n), msg_time=WHEN)
    client.logout()
    config = write_config(tmp_path, db_url, dovecot)
    uri = f"imap://{source.username}@{source.host}:{source.port}"
    balf(
        config,
        "bascule",
        "plan",
        "-d",
        "33",
        str(write_plan(tmp_path, [("sip", uri, target.username, "password_env=SRC_PW")])),
    )
    env = {"SRC_PW": source.password}

    original = migrate.MailboxRun._copy_batch

    async def taken_during_the_batch(self, *args, **kwargs):
        async def steal() -> None:  # another machine's run, after our lease lapsed
            engine = create_engine(db_url)
            async with engine.begin() as conn:
                until = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5)
                await conn.execute(update(BasculeJob).values(claimed_by="autre-poste:1", claimed_until=until))
            await engine.dispose()

        await steal()
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(migrate.MailboxRun, "_copy_batch", taken_during_the_batch)
    lost = balf(config, "bascule", "run", "-d", "33", env=env)
    assert lost.exit_code == 75, lost.output
    assert "reprise par un autre poste" in lost.output
    job = _job(config)
    assert job["state"] == "en cours" and job["messages_copied"] == 0  # nothing written after the loss
    assert _claims(db_url)[0][0] == "autre-poste:1"  # the holder keeps it
    appended = sum(len(v) for v in fetch_all(target).values())
    assert appended == 6  # the batch reached the target before its record was refused

    monkeypatch.setattr(migrate.MailboxRun, "_copy_batch", original)
    _set_jobs(db_url, claimed_by=None, claimed_until=None)  # the other machine is done
    again = balf(config, "bascule", "run", "-d", "33", env=env)
    assert again.exit_code == 0, again.output
    assert "sip: migrée - 0 copiés, 6 déjà présents" in again.output, again.output  # learnt from the target
    assert sum(len(v) for v in fetch_all(target).values()) == 6  # each message once


def test_a_held_lease_is_renewed_in_the_background_and_stops_when_taken(tmp_path: Path, dovecot, db_url: str) -> None:
    """A long folder (a big FETCH, a slow target) must not let a run's or verify's lease lapse."""
    from balf.bridge import store
    from balf.bridge.errors import LeaseLost
    from balf.bridge.lease import held
    from balf.db.engine import create_engine, session_factory

    _migrated(tmp_path, dovecot, db_url, "beat")
    lease = dt.timedelta(seconds=3)

    async def go() -> tuple[dt.datetime, dt.datetime, bool]:
        engine = create_engine(db_url)
        sessions = session_factory(engine)
        try:
            job = (await store.list_jobs(sessions, "33"))[0]
            assert await store.claim_job(sessions, job.id, "moi:1", lease)
            first = (await store.load_job(sessions, job.id)).claimed_until
            async with held(sessions, job.id, "moi:1", lease):
                await asyncio.sleep(4)  # longer than the lease; the beat comes every second
            renewed = (await store.load_job(sessions, job.id)).claimed_until
            taken = await store.claim_job(sessions, job.id, "autre:2", lease)  # not lapsed: refused

            # Released inside the body: a late beat must not take the lease again.
            async with held(sessions, job.id, "moi:1", lease):
                await store.finish_job(sessions, job.id, "moi:1", state=BasculeState.MIGREE)
                await asyncio.sleep(1.5)
            assert (await store.load_job(sessions, job.id)).claimed_until is None

            # Another process holds it: the last word of the old holder is refused, nothing written.
            assert await store.claim_job(sessions, job.id, "autre:2", lease)
            with pytest.raises(LeaseLost):
                await store.finish_job(sessions, job.id, "moi:1", state=BasculeState.EN_ERREUR)
            assert (await store.load_job(sessions, job.id)).state is BasculeState.MIGREE
            return first, renewed, taken
        finally:
            await engine.dispose()

    first, renewed, taken = asyncio.run(go())
    assert renewed > first
    assert not taken


def test_a_run_that_learns_its_lease_is_lost_appends_nothing_more(
    tmp_path: Path, dovecot, db_url: str, monkeypatch
) -> None:
    """Found by review: a lost lease was only noticed at the batch's record, after its APPEND,
    which could race the new holder's own copies. The background renewal now stops appends."""
    from sqlalchemy import update

    from balf.bridge import migrate
    from balf.db.engine import create_engine
    from balf.db.models import BasculeJob

    source, target = new_user(dovecot, "gone-src"), new_user(dovecot, "gone-dst")
    client = imap(source)
    for n in range(3):
        client.append("INBOX", _message(200 + n), msg_time=WHEN)
    client.logout()
    config = write_config(tmp_path, db_url, dovecot, lease_seconds=3)  # a renewal every second
    uri = f"imap://{source.username}@{source.host}:{source.port}"
    plan = write_plan(tmp_path, [("sip", uri, target.username, "password_env=SRC_PW")])
    balf(config, "bascule", "plan", "-d", "33", str(plan))
    original = migrate.MailboxRun._copy_batch

    async def taken_then_noticed(self, *args, **kwargs):
        engine = create_engine(db_url)
        async with engine.begin() as conn:
            until = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5)
            await conn.execute(update(BasculeJob).values(claimed_by="autre-poste:1", claimed_until=until))
        await engine.dispose()
        await asyncio.sleep(1.6)  # the next beat finds the lease taken
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(migrate.MailboxRun, "_copy_batch", taken_then_noticed)
    lost = balf(config, "bascule", "run", "-d", "33", env={"SRC_PW": source.password})
    assert lost.exit_code == 75, lost.output
    assert "arrêt avant d'ajouter" in lost.output
    assert sum(len(v) for v in fetch_all(target).values()) == 0
