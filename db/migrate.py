"""Run the Alembic migrations programmatically (I/O): `balf db upgrade` and `balf db current`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from balf.db.revision import MIGRATIONS, head_revision

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig

# Alembic is imported inside the functions: it costs a tenth of a second that every CLI
# command would otherwise pay, and only `db upgrade`, `init` and `serve` start-up need it.
__all__ = ["MIGRATIONS", "head_revision", "alembic_config", "upgrade", "current", "at_head"]


def alembic_config(url: str) -> AlembicConfig:
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


async def upgrade(engine: AsyncEngine, revision: str = "head") -> None:
    """Bring the schema up to ``revision`` inside one connection."""
    async with engine.begin() as conn:
        await conn.run_sync(_upgrade_sync, str(engine.url.render_as_string(hide_password=False)), revision)


def _upgrade_sync(connection: object, url: str, revision: str) -> None:
    from alembic import command

    cfg = alembic_config(url)
    cfg.attributes["connection"] = connection
    command.upgrade(cfg, revision)


async def current(engine: AsyncEngine) -> tuple[str | None, str]:
    """(the revision the database is at or None if never migrated, the latest revision)."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config(str(engine.url))).get_current_head() or ""
    async with engine.connect() as conn:
        rev = await conn.run_sync(lambda c: MigrationContext.configure(c).get_current_revision())
    return rev, head


async def at_head(engine: AsyncEngine) -> bool:
    """True when the database's ``alembic_version`` is the head revision (a cheap check that lets
    commands skip ``upgrade``); False when it is behind, empty, missing or cannot be told."""
    head = head_revision()
    if head is None:
        return False
    try:
        async with engine.connect() as conn:
            rows = (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalars().all()
    except SQLAlchemyError:
        return False
    return list(rows) == [head]
