"""`balf demo`: the whole gateway on one machine, for a first look (what `make run` runs).

A private Dovecot under <dir>/dovecot holds a demo service's mailbox; balf serves SMTP on
127.0.0.1:2525 with SQLite under <dir>. Everything stops with Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from pathlib import Path

import click

from balf.cli import init as init_command
from balf.cli.context import fail, run_async, state
from balf.cli.localdovecot import Dovecot, DovecotError
from balf.cli.logs import setup_logging
from balf.cli.serve import build_parts, first_cause
from balf.cli.supervisor import Supervisor
from balf.config.loader import ConfigError, load_config
from balf.db.directory import DirectoryError, add_services, get_service
from balf.db.engine import create_engine, session_factory
from balf.db.service_rows import validate_row

DEMO_SERVICE = {"code": "DEMO", "kind": "SIP", "department": "75", "name": "SIP de démonstration",
                "imap_account": "demo"}


@click.command("demo")
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path), default=Path("var/demo"),
              show_default=True, help="Where the demo keeps its configuration, database, spool and Dovecot.")
@click.option("--imap-port", default=10143, show_default=True, help="Port of the private Dovecot's IMAP.")
@click.pass_context
def command(ctx: click.Context, directory: Path, imap_port: int) -> None:
    """Run balf with a private Dovecot and a demo service, on loopback only."""
    directory = directory.absolute()
    config_file = directory / "balf.toml"
    if not config_file.exists():
        ctx.invoke(init_command.command, directory=directory, force=False)
    state(ctx).config_path = str(config_file)
    password_file = directory / "demo-imap-password"
    if not password_file.exists():
        password_file.write_text(secrets.token_urlsafe(9))
        password_file.chmod(0o600)
    password = password_file.read_text().strip()

    # Dovecot's unprivileged processes must traverse the data directory to reach their root
    # (search only: the directory stays unreadable to others).
    directory.chmod(0o751)
    dovecot = Dovecot(directory / "dovecot", imap_port=imap_port, lmtp_port=imap_port + 1)
    try:
        dovecot.start()
    except DovecotError as exc:
        fail(f"cannot start the private Dovecot: {str(exc).splitlines()[0]}")
    try:
        dovecot.add_user(str(DEMO_SERVICE["imap_account"]), password)
        # The daemon logs in as <mailbox>*<master>; the environment wins over the file, and a
        # reload (SIGHUP) reads it again.
        os.environ.update({"BALF_IMAP__HOST": dovecot.host, "BALF_IMAP__PORT": str(dovecot.imap_port),
                           "BALF_IMAP__TLS": "none", "BALF_IMAP__MASTER_USER": dovecot.master_user,
                           "BALF_IMAP__MASTER_PASSWORD": dovecot.master_password})
        try:
            config = load_config(config_file)
        except ConfigError as exc:
            fail(str(exc), 2)
        run_async(_ensure_demo_service, config.database_url, config.gateway.domain)
        setup_logging(config.log.level, config.log.format)
        click.echo(f"demo: SMTP on {config.smtp.host}:{config.smtp.port}, mail to demo@{config.gateway.domain}")
        click.echo(f"demo: Thunderbird/IMAP on {dovecot.host}:{dovecot.imap_port}, "
                   f"login demo, password {password} (no TLS: loopback only)")
        click.echo("demo: Ctrl-C stops everything")
        supervisor = Supervisor(config, str(config_file), build_parts(config))
        try:
            asyncio.run(supervisor.run())
        except KeyboardInterrupt:
            pass
        except BaseException as exc:  # noqa: BLE001 - translated once, here, at the edge
            fail(f"cannot run: {str(first_cause(exc)).splitlines()[0]}")
    finally:
        dovecot.stop()


async def _ensure_demo_service(url: str, domain: str) -> None:
    engine = create_engine(url)
    try:
        async with session_factory(engine)() as session, session.begin():
            if await get_service(session, str(DEMO_SERVICE["code"])) is not None:
                return
            row, errors = validate_row(0, {**DEMO_SERVICE, "addresses": f"demo@{domain}"})
            if row is None:
                raise DirectoryError(errors)
            await add_services(session, [row])
    finally:
        await engine.dispose()
