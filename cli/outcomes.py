"""The lines `balf bascule run` prints about each mailbox (no I/O: returns text).

Shared by the click command and by the shortcut that answers an unchanged rerun before click
is loaded (``balf.cli.shortcut``), so both print the same words.
"""

from __future__ import annotations

from collections.abc import Sequence

from balf.bridge.outcome import JobOutcome


def mode_line(mailbox: str, mode: str) -> str:
    return f"{mailbox}: doublons reconnus par {mode}"


def outcome_lines(outcomes: Sequence[JobOutcome], dry_run: bool) -> list[tuple[str, bool]]:
    """(line, to standard error) for each mailbox, its folders when there is something to say, and a total."""
    verb = "à copier" if dry_run else "copiés"
    lines: list[tuple[str, bool]] = []
    for o in outcomes:
        rate = o.copied / o.seconds if o.seconds > 0 else 0.0
        lines.append(
            (
                f"{o.mailbox}: {o.state.value if not dry_run else 'simulation'} - {o.copied} {verb}, "
                f"{o.skipped} déjà présents, {o.failed} signalés, {o.bytes / 1_000_000:.1f} Mo "
                f"en {o.seconds:.1f} s ({rate:.0f} msg/s)",
                False,
            )
        )
        if dry_run or o.failed or o.message:
            for f in o.folders:
                if not f.target:
                    lines.append((f"  {f.source}: ignoré (vue Domino ou exclu)", False))
                    continue
                created = " (à créer)" if dry_run else (" (créé)" if f.created else "")
                lines.append(
                    (
                        f"  {f.source} -> {f.target}{created}: {f.copied} {verb}, {f.skipped} déjà présents, "
                        f"{f.failed} signalés",
                        False,
                    )
                )
        if o.message:
            lines.append((f"balf: {o.message}", True))
    if len(outcomes) > 1:
        copied = sum(o.copied for o in outcomes)
        size = sum(o.bytes for o in outcomes) / 1_000_000
        seconds = max(o.seconds for o in outcomes)
        lines.append((f"total: {copied} messages {verb}, {size:.1f} Mo en {seconds:.1f} s", False))
    return lines
