"""Keyed reply tokens and Message-IDs (no I/O).

A thread's reply address is ``<balf local part>+<thread id>-<mac>@<domain>``; the MAC is an
HMAC-SHA256 of the thread id under the gateway secret, truncated to 80 bits and written in
lower-case base32 (local parts are often case-folded on the way back). It is checked before any
database lookup, so a guessed or edited token is an unknown recipient (550 5.1.1).

balf's own outgoing Message-IDs carry the thread id and a MAC of it the same way, so an
In-Reply-To/References naming one can be trusted to name that thread: a forged References header
cannot point a message at another usager's thread without the secret.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets

MAC_CHARS = 16  # 80 bits
_TOKEN = re.compile(r"^(?P<thread>[1-9][0-9]{0,17})-(?P<mac>[a-z2-7]{16})$")
_MSGID = re.compile(r"^<?(?P<nonce>[a-z2-7]{8,32})\.(?P<thread>[1-9][0-9]{0,17})\."
                    r"(?P<mac>[a-z2-7]{16})@(?P<domain>[^>]+)>?$")


def _mac(secret: bytes, purpose: str, *parts: str) -> str:
    digest = hmac.new(secret, "\0".join((purpose, *parts)).encode(), hashlib.sha256).digest()
    return base64.b32encode(digest).decode("ascii").lower()[:MAC_CHARS]


def reply_token(secret: bytes, thread_id: int) -> str:
    return f"{thread_id}-{_mac(secret, 'reply', str(thread_id))}"


def reply_address(secret: bytes, local_part: str, domain: str, thread_id: int) -> str:
    """The address a usager answers to so that the answer joins ``thread_id``."""
    return f"{local_part}+{reply_token(secret, thread_id)}@{domain}"


def check_token(secret: bytes, token: str) -> int | None:
    """The thread id a token names, or None when it is malformed or its MAC is wrong."""
    m = _TOKEN.match(token.lower())
    if not m:
        return None
    expected = _mac(secret, "reply", m["thread"])
    return int(m["thread"]) if hmac.compare_digest(expected, m["mac"]) else None


def split_address(address: str) -> tuple[str, str | None, str]:
    """(local part without the +detail, the detail or None, domain), lower-cased."""
    address = address.strip().strip("<>").lower()
    local, _, domain = address.rpartition("@")
    if not local:
        return address, None, ""
    base, plus, detail = local.partition("+")
    return base, (detail if plus else None), domain


def make_message_id(secret: bytes, domain: str, thread_id: int, nonce: str | None = None) -> str:
    """A Message-ID for a message balf sends in ``thread_id``: <nonce.thread.mac@domain>."""
    nonce = nonce or base64.b32encode(secrets.token_bytes(10)).decode("ascii").lower()
    return f"<{nonce}.{thread_id}.{_mac(secret, 'msgid', str(thread_id), nonce)}@{domain}>"


def thread_of_message_id(secret: bytes, message_id: str) -> int | None:
    """The thread a balf Message-ID names, if it is one of ours and its MAC checks."""
    m = _MSGID.match(message_id.strip().lower())
    if not m:
        return None
    expected = _mac(secret, "msgid", m["thread"], m["nonce"])
    return int(m["thread"]) if hmac.compare_digest(expected, m["mac"]) else None


def new_spool_id() -> str:
    """A spool id: sortable by time (so listings read in arrival order), unique, file-name safe."""
    import time

    return f"{time.time_ns():x}{secrets.token_hex(5)}".upper()
