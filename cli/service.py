"""`balf service`: the service directory (add, list, show, import)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from balf.cli.context import fail, run_async, state
from balf.db.directory import DirectoryError, ServiceView, add_services, get_service, list_services
from balf.db.engine import create_engine, session_factory
from balf.db.models import ServiceKind
from balf.db.service_rows import COLUMNS, parse_services_csv, validate_row

T = TypeVar("T")


@click.group("service")
def command() -> None:
    """The directory of services and their BALF addresses."""


def _with_session(ctx: click.Context, fn: Callable[[Any], Awaitable[T]]) -> T:
    url = state(ctx).config().database_url

    async def go() -> T:
        engine = create_engine(url)
        try:
            async with session_factory(engine)() as session, session.begin():
                result: T = await fn(session)
                return result
        finally:
            await engine.dispose()
    return run_async(go)


def _report(errors: list[Any], what: str) -> None:
    for error in errors:
        click.echo(f"balf: {what}: {error}", err=True)
    fail(f"{len(errors)} error(s); nothing was imported. Fix the rows above and run again.")


@command.command("add")
@click.argument("code")
@click.option("--kind", required=True, type=click.Choice([k.value for k in ServiceKind], case_sensitive=False))
@click.option("--department", required=True, help="INSEE department code: 33, 2A, 971...")
@click.option("--name", required=True)
@click.option("--address", "addresses", multiple=True, required=True, help="A BALF address (repeat for several).")
@click.option("--imap-account", default="", help="IMAP mailbox (default: the first address).")
@click.option("--no-acknowledge", is_flag=True, help="Send no automatic acknowledgement.")
@click.pass_context
def add_command(ctx: click.Context, code: str, kind: str, department: str, name: str,
                addresses: tuple[str, ...], imap_account: str, no_acknowledge: bool) -> None:
    """Add the service CODE."""
    row, errors = validate_row(0, {"code": code, "kind": kind, "department": department, "name": name,
                                   "addresses": " ".join(addresses), "imap_account": imap_account,
                                   "acknowledge": "non" if no_acknowledge else ""})
    if errors or row is None:
        _report(errors, "service add")
    try:
        views = _with_session(ctx, lambda s: add_services(s, [row]))
    except DirectoryError as exc:
        _report(exc.errors, "service add")
    click.echo(f"added {views[0].code}: {views[0].name} ({', '.join(views[0].addresses)})")


@command.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--dry-run", is_flag=True, help="Check the file, import nothing.")
@click.pass_context
def import_command(ctx: click.Context, file: Path, dry_run: bool) -> None:
    """Import a department's services from a CSV file, all rows or none.

    Columns (header line first, ';' or ',' separated, UTF-8 with or without BOM):
    code;kind;department;name;addresses;imap_account[;acknowledge]. Several addresses
    in one cell are separated by spaces.
    """
    try:
        text = file.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        fail(f"{file}: not UTF-8; save it from LibreOffice/Excel as 'CSV UTF-8'")
    rows, errors = parse_services_csv(text)
    if errors:
        _report(errors, str(file))
    if not rows:
        fail(f"{file}: no service rows; expected a header {';'.join(COLUMNS)} and one line per service")
    if dry_run:
        click.echo(f"{file}: {len(rows)} service(s) valid; nothing imported (--dry-run)")
        return
    try:
        views = _with_session(ctx, lambda s: add_services(s, rows))
    except DirectoryError as exc:
        _report(exc.errors, str(file))
    click.echo(f"imported {len(views)} service(s) from {file}")


@command.command("list")
@click.option("--department", help="Only this department.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def list_command(ctx: click.Context, department: str | None, as_json: bool) -> None:
    """List the services."""
    views = _with_session(ctx, lambda s: list_services(s, department))
    if as_json:
        click.echo(json.dumps([_as_dict(v) for v in views], ensure_ascii=False, indent=2))
        return
    if not views:
        click.echo("no services" + (f" in department {department}" if department else ""))
        return
    click.echo(f"{'code':<14} {'kind':<10} {'dep':<4} {'name':<32} addresses")
    for v in views:
        click.echo(f"{v.code:<14} {v.kind:<10} {v.department:<4} {v.name[:32]:<32} {', '.join(v.addresses)}")


@command.command("show")
@click.argument("code_or_address")
@click.pass_context
def show_command(ctx: click.Context, code_or_address: str) -> None:
    """Show one service, by code or by one of its addresses."""
    view = _with_session(ctx, lambda s: get_service(s, code_or_address))
    if view is None:
        fail(f"no service {code_or_address!r}; see `balf service list`")
    for key, value in _as_dict(view).items():
        click.echo(f"{key:<13} {', '.join(value) if isinstance(value, list) else value}")


def _as_dict(view: ServiceView) -> dict[str, Any]:
    return {"code": view.code, "kind": view.kind, "department": view.department, "name": view.name,
            "addresses": list(view.addresses), "imap_account": view.imap_account,
            "acknowledge": view.acknowledge, "active": view.active}
