"""What every run reads back from a department's plan: the department code and a mailbox's
options, validated (no I/O).

Kept apart from ``balf.bridge.campaign`` (the CSV file) and ``balf.bridge.model`` so that the
quick rerun, which reads them at every start, imports only this.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from balf.bridge.errors import PlanError

OPTION_KEYS = (
    "domino",
    "dedup_local_part",
    "folder_map",
    "exclude",
    "password_env",
    "password_file",
    "tls",
    "names_file",
    "folders_file",
    "unfiled_folder",
    "max_message_size",
)
# Written by balf, not by the plan: the Message-ID mode detected from the source, kept so that
# every later run and verification of the mailbox uses the same keys.
DOMINO_DETECTED = "domino_detected"
DOMINO_EVIDENCE = "domino_evidence"
INTERNAL_KEYS = (DOMINO_DETECTED, DOMINO_EVIDENCE)
NO_PASSWORD = (
    "a password in the plan is refused (the plan is kept in the database): "
    "use password_env=VARIABLE or password_file=/path/to/file"
)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TRUE = {"1", "yes", "oui", "true", "vrai", "on"}
_FALSE = {"0", "no", "non", "false", "faux", "off", ""}
DEPARTMENT = re.compile(r"^(?:\d{2}|2[AB]|\d{3})$")


def check_department(code: str) -> str:
    """An INSEE department code (``33``, ``2A``, ``971``), upper-cased; PlanError otherwise."""
    value = code.strip().upper()
    if not DEPARTMENT.match(value):
        raise PlanError(f"department {code!r}: expected an INSEE code such as 33, 2A or 971")
    return value


@dataclass(frozen=True)
class MailboxOptions:
    """Per-mailbox options from the campaign file, validated (see :func:`parse_options`)."""

    dedup_local_part: bool = False  # Domino rewrites Message-ID domains: compare the local part only
    domino: bool | None = None  # what the plan says (None: detected from the source, see bridge.domino)
    dedup_mode: str = "Message-ID entiers"  # the mode in words, and why: for logs and reports
    folder_map: tuple[tuple[str, str], ...] = ()  # source path -> target path ("/"-separated)
    exclude: tuple[str, ...] = ()  # fnmatch patterns on the source path
    # Never from a plan (refused: the plan is stored); programmatic use only; never in a repr.
    password: str | None = field(default=None, repr=False)
    password_env: str | None = None
    password_file: str | None = None
    tls: str = "none"
    names_file: str | None = None  # DXL: Notes name -> Internet address
    folders_file: str | None = None  # DXL: document UNID -> folder, when the export lacks FolderRefs
    max_message_size: int | None = None
    unfiled_folder: str | None = None  # DXL documents in no folder


def parse_option_pairs(text: str, where: str) -> dict[str, str]:
    result: dict[str, str] = {}
    for token in text.split():
        key, sep, value = token.partition("=")
        if not sep:
            raise PlanError(f"{where}: option {token!r} is not key=value")
        result[key.strip().lower()] = value.strip()
    return result


def parse_options(raw: dict[str, str], where: str = "options") -> MailboxOptions:
    """Validate a mailbox's options (as stored in BasculeJob.options) into a MailboxOptions."""
    if "password" in raw:
        raise PlanError(f"{where}: {NO_PASSWORD}")
    unknown = sorted(set(raw) - set(OPTION_KEYS) - set(INTERNAL_KEYS))
    if unknown:
        raise PlanError(f"{where}: unknown option(s) {', '.join(unknown)} (known: {', '.join(OPTION_KEYS)})")

    def flag(name: str) -> bool | None:
        value = raw.get(name, "").strip().lower()
        if not value:
            return None
        if value in _TRUE:
            return True
        if value in _FALSE:
            return False
        raise PlanError(f"{where}: {name}={value!r} is not yes or no")

    folder_map = []
    for pair in filter(None, (p.strip() for p in raw.get("folder_map", "").split("|"))):
        source, sep, target = pair.partition(">")
        if not sep or not source.strip() or not target.strip():
            raise PlanError(f"{where}: folder_map entry {pair!r} is not Source>Target")
        folder_map.append((source.strip().strip("/"), target.strip().strip("/") or "-"))
    tls = raw.get("tls", "none").lower() or "none"
    if tls not in ("none", "starttls", "ssl"):
        raise PlanError(f"{where}: tls={tls!r} is not none, starttls or ssl")
    size = raw.get("max_message_size", "").strip()
    if size and not size.isdigit():
        raise PlanError(f"{where}: max_message_size={size!r} is not a number of bytes")
    env = raw.get("password_env") or None
    if env is not None and not _ENV_NAME.match(env):
        raise PlanError(f"{where}: password_env={env!r} is not an environment variable name")
    explicit = flag("domino")
    if explicit is None:
        explicit = flag("dedup_local_part")
    detected = flag(DOMINO_DETECTED)
    evidence = raw.get(DOMINO_EVIDENCE, "")
    if explicit is not None:
        mode = (
            "partie locale des Message-ID (Domino, imposé par le plan)"
            if explicit
            else ("Message-ID entiers (domino=non imposé par le plan)")
        )
    elif detected is not None:
        mode = (
            f"partie locale des Message-ID (Domino détecté: {evidence})"
            if detected
            else f"Message-ID entiers (pas de Domino: {evidence})"
        )
    else:
        mode = "Message-ID entiers"
    return MailboxOptions(
        dedup_local_part=bool(explicit if explicit is not None else detected),
        domino=explicit,
        dedup_mode=mode,
        folder_map=tuple(folder_map),
        exclude=tuple(filter(None, (p.strip() for p in raw.get("exclude", "").split("|")))),
        password_env=env,
        password_file=raw.get("password_file") or None,
        tls=tls,
        names_file=raw.get("names_file") or None,
        folders_file=raw.get("folders_file") or None,
        max_message_size=int(size) if size else None,
        unfiled_folder=raw.get("unfiled_folder") or None,
    )
