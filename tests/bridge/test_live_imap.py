"""IMAP to IMAP on the private Dovecot: round trip, reruns, verification, quota, dry run, kill -9 (live)."""

from __future__ import annotations

import datetime as dt
import os
import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from balf.bridge.keys import message_id
from tests.bridge.helpers import (
    balf,
    balf_process,
    fetch_all,
    imap,
    new_user,
    special_use,
    subscribed,
    write_config,
    write_plan,
)

pytestmark = pytest.mark.live
PARIS = dt.timezone(dt.timedelta(hours=1))


def _message(n: int, folder: str, *, mid: bool = True, extra: bytes = b"") -> bytes:
    headers = [
        f"From: Usager {n} <usager{n}@example.org>",
        "To: sip.bordeaux@dgfip.finances.gouv.fr",
        f"Subject: =?utf-8?q?R=C3=A9clamation_{n}?= ({folder})",
        f"Date: Mon, 04 Mar 2024 10:{n % 60:02d}:00 +0100",
    ]
    if mid:
        headers.append(f"Message-ID: <msg-{n}-{folder.encode('ascii', 'ignore').decode()}@example.org>")
    return ("\r\n".join(headers)).encode() + extra + f"\r\n\r\nCorps du message {n}.\r\n".encode()


def populate(account, layout: dict[str, list[tuple[bytes, tuple[str, ...], dt.datetime]]]) -> None:
    client = imap(account)
    for folder, messages in layout.items():
        if folder != "INBOX" and not client.folder_exists(folder):
            client.create_folder(folder)
        for raw, flags, when in messages:
            client.append(folder, raw, flags=flags, msg_time=when)
    client.logout()


def _source_layout() -> dict[str, list[tuple[bytes, tuple[str, ...], dt.datetime]]]:
    when = dt.datetime(2023, 6, 1, 9, 30, tzinfo=PARIS)
    return {
        "INBOX": [
            (_message(1, "inbox"), ("\\Seen",), when),
            (_message(2, "inbox", mid=False), ("\\Flagged", "$Forwarded"), when + dt.timedelta(days=1)),
            (
                _message(3, "inbox", extra=b"\r\nX-Note: ent\xeate latin-1 brut"),
                ("\\Answered", "\\Seen"),
                when + dt.timedelta(days=2),
            ),
        ],
        "Réclamations/Été 2024": [(_message(4, "ete"), ("\\Seen", "$label1"), when + dt.timedelta(days=3))],
        "Sent": [(_message(5, "sent"), ("\\Seen",), when + dt.timedelta(days=4))],
    }


def _plan(tmp_path: Path, source, target, options: str = "password_env=SRC_PW") -> Path:
    return write_plan(
        tmp_path, [("sip-bordeaux", f"imap://{source.username}@{source.host}:{source.port}", target.username, options)]
    )


