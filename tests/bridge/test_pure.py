"""Pure parts of the bascule, from literal values and the hand-written files in tests/data/bridge."""

from __future__ import annotations

import datetime as dt
import imaplib
import io
import json

import pytest

from balf.bridge.campaign import parse_campaign
from balf.bridge.dxl import DxlSource, parse_document, read_membership, read_names
from balf.bridge.errors import PlanError, QuotaExceeded, SourceRefused, SourceUnavailable
from balf.bridge.files import from_line_date, maildir_flags, mbox_flags, mbox_message, split_mbox
from balf.bridge.folders import parents, plan_folders, target_name
from balf.bridge.imap import ImapSource, Login, appended_uids, parse_uid_set
from balf.bridge.keys import date_header, dedup_key, message_id, to_crlf
from balf.bridge.lease import describe_holder, holder_is_dead
from balf.bridge.migrate import (
    BatchReader,
    RunSettings,
    connections_for,
    ended_state,
    split_evenly,
    storable_flags,
)
from balf.bridge.model import Role, SourceDamage, SourceFolder, SourceMessage
from balf.bridge.notes import NotesDocument, canonical_name, convert_document, notes_address, parse_dxl_datetime
from balf.bridge.options import check_department, parse_options
from balf.bridge.progress import rate_line
from balf.bridge.report import FolderLine, IssueLine, JobReport, render_csv, render_json, render_text
from balf.bridge.verify import compare_folder
from tests.bridge.helpers import DATA

# --- keys --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"Message-ID: <a@b>\r\n\r\nbody", "a@b"),
        (b"message-id:\r\n <folded@x.example>\r\nSubject: s\r\n\r\n", "folded@x.example"),
        (b"Message-Id: no-brackets@host\n\n", "no-brackets@host"),
        (b"Subject: x\r\n\r\nMessage-ID: <in-body@x>\r\n", None),
        (b"Message-ID: <>\r\n\r\n", None),
        (b"X: \xff\xfe\r\nMessage-ID: <8bit-\xe9@x>\r\n\r\n", "8bit-\\xe9@x"),
    ],
)
def test_message_id(raw: bytes, expected: str | None) -> None:
    assert message_id(raw) == expected


def test_dedup_keys() -> None:
    a = b"Message-ID: <OF12.34-ONC1@domino.dgfip.local>\r\n\r\nx"
    b = b"Message-ID: <OF12.34-ONC1@example.org>\r\n\r\nx"
    assert dedup_key(a) != dedup_key(b)
    assert dedup_key(a, local_part_only=True) == dedup_key(b, local_part_only=True) == "l:OF12.34-ONC1"
    no_id = b"Subject: s\n\nbody\n"
    assert dedup_key(no_id).startswith("h:") and dedup_key(no_id) == dedup_key(to_crlf(no_id))
    assert len(dedup_key(b"Message-ID: <" + b"x" * 400 + b"@y>\r\n\r\n")) <= 200


def test_date_header() -> None:
    assert date_header(b"Date: Mon, 04 Mar 2024 10:11:00 +0100\r\n\r\n") == dt.datetime(
        2024, 3, 4, 10, 11, tzinfo=dt.timezone(dt.timedelta(hours=1))
    )
    assert date_header(b"Date: 32 Foo 2024 99:99 +0100\r\n\r\n") is None
    assert date_header(b"Date: le trente f\xe9vrier\r\n\r\n") is None


# --- folders -----------------------------------------------------------------------------

SPECIAL = {Role.SENT: "Envoyés", Role.DRAFTS: "Brouillons", Role.TRASH: "Corbeille", Role.JUNK: "Indésirables"}


def _plan(*paths: tuple[str, ...], **kw):
    folders = [SourceFolder(p, "\\".join(p)) for p in paths]
    return {p.source.path: (p.target, p.skip) for p in plan_folders(folders, delimiter="/", special=SPECIAL, **kw)}


