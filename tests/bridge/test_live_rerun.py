"""Reruns over a migrated mailbox skip unchanged folders by STATUS, and only those (live)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from tests.bridge.helpers import balf, fetch_all, imap, new_user, write_config, write_plan

pytestmark = pytest.mark.live
WHEN = dt.datetime(2024, 3, 4, 10, 0, tzinfo=dt.UTC)


def _message(n: int) -> bytes:
    return (
        f"From: usager{n}@example.org\r\nTo: sip@dgfip.finances.gouv.fr\r\nSubject: relance {n}\r\n"
        f"Message-ID: <rerun-{n}@example.org>\r\n\r\nCorps {n}.\r\n"
    ).encode()


def test_rerun_copies_what_changed_and_skips_the_rest(tmp_path: Path, dovecot, db_url: str) -> None:
    source, target = new_user(dovecot, "rerun-src"), new_user(dovecot, "rerun-dst")
    client = imap(source)
    client.create_folder("Dossiers")
    for n in range(3):
        client.append("INBOX", _message(n), flags=("\\Seen",), msg_time=WHEN)
    client.append("Dossiers", _message(10), msg_time=WHEN)
    client.logout()
    config = write_config(tmp_path, db_url, dovecot)
    plan = write_plan(
        tmp_path,
        [("sip", f"imap://{source.username}@{source.host}:{source.port}", target.username, "password_env=SRC_PW")],
    )
    env = {"SRC_PW": source.password}
    balf(config, "bascule", "plan", "-d", "33", str(plan))
    assert "4 copiés" in balf(config, "bascule", "run", "-d", "33", env=env).output

    # Nothing new: every folder is skipped from two STATUS replies, nothing copied.
    assert "- 0 copiés, 0 déjà présents" in balf(config, "bascule", "run", "-d", "33", env=env).output

    # A message arrives in the source INBOX: that folder is read again from its checkpoint.
    client = imap(source)
    client.append("INBOX", _message(3), msg_time=WHEN)
    client.logout()
    assert "- 1 copiés" in balf(config, "bascule", "run", "-d", "33", env=env).output

    # The target folder is deleted (and so will be recreated, new UIDVALIDITY): it is filled again.
    client = imap(target)
    client.delete_folder("Dossiers")
    client.logout()
    again = balf(config, "bascule", "run", "-d", "33", env=env)
    assert "- 1 copiés" in again.output, again.output
    got = fetch_all(target)
    assert len(got["INBOX"]) == 4 and len(got["Dossiers"]) == 1
