"""Pure gateway logic, from literal bytes (no I/O)."""

from __future__ import annotations

import datetime as dt

import pytest

from balf.gateway import tokens
from balf.gateway.acknowledgement import decide_acknowledgement, render_acknowledgement
from balf.gateway.errors import PermanentFailure, RejectedContent, UnknownRecipient
from balf.gateway.model import (
    Candidates,
    Envelope,
    JoinThread,
    OpenThread,
    Rule,
    ServiceRef,
    ThreadFacts,
)
from balf.gateway.parse import check_data, parse_mail
from balf.gateway.received import received_header
from balf.gateway.replies import add_enhanced_code, replies
from balf.gateway.services import ServiceTable, resolve_recipient, resolve_recipients
from balf.gateway.spool import decode_entry, encode_entry
from balf.gateway.threads import match_thread, subject_references

SECRET = b"k" * 32
ARRIVED = dt.datetime(2026, 11, 25, 9, 30, tzinfo=dt.UTC)
SIP = ServiceRef(1, "SIP75001", "SIP Paris 1er", "sip75001", True, "sip.paris1@balf.test")
SIE = ServiceRef(2, "SIE75002", "SIE Paris 2e", "sie75002", True, "sie.paris2@balf.test")
TABLE = ServiceTable({"sip.paris1@balf.test": SIP, "accueil.paris1@balf.test": SIP,
                      "sie.paris2@balf.test": SIE})


def envelope(mail_from: str = "jean@exemple.fr", rcpts: tuple[str, ...] = ("sip.paris1@balf.test",)) -> Envelope:
    return Envelope("S1", mail_from, rcpts, ARRIVED, "[127.0.0.1]:1234", "client.exemple.fr")


def mail(headers: str, body: str = "Bonjour\r\n", **env: object):  # type: ignore[no-untyped-def]
    raw = (headers.strip().replace("\n", "\r\n") + "\r\n\r\n" + body).encode()
    return parse_mail(raw, envelope(**env))  # type: ignore[arg-type]


# --- tokens -----------------------------------------------------------------------------------

def test_reply_token_round_trip_and_forgery() -> None:
    address = tokens.reply_address(SECRET, "sip.paris1", "balf.test", 42)
    base, detail, domain = tokens.split_address(address)
    assert (base, domain) == ("sip.paris1", "balf.test")
    assert tokens.check_token(SECRET, detail or "") == 42
    assert tokens.check_token(SECRET, (detail or "").upper()) == 42  # case-folded on the way back
    assert tokens.check_token(b"other" * 8, detail or "") is None
    forged = (detail or "").replace("42-", "43-")
    assert tokens.check_token(SECRET, forged) is None
    assert tokens.check_token(SECRET, "42") is None


def test_keyed_message_id() -> None:
    mid = tokens.make_message_id(SECRET, "balf.test", 7)
    assert tokens.thread_of_message_id(SECRET, mid) == 7
    assert tokens.thread_of_message_id(SECRET, mid.replace(".7.", ".8.")) is None
    assert tokens.thread_of_message_id(SECRET, "<abc@exemple.fr>") is None


def test_spool_ids_sort_by_time() -> None:
    a, b = tokens.new_spool_id(), tokens.new_spool_id()
    assert a < b and len(a) >= 20


# --- recipients ---------------------------------------------------------------------------------

def test_resolve_recipient() -> None:
    assert resolve_recipient("SIP.Paris1@balf.test", TABLE, SECRET).service == SIP
    reply = tokens.reply_address(SECRET, "sip.paris1", "balf.test", 9)
    assert resolve_recipient(reply, TABLE, SECRET).token_thread_id == 9
    with pytest.raises(UnknownRecipient):
        resolve_recipient("nobody@balf.test", TABLE, SECRET)
    with pytest.raises(UnknownRecipient):
        resolve_recipient("sip.paris1+9-aaaaaaaaaaaaaaaa@balf.test", TABLE, SECRET)


def test_one_copy_per_service() -> None:
    targets = resolve_recipients(("sip.paris1@balf.test", "accueil.paris1@balf.test",
                                  "sie.paris2@balf.test", "ghost@balf.test"), TABLE, SECRET)
    assert [t.service.id for t in targets] == [1, 2]


# --- DATA checks: smuggling and bad bytes -------------------------------------------------------