def test_lotus_system_folders_go_to_special_use() -> None:
    plans = _plan(
        ("($Inbox)",),
        ("($Sent)",),
        ("($Drafts)",),
        ("($Trash)",),
        ("($JunkMail)",),
        ("($All)",),
        ("($Archive)",),
        ("Sent Items",),
        ("Inbox",),
    )
    assert plans[("($Inbox)",)] == ("INBOX", False)
    assert plans[("($Sent)",)] == ("Envoyés", False)
    assert plans[("($Drafts)",)] == ("Brouillons", False)
    assert plans[("($Trash)",)] == ("Corbeille", False)
    assert plans[("($JunkMail)",)] == ("Indésirables", False)
    assert plans[("($All)",)][1] is True  # a view: every document is elsewhere too
    assert plans[("($Archive)",)] == ("Archives", False)  # not advertised: the French default
    assert plans[("Sent Items",)] == ("Envoyés", False) and plans[("Inbox",)] == ("INBOX", False)


def test_hierarchy_delimiters_and_overrides() -> None:
    plans = _plan(
        ("Dossiers", "Contentieux été"),
        ("A/B",),
        ("Vieux",),
        ("Perso", "x"),
        folder_map=(("Vieux", "Archives/2015"), ("Perso", "-")),
        exclude=("Tmp*",),
    )
    assert plans[("Dossiers", "Contentieux été")] == ("Dossiers/Contentieux été", False)
    assert plans[("A/B",)] == ("A_B", False)  # a "/" inside a Domino name is not a level
    assert plans[("Vieux",)] == ("Archives/2015", False)
    assert plans[("Perso", "x")][1] is True
    assert target_name(["Réclamations", "2024"], ".", "INBOX.") == "INBOX.Réclamations.2024"
    assert target_name(["inbox", "Sub"], ".") == "INBOX.Sub"
    assert parents("a/b/c", "/") == ["a", "a/b"]


# --- DXL and Notes -----------------------------------------------------------------------


def test_dxl_datetimes() -> None:
    assert parse_dxl_datetime("20151203T101500,00+01") == dt.datetime(
        2015, 12, 3, 10, 15, tzinfo=dt.timezone(dt.timedelta(hours=1))
    )
    assert parse_dxl_datetime("20220125T202600,50-0530").utcoffset() == -dt.timedelta(hours=5, minutes=30)
    assert parse_dxl_datetime("20220125") == dt.datetime(2022, 1, 25, tzinfo=dt.UTC)
    assert parse_dxl_datetime("20161345T999999,00+01") is None


def test_notes_names() -> None:
    names = read_names(DATA / "names.csv")
    assert canonical_name("CN=Élodie Martin/OU=SIP/O=DGFIP") == canonical_name("Élodie Martin/SIP/DGFIP@DGFIP")
    address, known = notes_address("Élodie Martin/SIP/DGFIP", names)
    assert known and address.addr_spec == "elodie.martin@dgfip.finances.gouv.fr"
    guessed, known = notes_address("CN=Paul Inconnu/OU=SIE/O=DGFIP", names)
    assert not known and guessed.addr_spec == "paul.inconnu@sie.dgfip.invalid"
    assert notes_address('"Jean" <jean@example.org>', {})[0].addr_spec == "jean@example.org"


def test_convert_document_is_deterministic_and_parses() -> None:
    doc = NotesDocument("0" * 32, "Memo", {"subject": ("Été",), "posteddate": ("20200101T080000,00+01",)}, ("Bonjour",))
    first = convert_document(doc, names={})
    assert first.raw == convert_document(doc, names={}).raw
    assert b"Message-ID: <00000000000000000000000000000000@dxl.invalid>" in first.raw
    assert first.flags == ("\\Seen",)


def test_dxl_source_membership_and_remarks(tmp_path) -> None:
    membership = tmp_path / "folders.csv"
    membership.write_text("unid;dossier\nA1B2C3D4E5F60718293A4B5C6D7E8F04;Dossiers\\Cadastre\n", encoding="utf-8")
    source = DxlSource(DATA / "sip33.dxl", membership=read_membership(membership))
    titles = {f.native: f.estimated_count for f in source.folders()}
    assert titles["Dossiers\\Cadastre"] == 1 and titles["($Sent)"] == 1  # the reply stays in Sent
    assert ("document_non_courriel", "1 document(s) de forme 'Appointment' non migré(s)") in source.remarks


