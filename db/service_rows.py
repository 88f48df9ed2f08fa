"""Validate service directory rows, from the CLI or a CSV file (pure: text in, values out).

Errors carry the line number and column so an administrator can fix a department's file
in one pass; nothing is imported while any row is wrong.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from email.errors import HeaderParseError
from email.headerregistry import Address

from balf.db.departments import normalize_department
from balf.db.models import ServiceKind

COLUMNS = ("code", "kind", "department", "name", "addresses", "imap_account")
OPTIONAL = ("acknowledge",)
KINDS = {k.value.lower(): k.value for k in ServiceKind} | {"tresorerie": "trésorerie"}


@dataclass(frozen=True)
class ServiceRow:
    line: int
    code: str
    kind: str
    department: str
    name: str
    addresses: tuple[str, ...]
    imap_account: str
    acknowledge: bool = True


@dataclass(frozen=True)
class RowError:
    line: int
    column: str
    message: str

    def __str__(self) -> str:
        where = f"line {self.line}" if self.line else "arguments"
        return f"{where}, {self.column}: {self.message}"


def parse_address(text: str) -> str | None:
    """A bare addr-spec (local@domain) or None; display names and routes are refused."""
    text = text.strip()
    if not text or any(c in text for c in " <>,;\"()[]\\") or text.count("@") != 1:
        return None
    try:
        address = Address(addr_spec=text)
    except (HeaderParseError, ValueError, IndexError):
        return None
    if not address.username or "." not in address.domain or address.domain.startswith("."):
        return None
    return address.addr_spec


def validate_row(line: int, values: dict[str, str]) -> tuple[ServiceRow | None, list[RowError]]:
    """One row's values -> a ServiceRow, or the list of what is wrong with it."""
    errors: list[RowError] = []

    def get(name: str) -> str:
        return (values.get(name) or "").strip()

    code = get("code")
    if not code:
        errors.append(RowError(line, "code", "missing service code"))
    elif len(code) > 32 or not all(c.isalnum() or c in "-_." for c in code):
        errors.append(RowError(line, "code", f"{code!r} must be letters, digits, '-', '_' or '.' (32 at most)"))
    kind = KINDS.get(get("kind").lower())
    if kind is None:
        errors.append(RowError(line, "kind", f"unknown kind {get('kind')!r}; expected one of "
                                             + ", ".join(k.value for k in ServiceKind)))
    department = normalize_department(get("department"))
    if department is None:
        errors.append(RowError(line, "department", f"unknown department code {get('department')!r} "
                                                   "(INSEE code such as 33, 2A or 971)"))
    name = get("name")
    if not name:
        errors.append(RowError(line, "name", "missing service name"))
    addresses: list[str] = []
    raw_addresses = [a for a in get("addresses").replace(",", " ").replace(";", " ").split() if a]
    if not raw_addresses:
        errors.append(RowError(line, "addresses", "at least one BALF address is needed"))
    for raw in raw_addresses:
        parsed = parse_address(raw)
        if parsed is None:
            errors.append(RowError(line, "addresses", f"{raw!r} is not a valid mail address"))
        elif parsed.lower() in {a.lower() for a in addresses}:
            errors.append(RowError(line, "addresses", f"{raw} is listed twice"))
        else:
            addresses.append(parsed)
    imap_account = get("imap_account") or (addresses[0] if addresses else "")
    acknowledge_text = get("acknowledge").lower()
    if acknowledge_text not in ("", "oui", "non", "yes", "no", "true", "false", "1", "0"):
        errors.append(RowError(line, "acknowledge", f"{acknowledge_text!r} must be oui or non"))
    acknowledge = acknowledge_text not in ("non", "no", "false", "0")
    if errors:
        return None, errors
    assert kind is not None and department is not None
    return ServiceRow(line, code, kind, department, name, tuple(addresses), imap_account, acknowledge), []


def parse_services_csv(text: str) -> tuple[list[ServiceRow], list[RowError]]:
    """Every row of a directory CSV (`;` or `,` separated, header line first, BOM allowed).

    Returns the valid rows and every error, including duplicates across rows.
    """
    text = text.removeprefix("\ufeff")
    first = text.splitlines()[0] if text.strip() else ""
    delimiter = ";" if first.count(";") >= first.count(",") else ","
    reader = csv.DictReader(io.StringIO(text), delimiter=delimiter)
    header = [h.strip().lower() for h in (reader.fieldnames or [])]
    missing = [c for c in COLUMNS if c not in header and c != "imap_account"]
    if missing:
        return [], [RowError(1, "header", f"missing column(s) {', '.join(missing)}; expected "
                                          + delimiter.join(COLUMNS))]
    unknown = [h for h in header if h not in COLUMNS + OPTIONAL]
    if unknown:
        return [], [RowError(1, "header", f"unknown column(s) {', '.join(unknown)}")]
    reader.fieldnames = header
    rows: list[ServiceRow] = []
    errors: list[RowError] = []
    seen_codes: dict[str, int] = {}
    seen_addresses: dict[str, int] = {}
    for record in reader:
        line = reader.line_num
        if None in record:
            errors.append(RowError(line, "row", "more fields than columns"))
            continue
        if not any((v or "").strip() for v in record.values()):
            continue
        row, row_errors = validate_row(line, record)
        errors += row_errors
        if row is None:
            continue
        if row.code in seen_codes:
            errors.append(RowError(line, "code", f"{row.code} already on line {seen_codes[row.code]}"))
        seen_codes.setdefault(row.code, line)
        for address in row.addresses:
            key = address.lower()
            if key in seen_addresses:
                errors.append(RowError(line, "addresses", f"duplicate address {address} "
                                                          f"(already on line {seen_addresses[key]})"))
            seen_addresses.setdefault(key, line)
        rows.append(row)
    return rows, errors
