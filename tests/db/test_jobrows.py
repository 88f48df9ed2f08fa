"""Job rows read without SQLAlchemy match the ORM's, and a schema of another revision is not read
(SQLite and PostgreSQL)."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import text

from balf.bridge import store
from balf.bridge.model import PlannedMailbox
from balf.db.engine import session_factory
from balf.db.jobrows import bascule_jobs


async def _plan(db_engine) -> None:
    sessions = session_factory(db_engine)
    planned = [
        PlannedMailbox("sip-été", "imap://u@h:143", "sip", dt.date(2026, 12, 1), {"password_env": "PW"}),
        PlannedMailbox("cdif", "mbox:/srv/cdif.mbox", "cdif", None, {}),
    ]
    await store.plan_department(sessions, "33", planned)
    jobs = await store.list_jobs(sessions, "33")
    await store.set_job(sessions, jobs[0].id, claimed_until=dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC))


async def test_rows_as_the_orm_sees_them(db_engine, db_url: str) -> None:
    await _plan(db_engine)
    orm = await store.list_jobs(session_factory(db_engine), "33")
    rows = await _in_thread(bascule_jobs, db_url, "33")
    assert rows is not None
    assert [(r.id, r.mailbox, r.source, r.target_account, r.options, r.state) for r in rows] == [
        (j.id, j.mailbox, j.source, j.target_account, j.options, j.state.value) for j in orm
    ]
    assert rows[0].claimed_until == dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    assert rows[1].rerun_digest is None
    assert await _in_thread(bascule_jobs, db_url, "75") == []


async def test_another_schema_revision_is_not_read(db_engine, db_url: str) -> None:
    await _plan(db_engine)
    async with db_engine.begin() as conn:
        await conn.execute(text("UPDATE alembic_version SET version_num = '0001'"))
    assert await _in_thread(bascule_jobs, db_url, "33") is None


async def test_a_missing_database_is_not_created(tmp_path) -> None:
    path = tmp_path / "absent.sqlite3"
    assert await _in_thread(bascule_jobs, f"sqlite+aiosqlite:///{path}", "33") is None
    assert not path.exists()
    assert await _in_thread(bascule_jobs, "postgresql+asyncpg://nobody@127.0.0.1:1/none", "33") is None


async def _in_thread(fn, *args):
    """bascule_jobs runs its own event loop for asyncpg: call it off this test's loop."""
    import asyncio

    return await asyncio.to_thread(fn, *args)
