"""`balf bascule`: the migration campaign of Lotus-style BALF into IMAP."""

from __future__ import annotations

import click


@click.group("bascule")
def command() -> None:
    """Migrate BALF mailboxes into IMAP, department by department (plan, run, status, verify)."""