GOOD = b"From: a@b.fr\r\nSubject: x\r\n\r\nbody\r\n"


@pytest.mark.parametrize("payload", [
    b"From: a@b.fr\r\n\r\nhello\n.\nMAIL FROM:<x@y>\r\n",      # \n.\n
    b"From: a@b.fr\r\n\r\nhello\r\n.\nMAIL FROM:<x@y>\r\n",    # \r\n.\n
    b"From: a@b.fr\r\n\r\nhello\n.\r\nMAIL FROM:<x@y>\r\n",    # \n.\r\n
    b"From: a@b.fr\r\n\r\nhello\r.\r\nMAIL FROM:<x@y>\r\n",    # \r.\r\n
    b"From: a@b.fr\r\n\r\nhello\r\n.\rMAIL FROM:<x@y>\r\n",    # \r\n.\r
    b"From: a@b.fr\nSubject: bare\n\nbody\n",
])
def test_bare_newlines_refused(payload: bytes) -> None:
    with pytest.raises(RejectedContent) as info:
        check_data(payload)
    assert info.value.reply == replies.BARE_NEWLINE


def test_nul_and_empty_refused() -> None:
    with pytest.raises(RejectedContent) as info:
        check_data(b"From: a@b.fr\r\n\r\nx\0y\r\n")
    assert info.value.reply.enhanced == "5.6.0"
    with pytest.raises(RejectedContent):
        check_data(b"\r\n")
    check_data(GOOD)


# --- parsing ------------------------------------------------------------------------------------

def test_parse_keeps_bytes_and_reads_headers() -> None:
    m = mail("""
From: =?utf-8?q?Fran=C3=A7oise_Dupr=C3=A9?= <francoise@exemple.fr>
Subject: =?utf-8?q?R=C3=A9clamation?= [EC-2026-000123]
Message-ID: <m1@exemple.fr>
In-Reply-To: <a@x>
References: <r1@x> <a@x>
Date: Tue, 24 Nov 2026 10:00:00 +0100
Auto-Submitted: auto-replied; by=x
""")
    assert m.sender and m.sender.name == "Françoise Dupré" and m.sender_key == "francoise@exemple.fr"
    assert m.subject == "Réclamation [EC-2026-000123]"
    assert m.message_id == "<m1@exemple.fr>" and m.references == ("<r1@x>", "<a@x>")
    assert m.auto_submitted == "auto-replied"
    assert m.date == dt.datetime(2026, 11, 24, 9, 0, tzinfo=dt.UTC)
    assert m.raw.startswith(b"From: =?utf-8?q?Fran")


@pytest.mark.parametrize("raw", [
    b"Subject: caf\xc3\xa9 \xe9t\xe9\r\nFrom: \xff\xfe <x@y.fr>\r\n\r\nbody\r\n",   # raw 8-bit
    b"Content-Type: multipart/mixed; boundary=\"nope\"\r\n\r\n--other\r\nbroken",   # bad MIME
    b"Subject: =?bogus-charset?q?x?=\r\nDate: not a date\r\nFrom: <<>>\r\n\r\n",     # bad words
    b"no header section at all, just text\r\n",
    b"X: " + b"a" * 20000 + b"\r\n\r\n",
])
def test_parse_never_raises(raw: bytes) -> None:
    m = parse_mail(raw, envelope())
    assert m.raw == raw
    assert m.sender_key  # falls back to the envelope sender


def test_eight_bit_subject_decoded() -> None:
    m = parse_mail("Subject: Réclamation taxe foncière\r\n\r\nx\r\n".encode(), envelope())
    assert m.subject == "Réclamation taxe foncière"


# --- threads ------------------------------------------------------------------------------------

def thread(id: int, usager: str | None = "jean@exemple.fr", service_id: int = 1) -> ThreadFacts:
    return ThreadFacts(id, f"EC-2026-{id:06d}", service_id, usager)


def test_subject_tags() -> None:
    assert subject_references("Re: [ec-2026-000123] et [EC-2026-000124] [EC-2026-000123]") == (
        "EC-2026-000123", "EC-2026-000124")
    assert subject_references("EC-2026-000123 sans crochets") == ()


def test_rule_1_token_joins() -> None:
    m = mail("From: other@exemple.fr\nSubject: x")
    d = match_thread(m, SIP, Candidates(by_token=thread(5)))
    assert d == JoinThread(thread(5), Rule.TOKEN)


