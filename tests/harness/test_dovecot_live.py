"""Live tests of the private Dovecot harness (I/O): what balf and Thunderbird need from it."""

from __future__ import annotations

import re
import smtplib
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path

import imapclient
import pytest
from imapclient.exceptions import IMAPClientError, LoginError
from imapclient.imapclient import SENT, TRASH

from tests.harness.apt import AptError, ensure_package
from tests.harness.dovecot import SPECIAL_USE, Account, Dovecot, DovecotError
from tests.harness.ports import free_port, port_is_open

pytestmark = pytest.mark.live

MESSAGE = (
    b"From: Usager <usager@example.org>\r\n"
    b"To: sip.75001@dgfip.test\r\n"
    b"Subject: =?utf-8?q?R=C3=A9clamation_taxe_fonci=C3=A8re?=\r\n"
    b"Message-ID: <harness-1@example.org>\r\n"
    b"Date: Thu, 03 Dec 2015 10:15:00 +0100\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"Bonjour, voici ma r\xc3\xa9clamation.   \r\n"
    b"\r\n"
    b"Cordialement\r\n"
)


@contextmanager
def logged_in(account: Account, *, master: bool = False) -> Iterator[imapclient.IMAPClient]:
    client = imapclient.IMAPClient(account.host, account.port, ssl=False, timeout=10)
    if master:
        client.login(account.master_login, account.master_password)
    else:
        client.login(account.username, account.password)
    try:
        yield client
    finally:
        client.logout()


def thunderbird_list(client: imapclient.IMAPClient) -> dict[str, set[bytes]]:
    """Folders and flags as Thunderbird asks for them: subscribed ones, with special use."""
    imap = client._imap
    typ, data = imap._simple_command("LIST", "(SUBSCRIBED)", '""', '"*"', "RETURN", "(SPECIAL-USE)")
    assert typ == "OK"
    _, lines = imap._untagged_response(typ, data, "LIST")
    return {name: set(flags) for flags, _, name in client._proc_folder_list(lines)}


def inbox_messages(account: Account) -> list[bytes]:
    with logged_in(account) as client:
        client.select_folder("INBOX", readonly=True)
        fetched = client.fetch(client.search(), ["BODY.PEEK[]"])
        return [data[b"BODY[]"] for _, data in sorted(fetched.items())]


def test_user_and_master_log_in_to_the_same_mailbox(imap_account: Account) -> None:
    with logged_in(imap_account, master=True) as client:
        client.append("INBOX", MESSAGE)
    assert inbox_messages(imap_account) == [MESSAGE]


def test_wrong_master_password_is_refused(dovecot: Dovecot, imap_account: Account) -> None:
    client = imapclient.IMAPClient(dovecot.host, dovecot.imap_port, ssl=False, timeout=10)
    with pytest.raises(LoginError):
        client.login(imap_account.master_login, "not-the-master-password")
    client.shutdown()


def test_special_use_folders_are_french_and_subscribed(imap_account: Account) -> None:
    with logged_in(imap_account) as client:
        folders = thunderbird_list(client)
        assert client.find_special_folder(SENT) == "Envoyés"
        assert client.find_special_folder(TRASH) == "Corbeille"
        assert client.list_folders()[0][1] == b"/"
    for name, flag in SPECIAL_USE:
        assert flag.encode() in folders[name], (name, folders)
    assert "INBOX" in folders


def test_append_keeps_bytes_flags_and_internaldate(imap_account: Account) -> None:
    when = datetime(2015, 12, 3, 10, 15, 7, tzinfo=timezone(timedelta(hours=1)))
    flags = (b"\\Seen", b"\\Flagged", b"$label1")
    with logged_in(imap_account) as client:
        client.normalise_times = False
        reply = client.append("Archives", MESSAGE, flags=flags, msg_time=when)
        match = re.search(rb"\[APPENDUID (\d+) (\d+)\]", reply)
        assert match, reply  # RFC 4315 UIDPLUS
        client.select_folder("Archives")
        uid = int(match.group(2))
        data = client.fetch([uid], ["BODY.PEEK[]", "INTERNALDATE", "FLAGS"])[uid]
    assert data[b"BODY[]"] == MESSAGE
    assert data[b"INTERNALDATE"] == when
    assert set(flags) <= set(data[b"FLAGS"])


def test_accented_folder_is_created_subscribed_and_stored_in_utf7(
    dovecot: Dovecot, imap_account: Account
) -> None:
    with logged_in(imap_account) as client:
        client.create_folder("Réclamations/2026")
        client.subscribe_folder("Réclamations/2026")
        subscribed = [name for _, _, name in client.list_sub_folders()]
        listed = [name for _, _, name in client.list_folders()]
    assert "Réclamations/2026" in subscribed
    assert "Réclamations" in listed
    # RFC 3501 5.1.3 modified UTF-7 on disk, "/" as directories (LAYOUT=fs)
    assert (dovecot.maildir(imap_account.username) / "R&AOk-clamations" / "2026").is_dir()


def test_lmtp_delivers_to_inbox_with_or_without_domain(
    dovecot: Dovecot, imap_account: Account
) -> None:
    with smtplib.LMTP(dovecot.host, dovecot.lmtp_port) as lmtp:
        lmtp.sendmail("usager@example.org", [f"{imap_account.username}@dgfip.test"], MESSAGE)
        lmtp.sendmail("usager@example.org", [imap_account.username], MESSAGE)
    delivered = inbox_messages(imap_account)
    assert len(delivered) == 2
    assert all(body.endswith(MESSAGE) for body in delivered)  # after Return-Path/Delivered-To
    assert len(list((dovecot.maildir(imap_account.username) / "new").iterdir())) == 2


