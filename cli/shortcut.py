"""`balf bascule run` over unchanged mailboxes, answered before click is loaded (I/O: reads the
configuration, then asks balf.bridge.quickrun).

An administrator reruns a department again and again during the campaign; most of those runs
have nothing to copy. balf.bridge.quickrun answers them from the servers' state without the
database layer, but going through click, the command modules and their imports still cost
three times the check itself. So the `balf` entry point tries this first: it takes only the
plain spellings of `balf [-c FILE] bascule run -d D [-m X]... [-q] [--again] [--parallel N]
[--connections N]`, and anything else, a configuration that does not load, or any doubt of
quickrun's, returns None and click runs the command as it always did (and reports the error).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

from balf.bridge.login import TargetAccess
from balf.config.schema import Config

attempted = False  # set once quickrun has been asked: the click command does not ask it twice


@dataclass(frozen=True)
class RunArguments:
    config: str | None
    department: str
    mailboxes: tuple[str, ...]
    again: bool
    parallel: int | None


_VALUED = {
    "-d": "department",
    "--department": "department",
    "-m": "mailbox",
    "--mailbox": "mailbox",
    "--parallel": "parallel",
    "--connections": "connections",
}
_FLAGS = {"-q": "quiet", "--quiet": "quiet", "--again": "again"}
_RANGES = {"parallel": (1, 64), "connections": (1, 32)}  # as the click options declare them


def parse_run(argv: Sequence[str]) -> RunArguments | None:
    """The arguments of a plain `bascule run` without --dry-run; None for anything else (pure)."""
    args = list(argv)
    config: str | None = None
    while args and args[0] not in ("bascule",):
        option = args.pop(0)
        if option in ("-c", "--config") and args:
            config = args.pop(0)
        elif option.startswith("--config="):
            config = option.removeprefix("--config=")
        else:
            return None
    if args[:2] != ["bascule", "run"]:
        return None
    values: dict[str, list[str]] = {}
    flags: set[str] = set()
    rest = args[2:]
    while rest:
        token = rest.pop(0)
        name, equals, attached = token.partition("=") if token.startswith("--") else (token, "", "")
        if name in _FLAGS and not equals:
            flags.add(_FLAGS[name])
        elif name in _VALUED:
            if equals:
                value = attached
            elif rest and not rest[0].startswith("-"):
                value = rest.pop(0)
            else:
                return None
            values.setdefault(_VALUED[name], []).append(value)
        else:
            return None  # --dry-run, --help, a combined short flag, a typo: click's business
    departments = values.get("department", [])
    if len(departments) != 1 or any(len(values.get(k, [])) > 1 for k in _RANGES):
        return None
    for key, (low, high) in _RANGES.items():
        for value in values.get(key, []):
            if not (value.isascii() and value.isdigit()) or not low <= int(value) <= high:
                return None
    parallel = values.get("parallel")
    return RunArguments(
        config,
        departments[0],
        tuple(values.get("mailbox", [])),
        "again" in flags,
        int(parallel[0]) if parallel else None,
    )


def target_access(config: Config) -> TargetAccess:
    """How the bascule logs into the target accounts: the configured IMAP server, as master user."""
    return TargetAccess(
        config.imap.host,
        config.imap.port,
        config.imap.tls,
        config.imap.master_user,
        config.imap.master_password,
        timeout=max(config.imap.timeout, 60.0),
    )


def answer(argv: Sequence[str]) -> int | None:
    """The exit code when an unchanged rerun was answered here; None: let click run the command."""
    try:
        return _answer(argv)
    except KeyboardInterrupt:
        print("balf: interrupted", file=sys.stderr)
        return 130


def _answer(argv: Sequence[str]) -> int | None:
    global attempted
    arguments = parse_run(argv)
    if arguments is None:
        return None
    from balf.bridge.errors import BridgeError
    from balf.bridge.options import check_department
    from balf.config.loader import ConfigError, load_config

    try:
        config = load_config(arguments.config)
        department = check_department(arguments.department)
    except (ConfigError, BridgeError):
        return None  # click says what is wrong, as for any other command
    from balf.bridge.quickrun import quick_rerun
    from balf.cli.outcomes import mode_line, outcome_lines

    attempted = True
    width = arguments.parallel or config.bascule.mailboxes_in_parallel
    quick = quick_rerun(
        config.database_url, department, arguments.mailboxes, arguments.again, target_access(config), width
    )
    if quick is None:
        return None
    lines = [(mode_line(mailbox, mode), False) for mailbox, mode in quick.notes]
    return _print(lines + outcome_lines(quick.outcomes, dry_run=False))


def _print(lines: Sequence[tuple[str, bool]]) -> int:
    """Write the lines as click.echo would: UTF-8 whatever the locale says, and a reader that
    closes the pipe early ends the command quietly with 1, not with a traceback."""
    try:
        for line, to_stderr in lines:
            stream = sys.stderr if to_stderr else sys.stdout
            raw = getattr(stream, "buffer", None)
            if raw is None:  # a replaced stream (a test's StringIO): it takes text
                stream.write(line + "\n")
                continue
            stream.flush()
            raw.write(line.encode("utf-8") + b"\n")
            raw.flush()
    except BrokenPipeError:
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 1
    return 0
