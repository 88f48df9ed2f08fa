"""Round trips from every source type into the private Dovecot, checked by fetching from the target (live)."""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import os
import shutil
from pathlib import Path

import pytest

from balf.bridge.files import EmlTreeSource, MaildirSource, MboxSource
from balf.bridge.keys import to_crlf
from tests.bridge.helpers import DATA, balf, fetch_all, new_user, special_use, subscribed, write_config, write_plan

pytestmark = pytest.mark.live


def _bodies(folder_msgs):
    return {m.raw for m in folder_msgs}


def test_mbox_tree_round_trip(tmp_path: Path, dovecot, db_url: str) -> None:
    target = new_user(dovecot, "mbox-rt")
    config = write_config(tmp_path, db_url, dovecot)
    plan = write_plan(tmp_path, [("sip-mbox", f"mbox:{DATA / 'thunderbird'}", target.username, "")])
    assert balf(config, "bascule", "plan", "-d", "33", str(plan)).exit_code == 0
    result = balf(config, "bascule", "run", "-d", "33")
    assert result.exit_code == 0, result.output
    assert "sip-mbox: migrée - 4 copiés" in result.output
    seen = fetch_all(target)
    assert len(seen["INBOX"]) == 2
    assert [m.raw for m in seen["Réclamations/Urgent"]] == [
        to_crlf((DATA / "thunderbird/Réclamations.sbd/Urgent").read_bytes().split(b"\n", 1)[1].rstrip(b"\n") + b"\n")
    ]
    inbox = {email.message_from_bytes(m.raw)["Message-ID"]: m for m in seen["INBOX"]}
    first = inbox["<delai-2024-001@example.org>"]
    assert "\\Seen" in first.flags
    assert b"\r\nFrom my point of view" in first.raw  # mboxrd ">From " unescaped, nothing else changed
    assert first.internaldate == dt.datetime(2024, 3, 4, 9, 12, tzinfo=dt.UTC)
    reclam = email.message_from_bytes(seen["Réclamations"][0].raw, policy=email.policy.default)
    assert {"\\Seen", "\\Answered"} <= seen["Réclamations"][0].flags
    assert [p.get_filename() for p in reclam.iter_attachments()] == ["avis-ir.pdf"]
    assert {"Réclamations", "Réclamations/Urgent", "INBOX"} <= subscribed(target)
    again = balf(config, "bascule", "run", "-d", "33", "--again")
    assert again.exit_code == 0 and "- 0 copiés" in again.output
    # A run that lost its database (a new one) learns what the target holds and copies nothing:
    # Message-IDs, and a content hash for the message without one.
    (tmp_path / "other").mkdir()
    other = write_config(tmp_path / "other", f"sqlite+aiosqlite:///{tmp_path}/other/balf.sqlite3", dovecot)
    balf(other, "bascule", "plan", "-d", "33", str(plan))
    stateless = balf(other, "bascule", "run", "-d", "33")
    assert "0 copiés, 4 déjà présents" in stateless.output, stateless.output
    assert sum(len(v) for v in fetch_all(target).values()) == 4


def test_maildir_and_eml_round_trip(tmp_path: Path, dovecot, db_url: str) -> None:
    t1 = new_user(dovecot, "maildir-rt")
    t2 = new_user(dovecot, "eml-rt")
    config = write_config(tmp_path, db_url, dovecot)
    # A Maildir's INTERNALDATE is its files' mtime (as Dovecot keeps it); git keeps neither
    # mtimes nor the empty new/ and tmp/ folders, so the fixture is copied and dated here.
    maildir_copy = tmp_path / "maildir"
    shutil.copytree(DATA / "maildir", maildir_copy)
    delivered = dt.datetime(2024, 1, 10, 8, 0, 5, tzinfo=dt.UTC)
    for box in [maildir_copy, *(p for p in maildir_copy.iterdir() if p.name.startswith("."))]:
        for sub in ("cur", "new", "tmp"):
            (box / sub).mkdir(exist_ok=True)
            for message in (box / sub).iterdir():
                os.utime(message, (delivered.timestamp(), delivered.timestamp()))
    plan = write_plan(
        tmp_path,
        [
            ("sip-maildir", f"maildir:{maildir_copy}", t1.username, ""),
            ("sip-eml", f"eml:{DATA / 'eml'}", t2.username, ""),
        ],
    )
    balf(config, "bascule", "plan", "-d", "2A", str(plan))
    result = balf(config, "bascule", "run", "-d", "2a")
    assert result.exit_code == 0, result.output

    maildir = fetch_all(t1)
    source = MaildirSource(maildir_copy)
    for folder in source.folders():
        expected = [m.raw for m in source.messages(folder)]
        name = "INBOX" if folder.path == ("INBOX",) else "/".join(folder.path)
        assert sorted(m.raw for m in maildir[name]) == sorted(expected)
    reclam = maildir["Réclamations"][0]
    assert reclam.flags >= {"\\Flagged", "\\Seen", "$Forwarded"}
    assert reclam.internaldate == delivered

    eml = fetch_all(t2)
    assert [m.raw for m in eml["Réclamations/2024"]] == [
        to_crlf((DATA / "eml/Réclamations/2024/002-8bit.eml").read_bytes())
    ]
    assert b"Ent\xeate 8 bits" in eml["Réclamations/2024"][0].raw  # undecodable header bytes kept as they are
    assert len(eml["Archives"]) == 1  # the garbage file is reported, not copied
    assert "Archives" == special_use(t2)["\\Archive"]
    report = balf(config, "bascule", "report", "-d", "2A", "-m", "sip-eml")
    assert "message illisible" in report.output and "004-garbage.eml" in report.output
    assert "date invalide" in report.output


