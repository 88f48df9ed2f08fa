"""`balf init`: write a commented configuration, create the data directory and the database."""

from __future__ import annotations

import secrets
from pathlib import Path

import click
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from balf.cli.context import fail, run_async, state
from balf.config.example import render_example
from balf.config.loader import ConfigError, load_config
from balf.db.engine import create_engine
from balf.db.migrate import current, upgrade


@click.command("init")
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path),
              help="Data directory; the configuration is written there as balf.toml "
                   "(default: the data_dir of --config, else /var/lib/balf).")
@click.option("--force", is_flag=True, help="Overwrite an existing configuration file.")
@click.pass_context
def command(ctx: click.Context, directory: Path | None, force: bool) -> None:
    """Create the configuration, the data directory and an up-to-date database.

    Running it again on an existing setup only upgrades the database.
    """
    cli_config = state(ctx).config_path
    config_file = Path(cli_config) if cli_config else None
    if directory is None and config_file is not None and config_file.exists():
        try:  # an existing --config names the data directory
            directory = Path(load_config(config_file).data_dir)
        except ConfigError as exc:
            fail(str(exc), 2)
    directory = (directory or Path("/var/lib/balf")).absolute()
    config_file = config_file or directory / "balf.toml"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "spool").mkdir(exist_ok=True)
        directory.chmod(0o750)
    except OSError as exc:
        fail(f"cannot create the data directory {directory}: {exc.strerror}; "
             "choose another with --dir or run as a user that may write there")
    if config_file.exists() and not force:
        click.echo(f"keeping the existing configuration {config_file} (--force to rewrite it)")
    else:
        text = render_example({"data_dir": str(directory),
                               "gateway": {"secret": secrets.token_urlsafe(32)}})
        try:
            config_file.parent.mkdir(parents=True, exist_ok=True)
            config_file.write_text(text, encoding="utf-8")
            config_file.chmod(0o640)  # it holds the gateway secret
        except OSError as exc:
            fail(f"cannot write {config_file}: {exc.strerror}")
        click.echo(f"wrote {config_file}")
    try:
        config = load_config(config_file)
    except ConfigError as exc:
        fail(str(exc), 2)
    shown_url = make_url(config.database_url).render_as_string(hide_password=True)
    try:
        revision = run_async(_create_database, config.database_url)
    except (SQLAlchemyError, OSError) as exc:
        fail(f"cannot create the database {shown_url}: {str(exc).splitlines()[0]}; check [database] url")
    click.echo(f"database ready at revision {revision}: {shown_url}")
    click.echo(f"next: balf --config {config_file} serve")


async def _create_database(url: str) -> str:
    engine = create_engine(url)
    try:
        await upgrade(engine)
        return (await current(engine))[0] or ""
    finally:
        await engine.dispose()