def test_imap_round_trip_rerun_and_verify(tmp_path: Path, dovecot, db_url: str) -> None:
    source, target = new_user(dovecot, "imap-src"), new_user(dovecot, "imap-dst")
    populate(source, _source_layout())
    config = write_config(tmp_path, db_url, dovecot)
    env = {"SRC_PW": source.password}
    assert balf(config, "bascule", "plan", "-d", "33", str(_plan(tmp_path, source, target))).exit_code == 0

    dry = balf(config, "bascule", "run", "-d", "33", "--dry-run", env=env)
    assert dry.exit_code == 0 and "simulation - 5 à copier" in dry.output, dry.output
    assert "Réclamations/Été 2024 -> Réclamations/Été 2024 (à créer)" in dry.output
    assert set(fetch_all(target)) == {"INBOX", "Envoyés", "Brouillons", "Corbeille", "Indésirables", "Archives"}
    assert "planifiée" in balf(config, "bascule", "status", "-d", "33").output

    result = balf(config, "bascule", "run", "-d", "33", env=env)
    assert result.exit_code == 0, result.output
    src, dst = fetch_all(source), fetch_all(target)
    sent = special_use(target)["\\Sent"]
    for s_folder, t_folder in (("INBOX", "INBOX"), ("Réclamations/Été 2024", "Réclamations/Été 2024"), ("Sent", sent)):
        want = sorted((m.raw, m.flags - {"\\Recent"}, m.internaldate) for m in src[s_folder])
        got = sorted((m.raw, m.flags - {"\\Recent"}, m.internaldate) for m in dst[t_folder])
        assert got == want, t_folder  # byte-exact, flags, INTERNALDATE
    assert {"Réclamations", "Réclamations/Été 2024"} <= subscribed(target)

    client = imap(target)
    raw_names = {n for _f, _d, n in client.list_folders()}
    client.folder_encode = False
    encoded = {n for _f, _d, n in client.list_folders()}
    client.logout()
    assert "Réclamations/Été 2024" in raw_names and b"R&AOk-clamations/&AMk-t&AOk- 2024" in encoded

    rerun = balf(config, "bascule", "run", "-d", "33", "--again", env=env)
    assert "- 0 copiés" in rerun.output
    assert sum(len(v) for v in fetch_all(target).values()) == 5

    verified = balf(config, "bascule", "verify", "-d", "33", "-o", str(tmp_path / "rapport"), env=env)
    assert verified.exit_code == 0, verified.output
    assert "sip-bordeaux: vérifiée" in verified.output
    status = balf(config, "bascule", "status", "-d", "33").output
    assert "vérifiée" in status and "1 vérifiée" in status

    # Someone deletes a message in the target: verify must see it.
    client = imap(target)
    client.select_folder("Réclamations/Été 2024")
    client.delete_messages(client.search(["ALL"]))
    client.expunge()
    client.logout()
    caught = balf(config, "bascule", "verify", "-d", "33", "-o", str(tmp_path / "rapport"), env=env)
    assert caught.exit_code == 1 and "ÉCARTS" in caught.output and "manquant: m:msg-4-ete@example.org" in caught.output
    csv = (tmp_path / "rapport" / "bascule-33.csv").read_bytes()
    assert csv.startswith("\ufeff".encode()) and "département;boîte;état".encode() in csv
    assert b"Envoy\xc3\xa9s" in csv
    anomalies = (tmp_path / "rapport" / "bascule-33-anomalies.csv").read_text("utf-8-sig")
    assert "manquant_cible" in anomalies and "msg-4-ete" in anomalies
    assert "migrée" in balf(config, "bascule", "status", "-d", "33").output
    # and the next run puts it back
    balf(config, "bascule", "run", "-d", "33", env=env)
    assert balf(config, "bascule", "verify", "-d", "33", "-o", str(tmp_path / "rapport"), env=env).exit_code == 0


def test_domino_rewritten_message_ids_are_not_copied_twice(tmp_path: Path, dovecot, db_url: str) -> None:
    """Domino's IMAP rewrites the domain of Message-IDs between sessions; with domino=yes only the
    local part is compared, so a stateless rerun against a target holding the original IDs copies nothing."""
    source, target = new_user(dovecot, "domino-src"), new_user(dovecot, "domino-dst")
    populate(source, {"INBOX": [(_message(7, "x"), (), dt.datetime(2020, 1, 1, tzinfo=dt.UTC))]})
    rewritten = _message(7, "x").replace(b"@example.org>", b"@domino.dgfip.local>")
    populate(target, {"INBOX": [(rewritten, (), dt.datetime(2020, 1, 1, tzinfo=dt.UTC))]})
    config = write_config(tmp_path, db_url, dovecot)
    balf(config, "bascule", "plan", "-d", "33", str(_plan(tmp_path, source, target, "password_env=SRC_PW domino=yes")))
    result = balf(config, "bascule", "run", "-d", "33", env={"SRC_PW": source.password})
    assert "0 copiés, 1 déjà présents" in result.output, result.output


