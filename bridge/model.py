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
class MailboxOptions:
    """Per-mailbox options from the campaign file, validated (see ``campaign.parse_options``)."""

    dedup_local_part: bool = False  # Domino rewrites Message-ID domains: compare the local part only
    folder_map: tuple[tuple[str, str], ...] = ()  # source path -> target path ("/"-separated)
    exclude: tuple[str, ...] = ()  # fnmatch patterns on the source path
    password: str | None = None
    password_env: str | None = None
    password_file: str | None = None
    tls: str = "none"
    names_file: str | None = None  # DXL: Notes name -> Internet address
    folders_file: str | None = None  # DXL: document UNID -> folder, when the export lacks FolderRefs
    max_message_size: int | None = None
    unfiled_folder: str | None = None  # DXL documents in no folder


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
class FolderVerdict:
    """Verification of one target folder against its source folders."""

    source_names: tuple[str, ...]
    target: str
    source_count: int
    target_count: int
    missing: tuple[str, ...]  # keys in the source, not in the target, not explained
    explained: tuple[tuple[str, str], ...]  # (key, why) in the source, not in the target, with a reason
    extra: tuple[str, ...]  # keys only in the target (mail that arrived since, or pre-existing)
    duplicates: int  # source messages sharing a key with another one of the same folder

    @property
    def ok(self) -> bool:
        return not self.missing