def test_dxl_views_membership_directory(tmp_path) -> None:
    views = tmp_path / "vues"
    views.mkdir()
    (views / "Dossiers#Usagers.xml").write_text(
        "<?xml version='1.0'?><viewentries>"
        "<viewentry position='1' unid='a1b2c3d4e5f60718293a4b5c6d7e8f01'/></viewentries>",
        encoding="utf-8",
    )
    assert read_membership(views) == {"A1B2C3D4E5F60718293A4B5C6D7E8F01": ("Dossiers\\Usagers",)}


def test_dxl_native_mime_document() -> None:
    from xml.etree.ElementTree import fromstring

    element = fromstring(
        "<document xmlns='http://www.lotus.com/dxl' form='Memo'><noteinfo unid='ab'/>"
        "<item name='Body'><mime>\nSubject: x\nMessage-ID: &lt;m@x&gt;\n\nbody\n</mime></item></document>"
    )
    doc = parse_document(element)
    assert convert_document(doc, names={}).raw == b"Subject: x\r\nMessage-ID: <m@x>\r\n\r\nbody\r\n"


def test_dxl_cases_from_the_dtd() -> None:
    """tests/data/bridge/domino-dtd-cases.dxl, written by hand from domino_9_0_1.dtd (see its comment)."""
    import email
    import email.policy

    source = DxlSource(DATA / "domino-dtd-cases.dxl")
    folders = source.folders()
    messages = {}
    for folder in folders:
        for item in source.messages(folder):
            assert isinstance(item, SourceMessage), item
            messages[message_id(item.raw)] = item
    assert len(messages) == 3

    # A native MIME note: <mime> is the document's own child; its stream passes unchanged (CRLF).
    native = messages["native-mime-1@example.org"]
    assert native.raw.startswith(b"MIME-Version: 1.0\r\nFrom: =?utf-8?q?C=C3=A9line_Usager?= <celine")
    assert b"\r\n--b1\r\nContent-Type: application/pdf;" in native.raw and native.raw.endswith(b"--b1--\r\n")
    assert b"\n" not in native.raw.replace(b"\r\n", b"")
    # dst='true' is informational: the offset written (-04 in July, US Eastern) is already in effect.
    assert native.internaldate == dt.datetime(2026, 7, 20, 16, 2, 5, 500000, tzinfo=dt.UTC)

    # A response document: its parent attribute stands for $Ref; <break/> in a text item; +0530.
    reply_item = messages["B0000000000000000000000000000002@dxl.invalid"]  # no $MessageID: from the UNID
    reply = email.message_from_bytes(reply_item.raw, policy=email.policy.default)
    assert reply["In-Reply-To"] == "<native-mime-1@example.org>"
    assert reply["Subject"] == "Réponse : votre déclaration"
    assert reply["Date"] == "Tue, 21 Jul 2026 09:30:00 +0530"
    assert reply_item.internaldate == dt.datetime(2026, 7, 21, 4, 0, tzinfo=dt.UTC)
    names = [part.get_filename() for part in reply.iter_attachments()]
    assert names == ["formulaire.txt"]  # the huffman-compressed one is reported, not attached as garbage
    assert next(reply.iter_attachments()).get_payload(decode=True) == b"Formulaire 1\n"
    assert "Le formulaire est joint." in reply.get_body(("plain",)).get_content()
    assert any("ancien.doc" in n and "compress" in n for n in reply_item.notes)

    # A Body the exporter could not render (rawitemdata): copied without body, and reported.
    raw_body = next(m for m in messages.values() if b"Corps illisible" in m.raw)
    assert any("rawitemdata" in n for n in raw_body.notes)


def test_dxl_native_mime_at_document_level() -> None:
    from xml.etree.ElementTree import fromstring

    element = fromstring(
        "<document xmlns='http://www.lotus.com/dxl' form='Memo'><noteinfo unid='ab'/>"
        "<mime>\nSubject: x\nMessage-ID: &lt;m@x&gt;\n\nbody\n</mime>"
        "<item name='PostedDate'><datetime>20151203T101500,00+01</datetime></item></document>"
    )
    doc = parse_document(element)
    assert convert_document(doc, names={}).raw == b"Subject: x\r\nMessage-ID: <m@x>\r\n\r\nbody\r\n"
    assert doc.first("PostedDate") == "20151203T101500,00+01"


# --- files ---------------------------------------------------------------------------------


