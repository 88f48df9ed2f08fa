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
import urllib.parse

from balf.bridge.errors import PlanError
from balf.bridge.model import PlannedMailbox
from balf.bridge.options import INTERNAL_KEYS, NO_PASSWORD, OPTION_KEYS, parse_option_pairs, parse_options
from balf.bridge.sources import validate_uri

REQUIRED = ("mailbox", "source", "target_account")


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