def test_dxl_round_trip(tmp_path: Path, dovecot, db_url: str) -> None:
    target = new_user(dovecot, "dxl-rt")
    config = write_config(tmp_path, db_url, dovecot)
    plan = write_plan(
        tmp_path, [("sip-dxl", f"dxl:{DATA / 'sip33.dxl'}", target.username, f"names_file={DATA / 'names.csv'}")]
    )
    balf(config, "bascule", "plan", "-d", "33", str(plan))
    result = balf(config, "bascule", "run", "-d", "33")
    assert result.exit_code == 0, result.output
    seen = fetch_all(target)
    uses = special_use(target)
    assert len(seen["INBOX"]) == 1
    assert len(seen["Réclamations"]) == 2  # filed in two folders: copied into both
    assert len(seen[uses["\\Sent"]]) == 2 and len(seen[uses["\\Drafts"]]) == 1 and len(seen[uses["\\Junk"]]) == 1
    contentieux = seen["Dossiers/Contentieux été"][0]
    assert "\\Flagged" in contentieux.flags
    inbox = email.message_from_bytes(seen["INBOX"][0].raw, policy=email.policy.default)
    assert inbox["Message-ID"] == "<OF1234ABCD.5678EF90-ONC1257F0A.003A1B2C@example.org>"
    assert str(inbox["From"]) == "Jean Dupont <jean.dupont@example.org>"
    assert "sip.bordeaux@dgfip.finances.gouv.fr" in str(inbox["To"])
    assert "\\Answered" in seen["INBOX"][0].flags
    assert seen["INBOX"][0].internaldate == dt.datetime(
        2015, 12, 3, 10, 15, 2, tzinfo=dt.timezone(dt.timedelta(hours=1))
    )
    attachments = list(inbox.iter_attachments())
    assert attachments[0].get_filename() == "avis.pdf" and attachments[0].get_content().startswith(b"%PDF-1.4")
    body = inbox.get_body(("plain",)).get_content()
    assert "reçu le 12 novembre" in body
    assert "12 novembre" in inbox.get_body(("html",)).get_content()
    reply = next(
        email.message_from_bytes(m.raw, policy=email.policy.default) for m in seen[uses["\\Sent"]] if b"RE:" in m.raw
    )
    assert reply["In-Reply-To"] == "<OF1234ABCD.5678EF90-ONC1257F0A.003A1B2C@example.org>"
    native = next(m for m in seen["Réclamations"] if b"native-mime-001" in m.raw)
    assert b"d\xc3\xa9claration rectificative" in native.raw
    report = balf(config, "bascule", "report", "-d", "33").output
    assert "Appointment" in report and "Paul Inconnu" in report and "20161345T999999" in report
    assert balf(config, "bascule", "run", "-d", "33", "--again").output.count("0 copiés") == 1


def test_bad_inputs_are_reported_never_partial(tmp_path: Path, dovecot, db_url: str) -> None:
    t1, t2 = new_user(dovecot, "corrupt-mbox"), new_user(dovecot, "truncated-dxl")
    config = write_config(tmp_path, db_url, dovecot)
    plan = write_plan(
        tmp_path,
        [
            ("mbox-abime", f"mbox:{DATA / 'corrupt.mbox'}", t1.username, ""),
            ("dxl-tronque", f"dxl:{DATA / 'truncated.dxl'}", t2.username, ""),
        ],
    )
    balf(config, "bascule", "plan", "-d", "971", str(plan))
    result = balf(config, "bascule", "run", "-d", "971")
    assert result.exit_code == 0, result.output
    mbox = fetch_all(t1)["corrupt"]
    ids = sorted(email.message_from_bytes(m.raw)["Message-ID"] for m in mbox)
    assert ids == ["<no-from-line@example.org>", "<second-ok@example.org>", "<third@example.org>"]
    dxl = fetch_all(t2)
    # the two whole documents before the cut: the first is filed in two folders
    assert sorted((k, len(v)) for k, v in dxl.items() if v) == [("Envoyés", 1), ("INBOX", 1), ("Réclamations", 1)]
    for messages in dxl.values():
        for m in messages:
            parsed = email.message_from_bytes(m.raw, policy=email.policy.default)
            assert not parsed.defects and parsed["Message-ID"]
    report = balf(config, "bascule", "report", "-d", "971").output
    assert "partie de mbox illisible" in report and "sans ligne From_" in report
    assert "export DXL tronqué" in report


def test_sources_read_in_position_order_and_resume() -> None:
    source = MboxSource(DATA / "thunderbird")
    inbox = source.folders()[0]
    first, second = list(source.messages(inbox))
    assert [m.position for m in source.messages(inbox, first.position)] == [second.position]
    eml = EmlTreeSource(DATA / "eml")
    assert [f.path for f in eml.folders()] == [("INBOX",), ("Archives",), ("Réclamations", "2024")]