def test_lmtp_refuses_unknown_recipient(dovecot: Dovecot) -> None:
    with smtplib.LMTP(dovecot.host, dovecot.lmtp_port) as lmtp:
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            lmtp.sendmail("usager@example.org", ["nobody-here@dgfip.test"], MESSAGE)


def test_stop_closes_the_port_and_start_keeps_the_mail(fresh_dovecot: Dovecot) -> None:
    account = fresh_dovecot.add_user("sip.75001")
    with logged_in(account) as client:
        client.append("INBOX", MESSAGE)
    fresh_dovecot.stop()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((fresh_dovecot.host, fresh_dovecot.imap_port), timeout=2)
    fresh_dovecot.start()
    assert inbox_messages(account) == [MESSAGE]
    fresh_dovecot.restart()
    assert inbox_messages(account) == [MESSAGE]


@pytest.mark.parametrize("end", ["stop", "kill"])
def test_stop_and_kill_drop_open_sessions(fresh_dovecot: Dovecot, end: str) -> None:
    account = fresh_dovecot.add_user("agent")
    client = imapclient.IMAPClient(account.host, account.port, ssl=False, timeout=10)
    client.login(account.username, account.password)
    client.select_folder("INBOX")
    getattr(fresh_dovecot, end)()
    assert not fresh_dovecot.running
    with pytest.raises((IMAPClientError, OSError)):
        client.noop()
    fresh_dovecot.start()
    with logged_in(account) as again:
        assert again.select_folder("INBOX")[b"EXISTS"] == 0


def test_quota_is_reported_and_enforced(dovecot: Dovecot) -> None:
    account = dovecot.add_user("quota-user", quota_bytes=2 * 1024 * 1024)
    with logged_in(account) as client:
        roots, quotas = client.get_quota_root("INBOX")
        assert roots.quota_roots and quotas[0].resource == "STORAGE"
        assert (quotas[0].usage, quotas[0].limit) == (0, 2048)  # KiB, RFC 2087
        with pytest.raises(IMAPClientError, match="OVERQUOTA|quota"):
            client.append("INBOX", MESSAGE + b"x" * (3 * 1024 * 1024) + b"\r\n")


def test_default_quota_is_unlimited(imap_account: Account) -> None:
    # Raw: imapclient 3's get_quota_root() raises IndexError when no QUOTA line comes back.
    with logged_in(imap_account) as client:
        typ, data = client._imap._simple_command("GETQUOTAROOT", "INBOX")
        assert (typ, client._imap.untagged_responses.pop("QUOTA", None)) == ("OK", None)
        assert data[-1].startswith(b"No quota")


def test_added_users_and_new_passwords_are_live_at_once(dovecot: Dovecot) -> None:
    accounts = [dovecot.add_user(f"live-{n}", password=f"pass-{n}") for n in range(3)]
    for account in accounts:
        with logged_in(account):
            pass
    changed = dovecot.add_user("live-0", password="pass-9")  # same size, same second
    with logged_in(changed):
        pass
    with pytest.raises(LoginError):
        with logged_in(accounts[0]):
            pass


def test_doveadm_addresses_the_private_instance(dovecot: Dovecot, imap_account: Account) -> None:
    listed = dovecot.doveadm("mailbox", "list", "-u", imap_account.username).split()
    assert {"INBOX", "Envoyés", "Corbeille"} <= set(listed)


def test_start_failure_names_the_cause() -> None:
    with tempfile.TemporaryDirectory() as root, socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        server = Dovecot(Path(root), imap_port=port, lmtp_port=free_port())
        with pytest.raises(DovecotError, match="Address already in use"):
            server.start()
        assert not server.running
        assert not port_is_open(server.lmtp_port)


def test_unreachable_root_is_refused(tmp_path: Path) -> None:
    # pytest's basetemp is 0700: the mail uid could not reach a Maildir there.
    with pytest.raises(DovecotError, match="not searchable"):
        Dovecot(tmp_path).start()


def test_bad_usernames_are_refused(dovecot: Dovecot) -> None:
    for name in ("", "a:b", "a b", "a*balf", "a/b"):
        with pytest.raises(ValueError):
            dovecot.add_user(name)


def test_benchmarks_can_open_many_sessions_per_user(imap_account: Account) -> None:
    clients = []
    try:
        for _ in range(40):  # Dovecot's default mail_max_userip_connections is 10
            client = imapclient.IMAPClient(imap_account.host, imap_account.port, ssl=False)
            client.login(imap_account.username, imap_account.password)
            clients.append(client)
        assert all(client.noop() for client in clients)
    finally:
        for client in clients:
            client.logout()


def test_users_can_be_added_before_start() -> None:
    with tempfile.TemporaryDirectory() as root:
        server = Dovecot(Path(root))
        account = server.add_user("Early.Bird", password="early")
        with server:
            with logged_in(account):
                pass
        assert server.maildir("Early.Bird") == Path(root) / "mail" / "early.bird" / "Maildir"


def test_apt_finds_installed_binaries_and_refuses_without_root(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert ensure_package("dovecot-core", "dovecot").endswith("/dovecot")
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    with pytest.raises(AptError, match="needs root.*apt-get install -y balf-no-such-package"):
        ensure_package("balf-no-such-package", "balf-no-such-binary")
