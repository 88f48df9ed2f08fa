"""Frozen values passed between the bascule's steps (no I/O)."""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass, field


class Role(enum.StrEnum):
    """What a folder is for, whatever its name (RFC 6154 special use, plus INBOX)."""

    INBOX = "inbox"
    SENT = "\\Sent"
    DRAFTS = "\\Drafts"
    TRASH = "\\Trash"
    JUNK = "\\Junk"
    ARCHIVE = "\\Archive"
    NONE = ""


@dataclass(frozen=True)
class SourceFolder:
    """A folder of a source: its path as components (no delimiter), and its role if known.

    ``native`` is the name the source adapter uses to open it again (an IMAP name, a path, a
    DXL folder title).
    """

    path: tuple[str, ...]
    native: str
    role: Role = Role.NONE
    estimated_count: int | None = None
    estimated_bytes: int | None = None

    @property
    def display(self) -> str:
        return "/".join(self.path)


@dataclass(frozen=True)
class SourceMessage:
    """One message read from a source, whole.

    ``position`` is the source's resume token: every message of a folder comes in increasing
    position order, so "everything up to the checkpoint is done" is a well-defined state.
    ``raw`` is the RFC 5322 message with CRLF line ends, never altered otherwise.
    """

    position: str
    raw: bytes
    flags: tuple[str, ...] = ()
    internaldate: dt.datetime | None = None
    notes: tuple[str, ...] = ()  # what the reader repaired or guessed, reported once copied

    @property
    def size(self) -> int:
        return len(self.raw)


@dataclass(frozen=True)
class SourceDamage:
    """Something at ``position`` that could not be turned into a whole message: reported, not copied."""

    position: str
    kind: str
    detail: str


SourceItem = SourceMessage | SourceDamage


@dataclass(frozen=True)
class FolderPlan:
    """Where one source folder goes in the target (``target`` uses the target's delimiter)."""

    source: SourceFolder
    target: str
    role: Role = Role.NONE
    skip: bool = False  # a view with no own messages, e.g. Domino's ($All)


@dataclass(frozen=True)
class PlannedMailbox:
    """One line of the campaign file."""

    mailbox: str
    source: str
    target_account: str
    planned_date: dt.date | None
    options: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Quota:
    """The target's storage quota, in bytes (``limit`` None: unlimited)."""

    usage: int
    limit: int | None


@dataclass(frozen=True)
class Difference:
    """One difference between the source folders and their target folder, by dedup key.

    ``kind``: ``manquant`` (in the source, not in the target), ``en_plus`` (in the target, not in
    the source), ``en_double`` (more copies in the target than the source has and than were there
    before the bascule), ``doublon_source`` (several source messages share a key: copied once).
    ``explanation`` None: unexplained, the mailbox cannot be vérifiée.
    """

    kind: str
    key: str
    copies: int
    explanation: str | None = None


@dataclass(frozen=True)
class FolderVerdict:
    """Verification of one target folder against its source folders: counts and key multisets
    compared both ways, every difference listed with its explanation (or none)."""

    source_names: tuple[str, ...]
    target: str
    source_count: int
    target_count: int
    differences: tuple[Difference, ...] = ()

    def _keys(self, kind: str) -> tuple[str, ...]:
        return tuple(d.key for d in self.differences if d.kind == kind and d.explanation is None)

    @property
    def missing(self) -> tuple[str, ...]:
        """Keys in the source, not in the target, not explained."""
        return self._keys("manquant")

    @property
    def extra(self) -> tuple[str, ...]:
        """Keys in the target only, not explained (not there before the bascule)."""
        return self._keys("en_plus")

    @property
    def duplicated(self) -> tuple[str, ...]:
        """Keys with surplus copies in the target, not explained."""
        return self._keys("en_double")

    @property
    def explained(self) -> tuple[Difference, ...]:
        return tuple(d for d in self.differences if d.explanation is not None)

    @property
    def unexplained(self) -> tuple[Difference, ...]:
        return tuple(d for d in self.differences if d.explanation is None)

    @property
    def ok(self) -> bool:
        """Counts and keys match, or every difference is explained."""
        return not self.unexplained
