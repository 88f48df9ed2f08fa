"""`balf serve`: run the daemon in the foreground (systemd runs it as Type=notify)."""

from __future__ import annotations

import asyncio
import importlib

import click
from sqlalchemy.exc import SQLAlchemyError

from balf.cli.context import fail, state
from balf.cli.logs import setup_logging
from balf.cli.supervisor import PartSpec, Supervisor
from balf.config.loader import ConfigError
from balf.config.schema import Config


def build_parts(config: Config) -> list[PartSpec]:
    """The parts this configuration asks for, with the sections each one reads."""
    parts = []
    if config.smtp.enabled or config.smtp.lmtp_enabled:
        gateway = importlib.import_module("balf.gateway.daemon")
        parts.append(PartSpec("gateway", gateway.run_gateway,
                              ("smtp", "imap", "gateway", "spool", "relay", "data_dir")))
    return parts


@click.command("serve")
@click.pass_context
def command(ctx: click.Context) -> None:
    """Run the gateway and its workers until SIGTERM; SIGHUP reloads the configuration."""
    cli_state = state(ctx)
    config = cli_state.config()
    setup_logging(config.log.level, config.log.format)
    parts = build_parts(config)
    if not parts:
        fail("nothing to run: [smtp] enabled and lmtp_enabled are both false", 2)
    supervisor = Supervisor(config, cli_state.config_path, parts)
    try:
        asyncio.run(supervisor.run())
    except BaseException as exc:  # noqa: BLE001 - translated once, here, at the edge
        reason = first_cause(exc)
        if isinstance(reason, ConfigError):
            fail(str(reason), 2)
        if isinstance(reason, OSError | SQLAlchemyError):
            fail(f"cannot run: {str(reason).splitlines()[0]}")
        raise


def first_cause(exc: BaseException) -> BaseException:
    """The first real error inside the TaskGroup's exception groups."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc
