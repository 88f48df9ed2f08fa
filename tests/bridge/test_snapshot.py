"""The rerun digest's parsing and the quick rerun's selection rules (pure)."""

from __future__ import annotations

import datetime as dt

import pytest

from balf.bridge.quickrun import eligible, selected
from balf.bridge.snapshot import NoSnapshot, digest, list_entry, list_line, plan_fingerprint, quoted
from balf.db.jobrows import JobRow, sqlite_path

NOW = dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (b'(\\HasNoChildren) "/" INBOX', ((b"\\hasnochildren",), b'"/"', b"INBOX")),
        (b'(\\HasNoChildren \\Sent) "/" "Envoy&AOk-s"', ((b"\\hasnochildren", b"\\sent"), b'"/"', b"Envoy&AOk-s")),
        (b'(\\Noselect) "\\\\" "Lotus\\\\($Inbox)"', ((b"\\noselect",), b'"\\\\"', b"Lotus\\($Inbox)")),
        (b'() NIL "say \\"hi\\""', ((), b"NIL", b'say "hi"')),
        ((b'(\\HasNoChildren) "/" {9}', b"a\r\nb c d "), ((b"\\hasnochildren",), b'"/"', b"a\r\nb c d ")),
    ],
)
def test_list_replies_as_imaplib_gives_them(reply, expected) -> None:
    assert list_entry(reply) == expected


@pytest.mark.parametrize("reply", [b"garbage", b'(\\HasNoChildren) "/" "unterminated', (b"no literal", b"x")])
def test_an_unexpected_list_reply_gives_no_snapshot(reply) -> None:
    with pytest.raises(NoSnapshot):
        list_entry(reply)


def test_marked_and_unmarked_do_not_change_the_digest() -> None:
    # Dovecot adds \UnMarked once a run has read the folder; nothing a rerun decides on changed.
    before = list_line(*list_entry(b'(\\HasNoChildren \\Sent) "/" Sent'))
    after = list_line(*list_entry(b'(\\UnMarked \\HasNoChildren \\Sent) "/" Sent'))
    assert before == after
    assert before != list_line(*list_entry(b'(\\HasChildren \\Sent) "/" Sent'))


def test_quoting_and_names_that_need_a_literal() -> None:
    assert quoted(b'a "b" \\c') == b'"a \\"b\\" \\\\c"'
    with pytest.raises(NoSnapshot):
        quoted("Été".encode())


def test_the_digest_covers_plan_source_and_target() -> None:
    plan = plan_fingerprint("imap://u@h", "sip", {"b": 1, "a": "é"})
    assert plan == plan_fingerprint("imap://u@h", "sip", {"a": "é", "b": 1})  # key order is not a change
    base = digest(plan, b"src", b"dst")
    assert len(base) == 64
    assert base != digest(plan_fingerprint("imap://u@h", "sip", {"b": 2, "a": "é"}), b"src", b"dst")
    assert base != digest(plan, b"src2", b"dst") != digest(plan, b"src", b"dst2")
    assert digest(plan, b"ab", b"c") != digest(plan, b"a", b"bc")  # parts are length-prefixed


def _row(mailbox: str, state: str = "migrée", **changes) -> JobRow:
    values = dict(
        id=1,
        department="33",
        mailbox=mailbox,
        source="imap://u@h:143",
        target_account="t",
        options={"domino_detected": "no"},
        state=state,
        claimed_until=None,
        rerun_digest="0" * 64,
    )
    values.update(changes)
    return JobRow(**values)


def test_the_quick_path_selects_as_the_full_run_does() -> None:
    rows = [_row("a"), _row("b", "vérifiée")]
    assert [r.mailbox for r in selected(rows, (), again=False) or []] == ["a"]
    assert [r.mailbox for r in selected(rows, (), again=True) or []] == ["a", "b"]
    assert [r.mailbox for r in selected(rows, ("b",), again=False) or []] == ["b"]
    assert selected(rows, ("c",), again=True) is None  # the full run names the unknown mailbox
    assert selected([_row("b", "vérifiée")], (), again=False) is None  # "nothing to run"


def test_only_settled_unheld_imap_jobs_with_a_digest_are_eligible() -> None:
    assert eligible(_row("a"), NOW)
    assert eligible(_row("a", claimed_until=NOW - dt.timedelta(seconds=1)), NOW)  # an expired lease
    assert not eligible(_row("a", claimed_until=NOW + dt.timedelta(minutes=1)), NOW)
    assert not eligible(_row("a", rerun_digest=None), NOW)
    assert not eligible(_row("a", state="en erreur"), NOW)
    assert not eligible(_row("a", state="en cours"), NOW)
    assert not eligible(_row("a", source="mbox:/srv/a.mbox"), NOW)


def test_sqlite_urls() -> None:
    assert str(sqlite_path("sqlite+aiosqlite:////var/lib/balf/balf.sqlite3")) == "/var/lib/balf/balf.sqlite3"
    assert str(sqlite_path("sqlite:///relative.db")) == "relative.db"
    assert sqlite_path("sqlite+aiosqlite:///:memory:") is None
    assert sqlite_path("sqlite+aiosqlite:////x.db?mode=ro") is None
    assert sqlite_path("postgresql+asyncpg://u@h/db") is None


def test_status_numbers_from_a_source_state() -> None:
    from balf.bridge.snapshot import status_numbers

    state = b"\n".join(
        [
            list_line(*list_entry(b'(\\HasNoChildren) "/" INBOX')),
            b"INBOX (MESSAGES 3 UIDNEXT 4 UIDVALIDITY 17)",
            b'"R&AOk-clamations/&AMk-t&AOk- 2024" (MESSAGES 0 UIDNEXT 1 UIDVALIDITY 9)',
            b'"say \\"hi\\"" (UIDVALIDITY 5 MESSAGES 1 UIDNEXT 2)',
        ]
    )
    assert status_numbers(state) == {
        b"INBOX": (3, 17, 4),
        b"R&AOk-clamations/&AMk-t&AOk- 2024": (0, 9, 1),
        b'say "hi"': (1, 5, 2),
    }