def test_mbox_split_and_flags() -> None:
    data = (
        b"From a Mon Mar 04 09:12:00 2024\nStatus: RO\nX-Status: AF\nSubject: 1\n\n>From x\n\n"
        b"From b Tue Mar 05 10:00:00 2024\nSubject: 2\n\nbody\n"
    )
    lines, offset = [], 0
    for line in io.BytesIO(data):
        lines.append((offset, line))
        offset += len(line)
    chunks = list(split_mbox(iter(lines)))
    assert [c[0] for c in chunks] == [0, data.index(b"From b")]
    first = mbox_message(*chunks[0], None)
    assert isinstance(first, SourceMessage)
    assert first.raw == b"Status: RO\r\nX-Status: AF\r\nSubject: 1\r\n\r\nFrom x\r\n"
    assert set(first.flags) == {"\\Seen", "\\Answered", "\\Flagged"}
    assert mbox_flags(b"X-Mozilla-Status: 1003\n") == ("$Forwarded", "\\Answered", "\\Seen")
    assert from_line_date(b"From - Tue Nov  3 10:00:00 2015\n") == dt.datetime(2015, 11, 3, 10, tzinfo=dt.UTC)
    assert isinstance(mbox_message(5, b"From x\n", b"garbage only\n", None), SourceDamage)


def test_maildir_flags() -> None:
    assert maildir_flags("1.M1.h:2,FRSab", {"a": "$Forwarded", "b": "$label1"}) == (
        "$Forwarded",
        "$label1",
        "\\Answered",
        "\\Flagged",
        "\\Seen",
    )
    assert maildir_flags("1.M1.h", {}) == ()


# --- migration helpers --------------------------------------------------------------------


def test_flags_filtered_by_permanentflags() -> None:
    flags = ("\\Seen", "\\Recent", "\\Deleted", "$Forwarded", "$label1")
    assert storable_flags(flags, ("\\Seen", "\\Answered", "\\*")) == ("\\Seen", "$Forwarded", "$label1")
    assert storable_flags(flags, ("\\Seen", "\\Answered", "$Forwarded")) == ("\\Seen", "$Forwarded")


def test_batches_and_chunks() -> None:
    messages = [SourceMessage(str(i), b"x" * 10) for i in range(7)]
    reader = BatchReader(iter(messages), 3, 10**6)
    assert [len(reader.next()) for _ in range(4)] == [3, 3, 1, 0]
    # the byte bound is strict: the message that would cross it opens the next batch, none is lost
    reader = BatchReader(iter(messages), 100, 25)
    assert [len(reader.next()) for _ in range(5)] == [2, 2, 2, 1, 0]
    # a message bigger than the bound travels alone; damage records weigh nothing
    mixed = [
        SourceMessage("a", b"x" * 5),
        SourceMessage("b", b"y" * 40),
        SourceDamage("c", "k", "d"),
        SourceMessage("d", b"z" * 5),
    ]
    reader = BatchReader(iter(mixed), 100, 25)
    assert [[i.position for i in reader.next()] for _ in range(4)] == [["a"], ["b"], ["c", "d"], []]
    chunks = split_evenly([(str(i), m) for i, m in enumerate(messages)], 3)
    assert sum(len(c) for c in chunks) == 7 and len(chunks) == 3
    assert [k for c in chunks for k, _m in c] == [str(i) for i in range(7)]


def test_uid_sets() -> None:
    assert parse_uid_set(b"3:5,9") == [3, 4, 5, 9]
    assert appended_uids(("OK", [b"[APPENDUID 38505 3955:3957] Append completed."]), 3) == [3955, 3956, 3957]
    assert appended_uids(b"[APPENDUID 1 7] done", 2) is None


class _DroppedClient:
    """A connection whose next command finds the socket closed (what imaplib raises)."""

    def run(self) -> str:
        raise imaplib.IMAP4.abort("socket error: EOF")

    def shutdown(self) -> None:
        pass


class _LiveClient:
    def run(self) -> str:
        return "done"


def _source_with(monkeypatch: pytest.MonkeyPatch, connections: list[object]) -> tuple[ImapSource, list[float]]:
    import balf.bridge.imap as imap_module

    def connect(login: Login, *, for_source: bool) -> object:
        outcome = connections.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    monkeypatch.setattr(imap_module, "connect", connect)
    source = ImapSource(Login("127.0.0.1", 1143, "src", "pw"))
    slept: list[float] = []
    source._sleep = slept.append  # type: ignore[method-assign]
    return source, slept


