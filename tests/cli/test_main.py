"""The lazy command table matches the command modules."""

from __future__ import annotations

import importlib

import click

from balf.cli.group import COMMANDS


def test_every_listed_command_loads_under_its_name() -> None:
    for name, (module, summary) in COMMANDS.items():
        command = importlib.import_module(module).command
        assert isinstance(command, click.Command)
        assert command.name == name
        assert summary.endswith(".")
