"""Mail sources read from files: mbox, Maildir and trees of .eml files (I/O: reads files).

Every reader streams one message at a time and hands it over with CRLF line ends (RFC 3501 2.2),
its flags and INTERNALDATE; nothing else of the message is changed. Damage is reported as a
``SourceDamage`` at its position and reading goes on.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator
from pathlib import Path

from imapclient import imap_utf7

from balf.bridge.errors import SourceRefused
from balf.bridge.keys import date_header, header_section, to_crlf
from balf.bridge.model import Role, SourceDamage, SourceFolder, SourceItem, SourceMessage

_FROM_DATE = re.compile(rb"([A-Z][a-z]{2}) +([A-Z][a-z]{2}) +(\d{1,2}) +(\d{1,2}):(\d{2})(?::(\d{2}))? +(\d{4})")
_HEADER_LINE = re.compile(rb"^[!-9;-~]+[ \t]*:")
_MBOX_ESCAPED = re.compile(rb"^>(>*From )", re.M)
_SKIP_FILES = {".msf", ".dat", ".json", ".sqlite", ".html", ".db", ".lock", ".idx"}
_MONTHS = {
    m: i
    for i, m in enumerate(
        [b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov", b"Dec"], 1
    )
}


def decode_folder_name(name: str) -> str:
    """Folder names on disk may be modified UTF-7 (Dovecot, Courier): decode when they are."""
    if "&" not in name:
        return name
    try:
        return imap_utf7.decode(name.encode("ascii"))
    except (UnicodeError, ValueError):
        return name


def mtime(path: Path) -> dt.datetime:
    return dt.datetime.fromtimestamp(path.stat().st_mtime, dt.UTC)


# --- mbox ------------------------------------------------------------------------------------


def mbox_flags(headers: bytes) -> tuple[str, ...]:
    """Flags from the Status/X-Status (mutt, Pine) and X-Mozilla-Status (Thunderbird) headers."""
    flags: set[str] = set()
    for name, value in re.findall(rb"^(status|x-status|x-mozilla-status)[ \t]*:[ \t]*(\S*)", headers, re.I | re.M):
        lname = name.lower()
        if lname == b"status":
            if b"R" in value:
                flags.add("\\Seen")
        elif lname == b"x-status":
            for letter, flag in ((b"A", "\\Answered"), (b"F", "\\Flagged"), (b"T", "\\Draft"), (b"D", "\\Deleted")):
                if letter in value:
                    flags.add(flag)
        else:
            try:
                bits = int(value, 16)
            except ValueError:
                continue
            for bit, flag in (
                (0x1, "\\Seen"),
                (0x2, "\\Answered"),
                (0x4, "\\Flagged"),
                (0x1000, "$Forwarded"),
                (0x8, "\\Deleted"),
            ):
                if bits & bit:
                    flags.add(flag)
    return tuple(sorted(flags))


def from_line_date(line: bytes) -> dt.datetime | None:
    """The asctime date of an mbox From_ line (taken as UTC), or None."""
    match = _FROM_DATE.search(line)
    if not match:
        return None
    _wd, mon, day, hh, mm, ss, year = match.groups()
    try:
        return dt.datetime(int(year), _MONTHS[mon], int(day), int(hh), int(mm), int(ss or 0), tzinfo=dt.UTC)
    except (KeyError, ValueError):
        return None


def split_mbox(stream: Iterator[tuple[int, bytes]]) -> Iterator[tuple[int, bytes | None, bytes]]:
    """(offset, From_ line or None, content) for each message of an mbox given as (offset, line).

    A message starts at a line beginning with ``From `` that opens the file or follows an empty
    line (mboxo/mboxrd). Content before the first From_ line comes with ``None``.
    """
    start: int | None = None
    from_line: bytes | None = None
    lines: list[bytes] = []
    previous_blank = True
    for offset, line in stream:
        if line.startswith(b"From ") and previous_blank:
            if start is not None or lines:
                yield (start if start is not None else 0), from_line, b"".join(lines)
            start, from_line, lines = offset, line, []
        else:
            if start is None and not lines:
                start = offset
            lines.append(line)
        previous_blank = line in (b"\n", b"\r\n")
    if start is not None or lines:
        yield (start if start is not None else 0), from_line, b"".join(lines)


def mbox_message(offset: int, from_line: bytes | None, content: bytes, mtime_: dt.datetime | None) -> SourceItem:
    """One split mbox chunk -> a message or a damage record (pure)."""
    position = f"{offset:015d}"
    body = content
    # The separator's empty line belongs to the mbox, not to the message.
    if body.endswith(b"\n\n"):
        body = body[:-1]
    elif body.endswith(b"\r\n\r\n"):
        body = body[:-2]
    body = _MBOX_ESCAPED.sub(rb"\1", body)
    first = body.split(b"\n", 1)[0]
    if not body.strip() or not _HEADER_LINE.match(first):
        return SourceDamage(position, "mbox_illisible", f"octet {offset}: pas d'en-têtes de message ({first[:60]!r})")
    notes: list[str] = []
    if from_line is None:
        notes.append(f"octet {offset}: message sans ligne From_ (mbox corrompu), migré tel quel")
    headers = header_section(body)
    when = date_header(body) or (from_line_date(from_line) if from_line else None)
    if from_line and from_line_date(from_line):
        when = from_line_date(from_line)
    if when is None:
        notes.append(f"octet {offset}: date invalide ou absente, date du fichier utilisée")
        when = mtime_
    return SourceMessage(
        position=position, raw=to_crlf(body), flags=mbox_flags(headers), internaldate=when, notes=tuple(notes)
    )


def _lines_from(path: Path, start: int) -> Iterator[tuple[int, bytes]]:
    with path.open("rb") as handle:
        handle.seek(start)
        offset = start
        for line in handle:
            yield offset, line
            offset += len(line)


class MboxSource:
    """One mbox file, or a tree of them (Thunderbird's ``Folder`` + ``Folder.sbd/``)."""

    kind = "mbox"

    def __init__(self, root: Path) -> None:
        if not root.exists():
            raise SourceRefused(f"mbox not found: {root}")
        self.root = root
        self.remarks: list[tuple[str, str]] = []

    def folders(self) -> list[SourceFolder]:
        if self.root.is_file():
            return [self._folder(self.root, (self._name(self.root),))]
        found = []
        for path in sorted(self.root.rglob("*")):
            if path.is_file() and path.suffix.lower() not in _SKIP_FILES and not path.name.startswith("."):
                rel = path.relative_to(self.root).parts
                parts = tuple(p[:-4] if p.endswith(".sbd") else p for p in rel[:-1]) + (self._name(path),)
                found.append(self._folder(path, parts))
        return found

    def _name(self, path: Path) -> str:
        stem = path.stem if path.suffix.lower() in (".mbox", ".mbx") else path.name
        return "INBOX" if stem.lower() in ("inbox", "mbox") else stem

    def _folder(self, path: Path, parts: tuple[str, ...]) -> SourceFolder:
        return SourceFolder(path=parts, native=str(path), role=Role.NONE, estimated_bytes=path.stat().st_size)

    def messages(self, folder: SourceFolder, after: str | None = None) -> Iterator[SourceItem]:
        path = Path(folder.native)
        start = 0
        if after:
            start = self._next_offset(path, int(after))
        fallback = mtime(path)
        for offset, from_line, content in split_mbox(_lines_from(path, start)):
            yield mbox_message(offset, from_line, content, fallback)

    @staticmethod
    def _next_offset(path: Path, offset: int) -> int:
        """The offset of the message after the one at ``offset`` (resuming from a checkpoint)."""
        stream = _lines_from(path, offset)
        next(stream, None)  # the From_ line of the checkpointed message
        previous_blank = False
        for position, line in stream:
            if line.startswith(b"From ") and previous_blank:
                return position
            previous_blank = line in (b"\n", b"\r\n")
        return path.stat().st_size

    def close(self) -> None:
        pass


# --- Maildir ---------------------------------------------------------------------------------

MAILDIR_FLAGS = {
    "S": "\\Seen",
    "R": "\\Answered",
    "F": "\\Flagged",
    "T": "\\Deleted",
    "D": "\\Draft",
    "P": "$Forwarded",
}


def maildir_flags(filename: str, keywords: dict[str, str]) -> tuple[str, ...]:
    """Flags from a Maildir file name's ``:2,`` info; lower-case letters are Dovecot keywords."""
    _, sep, info = filename.rpartition(":2,")
    if not sep:
        return ()
    flags = {MAILDIR_FLAGS[c] for c in info if c in MAILDIR_FLAGS}
    flags |= {keywords[c] for c in info if c in keywords}
    return tuple(sorted(flags))


def _read_keywords(folder_dir: Path) -> dict[str, str]:
    path = folder_dir / "dovecot-keywords"
    if not path.is_file():
        return {}
    result = {}
    for line in path.read_text("utf-8", "replace").splitlines():
        number, _, name = line.partition(" ")
        if number.isdigit() and int(number) < 26 and name:
            result[chr(ord("a") + int(number))] = name
    return result


class MaildirSource:
    """A Maildir (INBOX at the root) with Maildir++ (``.A.B``) or nested (``A/B``) sub-folders."""

    kind = "maildir"

    def __init__(self, root: Path) -> None:
        if not (root / "cur").is_dir() and not any(root.glob("*/cur")) and not any(root.glob(".*/cur")):
            raise SourceRefused(f"not a Maildir (no cur/ directory): {root}")
        self.root = root
        self.remarks: list[tuple[str, str]] = []

    def folders(self) -> list[SourceFolder]:
        found = []
        if (self.root / "cur").is_dir():
            found.append(SourceFolder(("INBOX",), str(self.root), Role.INBOX))
        for cur in sorted(self.root.rglob("cur")):
            folder_dir = cur.parent
            if folder_dir == self.root or not cur.is_dir():
                continue
            rel = folder_dir.relative_to(self.root).parts
            if len(rel) == 1 and rel[0].startswith("."):
                parts = tuple(decode_folder_name(p) for p in rel[0][1:].split("."))
            else:
                parts = tuple(decode_folder_name(p) for p in rel)
            found.append(SourceFolder(parts, str(folder_dir), Role.NONE))
        return found

    def messages(self, folder: SourceFolder, after: str | None = None) -> Iterator[SourceItem]:
        folder_dir = Path(folder.native)
        keywords = _read_keywords(folder_dir)
        files = sorted(p for sub in ("new", "cur") for p in (folder_dir / sub).glob("*") if p.is_file())
        files.sort(key=lambda p: p.name)
        for path in files:
            position = path.name.split(":2,", 1)[0]
            if after is not None and position <= after:
                continue
            yield _file_message(path, position, maildir_flags(path.name, keywords), prefer_mtime=True)

    def close(self) -> None:
        pass


# --- EML trees -------------------------------------------------------------------------------


class EmlTreeSource:
    """A folder tree of .eml files (converters' exports): each directory is a folder, the root INBOX."""

    kind = "eml"

    def __init__(self, root: Path, seen: bool = True) -> None:
        if not root.is_dir():
            raise SourceRefused(f"EML folder not found: {root}")
        self.root = root
        self.seen = seen
        self.remarks: list[tuple[str, str]] = []

    def folders(self) -> list[SourceFolder]:
        found = []
        for directory in [self.root, *sorted(p for p in self.root.rglob("*") if p.is_dir())]:
            emls = [p for p in directory.iterdir() if p.is_file() and p.suffix.lower() == ".eml"]
            if not emls:
                continue
            rel = directory.relative_to(self.root).parts
            parts = rel or ("INBOX",)
            found.append(
                SourceFolder(
                    parts,
                    str(directory),
                    Role.NONE,
                    estimated_count=len(emls),
                    estimated_bytes=sum(p.stat().st_size for p in emls),
                )
            )
        return found

    def messages(self, folder: SourceFolder, after: str | None = None) -> Iterator[SourceItem]:
        directory = Path(folder.native)
        for path in sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() == ".eml"):
            if after is not None and path.name <= after:
                continue
            yield _file_message(path, path.name, ("\\Seen",) if self.seen else (), prefer_mtime=False)

    def close(self) -> None:
        pass


def _file_message(path: Path, position: str, flags: tuple[str, ...], *, prefer_mtime: bool) -> SourceItem:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        return SourceDamage(position, "fichier_illisible", f"{path.name}: {exc}")
    first = raw.lstrip(b"\r\n").split(b"\n", 1)[0]
    if not raw.strip() or not _HEADER_LINE.match(first):
        return SourceDamage(position, "message_illisible", f"{path.name}: pas d'en-têtes de message")
    notes: list[str] = []
    when = mtime(path) if prefer_mtime else date_header(raw)
    if when is None:
        when = mtime(path)
        notes.append(f"{path.name}: date invalide ou absente, date du fichier utilisée")
    return SourceMessage(position=position, raw=to_crlf(raw), flags=flags, internaldate=when, notes=tuple(notes))


__all__ = ["MboxSource", "MaildirSource", "EmlTreeSource", "split_mbox", "mbox_message"]
