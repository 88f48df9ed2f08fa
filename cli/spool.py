"""`balf spool`: inspect and manage the gateway's durable spool."""

from __future__ import annotations

import click


@click.group("spool")
def command() -> None:
    """Messages accepted and waiting for delivery (list, show, retry, purge)."""