def test_source_reconnects_while_the_server_restarts(monkeypatch: pytest.MonkeyPatch) -> None:
    refused = SourceUnavailable("IMAP server src@127.0.0.1:1143 unreachable: [Errno 111] Connection refused")
    source, slept = _source_with(monkeypatch, [_DroppedClient(), refused, _LiveClient()])
    assert source._retry(lambda client: client.run(), "FETCH INBOX") == "done"  # type: ignore[attr-defined]
    assert slept == [1.0, 3.0]


def test_source_that_stays_down_names_itself_and_the_command(monkeypatch: pytest.MonkeyPatch) -> None:
    refused = SourceUnavailable("refused")
    source, slept = _source_with(monkeypatch, [_DroppedClient(), refused, refused, refused])
    with pytest.raises(SourceUnavailable, match=r"src@127.0.0.1:1143: connection lost during FETCH INBOX, 3 rec"):
        source._retry(lambda client: client.run(), "FETCH INBOX")  # type: ignore[attr-defined]
    assert slept == [1.0, 3.0, 6.0]


def test_source_login_refused_is_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    source, slept = _source_with(monkeypatch, [SourceRefused("IMAP login refused for src")])
    with pytest.raises(SourceRefused):
        source._retry(lambda client: client.run())  # type: ignore[attr-defined]
    assert slept == []


def test_source_status_tells_an_unchanged_folder() -> None:
    source = ImapSource(Login("127.0.0.1", 1143, "src", "pw"))
    folder = SourceFolder(("INBOX",), "INBOX", Role.INBOX)
    assert not source.unchanged_since(folder, "7:10")  # not listed yet: unknown
    source._status["INBOX"] = (10, 7, 11)
    assert source.unchanged_since(folder, "7:10")
    assert not source.unchanged_since(folder, "7:9")  # a UID given since the checkpoint
    assert not source.unchanged_since(folder, "8:10")  # UIDVALIDITY changed: read again
    assert not source.unchanged_since(folder, None)
    source._status["INBOX"] = (0, 7, 11)
    assert source.unchanged_since(folder, None)  # empty folder


def test_dead_holder() -> None:
    assert holder_is_dead("me:999999999", "me:1")
    assert not holder_is_dead("other-host:999999999", "me:1")
    import os

    assert not holder_is_dead(f"me:{os.getpid()}", "me:1")
    assert holder_is_dead("verification@me:999999999", "copie@me:1")  # with the role, and older rows without
    assert holder_is_dead("me:999999999", "copie@me:1")
    assert not holder_is_dead("copie@other-host:999999999", "verification@me:1")


def test_a_holder_is_described_for_the_coordinator() -> None:
    assert describe_holder("verification@poste-12:4242") == "une vérification sur poste-12 (processus 4242)"
    assert describe_holder("copie@poste-12:7") == "une copie sur poste-12 (processus 7)"
    assert describe_holder("autre-poste:1") == "un autre poste (autre-poste:1)"  # rows of older runs
    assert describe_holder("x@y") == "un autre poste (x@y)"
    assert describe_holder(None) == "un autre processus"


# --- campaign ------------------------------------------------------------------------------


def test_campaign_file() -> None:
    text = (
        "\ufeffmailbox;source;target_account;planned_date;options;domino\n"
        "sip-bdx;imap://balf@domino.dgfip:143;sip.33001;03/02/2027;"
        "password_env=PW folder_map=Old>Archives/Old|Tmp>-;oui\n"
        "# commentaire;;;;;\n"
        "cdif;dxl:/exports/cdif.xml;cdif.33002;;names_file=/n.csv;\n"
    )
    planned = parse_campaign(text)
    assert [p.mailbox for p in planned] == ["sip-bdx", "cdif"]
    assert planned[0].planned_date == dt.date(2027, 2, 3)
    options = parse_options(planned[0].options)
    assert options.dedup_local_part and options.folder_map == (("Old", "Archives/Old"), ("Tmp", "-"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("mailbox;source\nx;mbox:/a\n", "missing column"),
        ("mailbox;source;target_account\nx;ftp://a;t\n", "line 2"),
        ("mailbox;source;target_account;planned_date\nx;mbox:/a;t;demain\n", "planned_date"),
        ("mailbox;source;target_account;options\nx;mbox:/a;t;colour=blue\n", "unknown option"),
        ("mailbox;source;target_account\nx;mbox:/a;t\nx;mbox:/b;t\n", "twice"),
    ],
)
def test_campaign_errors(text: str, message: str) -> None:
    with pytest.raises(PlanError, match=message):
        parse_campaign(text)


