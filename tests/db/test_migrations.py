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
