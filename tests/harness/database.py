"""Test databases (I/O): a fresh, migrated SQLite file or PostgreSQL database per test.

PostgreSQL: the local cluster on 127.0.0.1:5432 (trust auth) is started if it is down; one
migrated template database is made per run and each test gets a copy of it
(``CREATE DATABASE ... TEMPLATE``), so tests are isolated and cheap; all are dropped at the end.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from balf.db.engine import create_engine
from balf.db.migrate import upgrade

PG_ADMIN_URL = os.environ.get("BALFTEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
BACKENDS = ["sqlite", "postgresql"]


def ensure_postgres_running() -> None:
    """Start the machine's PostgreSQL cluster when nothing answers on 5432."""
    if _pg_answers():
        return
    clusters = sorted(Path("/etc/postgresql").glob("*")) if Path("/etc/postgresql").exists() else []
    if not clusters or not shutil.which("pg_ctlcluster"):
        pytest.fail("PostgreSQL is not running on 127.0.0.1:5432 and no local cluster was found")
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", clusters[-1].name, "main", "start"],
                   check=False, capture_output=True)
    for _ in range(50):
        if _pg_answers():
            return
        time.sleep(0.2)
    pytest.fail("PostgreSQL did not start on 127.0.0.1:5432")


def _pg_answers() -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=1):
            return True
    except OSError:
        return False


class PostgresDatabases:
    """Creates and drops the databases of one test run."""

    def __init__(self, admin_url: str = PG_ADMIN_URL) -> None:
        self.admin_url = admin_url
        self.run_id = uuid.uuid4().hex[:8]
        self.template = f"balftest_{self.run_id}_tpl"
        self.created: list[str] = []

    def _admin(self, sql: str) -> None:
        async def go() -> None:
            engine = create_engine(self.admin_url.replace("postgresql://", "postgresql+asyncpg://"))
            async with engine.connect() as conn:
                conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
                await conn.execute(text(sql))
            await engine.dispose()
        asyncio.run(go())

    def url(self, name: str) -> str:
        base = self.admin_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
        return f"{base}/{name}"

    def make_template(self) -> None:
        self._admin(f'CREATE DATABASE "{self.template}"')
        self.created.append(self.template)

        async def migrate() -> None:
            engine = create_engine(self.url(self.template))
            await upgrade(engine)
            await engine.dispose()
        asyncio.run(migrate())

    def fresh(self, migrated: bool = True) -> str:
        name = f"balftest_{self.run_id}_{uuid.uuid4().hex[:8]}"
        template = f' TEMPLATE "{self.template}"' if migrated else ""
        self._admin(f'CREATE DATABASE "{name}"{template}')
        self.created.append(name)
        return self.url(name)

    def drop_all(self) -> None:
        for name in reversed(self.created):
            self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.created.clear()


@pytest.fixture(scope="session")
def postgres_databases() -> Iterator[PostgresDatabases]:
    ensure_postgres_running()
    dbs = PostgresDatabases()
    dbs.make_template()
    yield dbs
    dbs.drop_all()


@pytest.fixture(params=BACKENDS)
def db_backend(request: pytest.FixtureRequest) -> str:
    """The database kind a test runs on: every database test runs on both."""
    return str(request.param)


@pytest.fixture
def db_url(db_backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """URL of a fresh, migrated database of kind ``db_backend``."""
    if db_backend == "postgresql":
        dbs: PostgresDatabases = request.getfixturevalue("postgres_databases")
        return dbs.fresh()
    url = f"sqlite+aiosqlite:///{tmp_path}/balf.sqlite3"

    async def migrate() -> None:
        engine = create_engine(url)
        await upgrade(engine)
        await engine.dispose()
    asyncio.run(migrate())
    return url


@pytest.fixture
def empty_db_url(db_backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """URL of a fresh database with no schema (for migration tests)."""
    if db_backend == "postgresql":
        dbs: PostgresDatabases = request.getfixturevalue("postgres_databases")
        return dbs.fresh(migrated=False)
    return f"sqlite+aiosqlite:///{tmp_path}/empty.sqlite3"


@pytest.fixture
async def db_engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    """An async engine on a fresh migrated database (SQLite and PostgreSQL)."""
    engine = create_engine(db_url)
    yield engine
    await engine.dispose()
