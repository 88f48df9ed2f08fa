"""Review fixes of the bascule: verification both ways, Domino detection, no source password kept.

Pure tests first (from literal bytes in tests/data/bridge/servers/, written for these tests in
the format of real server captures), then live tests on the private Dovecot and both databases.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import secrets
from pathlib import Path

import pytest
from sqlalchemy import select

from balf.bridge import store
from balf.bridge.campaign import parse_campaign
from balf.bridge.domino import ServerFacts, domino_evidence, facts_from_transcript, settle_modes
from balf.bridge.errors import PlanError, SourceUnavailable
from balf.bridge.model import PlannedMailbox
from balf.bridge.options import DOMINO_DETECTED, parse_options
from balf.bridge.verify import compare_folder, difference_issues
from balf.db.engine import create_engine, session_factory
from balf.db.models import BasculeIssue, BasculeJob
from tests.bridge.helpers import balf, fetch_all, imap, new_user, write_config, write_plan

SERVERS = Path(__file__).resolve().parents[1] / "data" / "bridge" / "servers"
WHEN = dt.datetime(2023, 6, 1, 9, 30, tzinfo=dt.UTC)


# --- Domino detection (pure) -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("capture", "evidence"),
    [
        ("domino-default.txt", "accueil du serveur « * OK Domino IMAP4 Server Release 9.0.1FP9 ready"),
        ("domino-custom-greeting.txt", "séparateur de dossiers « \\ »"),
        ("domino-id.txt", "réponse ID name=Lotus Domino"),
        ("dovecot.txt", None),
    ],
)
def test_domino_detected_from_server_bytes(capture: str, evidence: str | None) -> None:
    facts = facts_from_transcript((SERVERS / capture).read_bytes())
    found = domino_evidence(facts)
    assert found == evidence if evidence is None else found is not None and found.startswith(evidence)


def test_server_facts_parsed_from_bytes() -> None:
    domino = facts_from_transcript((SERVERS / "domino-custom-greeting.txt").read_bytes())
    assert domino.capabilities == tuple(b"IMAP4rev1 AUTH=PLAIN LITERAL+ NAMESPACE QUOTA UIDPLUS".split())
    assert domino.delimiters == ("\\",)
    dovecot = facts_from_transcript((SERVERS / "dovecot.txt").read_bytes())
    assert b"SASL-IR" in dovecot.capabilities and dovecot.server_id == (("name", "Dovecot"),)
    assert dovecot.delimiters == ("/",)
    assert domino_evidence(ServerFacts(capabilities=(b"IMAP4rev1", b"X-DOMINO-EXT"))) == "CAPABILITY X-DOMINO-EXT"


def test_plan_forces_the_mode_either_way() -> None:
    detected_yes = {DOMINO_DETECTED: "yes", "domino_evidence": "accueil"}
    assert parse_options(detected_yes).dedup_local_part
    assert "Domino détecté: accueil" in parse_options(detected_yes).dedup_mode
    forced_off = parse_options({**detected_yes, "domino": "non"})
    assert not forced_off.dedup_local_part and "imposé par le plan" in forced_off.dedup_mode
    forced_on = parse_options({DOMINO_DETECTED: "no", "domino": "oui"})
    assert forced_on.dedup_local_part and forced_on.domino is True
    assert not parse_options({}).dedup_local_part and parse_options({}).domino is None


# --- secrets (pure) -----------------------------------------------------------------------------

HEADER = "mailbox;source;target_account;planned_date;options\n"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("sip;imap://balf@domino33:143;sip.33001;;password=Tr3s-S3cret\n", "password_env=VARIABLE or password_file="),
        ("sip;imap://balf:Tr3s-S3cret@domino33:143;sip.33001;;password_env=PW\n", "without ':password'"),
        ("sip;imap://balf@domino33:143;sip.33001;;\n", "IMAP source without password_env"),
        ("sip;imap://balf@domino33;sip.33001;;password_env=PW password_file=/etc/x\n", "not both"),
        ("sip;imap://balf@domino33;sip.33001;;password_env=1-bad\n", "not an environment variable name"),
        ("sip;imap://balf@domino33;sip.33001;;password_env=PW domino_detected=yes\n", "set by balf"),
    ],
)
def test_plan_refuses_passwords_in_clear(line: str, message: str) -> None:
    with pytest.raises(PlanError, match=message) as caught:
        parse_campaign(HEADER + line)
    text = str(caught.value)
    assert "Tr3s-S3cret" not in text and "\n" not in text


def test_password_column_is_refused_too() -> None:
    with pytest.raises(PlanError, match="password_env") as caught:
        parse_campaign("mailbox;source;target_account;password\nsip;imap://balf@h;sip.1;Tr3s-S3cret\n")
    assert "Tr3s-S3cret" not in str(caught.value)
    with pytest.raises(PlanError, match="refused"):  # an old job whose stored options hold one
        parse_options({"password": "Tr3s-S3cret", "password_env": "PW"})


def test_plan_accepts_password_env_or_file() -> None:
    planned = parse_campaign(
        HEADER + "a;imap://balf@h;a.1;;password_env=DOMINO_PW\nb;imaps://balf@h;b.1;;password_file=/etc/balf/b\n"
    )
    assert [parse_options(p.options).password_env for p in planned] == ["DOMINO_PW", None]
    assert parse_options(planned[1].options).password_file == "/etc/balf/b"


# --- verification both ways (pure) ---------------------------------------------------------------


def test_duplicate_in_target_fails() -> None:
    verdict = compare_folder(["INBOX"], "INBOX", ["m:a", "m:b"], ["m:a", "m:b", "m:a"], {})
    assert not verdict.ok and verdict.duplicated == ("m:a",) and verdict.target_count == 3
    issues = difference_issues(verdict, {"m:a": [1, 3]})
    assert [(i.kind, i.item) for i in issues] == [("double_cible", "m:a")] and "UID 1, 3" in issues[0].detail


def test_extra_in_target_fails_unless_there_before() -> None:
    foreign = compare_folder(["INBOX"], "INBOX", ["m:a"], ["m:a", "m:intrus"], {})
    assert not foreign.ok and foreign.extra == ("m:intrus",)
    before = compare_folder(["INBOX"], "INBOX", ["m:a"], ["m:a", "m:ancien"], {}, {"m:ancien": 1})
    assert before.ok and [(d.kind, d.key) for d in before.explained] == [("en_plus", "m:ancien")]
    # one copy was there before, a second one was added since: the second is not explained
    added = compare_folder(["INBOX"], "INBOX", ["m:a"], ["m:a", "m:ancien", "m:ancien"], {}, {"m:ancien": 1})
    assert not added.ok and added.extra == ("m:ancien",) and len(added.explained) == 1
    # a source message that was already twice in the target before the copy
    twice = compare_folder(["INBOX"], "INBOX", ["m:a"], ["m:a", "m:a"], {}, {"m:a": 2})
    assert twice.ok and [(d.kind, d.copies) for d in twice.explained] == [("en_double", 1)]


def test_missing_still_caught_and_explained_ones_listed() -> None:
    verdict = compare_folder(["INBOX"], "INBOX", ["m:a", "m:b", "m:big"], ["m:a"], {"m:big": "trop_volumineux: 60 Mo"})
    assert verdict.missing == ("m:b",) and not verdict.ok
    kinds = {(i.kind, i.item) for i in difference_issues(verdict, {})}
    assert kinds == {("manquant_cible", "m:b"), ("ecart_explique", "m:big")}


# --- live ---------------------------------------------------------------------------------------


def _message(mid: str, subject: str = "Réclamation") -> bytes:
    return (
        f"From: Usager <usager@example.org>\r\nTo: sip@dgfip.example\r\nSubject: {subject}\r\n"
        f"Date: Mon, 04 Mar 2024 10:00:00 +0100\r\nMessage-ID: <{mid}@example.org>\r\n\r\nCorps {mid}.\r\n"
    ).encode()


def _append(account, folder: str, mids: list[str]) -> None:
    client = imap(account)
    if folder != "INBOX" and not client.folder_exists(folder):
        client.create_folder(folder)
    for mid in mids:
        client.append(folder, _message(mid), flags=("\\Seen",), msg_time=WHEN)
    client.logout()


def _delete(account, folder: str, mid: str, *, last_only: bool = False) -> None:
    client = imap(account)
    client.select_folder(folder)
    uids = sorted(client.search(["HEADER", "Message-ID", f"<{mid}@example.org>"]))
    assert uids, mid
    client.delete_messages(uids[-1:] if last_only else uids)
    client.expunge()
    client.logout()


@pytest.mark.live
def test_verify_compares_both_ways(tmp_path: Path, dovecot, db_url: str) -> None:
    source, target = new_user(dovecot, "vb-src"), new_user(dovecot, "vb-dst")
    _append(source, "INBOX", ["msg-1", "msg-2", "msg-3"])
    _append(source, "Contentieux", ["msg-4"])
    _append(target, "INBOX", ["deja-la"])  # mail in the new account before the bascule
    config = write_config(tmp_path, db_url, dovecot)
    plan = write_plan(
        tmp_path,
        [("sip-bdx", f"imap://{source.username}@{source.host}:{source.port}", target.username, "password_env=SRC_PW")],
    )
    env = {"SRC_PW": source.password}
    assert balf(config, "bascule", "plan", "-d", "33", str(plan)).exit_code == 0
    ran = balf(config, "bascule", "run", "-d", "33", env=env)
    assert ran.exit_code == 0 and "4 copiés" in ran.output, ran.output
    out = tmp_path / "rapport"

    def verify() -> tuple[int, str, str, list[dict]]:
        result = balf(config, "bascule", "verify", "-d", "33", "-o", str(out), env=env)
        anomalies = (out / "bascule-33-anomalies.csv").read_bytes()
        assert anomalies.startswith(b"\xef\xbb\xbf")
        return (
            result.exit_code,
            result.output,
            anomalies.decode("utf-8-sig"),
            json.loads((out / "bascule-33.json").read_text("utf-8")),
        )

    code, output, anomalies, report = verify()
    assert code == 0 and "sip-bdx: vérifiée" in output, output
    assert "INBOX: source 3, cible 4" in output and "expliqués 1 (en_plus 1)" in output
    assert "ecart_explique" in anomalies and "deja-la" in anomalies and "avant toute copie" in anomalies
    assert report[0]["unexplained"] == 0 and report[0]["found_in_target"] == 1
    assert "1 messages déjà dans la cible avant la bascule" in (out / "bascule-33.txt").read_text("utf-8")

    # a duplicate APPENDed by hand
    _append(target, "INBOX", ["msg-1"])
    code, output, anomalies, report = verify()
    assert code == 1 and "ÉCARTS" in output and "en double: m:msg-1@example.org" in output, output
    assert "double_cible" in anomalies and "msg-1@example.org" in anomalies and "de trop dans la cible" in anomalies
    assert report[0]["unexplained"] == 1 and report[0]["state"] == "migrée"
    assert "ÉCART: en double dans la cible" in balf(config, "bascule", "report", "-d", "33").output
    _delete(target, "INBOX", "msg-1", last_only=True)

    # a foreign message that was not there before the bascule
    _append(target, "Contentieux", ["intrus"])
    code, output, anomalies, _report = verify()
    assert code == 1 and "en plus: m:intrus@example.org" in output, output
    assert "en_plus_cible" in anomalies and "pas là avant la bascule" in anomalies
    # a rerun does not turn it into mail that "was there before"
    assert balf(config, "bascule", "run", "-d", "33", "--again", env=env).exit_code == 0
    assert verify()[0] == 1
    _delete(target, "Contentieux", "intrus")

    # a message deleted from the target: still caught, then copied again
    _delete(target, "INBOX", "msg-2")
    code, output, anomalies, _report = verify()
    assert code == 1 and "manquant: m:msg-2@example.org" in output and "manquant_cible" in anomalies
    assert balf(config, "bascule", "run", "-d", "33", env=env).exit_code == 0
    code, output, anomalies, report = verify()
    assert code == 0 and report[0]["state"] == "vérifiée", output
    assert sorted(len(v) for k, v in fetch_all(target).items() if k in ("INBOX", "Contentieux")) == [1, 4]


@pytest.mark.live
def test_mode_detected_once_and_reported(tmp_path: Path, dovecot, db_url: str) -> None:
    """A plain Dovecot source is not Domino: the run says so, records it, and the report shows it."""
    source, target = new_user(dovecot, "mode-src"), new_user(dovecot, "mode-dst")
    _append(source, "INBOX", ["m-1"])
    config = write_config(tmp_path, db_url, dovecot)
    plan = write_plan(
        tmp_path,
        [("sie", f"imap://{source.username}@{source.host}:{source.port}", target.username, "password_env=SRC_PW")],
    )
    balf(config, "bascule", "plan", "-d", "33", str(plan))
    env = {"SRC_PW": source.password}
    dry = balf(config, "bascule", "run", "-d", "33", "--dry-run", env=env)
    assert "sie: doublons reconnus par Message-ID entiers (pas de Domino" in dry.output, dry.output
    ran = balf(config, "bascule", "run", "-d", "33", env=env)
    assert ran.exit_code == 0 and "pas de Domino" in ran.output, ran.output
    status = json.loads(balf(config, "bascule", "status", "-d", "33", "--json").output)
    assert status[0]["message_ids"].startswith("Message-ID entiers (pas de Domino")
    assert "doublons reconnus par: Message-ID entiers" in balf(config, "bascule", "report", "-d", "33").output
    # re-planning keeps the decision (the mode of a mailbox never changes under it)
    balf(config, "bascule", "plan", "-d", "33", str(plan))
    again = balf(config, "bascule", "run", "-d", "33", "--again", env=env)
    assert "0 copiés" in again.output and "pas de Domino" in again.output


@pytest.mark.live
async def test_settle_modes_records_domino_and_refuses_unknown(db_url: str) -> None:
    engine = create_engine(db_url)
    sessions = session_factory(engine)
    try:
        await store.plan_department(
            sessions,
            "33",
            [
                PlannedMailbox("dom", "imap://balf@domino33", "dom.1", None, {"password_env": "PW"}),
                PlannedMailbox("off", "imap://balf@domino33", "off.1", None, {"password_env": "PW", "domino": "non"}),
                PlannedMailbox("down", "imap://balf@down33", "down.1", None, {"password_env": "PW"}),
                PlannedMailbox("mbox", "mbox:/x", "mbox.1", None, {}),
            ],
        )
        domino = facts_from_transcript((SERVERS / "domino-default.txt").read_bytes())
        probed: list[str] = []

        def probe(uri: str, _options, _timeout: float) -> ServerFacts:
            probed.append(uri)
            if "down" in uri:
                raise SourceUnavailable("IMAP server balf@down33:143 unreachable")
            return domino

        jobs = await store.list_jobs(sessions, "33")
        notes = {n.mailbox: n for n in await settle_modes(sessions, jobs, timeout=5, record=True, probe=probe)}
        assert "Domino détecté: accueil du serveur" in notes["dom"].mode
        assert "imposé par le plan" in notes["off"].mode and "mbox" not in notes
        assert notes["down"].error and "unreachable" in notes["down"].error
        by_name = {j.mailbox: j for j in await store.list_jobs(sessions, "33")}
        assert parse_options(by_name["dom"].options).dedup_local_part
        assert by_name["down"].state.value == "en erreur"
        # decided once: not probed again
        probed.clear()
        await settle_modes(sessions, [by_name["dom"]], timeout=5, record=True, probe=probe)
        assert probed == []
    finally:
        await engine.dispose()


@pytest.mark.live
def test_no_source_password_kept_or_shown(
    tmp_path: Path, dovecot, db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    password = f"Src-{secrets.token_hex(8)}"
    source = dovecot.add_user(f"pw-src-{secrets.token_hex(3)}", password=password)
    target = new_user(dovecot, "pw-dst")
    _append(source, "INBOX", ["p-1", "p-2"])
    config = write_config(tmp_path, db_url, dovecot)
    uri = f"imap://{source.username}@{source.host}:{source.port}"

    literal = write_plan(tmp_path, [("sip", uri, target.username, f"password={password}")])
    refused = balf(config, "bascule", "plan", "-d", "33", str(literal))
    assert refused.exit_code == 2 and "password_env=" in refused.output and password not in refused.output
    assert len(refused.output.strip().splitlines()) == 1
    in_uri = write_plan(
        tmp_path,
        [("sip", f"imap://{source.username}:{password}@{source.host}:{source.port}", target.username, "")],
    )
    refused = balf(config, "bascule", "plan", "-d", "33", str(in_uri))
    assert refused.exit_code == 2 and password not in refused.output

    secret_file = tmp_path / "secrets" / "sip"
    secret_file.parent.mkdir()
    secret_file.write_text(password + "\n", encoding="utf-8")
    secret_file.chmod(0o600)
    plan = write_plan(tmp_path, [("sip", uri, target.username, f"password_file={secret_file}")])
    caplog.set_level(logging.DEBUG)
    outputs = [balf(config, "bascule", "plan", "-d", "33", str(plan)).output]
    ran = balf(config, "bascule", "run", "-d", "33")
    assert ran.exit_code == 0 and "2 copiés" in ran.output, ran.output
    outputs.append(ran.output)
    outputs.append(balf(config, "bascule", "verify", "-d", "33", "-o", str(tmp_path / "r")).output)
    # a wrong password from the environment: the error says so without repeating it
    wrong = f"Wrong-{secrets.token_hex(8)}"
    other = write_plan(
        tmp_path,
        [
            ("sip", uri, target.username, f"password_file={secret_file}"),
            ("bad", uri, target.username + "x", "password_env=BAD_PW"),
        ],
    )
    outputs.append(balf(config, "bascule", "plan", "-d", "33", str(other)).output)
    failed = balf(config, "bascule", "run", "-d", "33", "-m", "bad", env={"BAD_PW": wrong})
    assert failed.exit_code == 1
    outputs.append(failed.output)
    for args in (
        ("status",),
        ("status", "--json"),
        ("report", "-d", "33"),
        ("report", "-d", "33", "--format", "csv"),
        ("report", "-d", "33", "--format", "json"),
    ):
        outputs.append(balf(config, "bascule", *args).output)
    outputs.extend(p.read_text("utf-8-sig") for p in (tmp_path / "r").iterdir())
    outputs.extend(r.getMessage() for r in caplog.records)
    for text in outputs:
        assert password not in text and wrong not in text

    async def stored() -> list[str]:
        engine = create_engine(db_url)
        try:
            async with session_factory(engine)() as session:
                jobs = (await session.scalars(select(BasculeJob))).all()
                issues = (await session.scalars(select(BasculeIssue))).all()
                return [json.dumps(j.options) + j.source + (j.last_error or "") for j in jobs] + [
                    i.item + i.detail for i in issues
                ]
        finally:
            await engine.dispose()

    import asyncio

    rows = asyncio.run(stored())
    assert rows and not any(password in r or wrong in r for r in rows)
