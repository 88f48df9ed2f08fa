"""The `balf` command's entry point (the console script and ``python -m balf.cli.main``).

It imports almost nothing itself: an unchanged `balf bascule run` is answered by
``balf.cli.shortcut`` before click is loaded; every other command, and every doubt, goes to the
click group in ``balf.cli.group``.
"""

from __future__ import annotations

import sys


def main() -> None:
    from balf.cli.shortcut import answer

    code = answer(sys.argv[1:])
    if code is not None:
        sys.exit(code)
    from balf.cli.group import cli

    cli(prog_name="balf")


if __name__ == "__main__":  # pragma: no cover
    main()
