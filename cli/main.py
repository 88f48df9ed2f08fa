"""The `balf` command: one group, one module per command group (thin shells over the library)."""

from __future__ import annotations

import click

from balf.cli import bascule, database, demo, init, serve, service, spool
from balf.cli.context import CliState


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--config", "-c", "config_path", metavar="FILE", envvar="BALF_CONFIG",
              help="Configuration file (default: $BALF_CONFIG, else /etc/balf/balf.toml).")
@click.version_option(package_name="balf")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None) -> None:
    """balf: mail gateway and IMAP bridge for the services' functional mailboxes (BALF).

    Receives the services' mail into their IMAP mailboxes and e-contacts threads, migrates
    Lotus-style BALF into Thunderbird-ready IMAP stores, and counts the traffic.
    """
    ctx.obj = CliState(config_path)


for module in (init, database, serve, service, spool, bascule, demo):
    cli.add_command(module.command)


def main() -> None:
    cli(prog_name="balf")


if __name__ == "__main__":  # pragma: no cover
    main()
