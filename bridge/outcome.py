"""What a run of the bascule tells about each folder and mailbox (no I/O).

Kept apart from ``balf.bridge.migrate`` so that the quick rerun and the progress display can
speak of outcomes without importing the database layer.
"""

from __future__ import annotations

from dataclasses import dataclass

from balf.db.states import BasculeState


@dataclass(frozen=True)
class FolderOutcome:
    source: str
    target: str
    seen: int = 0
    copied: int = 0
    skipped: int = 0
    failed: int = 0
    bytes: int = 0
    created: bool = False


@dataclass(frozen=True)
class JobOutcome:
    department: str
    mailbox: str
    state: BasculeState
    folders: tuple[FolderOutcome, ...]
    seconds: float
    message: str = ""
    exit_code: int = 0

    @property
    def copied(self) -> int:
        return sum(f.copied for f in self.folders)

    @property
    def skipped(self) -> int:
        return sum(f.skipped for f in self.folders)

    @property
    def failed(self) -> int:
        return sum(f.failed for f in self.folders)

    @property
    def bytes(self) -> int:
        return sum(f.bytes for f in self.folders)
