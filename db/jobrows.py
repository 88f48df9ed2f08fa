"""The bascule's job rows read with the database's own driver, without SQLAlchemy (I/O: database).

For the quick rerun only (``balf.bridge.quickrun``): importing SQLAlchemy and mapping the models
costs most of a second, more than everything a rerun over an unchanged mailbox has to do. It
reads, never writes, and answers None whenever it cannot be sure it reads what the models
describe (another schema revision, a URL form it does not know, any database error): the caller
then takes the ordinary path, which handles and reports all of those.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from balf.db.revision import head_revision

log = logging.getLogger(__name__)

_COLUMNS = "id, department, mailbox, source, target_account, options, state, claimed_until, rerun_digest"
_SQLITE_JOBS = f"SELECT {_COLUMNS} FROM bascule_jobs WHERE department = ? ORDER BY department, mailbox"
_PG_JOBS = f"SELECT {_COLUMNS} FROM bascule_jobs WHERE department = $1 ORDER BY department, mailbox"
_VERSION = "SELECT version_num FROM alembic_version"


@dataclass(frozen=True)
class JobRow:
    id: int
    department: str
    mailbox: str
    source: str
    target_account: str
    options: dict[str, Any]
    state: str
    claimed_until: dt.datetime | None
    rerun_digest: str | None


def _when(value: Any) -> dt.datetime | None:
    """A stored time as an aware UTC datetime (SQLite keeps SQLAlchemy's naive UTC text)."""
    if value is None:
        return None
    when = value if isinstance(value, dt.datetime) else dt.datetime.fromisoformat(str(value))
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def _row(values: Any) -> JobRow:
    options = values[5]
    if isinstance(options, str):
        options = json.loads(options)
    if not isinstance(options, dict):
        raise ValueError("options is not a JSON object")
    return JobRow(
        int(values[0]),
        str(values[1]),
        str(values[2]),
        str(values[3]),
        str(values[4]),
        options,
        str(values[6]),
        _when(values[7]),
        values[8],
    )


def sqlite_path(url: str) -> Path | None:
    """The file of a ``sqlite[+driver]:///path`` URL; None for memory databases or query options (pure)."""
    scheme, sep, rest = url.partition(":///")
    if not sep or not scheme.startswith("sqlite") or not rest or "?" in rest or rest.startswith(":memory:"):
        return None
    return Path(rest)


def _read_sqlite(path: Path, department: str) -> list[JobRow] | None:
    if not path.is_file():  # sqlite3.connect would create it
        return None
    conn = sqlite3.connect(path, timeout=5.0)
    try:
        versions = [v for (v,) in conn.execute(_VERSION)]
        if versions != [head_revision()]:
            return None
        return [_row(r) for r in conn.execute(_SQLITE_JOBS, (department,))]
    finally:
        conn.close()


def _read_postgresql(url: str, department: str) -> list[JobRow] | None:
    import asyncio

    import asyncpg

    dsn = "postgresql://" + url.split("://", 1)[1]

    async def go() -> list[JobRow] | None:
        conn = await asyncpg.connect(dsn, timeout=10.0)
        try:
            versions = [r[0] for r in await conn.fetch(_VERSION)]
            if versions != [head_revision()]:
                return None
            return [_row(r) for r in await conn.fetch(_PG_JOBS, department)]
        finally:
            await conn.close()

    return asyncio.run(go())


def bascule_jobs(url: str, department: str) -> list[JobRow] | None:
    """The department's jobs in the order ``balf.bridge.store.list_jobs`` gives them, or None."""
    try:
        path = sqlite_path(url)
        if path is not None:
            return _read_sqlite(path, department)
        if url.startswith(("postgresql+asyncpg://", "postgresql://")):
            return _read_postgresql(url, department)
    except Exception as exc:  # noqa: BLE001 - any doubt: the ordinary path reads and reports
        log.info("bascule: job rows not read without SQLAlchemy (%s: %s)", type(exc).__name__, exc)
    return None
