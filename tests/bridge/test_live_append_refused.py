"""A NO to an APPEND is an error, never a copy, whichever way the message travels (live Dovecot).

imapclient's multiappend returns the server's NO instead of raising it: read as a success, the
message would have been recorded as copied and its checkpoint passed."""

from __future__ import annotations

import pytest

from balf.bridge.errors import QuotaExceeded
from balf.bridge.imap import ImapTarget
from balf.bridge.login import Login
from tests.bridge.helpers import fetch_all, new_user

pytestmark = pytest.mark.live


def _message(n: int, size: int) -> bytes:
    head = f"From: a@example.org\r\nSubject: gros {n}\r\nMessage-ID: <big-{n}@example.org>\r\n\r\n".encode()
    return head + (b"x" * 76 + b"\r\n") * (size // 78)


@pytest.mark.parametrize("count", [1, 2])
def test_an_append_over_quota_raises_with_multiappend(dovecot, count: int) -> None:
    account = new_user(dovecot, "noquota", quota_bytes=20_000)
    target = ImapTarget(Login(account.host, account.port, account.username, account.password))
    try:
        assert target.info().multiappend
        batch = [(_message(n, 30_000), ("\\Seen",), None) for n in range(count)]
        with pytest.raises(QuotaExceeded):
            target.append("INBOX", batch, multiappend=True)
        small = [(_message(9, 2_000), (), None)]
        assert target.append("INBOX", small, multiappend=True)  # a UID: the same path works below quota
    finally:
        target.close()
    assert [len(m.raw) > 1000 for m in fetch_all(account)["INBOX"]] == [True]
