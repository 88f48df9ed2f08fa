"""`balf spool`: inspect and manage the gateway's durable spool (thin shell over balf.gateway.ledger)."""

from __future__ import annotations

import datetime as dt
import re
import sys
from typing import Any

import click

from balf.cli.context import fail, run_async, state
from balf.config.schema import Config
from balf.db.engine import create_engine
from balf.gateway.errors import DatabaseUnavailable
from balf.gateway.ledger import SqlLedger
from balf.gateway.spool import FileSpool

STATES = ("queued", "dead", "done")


@click.group("spool")
def command() -> None:
    """Messages accepted and waiting for delivery (list, show, retry, purge)."""


async def _with_ledger(config: Config, fn: Any) -> Any:
    engine = create_engine(config.database_url)
    try:
        ledger = SqlLedger(engine, secret=config.gateway.secret.encode(), domain=config.gateway.domain,
                           instance="cli")
        return await fn(ledger)
    except DatabaseUnavailable as exc:
        fail(f"{exc.detail} (is the database at {engine.url.render_as_string()} up?)")
    finally:
        await engine.dispose()


def _age(value: dt.datetime | None) -> str:
    if value is None:
        return "-"
    seconds = (dt.datetime.now(dt.UTC) - value).total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if abs(seconds) >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _duration(text: str) -> dt.timedelta:
    m = re.fullmatch(r"(\d+)([smhd])", text.strip())
    if not m:
        raise click.BadParameter(f"{text!r}: write a number and s, m, h or d (e.g. 7d)")
    return dt.timedelta(seconds=int(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)])


@command.command("list")
@click.option("--state", "states", type=click.Choice(STATES + ("all",)), multiple=True,
              help="Entries in this state (repeatable; default: queued and dead).")
@click.option("--limit", default=100, show_default=True, help="At most this many lines.")
@click.pass_context
def list_command(ctx: click.Context, states: tuple[str, ...], limit: int) -> None:
    """Entries waiting (queued), undeliverable (dead) or delivered (done), oldest first."""
    config = state(ctx).config()
    wanted = STATES if "all" in states else (states or ("queued", "dead"))
    spool = FileSpool(config.spool_dir)
    try:
        files = sum(1 for _ in spool.pending())
        corrupt = spool.corrupt()
    finally:
        spool.close()
    items = run_async(_with_ledger, config, lambda ledger: ledger.list_entries(wanted, limit))
    if files:
        click.echo(f"{files} message(s) accepted but not yet indexed in the database "
                   f"(spool directory {config.spool_dir}/queue)")
    if corrupt:
        click.echo(f"{len(corrupt)} file(s) set aside, never delivered: unreadable or refused by the "
                   f"database (see the log's event=spool.corrupt lines); in {config.spool_dir}/corrupt:")
        for path in corrupt:
            click.echo(f"  {path.name}")
    if not items:
        click.echo(f"no {' or '.join(wanted)} entries")
        return
    click.echo(f"{'ID':<26} {'STATE':<7} {'AGE':>5} {'TRIES':>5} {'SIZE':>9}  FROM -> TO / LAST ERROR")
    for it in items:
        click.echo(f"{it.id:<26} {it.state:<7} {_age(it.received_at):>5} {it.attempts:>5} "
                   f"{it.size:>9}  {it.mail_from or '<>'} -> {', '.join(it.recipients)}")
        if it.last_error and it.state != "done":
            click.echo(f"{'':<26} {it.last_error}")


@command.command("show")
@click.argument("spool_id")
@click.option("--raw", is_flag=True, help="Print the message bytes as stored.")
@click.pass_context
def show_command(ctx: click.Context, spool_id: str, raw: bool) -> None:
    """One entry: envelope, attempts, last error, where it was delivered."""
    config = state(ctx).config()
    found = run_async(_with_ledger, config, lambda ledger: ledger.get_entry(spool_id))
    if found is None:
        fail(f"no spool entry {spool_id}; `balf spool list --state all` shows them")
    item, content = found
    if raw:
        if content is None:
            fail(f"{spool_id} was delivered; its bytes are in the mailbox, no longer in the spool")
        sys.stdout.buffer.write(content)
        return
    for label, value in (("id", item.id), ("state", item.state), ("received", item.received_at.isoformat()),
                         ("from", item.mail_from or "<>"), ("to", ", ".join(item.recipients)),
                         ("peer", item.peer), ("size", item.size), ("attempts", item.attempts),
                         ("next attempt", item.next_attempt_at.isoformat() if item.next_attempt_at else "-"),
                         ("done", item.done_at.isoformat() if item.done_at else "-"),
                         ("last error", item.last_error or "-")):
        click.echo(f"{label:>13}: {value}")
    for d in item.deliveries:
        click.echo(f"{'delivered':>13}: {d}")


@command.command("retry")
@click.argument("spool_id", required=False)
@click.option("--all-dead", is_flag=True, help="Every dead entry.")
@click.pass_context
def retry_command(ctx: click.Context, spool_id: str | None, all_dead: bool) -> None:
    """Make a dead entry (or every dead one), or a waiting one, due now; the running daemon
    delivers it. An entry a worker is delivering right now (its claim is live) is left alone."""
    if bool(spool_id) == all_dead:
        fail("name one SPOOL_ID, or use --all-dead", 2)
    config = state(ctx).config()

    async def retry(ledger: SqlLedger) -> tuple[int, tuple[str, dt.datetime] | None]:
        now = dt.datetime.now(dt.UTC)
        n = await ledger.retry(spool_id, now)
        return n, (await ledger.holder(spool_id, now) if spool_id and not n else None)

    n, holder = run_async(_with_ledger, config, retry)
    if holder is not None:
        fail(f"{spool_id} is being delivered by {holder[0]} (claimed until "
             f"{holder[1].isoformat(timespec='seconds')}); not changed. Retry it after that "
             "if it is still queued.")
    if spool_id and not n:
        fail(f"no queued or dead entry {spool_id} with its bytes in the spool")
    click.echo(f"{n} entr{'y' if n == 1 else 'ies'} due now")


@command.command("purge")
@click.argument("spool_id", required=False)
@click.option("--state", "states", type=click.Choice(("done", "dead")), multiple=True,
              help="Entries in this state (default: done).")
@click.option("--older-than", default=None, help="Only entries received before this age (e.g. 30d).")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation (dead entries).")
@click.pass_context
def purge_command(ctx: click.Context, spool_id: str | None, states: tuple[str, ...],
                  older_than: str | None, yes: bool) -> None:
    """Delete delivered entries (the bookkeeping only) or, deliberately, dead ones.

    Queued entries are never purged: they are mail accepted with 250 and not yet delivered.
    """
    states = states or ("done",)
    if "dead" in states and not yes:
        click.confirm("Dead entries hold mail that was never delivered. Delete them?", abort=True)
    cutoff = dt.datetime.now(dt.UTC) - _duration(older_than) if older_than else None
    config = state(ctx).config()
    n = run_async(_with_ledger, config,
                  lambda ledger: ledger.purge(spool_id=spool_id, states=states, older_than=cutoff))
    click.echo(f"{n} entr{'y' if n == 1 else 'ies'} purged")
