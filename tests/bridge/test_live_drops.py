"""A source or target IMAP server that goes down in the middle of a bascule (live, private Dovecots).

The server under test is a ``fresh_dovecot`` of its own, killed (SIGKILL: a crash) or stopped
(SIGTERM: an administrator's restart) while `balf bascule run` copies; the other side is the
session Dovecot. Whatever happens, the target must end with every message once, byte-exact (no
duplicate, no partial message), either in the same run (the server came back within the
reconnection delays) or after a clear error naming the mailbox and folder and a second run.
"""

from __future__ import annotations

import datetime as dt
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from balf.bridge.keys import message_id
from tests.bridge.helpers import balf, balf_process, fetch_all, imap, new_user, write_config, write_plan
from tests.harness.dovecot import Account, Dovecot

pytestmark = pytest.mark.live

TOTAL = 600
PAD = b"\r\nX-Pad: " + b"d" * 12_000  # ~12 KB each: APPENDs are in flight when the server goes down


def _message(n: int) -> bytes:
    return (
        (
            f"From: Usager {n} <usager{n}@example.org>\r\nTo: sie.libourne@dgfip.finances.gouv.fr\r\n"
            f"Subject: =?utf-8?q?D=C3=A9claration?= {n}\r\nDate: Tue, 05 Mar 2024 11:{n % 60:02d}:00 +0100\r\n"
            f"Message-ID: <drop-{n}@example.org>"
        ).encode()
        + PAD
        + f"\r\n\r\nMessage {n}.\r\n".encode()
    )


def _fill(account: Account) -> dict[str, bytes]:
    client = imap(account)
    client.create_folder("Réclamations")
    sent: dict[str, bytes] = {}
    for start in range(0, TOTAL, 100):
        items = []
        for n in range(start, min(TOTAL, start + 100)):
            raw = _message(n)
            sent[f"drop-{n}@example.org"] = raw
            items.append({"msg": raw, "flags": ("\\Seen",), "date": dt.datetime(2024, 3, 5, tzinfo=dt.UTC)})
        client.multiappend("Réclamations", items)
    client.logout()
    return sent


def _wait_for(target: Account, at_least: int, process: subprocess.Popen[bytes]) -> int:
    """Poll the target folder until it holds ``at_least`` messages; the count seen."""
    watcher = imap(target)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and process.poll() is None:
            if watcher.folder_exists("Réclamations"):
                count = int(watcher.folder_status("Réclamations", [b"MESSAGES"])[b"MESSAGES"])
                if count >= at_least:
                    return count
            time.sleep(0.02)
    finally:
        try:
            watcher.logout()
        except Exception:  # noqa: BLE001 - the watched server may be the one that went down
            pass
    raise AssertionError(f"the run ended or stalled before {at_least} messages: {process.communicate()}")


def _assert_complete(target: Account, sent: dict[str, bytes]) -> None:
    """Every message once, byte-exact: no duplicate, no partial message."""
    got = fetch_all(target)["Réclamations"]
    counts = Counter(message_id(m.raw) for m in got)
    assert max(counts.values()) == 1, [k for k, v in counts.items() if v > 1][:5]
    assert len(got) == TOTAL
    assert all(m.raw == sent[message_id(m.raw) or ""] for m in got)
    assert all("\\Seen" in m.flags for m in got)


def _setup(tmp_path: Path, db_url: str, source: Account, target_server: Dovecot, target: Account) -> Path:
    config = write_config(tmp_path, db_url, target_server, batch_messages=25, connections_per_mailbox=2)
    plan = write_plan(
        tmp_path,
        [
            (
                "sie-libourne",
                f"imap://{source.username}@{source.host}:{source.port}",
                target.username,
                "password_env=SRC_PW",
            )
        ],
    )
    assert balf(config, "bascule", "plan", "-d", "33", str(plan)).exit_code == 0
    return config


def _down(server: Dovecot, how: str) -> None:
    (server.kill if how == "kill" else server.stop)()


