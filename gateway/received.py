"""The Received trace header balf prepends (no I/O), RFC 5321 4.4 with RFC 3848 protocol names.

It names the spool id (``id``, like Postfix's queue id), which the worker searches for before
re-APPENDing after a crash: the copy already in the mailbox is found instead of duplicated.
"""

from __future__ import annotations

import email.utils

from balf.gateway.model import Envelope


def received_header(envelope: Envelope, hostname: str, recipient: str | None = None) -> bytes:
    helo = _clean(envelope.helo) or "unknown"
    peer = _clean(envelope.peer) or "unknown"
    when = email.utils.format_datetime(envelope.arrived_at)
    for_clause = f"\r\n\tfor <{_clean(recipient)}>" if recipient else ""
    text = (f"Received: from {helo} ({peer})\r\n\tby {_clean(hostname)} (balf) "
            f"with {envelope.protocol} id {envelope.spool_id}{for_clause};\r\n\t{when}\r\n")
    return text.encode("utf-8")


def _clean(value: str) -> str:
    # Nothing the client typed may break the header's structure.
    return "".join(c for c in value if c.isprintable() and c not in "\r\n;()")[:200]