def test_rule_2_subject_tag_joins_only_for_the_usager() -> None:
    m = mail("From: Jean <JEAN@exemple.fr>\nSubject: Re: [EC-2026-000005]")
    assert match_thread(m, SIP, Candidates(by_reference=(thread(5),))) == JoinThread(thread(5), Rule.SUBJECT_TAG)
    other = mail("From: intrus@exemple.fr\nSubject: Re: [EC-2026-000005]")
    d = match_thread(other, SIP, Candidates(by_reference=(thread(5),)))
    assert isinstance(d, OpenThread) and d.related_reference == "EC-2026-000005"
    elsewhere = match_thread(m, SIP, Candidates(by_reference=(thread(5, service_id=2),)))
    assert isinstance(elsewhere, OpenThread) and "another service" in elsewhere.reason


def test_rule_3_references_join_only_for_the_usager() -> None:
    m = mail("From: jean@exemple.fr\nReferences: <a@x>")
    assert match_thread(m, SIP, Candidates(by_message_id=(thread(6),))) == JoinThread(thread(6), Rule.REFERENCES)
    forged = mail("From: intrus@exemple.fr\nReferences: <a@x>")
    d = match_thread(forged, SIP, Candidates(by_message_id=(thread(6),)))
    assert isinstance(d, OpenThread) and d.related_reference == "EC-2026-000006"


def test_rule_order_and_new_thread() -> None:
    m = mail("From: jean@exemple.fr\nSubject: [EC-2026-000005]")
    both = Candidates(by_reference=(thread(5),), by_message_id=(thread(6),))
    assert match_thread(m, SIP, both).thread.id == 5  # type: ignore[union-attr]
    assert match_thread(m, SIP, Candidates()) == OpenThread(Rule.NEW, None, "")


# --- acknowledgements (RFC 3834) ----------------------------------------------------------------

@pytest.mark.parametrize("headers, mail_from, sent, expected", [
    ("From: jean@exemple.fr", "jean@exemple.fr", 0, "ok"),
    ("From: jean@exemple.fr", "", 0, "null reverse-path"),
    ("From: jean@exemple.fr\nAuto-Submitted: auto-replied", "jean@exemple.fr", 0, "Auto-Submitted"),
    ("From: jean@exemple.fr\nAuto-Submitted: no", "jean@exemple.fr", 0, "ok"),
    ("From: jean@exemple.fr\nPrecedence: bulk", "jean@exemple.fr", 0, "Precedence"),
    ("From: jean@exemple.fr\nList-Id: <l.exemple.fr>", "jean@exemple.fr", 0, "mailing list"),
    ("From: jean@exemple.fr\nX-Auto-Response-Suppress: All", "jean@exemple.fr", 0, "suppressed"),
    ("From: x@exemple.fr", "MAILER-DAEMON@exemple.fr", 0, "system sender"),
    ("From: x@exemple.fr", "liste-request@exemple.fr", 0, "system sender"),
    ("From: x@balf.test", "agent@balf.test", 0, "own domain"),
    ("From: jean@exemple.fr", "jean@exemple.fr", 3, "already 3"),
])
def test_acknowledgement_decision(headers: str, mail_from: str, sent: int, expected: str) -> None:
    m = mail(headers, mail_from=mail_from)
    d = decide_acknowledgement(m, SIP, enabled=True, sent_today=sent, per_day=3, own_domain="balf.test")
    assert expected in d.reason and d.send == (expected == "ok")


def test_acknowledgement_off_per_service() -> None:
    m = mail("From: jean@exemple.fr")
    off = ServiceRef(3, "X", "X", "x", acknowledge=False, address="x@balf.test")
    assert not decide_acknowledgement(m, off, enabled=True, sent_today=0, per_day=3, own_domain="balf.test").send


