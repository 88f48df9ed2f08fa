"""The campaign file of a department and the per-mailbox options (no I/O: parses text).

A CSV file (``;`` or ``,``, UTF-8 with or without BOM, as LibreOffice and Excel save it) with a
header line. Required columns: ``mailbox``, ``source``, ``target_account``; optional:
``planned_date`` (YYYY-MM-DD or DD/MM/YYYY), ``options`` (``key=value`` pairs separated by spaces)
and any option as a column of its own. Options:

    domino=yes                    compare Message-IDs on their local part (Domino rewrites domains)
    folder_map=Src>Dst|Src2>-     map source folders ("/"-paths) to target folders; "-" skips one
    exclude=Pattern|Pattern2      fnmatch patterns of source folders not to copy
    password_env=VAR / password_file=PATH / tls=none|starttls|ssl     IMAP source login
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

from balf.bridge.errors import PlanError
from balf.bridge.model import MailboxOptions, PlannedMailbox
from balf.bridge.sources import validate_uri

REQUIRED = ("mailbox", "source", "target_account")
OPTION_KEYS = (
    "domino",
    "dedup_local_part",
    "folder_map",
    "exclude",
    "password",
    "password_env",
    "password_file",
    "tls",
    "names_file",
    "folders_file",
    "unfiled_folder",
    "max_message_size",
)
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
    unknown = sorted(set(raw) - set(OPTION_KEYS))
    if unknown:
        raise PlanError(f"{where}: unknown option(s) {', '.join(unknown)} (known: {', '.join(OPTION_KEYS)})")

    def flag(name: str) -> bool:
        value = raw.get(name, "").strip().lower()
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
    return MailboxOptions(
        dedup_local_part=flag("domino") or flag("dedup_local_part"),
        folder_map=tuple(folder_map),
        exclude=tuple(filter(None, (p.strip() for p in raw.get("exclude", "").split("|")))),
        password=raw.get("password") or None,
        password_env=raw.get("password_env") or None,
        password_file=raw.get("password_file") or None,
        tls=tls,
        names_file=raw.get("names_file") or None,
        folders_file=raw.get("folders_file") or None,
        max_message_size=int(size) if size else None,
        unfiled_folder=raw.get("unfiled_folder") or None,
    )


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
        try:
            validate_uri(values["source"])
        except PlanError as exc:
            raise PlanError(f"{where}: {exc}") from exc
        options = parse_option_pairs(values.get("options", ""), where)
        for key in OPTION_KEYS:
            if values.get(key):
                options[key] = values[key]
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