def test_source_back_within_the_delays_the_run_reconnects_and_finishes(
    tmp_path: Path, fresh_dovecot: Dovecot, dovecot: Dovecot, db_url: str
) -> None:
    source, target = new_user(fresh_dovecot, "src"), new_user(dovecot, "dst")
    sent = _fill(source)
    config = _setup(tmp_path, db_url, source, dovecot, target)
    process = balf_process(config, "bascule", "run", "-d", "33", env={"SRC_PW": source.password})
    copied = _wait_for(target, 100, process)
    fresh_dovecot.kill()
    time.sleep(0.5)  # down long enough for an immediate reconnection to be refused
    fresh_dovecot.start()
    out, err = process.communicate(timeout=90)
    assert process.returncode == 0, (out, err)
    assert copied < TOTAL
    _assert_complete(target, sent)
    assert "migrée" in balf(config, "bascule", "status", "-d", "33").output


# The runs that give up wait out every reconnection delay (10 s): one database backend is enough.
@pytest.mark.parametrize("db_backend", ["sqlite"])
def test_source_that_stays_down_stops_with_the_folder_named_then_resumes(
    tmp_path: Path, fresh_dovecot: Dovecot, dovecot: Dovecot, db_url: str
) -> None:
    source, target = new_user(fresh_dovecot, "src"), new_user(dovecot, "dst")
    sent = _fill(source)
    config = _setup(tmp_path, db_url, source, dovecot, target)
    env = {"SRC_PW": source.password}
    process = balf_process(config, "bascule", "run", "-d", "33", env=env)
    _wait_for(target, 100, process)
    fresh_dovecot.kill()
    out, err = process.communicate(timeout=90)
    assert process.returncode == 1, (out, err)
    error = err.decode()
    assert "sie-libourne, dossier Réclamations:" in error and "connection lost" in error, error
    assert "Traceback" not in error
    status = balf(config, "bascule", "status", "-d", "33").output
    assert "en erreur" in status and "dossier Réclamations" in status
    partial = len(fetch_all(target)["Réclamations"])
    assert 0 < partial < TOTAL

    fresh_dovecot.start()
    resumed = balf(config, "bascule", "run", "-d", "33", env=env)
    assert resumed.exit_code == 0, resumed.output
    _assert_complete(target, sent)


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_target_dropping_mid_append_is_reconnected_without_duplicates(
    tmp_path: Path, fresh_dovecot: Dovecot, dovecot: Dovecot, db_url: str, how: str
) -> None:
    source, target = new_user(dovecot, "src"), new_user(fresh_dovecot, "dst")
    sent = _fill(source)
    config = _setup(tmp_path, db_url, source, fresh_dovecot, target)
    process = balf_process(config, "bascule", "run", "-d", "33", env={"SRC_PW": source.password})
    copied = _wait_for(target, 100, process)
    _down(fresh_dovecot, how)
    time.sleep(0.5)
    fresh_dovecot.start()
    out, err = process.communicate(timeout=90)
    assert process.returncode == 0, (out, err)
    assert copied < TOTAL
    _assert_complete(target, sent)


@pytest.mark.parametrize("db_backend", ["sqlite"])
def test_target_that_stays_down_stops_with_the_folder_named_then_resumes(
    tmp_path: Path, fresh_dovecot: Dovecot, dovecot: Dovecot, db_url: str
) -> None:
    source, target = new_user(dovecot, "src"), new_user(fresh_dovecot, "dst")
    sent = _fill(source)
    config = _setup(tmp_path, db_url, source, fresh_dovecot, target)
    env = {"SRC_PW": source.password}
    process = balf_process(config, "bascule", "run", "-d", "33", env=env)
    _wait_for(target, 100, process)
    fresh_dovecot.stop()
    out, err = process.communicate(timeout=90)
    assert process.returncode == 1, (out, err)
    error = err.decode()
    assert "sie-libourne, dossier Réclamations:" in error and "target IMAP" in error, error
    assert "relancer" in error and "Traceback" not in error

    fresh_dovecot.start()
    resumed = balf(config, "bascule", "run", "-d", "33", env=env)
    assert resumed.exit_code == 0, resumed.output
    _assert_complete(target, sent)
    verified = balf(config, "bascule", "verify", "-d", "33", "-o", str(tmp_path / "r"), env=env)
    assert verified.exit_code == 0, verified.output
