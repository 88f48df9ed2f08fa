"""The `balf` click group: one module per command group (thin shells over the library).

Command modules are imported only when their command runs, so a command does not pay for
importing the others (the gateway, the database layer), and `--help` stays instant.
"""

from __future__ import annotations

import importlib

import click

from balf.cli.context import CliState

# name -> (module, one-line help shown by `balf --help` without importing the module)
COMMANDS: dict[str, tuple[str, str]] = {
    "init": ("balf.cli.init", "Create the configuration, the data directory and the database."),
    "db": ("balf.cli.database", "The database schema: upgrade it, or show its revision."),
    "serve": ("balf.cli.serve", "Run the daemon until SIGTERM; SIGHUP reloads the configuration."),
    "service": ("balf.cli.service", "The directory of services and their BALF addresses."),
    "spool": ("balf.cli.spool", "Messages accepted and waiting for delivery (list, show, retry, purge)."),
    "bascule": ("balf.cli.bascule", "Migrate BALF mailboxes into IMAP, department by department."),
    "demo": ("balf.cli.demo", "Run balf with a private Dovecot and a demo service, on loopback."),
}


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        command: click.Command = importlib.import_module(COMMANDS[cmd_name][0]).command
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, text) for name, (_, text) in COMMANDS.items()])


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
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
