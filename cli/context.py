"""What every `balf` command shares: loading the configuration and reporting errors (I/O)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import click

from balf.config.loader import ConfigError, load_config
from balf.config.schema import Config

T = TypeVar("T")

EXIT_USAGE = 2  # a wrong configuration or argument: the user must change something
EXIT_FAILURE = 1


class UserError(click.ClickException):
    """A problem the user can fix; printed as one line without a traceback."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.exit_code = exit_code  # type: ignore[misc]  # click declares it on the class

    def show(self, file: Any = None) -> None:
        click.echo(f"balf: {self.format_message()}", err=True)


@dataclass
class CliState:
    """Options of the top-level `balf` command, resolved lazily by subcommands."""

    config_path: str | None
    _config: Config | None = None

    def config(self) -> Config:
        """The validated configuration; a problem exits 2 with one line naming the key."""
        if self._config is None:
            try:
                self._config = load_config(self.config_path)
            except ConfigError as exc:
                fail(str(exc), EXIT_USAGE)
        return self._config


def fail(message: str, exit_code: int = EXIT_FAILURE) -> NoReturn:
    raise UserError(message, exit_code)


def state(ctx: click.Context) -> CliState:
    return ctx.ensure_object(CliState)


def run_async(fn: Callable[..., Coroutine[Any, Any, T]], *args: Any, **kwargs: Any) -> T:
    """Run a coroutine for a command; Ctrl-C ends it with the conventional exit code 130."""
    import asyncio  # on use: a quick `balf bascule run` needs no event loop

    try:
        return asyncio.run(fn(*args, **kwargs))
    except KeyboardInterrupt:
        click.echo("balf: interrupted", err=True)
        sys.exit(130)


pass_state = click.make_pass_decorator(CliState, ensure=True)
