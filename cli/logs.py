"""Structured logging for the daemon and the CLI (configures the stdlib logging at the edge).

One event per line (logfmt): a timestamp, the level, the logger, then ``event=NAME`` and
key=value pairs. Code logs ``log.info("event=smtp.accepted spool_id=%s size=%d", ...)``, so
that every line about a message carries its ids, or passes fields in ``extra=``; a free-text
message is written as ``msg="..."``. Extra fields named like secrets are never written.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from typing import Any

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
_SECRET_WORDS = ("password", "secret", "token_key", "authorization")


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = {}
    for key, value in vars(record).items():
        if key in _STANDARD or key.startswith("_"):
            continue
        fields[key] = "***" if any(w in key.lower() for w in _SECRET_WORDS) else value
    return fields


def _timestamp(record: logging.LogRecord) -> str:
    return dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds")


def _quote(value: Any) -> str:
    text = str(value)
    if text and not any(c in text for c in ' "=\n\t\\'):
        return text
    return json.dumps(text, ensure_ascii=False)


class KeyValueFormatter(logging.Formatter):
    """``2026-11-25T10:00:00.000+00:00 INFO balf.gateway.smtp event=smtp.accepted spool_id=...``"""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if not message.startswith("event=") or "\n" in message:
            message = f"msg={_quote(message)}"
        parts = [_timestamp(record), record.levelname, record.name, message]
        parts += [f"{k}={_quote(v)}" for k, v in _fields(record).items()]
        if record.exc_info:
            parts.append(f"error={_quote(self.formatException(record.exc_info))}")
        return " ".join(parts)


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        data = {"time": _timestamp(record), "level": record.levelname, "logger": record.name,
                "message": record.getMessage(), **_fields(record)}
        if record.exc_info:
            data["error"] = self.formatException(record.exc_info)
        return json.dumps(data, ensure_ascii=False, default=str)


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Send balf's log lines to stderr (journald keeps them under systemd)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("balf").setLevel(level)
    # Library chatter (aiosmtpd logs every command at INFO) stays at WARNING.
    for noisy in ("mail.log", "aioimaplib", "aiosqlite", "sqlalchemy", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
