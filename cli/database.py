"""`balf db`: the database schema (upgrade, current)."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import click
from sqlalchemy.exc import SQLAlchemyError

from balf.cli.context import fail, run_async, state
from balf.db.engine import create_engine
from balf.db.migrate import current, upgrade

T = TypeVar("T")


@click.group("db")
def command() -> None:
    """The database schema: upgrade it, or show its revision."""


@command.command("upgrade")
@click.option("--revision", default="head", show_default=True, help="Target revision.")
@click.pass_context
def upgrade_command(ctx: click.Context, revision: str) -> None:
    """Apply the migrations up to REVISION (idempotent)."""
    url = state(ctx).config().database_url

    async def go() -> str:
        engine = create_engine(url)
        try:
            await upgrade(engine, revision)
            return (await current(engine))[0] or "(empty)"
        finally:
            await engine.dispose()
    click.echo(f"database at revision {_guard(go)}")


@command.command("current")
@click.pass_context
def current_command(ctx: click.Context) -> None:
    """Show the database's revision and whether it is the latest."""
    url = state(ctx).config().database_url

    async def go() -> tuple[str | None, str]:
        engine = create_engine(url)
        try:
            return await current(engine)
        finally:
            await engine.dispose()
    rev, head = _guard(go)
    if rev is None:
        click.echo(f"not initialised (latest is {head}): run `balf db upgrade`")
        raise SystemExit(1)
    click.echo(f"{rev} ({'latest' if rev == head else f'out of date, latest is {head}'})")


def _guard(fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
    try:
        return run_async(fn)
    except (SQLAlchemyError, OSError) as exc:
        fail(f"cannot use the database: {str(exc).splitlines()[0]}; check [database] url")
    raise AssertionError("unreachable")  # pragma: no cover
