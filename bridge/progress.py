"""Progress of a bascule on the terminal (I/O: writes to stderr).

One line per mailbox, redrawn in place: messages done/total, messages/s, MB/s and ETA, plus an
overall line when several mailboxes run. Silent when stderr is not a terminal (cron, CI) or with
``--quiet``; the summary at the end is printed by the CLI in every case.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TextIO

from balf.bridge.outcome import JobOutcome


@dataclass
class _Bar:
    total: int
    size: int
    done: int = 0
    bytes: int = 0
    started: float = field(default_factory=time.monotonic)


def rate_line(label: str, done: int, total: int, size_done: int, elapsed: float) -> str:
    """``label  1200/5000  340 msg/s  12.1 MB/s  ETA 0:11`` (pure; tested)."""
    rate = done / elapsed if elapsed > 0 else 0.0
    mbps = size_done / elapsed / 1_000_000 if elapsed > 0 else 0.0
    if total and rate > 0 and done < total:
        left = int((total - done) / rate)
        eta = f"ETA {left // 3600}:{left % 3600 // 60:02d}:{left % 60:02d}"
    else:
        eta = "ETA --"
    pct = f"{100 * done / total:5.1f}%" if total else "     "
    return f"{label[:28]:<28} {pct} {done:>8}/{total:<8} {rate:7.0f} msg/s {mbps:6.1f} MB/s  {eta}"


class TerminalProgress:
    """Progress lines on a TTY; ``enabled`` False turns every call into nothing."""

    def __init__(self, stream: TextIO | None = None, enabled: bool | None = None, interval: float = 0.25) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.interval = interval
        self.bars: dict[str, _Bar] = {}
        self._lock = threading.Lock()
        self._last = 0.0
        self._lines = 0

    def start(self, mailbox: str, messages: int, size: int) -> None:
        with self._lock:
            self.bars[mailbox] = _Bar(messages, size)
        self._draw(force=True)

    def advance(self, mailbox: str, messages: int, size: int) -> None:
        with self._lock:
            bar = self.bars.get(mailbox)
            if bar is None:
                return
            bar.done += messages
            bar.bytes += size
            bar.total = max(bar.total, bar.done)
        self._draw()

    def finish(self, outcome: JobOutcome) -> None:
        self._draw(force=True)
        with self._lock:
            self.bars.pop(outcome.mailbox, None)
            self._lines = 0  # the finished mailbox's last line stays on screen

    def _draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        with self._lock:
            lines = [rate_line(name, b.done, b.total, b.bytes, now - b.started) for name, b in self.bars.items()]
            if len(self.bars) > 1:
                started = min(b.started for b in self.bars.values())
                lines.append(
                    rate_line(
                        "total",
                        sum(b.done for b in self.bars.values()),
                        sum(b.total for b in self.bars.values()),
                        sum(b.bytes for b in self.bars.values()),
                        now - started,
                    )
                )
            out = ("\x1b[F" * self._lines) + "".join(f"\x1b[2K{line}\n" for line in lines)
            self._lines = len(lines)
        self.stream.write(out)
        self.stream.flush()
