"""Named SMTP replies with RFC 3463 enhanced status codes (no I/O).

Every reply balf writes comes from here, so the wording and codes are reviewed in one place.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from types import SimpleNamespace


@dataclass(frozen=True)
class Reply:
    code: int
    enhanced: str
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"

    def with_text(self, text: str) -> Reply:
        return Reply(self.code, self.enhanced, text)

    @property
    def permanent(self) -> bool:
        return self.code >= 500


replies = SimpleNamespace(
    OK=Reply(250, "2.0.0", "OK"),
    SENDER_OK=Reply(250, "2.1.0", "Sender OK"),
    RECIPIENT_OK=Reply(250, "2.1.5", "Recipient OK"),
    QUEUED=Reply(250, "2.0.0", "Ok: queued as {id}"),
    TOO_MANY_CONNECTIONS=Reply(421, "4.7.0", "{host} Too many connections, try again later"),
    SHUTTING_DOWN=Reply(421, "4.3.2", "{host} Service shutting down, try again later"),
    TEMPORARY_LOCAL_ERROR=Reply(451, "4.3.0", "Temporary local problem, try again later"),
    SPOOL_UNAVAILABLE=Reply(451, "4.3.0", "Cannot store the message now, try again later"),
    DIRECTORY_UNAVAILABLE=Reply(451, "4.3.0", "Recipient directory unavailable, try again later"),
    TOO_MANY_RECIPIENTS=Reply(452, "4.5.3", "Too many recipients"),
    UNKNOWN_RECIPIENT=Reply(550, "5.1.1", "Recipient address rejected: user unknown"),
    BAD_RECIPIENT_SYNTAX=Reply(501, "5.1.3", "Bad recipient address syntax"),
    SENDER_PATH_TOO_LONG=Reply(501, "5.1.7", "Path too long (RFC 5321 4.5.3.1.3)"),
    RECIPIENT_PATH_TOO_LONG=Reply(501, "5.1.3", "Path too long (RFC 5321 4.5.3.1.3)"),
    BARE_NEWLINE=Reply(550, "5.5.2", "Message contains bare CR or LF; lines must end with CRLF (RFC 5321 2.3.8)"),
    NUL_BYTES=Reply(550, "5.6.0", "Message contains NUL characters"),
    EMPTY_MESSAGE=Reply(550, "5.6.0", "Message has no header section"),
    MESSAGE_TOO_BIG=Reply(552, "5.3.4", "Message size exceeds fixed maximum message size"),
    LINE_TOO_LONG=Reply(500, "5.5.2", "Line too long (RFC 5321 4.5.3.1.6)"),
    TRANSACTION_FAILED=Reply(554, "5.0.0", "Transaction failed"),
)

# Replies aiosmtpd writes by itself, without enhanced codes: the RFC 3463 code to add.
# Matched on the start of the text after the 3-digit code.
_LIBRARY_CODES: tuple[tuple[str, str, str], ...] = (
    ("250", "OK", "2.0.0"),
    ("250", "", "2.0.0"),
    ("221", "", "2.0.0"),
    ("251", "", "2.1.5"),
    ("252", "", "2.5.0"),
    ("220", "Ready to start TLS", "2.0.0"),
    ("500", "Line too long", "5.5.2"),
    ("500", "Command line too long", "5.5.2"),
    ("500", "Error: strict ASCII", "5.6.7"),
    ("500", "", "5.5.2"),
    ("501", "", "5.5.4"),
    ("502", "", "5.5.1"),
    ("503", "", "5.5.1"),
    ("504", "", "5.5.4"),
    ("530", "", "5.7.0"),
    ("552", "", "5.3.4"),
    ("553", "", "5.1.7"),
    ("554", "", "5.0.0"),
    ("555", "", "5.5.4"),
    ("421", "", "4.4.2"),
    ("451", "", "4.3.0"),
    ("454", "", "4.7.0"),
)

_HAS_ENHANCED = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}( |$)")


def add_enhanced_code(line: str) -> str:
    """Give a library reply line an RFC 3463 enhanced code, unless it has one or must not.

    RFC 2034 3: the greeting and the replies to HELO/EHLO carry none (the caller skips those),
    nor do 3xx intermediate replies.
    """
    if len(line) < 3 or not line[:3].isdigit() or _HAS_ENHANCED.match(line) or line[0] == "3":
        return line
    code, sep, text = line[:3], line[3:4] or " ", line[4:]
    if "Too much mail data" in text or "message size exceeds" in text:
        return f"{code}{sep}5.3.4 Message size exceeds fixed maximum message size"
    for lib_code, prefix, enhanced in _LIBRARY_CODES:
        if code == lib_code and text.startswith(prefix):
            return f"{code}{sep}{enhanced} {text}"
    return f"{code}{sep}{code[0]}.0.0 {text}"
