"""The campaign file of a department and the per-mailbox options (no I/O: parses text).

A CSV file (``;`` or ``,``, UTF-8 with or without BOM, as LibreOffice and Excel save it) with a
header line. Required columns: ``mailbox``, ``source``, ``target_account``; optional:
``planned_date`` (YYYY-MM-DD or DD/MM/YYYY), ``options`` (``key=value`` pairs separated by spaces)
and any option as a column of its own. Options:

    domino=yes|no                 compare Message-IDs on their local part (Domino rewrites domains);
                                  absent: detected from the IMAP source (see ``bridge.domino``)
    folder_map=Src>Dst|Src2>-     map source folders ("/"-paths) to target folders; "-" skips one
    exclude=Pattern|Pattern2      fnmatch patterns of source folders not to copy
    password_env=VAR / password_file=PATH / tls=none|starttls|ssl     IMAP source login; never
                                  ``password=`` nor a password in the URI: the plan is kept in the database
    names_file=PATH               DXL: Notes name;address lines
    folders_file=PATH             DXL: UNID;folder lines, or a directory of exported folder views
    unfiled_folder=NAME           DXL: where documents filed in no folder go
    max_message_size=BYTES        report larger messages instead of copying them
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import re
import urllib.parse

from balf.bridge.errors import PlanError
from balf.bridge.model import MailboxOptions, PlannedMailbox
from balf.bridge.sources import validate_uri

REQUIRED = ("mailbox", "source", "target_account")
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


def parse_date(text: str, where: str) -> dt.date | None:
    text = text.strip()
    if not text:
        return None
    for fmt in ("%Y-%m-%d", "%d/%m/%Y"):
        try:
            return dt.datetime.strptime(text, fmt).date()
        except ValueError:
            continue
    raise PlanError(f"{where}: planned_date {text!r} is not YYYY-MM-DD or DD/MM/YYYY")


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


def check_secrets(source: str, options: dict[str, str], where: str) -> None:
    """No password in what the database keeps: not in the URI, not as an option; an IMAP source
    names where its password is (an environment variable or a file). PlanError otherwise; the
    message never repeats the password."""
    if "password" in options:
        raise PlanError(f"{where}: {NO_PASSWORD}")
    if not source.lower().startswith(("imap:", "imaps:")):
        return
    try:
        password = urllib.parse.urlsplit(source).password
    except ValueError as exc:
        raise PlanError(f"{where}: source is not a valid URI ({exc})") from exc
    if password is not None:
        raise PlanError(f"{where}: {NO_PASSWORD} (and imap://user@host, without ':password')")
    given = [k for k in ("password_env", "password_file") if options.get(k)]
    if not given:
        raise PlanError(f"{where}: IMAP source without password_env=VARIABLE or password_file=/path/to/file")
    if len(given) == 2:
        raise PlanError(f"{where}: give password_env or password_file, not both")


def parse_campaign(text: str) -> list[PlannedMailbox]:
    """Every mailbox of a campaign file; PlanError naming the line of the first problem."""
    text = text.lstrip("\ufeff")
    if not text.strip():
        raise PlanError("the campaign file is empty")
    first = text.splitlines()[0]
    delimiter = ";" if first.count(";") >= first.count(",") else ","
    reader = csv.DictReader(io.StringIO(text), delimiter=delimiter)
    columns = [c.strip().lower() for c in reader.fieldnames or []]
    missing = [c for c in REQUIRED if c not in columns]
    if missing:
        raise PlanError(
            f"campaign file: missing column(s) {', '.join(missing)} "
            f"(expected header: {delimiter.join((*REQUIRED, 'planned_date', 'options'))})"
        )
    planned: list[PlannedMailbox] = []
    seen: set[str] = set()
    for number, row in enumerate(reader, start=2):
        values = {(k or "").strip().lower(): (v or "").strip() for k, v in row.items() if k}
        if not any(values.values()) or values.get("mailbox", "").startswith("#"):
            continue
        where = f"line {number}"
        for column in REQUIRED:
            if not values.get(column):
                raise PlanError(f"{where}: {column} is empty")
        if values["mailbox"] in seen:
            raise PlanError(f"{where}: mailbox {values['mailbox']!r} appears twice")
        seen.add(values["mailbox"])
        options = parse_option_pairs(values.get("options", ""), where)
        for key in (*OPTION_KEYS, "password"):
            if values.get(key):
                options[key] = values[key]
        check_secrets(values["source"], options, where)
        try:
            validate_uri(values["source"])  # after check_secrets: the URI holds no password
        except (PlanError, ValueError) as exc:
            raise PlanError(f"{where}: {exc}") from exc
        internal = sorted(set(options) & set(INTERNAL_KEYS))
        if internal:
            raise PlanError(f"{where}: {', '.join(internal)} is set by balf, not by the plan")
        parse_options(options, where)
        planned.append(
            PlannedMailbox(
                values["mailbox"],
                values["source"],
                values["target_account"],
                parse_date(values.get("planned_date", ""), where),
                options,
            )
        )
    if not planned:
        raise PlanError("the campaign file lists no mailbox")
    return planned