def test_acknowledgement_message() -> None:
    m = mail("From: jean@exemple.fr\nSubject: Ma taxe\nMessage-ID: <q@exemple.fr>")
    reply_to = tokens.reply_address(SECRET, "sip.paris1", "balf.test", 3)
    raw = render_acknowledgement(m, SIP, reference="EC-2026-000003", reply_to=reply_to,
                                 message_id=tokens.make_message_id(SECRET, "balf.test", 3),
                                 portal_url="https://portail.test/", now=ARRIVED)
    ack = parse_mail(raw, envelope())
    assert ack.auto_submitted == "auto-replied"
    assert ack.in_reply_to == ("<q@exemple.fr>",)
    assert "[EC-2026-000003]" in ack.subject and "Accusé de réception" in ack.subject
    assert b"Reply-To: sip.paris1+3-" in raw
    import email
    body = email.message_from_bytes(raw, policy=email.policy.default).get_content()
    assert "EC-2026-000003" in body and "messagerie sécurisée" in body and "https://portail.test/" in body


# --- replies, Received, spool encoding ----------------------------------------------------------

@pytest.mark.parametrize("line, expected", [
    ("250 OK", "250 2.0.0 OK"),
    ("503 Error: need RCPT command", "503 5.5.1 Error: need RCPT command"),
    ("552 Error: Too much mail data", "552 5.3.4 Message size exceeds fixed maximum message size"),
    ("500 Line too long (see RFC5321 4.5.3.1.6)", "500 5.5.2 Line too long (see RFC5321 4.5.3.1.6)"),
    ("354 End data with <CR><LF>.<CR><LF>", "354 End data with <CR><LF>.<CR><LF>"),
    ("550 5.1.1 Recipient address rejected: user unknown", "550 5.1.1 Recipient address rejected: user unknown"),
])
def test_enhanced_codes_added(line: str, expected: str) -> None:
    assert add_enhanced_code(line) == expected


def test_received_header_names_spool_id_and_cannot_be_broken() -> None:
    env = Envelope("ABC123", "x@y", ("r@balf.test",), ARRIVED, "[10.0.0.1]:5", "evil\r\nX-Injected: 1")
    header = received_header(env, "mx.balf.test", "r@balf.test")
    assert b"id ABC123" in header and b"X-Injected:" not in header.replace(b"evilX-Injected: 1", b"")
    assert header.endswith(b"\r\n") and header.count(b"\r\n") == 4


def test_spool_entry_round_trip_and_corruption() -> None:
    env = envelope()
    data = encode_entry(env, GOOD, "0" * 64)
    with pytest.raises(PermanentFailure):
        decode_entry(data)  # sha256 does not match
    from balf.gateway.parse import sha256_of
    data = encode_entry(env, GOOD, sha256_of(GOOD))
    assert decode_entry(data).envelope == env
    with pytest.raises(PermanentFailure):
        decode_entry(data[:-3])


def test_imap_response_parsing() -> None:
    from balf.gateway.store import parse_appenduid, parse_search
    assert parse_appenduid([b"[APPENDUID 1795611630 7] Append completed."]) == (1795611630, 7)
    assert parse_appenduid([b"Append completed."]) == (None, None)
    assert parse_search([b"3 9", b"Search completed (0.001 + 0.000 secs)."]) == [3, 9]
    assert parse_search([b"SEARCH 4", b"Search completed."]) == [4]
    assert parse_search([b"Search completed."]) == []


def test_appenduid_uid_sets_and_multiappend_payload() -> None:
    """MULTIAPPEND's APPENDUID gives a uid-set in message order (RFC 4315 3); the payload sends
    the first literal synchronising and the others as LITERAL+ (RFC 7888)."""
    import datetime as dt

    from balf.gateway.store import Copy, multiappend_payload, parse_appenduid, parse_appenduid_set

    assert parse_appenduid_set([b"[APPENDUID 38505 3955:3957] APPEND completed"]) == (38505, [3955, 3956, 3957])
    assert parse_appenduid_set(["[APPENDUID 7 1,4:5]"]) == (7, [1, 4, 5])
    assert parse_appenduid([b"[APPENDUID 7 9:10] ok"]) == (7, 10)
    assert parse_appenduid_set([b"OK APPEND completed"]) == (None, [])
    when = dt.datetime(2026, 11, 25, 10, 0, tzinfo=dt.UTC)
    head, payload = multiappend_payload([Copy(b"A\r\n", when, "S1"), Copy(b"\xe9B\r\n", when, "S2")])
    assert head == 'INBOX "25-Nov-2026 10:00:00 +0000" {3}'
    assert payload == b'A\r\n "25-Nov-2026 10:00:00 +0000" {4+}\r\n\xe9B\r\n'
