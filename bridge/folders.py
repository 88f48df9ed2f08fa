"""Where each source folder goes in the target: the folder mapping of the bascule (no I/O).

Lotus system folders (``($Inbox)``, ``($Sent)``...) and the special-use folders of an IMAP
source go to INBOX and to the folders the target advertises for the same use (RFC 6154); when the
target advertises none, to the French names Thunderbird users expect. User folders keep their
hierarchy, translated to the target's delimiter. Names stay Unicode here: the target adapter
encodes them in modified UTF-7 (RFC 3501 5.1.3) through imapclient.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping

from balf.bridge.model import FolderPlan, Role, SourceFolder

# Domino's mail template: system folders and views, by their internal names.
LOTUS_SYSTEM: Mapping[str, Role] = {
    "($inbox)": Role.INBOX,
    "($sent)": Role.SENT,
    "($drafts)": Role.DRAFTS,
    "($trash)": Role.TRASH,
    "($softdeletions)": Role.TRASH,
    "($junkmail)": Role.JUNK,
    "($archive)": Role.ARCHIVE,
}
# Views that only show documents filed elsewhere (or are not mail): never copied as folders.
LOTUS_VIEWS = frozenset(
    {
        "($all)",
        "($alarms)",
        "($calendar)",
        "($meetings)",
        "($todo)",
        "($threads)",
        "($rules)",
        "($follow-up)",
        "($inbox-categorized1)",
        "($stationery)",
        "($users)",
        "($profiles)",
    }
)

# Names that IMAP servers (Domino included) and exports give the special folders when they do not
# flag them (RFC 6154 is younger than most of these stores). Top-level names only, compared casefolded.
WELL_KNOWN_NAMES: Mapping[str, Role] = {
    "inbox": Role.INBOX,
    "boîte de réception": Role.INBOX,
    "sent": Role.SENT,
    "sent items": Role.SENT,
    "sent messages": Role.SENT,
    "sent mail": Role.SENT,
    "envoyés": Role.SENT,
    "éléments envoyés": Role.SENT,
    "messages envoyés": Role.SENT,
    "drafts": Role.DRAFTS,
    "brouillons": Role.DRAFTS,
    "trash": Role.TRASH,
    "deleted items": Role.TRASH,
    "deleted messages": Role.TRASH,
    "corbeille": Role.TRASH,
    "éléments supprimés": Role.TRASH,
    "junk": Role.JUNK,
    "spam": Role.JUNK,
    "junk e-mail": Role.JUNK,
    "junk mail": Role.JUNK,
    "indésirables": Role.JUNK,
    "courrier indésirable": Role.JUNK,
    "archive": Role.ARCHIVE,
    "archives": Role.ARCHIVE,
}

DEFAULT_NAMES: Mapping[Role, str] = {
    Role.SENT: "Envoyés",
    Role.DRAFTS: "Brouillons",
    Role.TRASH: "Corbeille",
    Role.JUNK: "Indésirables",
    Role.ARCHIVE: "Archives",
}

SKIP = "-"  # a folder_map value meaning "do not copy this folder"


def folder_role(folder: SourceFolder) -> Role:
    """The role of a source folder: its own flag, else its Lotus name, else a well-known name."""
    if folder.role is not Role.NONE:
        return folder.role
    if len(folder.path) != 1:
        return Role.NONE
    name = folder.path[0].strip().casefold()
    if name in LOTUS_SYSTEM:
        return LOTUS_SYSTEM[name]
    return WELL_KNOWN_NAMES.get(name, Role.NONE)


def is_view(folder: SourceFolder) -> bool:
    """Domino views that are not folders of their own (($All) shows every document)."""
    return any(part.strip().casefold() in LOTUS_VIEWS for part in folder.path)


def clean_component(name: str, delimiter: str) -> str:
    """A path component safe for the target: the target's delimiter inside a name becomes '_'
    (otherwise "Dossiers 2023/2024" would become two levels), surrounding spaces go."""
    cleaned = name.replace(delimiter, "_").strip() if delimiter else name.strip()
    return cleaned or "_"


def target_name(path: Iterable[str], delimiter: str, prefix: str = "") -> str:
    """Join ``path`` with the target's delimiter, under its personal namespace prefix (not INBOX)."""
    parts = [clean_component(p, delimiter) for p in path if p.strip()]
    if not parts:
        return "INBOX"
    if parts[0].upper() == "INBOX":
        parts[0] = "INBOX"
        return delimiter.join(parts) if delimiter else parts[0]
    joined = delimiter.join(parts)
    return prefix + joined if prefix and not joined.startswith(prefix) else joined


def _override(display: str, folder_map: tuple[tuple[str, str], ...]) -> str | None:
    """The mapped "/"-path for ``display``: exact match first, then the longest matching prefix."""
    for source, target in folder_map:
        if source == display:
            return target
    best: tuple[str, str] | None = None
    for source, target in folder_map:
        if display.startswith(source + "/") and (best is None or len(source) > len(best[0])):
            best = (source, target)
    if best is None:
        return None
    if best[1] == SKIP:
        return SKIP
    return best[1] + display[len(best[0]) :]


def plan_folders(
    folders: Iterable[SourceFolder],
    *,
    delimiter: str,
    special: Mapping[Role, str],
    prefix: str = "",
    folder_map: tuple[tuple[str, str], ...] = (),
    exclude: tuple[str, ...] = (),
) -> list[FolderPlan]:
    """Map every source folder to its target folder.

    ``special`` is what the target advertises: role -> existing folder name (RFC 6154 LIST
    flags). ``folder_map`` (from the plan, "/"-separated) wins over every rule; a value of "-"
    skips the folder. Excluded (fnmatch on the "/"-path) and Domino views are marked skipped.
    """
    plans: list[FolderPlan] = []
    for folder in folders:
        display = folder.display
        role = folder_role(folder)
        mapped = _override(display, folder_map)
        if mapped == SKIP or any(fnmatch.fnmatchcase(display, pattern) for pattern in exclude):
            plans.append(FolderPlan(folder, "", role, skip=True))
            continue
        if mapped is not None:
            plans.append(FolderPlan(folder, target_name(mapped.split("/"), delimiter, prefix), role))
            continue
        if is_view(folder):
            plans.append(FolderPlan(folder, "", role, skip=True))
            continue
        if role is Role.INBOX:
            target = "INBOX"
        elif role is not Role.NONE:
            target = special.get(role) or target_name([DEFAULT_NAMES[role]], delimiter, prefix)
        else:
            path = list(folder.path)
            # Sub-folders of a Lotus system folder stay under its mapped parent.
            head = path[0].strip().casefold() if path else ""
            if len(path) > 1 and head in LOTUS_SYSTEM:
                parent_role = LOTUS_SYSTEM[head]
                parent = (
                    "INBOX" if parent_role is Role.INBOX else (special.get(parent_role) or DEFAULT_NAMES[parent_role])
                )
                target = target_name([*_split(parent, delimiter), *path[1:]], delimiter, prefix)
            else:
                target = target_name(path, delimiter, prefix)
        plans.append(FolderPlan(folder, target, role))
    return plans


def _split(name: str, delimiter: str) -> list[str]:
    return name.split(delimiter) if delimiter else [name]


def parents(name: str, delimiter: str) -> list[str]:
    """The ancestors of a target folder, outermost first ("a/b/c" -> ["a", "a/b"])."""
    if not delimiter:
        return []
    parts = name.split(delimiter)
    return [delimiter.join(parts[:i]) for i in range(1, len(parts))]
