"""The entry point's shortcut takes only the plain spellings of `bascule run`, and reads them as
click does (no I/O: parses argument lists)."""

from __future__ import annotations

import pytest

from balf.cli.bascule import run_command
from balf.cli.group import cli
from balf.cli.shortcut import RunArguments, parse_run

ACCEPTED = [
    ["bascule", "run", "-d", "33"],
    ["-c", "/etc/balf/x.toml", "bascule", "run", "--department", "2A", "-q"],
    ["--config=/tmp/b.toml", "bascule", "run", "-d", "971", "-m", "sip", "--mailbox", "sie", "--again"],
    ["--config", "b.toml", "bascule", "run", "--department=33", "--mailbox=sip", "--parallel", "4"],
    ["bascule", "run", "-m", "sip", "-d", "33", "--connections", "32", "--parallel=64", "--quiet"],
]

REFUSED = [
    ["bascule", "run", "-d", "33", "--dry-run"],  # the shortcut never simulates
    ["bascule", "run", "-d", "33", "--help"],
    ["bascule", "run"],  # no department: click says so
    ["bascule", "run", "-d33"],  # attached short values: left to click
    ["bascule", "run", "-qd", "33"],
    ["bascule", "run", "-d", "33", "-d", "34"],
    ["bascule", "run", "-d", "33", "--parallel", "0"],
    ["bascule", "run", "-d", "33", "--parallel", "65"],
    ["bascule", "run", "-d", "33", "--connections", "x"],
    ["bascule", "run", "-d", "33", "--parallel", "\u00b2"],  # a digit to str.isdigit, not to int()
    ["bascule", "run", "-d", "33", "--parallel", "\u0664"],  # an Arabic-Indic 4: left to click
    ["bascule", "run", "-d", "33", "--again=yes"],
    ["bascule", "run", "-d", "33", "--again="],
    ["bascule", "run", "--department=", "33"],  # click reads an empty department, then a stray 33
    ["bascule", "run", "-d", "33", "extra"],
    ["bascule", "run", "-d", "-m"],
    ["bascule", "status", "-d", "33"],
    ["--version"],
    ["-c"],
    [],
    ["--verbose", "bascule", "run", "-d", "33"],
]


@pytest.mark.parametrize("argv", ACCEPTED)
def test_plain_spellings_are_read_as_click_reads_them(argv: list[str]) -> None:
    parsed = parse_run(argv)
    assert parsed is not None
    split = argv.index("bascule")
    group = cli.make_context("balf", argv[:split] + ["bascule"], resilient_parsing=True)
    run = run_command.make_context("run", argv[split + 2 :])
    expected = RunArguments(
        group.params["config_path"],
        run.params["department"],
        run.params["mailboxes"],
        run.params["again"],
        run.params["parallel"],
    )
    assert parsed == expected


@pytest.mark.parametrize("argv", REFUSED)
def test_anything_else_is_left_to_click(argv: list[str]) -> None:
    assert parse_run(argv) is None
