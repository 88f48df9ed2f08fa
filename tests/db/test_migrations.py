"""The schema migrates on both databases and matches the models."""

from __future__ import annotations

from sqlalchemy import inspect

from balf.db.engine import create_engine
from balf.db.migrate import current, upgrade
from balf.db.models import Base


async def test_upgrade_from_empty_reaches_head_and_creates_every_table(empty_db_url: str) -> None:
    engine = create_engine(empty_db_url)
    try:
        rev, head = await current(engine)
        assert rev is None and head
        await upgrade(engine)
        rev, head = await current(engine)
        assert rev == head
        async with engine.connect() as conn:
            tables = set(await conn.run_sync(lambda c: inspect(c).get_table_names()))
        assert set(Base.metadata.tables) <= tables
        await upgrade(engine)  # a second upgrade is a no-op
        assert (await current(engine))[0] == head
    finally:
        await engine.dispose()


async def test_a_0001_database_with_jobs_upgrades_and_keeps_them(empty_db_url: str) -> None:
    """A database made by the first release gains the rerun digest without losing a job."""
    from sqlalchemy import text

    from balf.db.revision import head_revision

    engine = create_engine(empty_db_url)
    try:
        await upgrade(engine, "0001")
        async with engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO bascule_jobs (department, mailbox, source, target_account, options, state,"
                    " messages_total, messages_copied, bytes_copied, bytes_total, errors, created_at)"
                    " VALUES ('33', 'sip', 'mbox:/x', 'sip', '{}', 'migrée', 1, 1, 10, 10, 0, CURRENT_TIMESTAMP)"
                )
            )
        await upgrade(engine)
        rev, head = await current(engine)
        assert rev == head == head_revision()  # the file-reading shortcut agrees with Alembic
        async with engine.connect() as conn:
            rows = (await conn.execute(text("SELECT mailbox, state, rerun_digest FROM bascule_jobs"))).all()
        assert [tuple(r) for r in rows] == [("sip", "migrée", None)]
    finally:
        await engine.dispose()