def test_departments() -> None:
    assert [check_department(c) for c in ("33", "2a", "971")] == ["33", "2A", "971"]
    with pytest.raises(PlanError):
        check_department("3")
    assert QuotaExceeded.exit_code == 113


# --- verification and report ---------------------------------------------------------------


def test_compare_folder() -> None:
    verdict = compare_folder(
        ["($Inbox)"],
        "INBOX",
        ["m:a", "m:b", "m:b", "m:c", "m:d"],
        ["m:a", "m:b", "m:z"],
        {"m:c": "trop_volumineux: 60 Mo"},
    )
    assert verdict.missing == ("m:d",) and verdict.extra == ("m:z",) and not verdict.ok
    assert [(d.kind, d.key, d.explanation) for d in verdict.explained] == [
        ("doublon_source", "m:b", "2 messages de la source ont cette clé: copié une fois"),
        ("manquant", "m:c", "trop_volumineux: 60 Mo"),
    ]


def test_report_renderings() -> None:
    report = JobReport(
        "33",
        "sip-bdx",
        "imap://u@h",
        "sip.33001",
        "migrée",
        None,
        None,
        None,
        None,
        3,
        3000,
        1,
        None,
        (FolderLine("($Inbox)", "INBOX", 4, 3, 3, 0, 1, 3000),),
        (IssueLine("($Inbox)", "m:c", "trop_volumineux", "message trop volumineux, non copié", "60 Mo"),),
    )
    csv = render_csv([report])
    assert csv.startswith(b"\xef\xbb\xbf") and b"\r\n33;sip-bdx;migr\xc3\xa9e;($Inbox);INBOX;4;3;3;0;1;3000\r\n" in csv
    assert json.loads(render_json([report]))[0]["folders"][0]["target"] == "INBOX"
    assert "message trop volumineux" in render_text([report])


def test_rate_line() -> None:
    line = rate_line("sip-bdx", 500, 1000, 5_000_000, 2.0)
    assert "250 msg/s" in line and "2.5 MB/s" in line and "ETA 0:00:02" in line


def test_connections_follow_the_folder_size() -> None:
    from balf.bridge.model import FolderPlan, SourceFolder

    settings = RunSettings(connections=4, batch_messages=200, batch_bytes=8 * 1024 * 1024)

    def plan(count: int | None, size: int | None) -> FolderPlan:
        return FolderPlan(SourceFolder(("INBOX",), "INBOX", estimated_count=count, estimated_bytes=size), "INBOX")

    assert connections_for(plan(20, 900_000), settings) == 1  # a small BALF: one login, not four
    assert connections_for(plan(0, 0), settings) == 1
    assert connections_for(plan(450, 3_000_000), settings) == 3  # by count
    assert connections_for(plan(1000, 45_000_000), settings) == 4  # the benchmark's folders
    assert connections_for(plan(None, None), settings) == 4  # unknown: all of them


def test_a_verified_mailbox_stays_verified_only_through_an_idle_rerun() -> None:
    from balf.bridge.outcome import FolderOutcome
    from balf.db.states import BasculeState

    idle = [FolderOutcome("INBOX", "INBOX"), FolderOutcome("($All)", "")]
    assert ended_state(BasculeState.VERIFIEE, idle, []) is BasculeState.VERIFIEE
    assert ended_state(BasculeState.VERIFIEE, [FolderOutcome("INBOX", "INBOX", copied=1)], []) is BasculeState.MIGREE
    assert ended_state(BasculeState.VERIFIEE, [FolderOutcome("INBOX", "INBOX", failed=1)], []) is BasculeState.MIGREE
    assert ended_state(BasculeState.VERIFIEE, idle, [("dxl", "tronqué")]) is BasculeState.MIGREE
    assert ended_state(BasculeState.EN_ERREUR, idle, []) is BasculeState.MIGREE