def test_quota_stops_before_copying(tmp_path: Path, dovecot, db_url: str) -> None:
    source, target = new_user(dovecot, "quota-src"), new_user(dovecot, "quota-dst", quota_bytes=4000)
    populate(
        source,
        {
            "INBOX": [
                (_message(i, "q", extra=b"\r\nX-Pad: " + b"x" * 900), (), dt.datetime(2020, 1, 1, tzinfo=dt.UTC))
                for i in range(10)
            ]
        },
    )
    config = write_config(tmp_path, db_url, dovecot)
    balf(config, "bascule", "plan", "-d", "33", str(_plan(tmp_path, source, target)))
    result = balf(config, "bascule", "run", "-d", "33", env={"SRC_PW": source.password})
    assert result.exit_code == 113
    assert "quota" in result.output and "Traceback" not in result.output
    assert fetch_all(target)["INBOX"] == []
    assert "en erreur" in balf(config, "bascule", "status", "-d", "33").output


def test_oversized_messages_are_reported(tmp_path: Path, dovecot, db_url: str) -> None:
    source, target = new_user(dovecot, "big-src"), new_user(dovecot, "big-dst")
    populate(
        source,
        {
            "INBOX": [
                (_message(1, "small"), (), dt.datetime(2020, 1, 1, tzinfo=dt.UTC)),
                (_message(2, "big", extra=b"\r\nX-Pad: " + b"y" * 5000), (), dt.datetime(2020, 1, 1, tzinfo=dt.UTC)),
            ]
        },
    )
    config = write_config(tmp_path, db_url, dovecot, max_message_size=2000)
    balf(config, "bascule", "plan", "-d", "33", str(_plan(tmp_path, source, target)))
    result = balf(config, "bascule", "run", "-d", "33", env={"SRC_PW": source.password})
    assert "1 copiés, 0 déjà présents, 1 signalés" in result.output, result.output
    verified = balf(config, "bascule", "verify", "-d", "33", "-o", str(tmp_path / "r"), env={"SRC_PW": source.password})
    assert verified.exit_code == 0 and "expliqués 1" in verified.output  # a reported difference is explained
    assert "trop volumineux" in balf(config, "bascule", "report", "-d", "33").output


@pytest.mark.slow
def test_killed_run_resumes_without_duplicates(tmp_path: Path, dovecot, db_url: str) -> None:
    source, target = new_user(dovecot, "kill-src"), new_user(dovecot, "kill-dst")
    total = 1500
    client = imap(source)
    pad = b"\r\nX-Pad: " + b"z" * 3000
    for start in range(0, total, 250):
        client.multiappend(
            "INBOX",
            [{"msg": _message(n, "k", extra=pad), "flags": ("\\Seen",)} for n in range(start, min(total, start + 250))],
        )
    client.logout()
    config = write_config(tmp_path, db_url, dovecot, batch_messages=20, connections_per_mailbox=2)
    balf(config, "bascule", "plan", "-d", "33", str(_plan(tmp_path, source, target)))
    env = {"SRC_PW": source.password}
    process = balf_process(config, "bascule", "run", "-d", "33", env=env)
    watcher = imap(target)
    deadline = time.monotonic() + 60
    copied = 0
    while time.monotonic() < deadline and process.poll() is None:
        copied = watcher.folder_status("INBOX", [b"MESSAGES"])[b"MESSAGES"]
        if copied >= 200:
            break
        time.sleep(0.02)
    assert process.poll() is None, process.communicate()
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    watcher.logout()
    assert 0 < copied < total

    status = balf(config, "bascule", "status", "-d", "33").output
    assert "en cours" in status
    resumed = balf(config, "bascule", "run", "-d", "33", env=env)
    assert resumed.exit_code == 0, resumed.output
    inbox = fetch_all(target)["INBOX"]
    counts = Counter(message_id(m.raw) for m in inbox)
    assert len(inbox) == total and max(counts.values()) == 1
    assert balf(config, "bascule", "verify", "-d", "33", "-o", str(tmp_path / "r"), env=env).exit_code == 0
