"""The bascule report a department coordinator signs off: text, CSV and JSON (no I/O).

Built from a snapshot of the database (``JobReport`` values), rendered three ways: a readable
summary, a CSV that opens in LibreOffice and Excel (``;`` separator, UTF-8 with BOM, French
headers), and JSON for other tools.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from balf.bridge.errors import BridgeError
from balf.bridge.options import parse_options
from balf.bridge.store import EVIDENCE_REFUSED, EVIDENCE_TAKEN, PRESENT_BEFORE
from balf.db.models import BasculeFolder, BasculeIssue, BasculeJob

ISSUE_LABELS = {
    "trop_volumineux": "message trop volumineux, non copié",
    "supprime_source": "marqué supprimé dans la source, non copié",
    "refuse_cible": "refusé par le serveur cible",
    "mbox_illisible": "partie de mbox illisible",
    "message_illisible": "message illisible",
    "fichier_illisible": "fichier illisible",
    "document_illisible": "document DXL illisible",
    "dxl_tronque": "export DXL tronqué ou invalide",
    "document_non_courriel": "documents Notes qui ne sont pas des courriels",
    "repare": "copié après réparation (date, nom Notes, ligne From_)",
    "manquant_cible": "ÉCART: absent de la cible sans explication",
    "en_plus_cible": "ÉCART: dans la cible, absent de la source, sans explication",
    "double_cible": "ÉCART: en double dans la cible",
    "ecart_explique": "écart expliqué",
    "uidvalidity_cible": "dossier cible recréé",
    "cible_changee": "dossier cible changé par le plan",
    "uidvalidity": "dossier source renuméroté",
    "verification": "vérification impossible",
    EVIDENCE_REFUSED: "aucun relevé de la cible avant copie: tout écart y compte",
}


UNEXPLAINED = frozenset({"manquant_cible", "en_plus_cible", "double_cible"})


@dataclass(frozen=True)
class FolderLine:
    source: str
    target: str
    source_count: int
    target_count: int | None
    copied: int
    skipped: int
    failed: int
    bytes: int


@dataclass(frozen=True)
class IssueLine:
    folder: str
    item: str
    kind: str
    label: str
    detail: str


@dataclass(frozen=True)
class JobReport:
    department: str
    mailbox: str
    source: str
    target_account: str
    state: str
    planned_date: str | None
    started_at: str | None
    finished_at: str | None
    verified_at: str | None
    messages_copied: int
    bytes_copied: int
    errors: int
    last_error: str | None
    folders: tuple[FolderLine, ...]
    issues: tuple[IssueLine, ...]
    message_ids: str = ""  # how duplicates were recognised (Domino mode or not, and why)
    found_in_target: int = 0  # messages already in the target folders before the bascule

    @property
    def unexplained(self) -> int:
        return sum(1 for i in self.issues if i.kind in UNEXPLAINED)


def _iso(value: dt.datetime | dt.date | None) -> str | None:
    return value.isoformat() if value else None


def message_id_mode(job: BasculeJob) -> str:
    """The job's Message-ID mode in words; never shows an option's value other than the mode."""
    try:
        return parse_options(dict(job.options or {})).dedup_mode
    except BridgeError as exc:
        return f"options invalides: {exc}"


def snapshot(job: BasculeJob, folders: Sequence[BasculeFolder], issues: Sequence[BasculeIssue]) -> JobReport:
    """The report's value from database rows (pure). The evidence of messages found in the
    target before the bascule is counted, not listed: verification lists the differences it explains."""
    return JobReport(
        department=job.department,
        mailbox=job.mailbox,
        source=_redact(job.source),
        target_account=job.target_account,
        state=str(job.state.value),
        planned_date=_iso(job.planned_date),
        started_at=_iso(job.started_at),
        finished_at=_iso(job.finished_at),
        verified_at=_iso(job.verified_at),
        messages_copied=job.messages_copied,
        bytes_copied=job.bytes_copied,
        errors=job.errors,
        last_error=job.last_error,
        folders=tuple(
            FolderLine(
                f.source_name,
                f.target_name,
                f.source_count,
                f.target_count,
                f.copied,
                f.skipped,
                f.failed,
                f.bytes_copied,
            )
            for f in folders
        ),
        issues=tuple(
            IssueLine(i.folder, i.item, i.kind, ISSUE_LABELS.get(i.kind, i.kind), i.detail)
            for i in issues
            if i.kind not in (PRESENT_BEFORE, EVIDENCE_TAKEN)
        ),
        message_ids=message_id_mode(job),
        found_in_target=_found_before(issues),
    )


def _found_before(issues: Sequence[BasculeIssue]) -> int:
    """Messages kept as evidence of being in the target before the bascule, in the folders where
    that evidence was taken once before any copy (the ones verification trusts)."""
    taken = {i.folder for i in issues if i.kind == EVIDENCE_TAKEN}
    return sum(1 for i in issues if i.kind == PRESENT_BEFORE and i.folder in taken)


def _redact(uri: str) -> str:
    """Never print a password that someone put in a source URI."""
    if "://" in uri and "@" in uri:
        scheme, rest = uri.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':', 1)[0]}@{host}"
    return uri


def render_text(reports: Sequence[JobReport]) -> str:
    out: list[str] = []
    for r in reports:
        out.append(f"Bascule {r.department} / {r.mailbox}: {r.state}")
        out.append(f"  source {r.source} -> compte {r.target_account}")
        if r.message_ids:
            out.append(f"  doublons reconnus par: {r.message_ids}")
        if r.found_in_target:
            out.append(f"  {r.found_in_target} messages déjà dans la cible avant la bascule")
        out.append(f"  début {r.started_at or '-'}  fin {r.finished_at or '-'}  vérifiée {r.verified_at or '-'}")
        out.append(
            f"  {r.messages_copied} messages copiés ({r.bytes_copied / 1_000_000:.1f} Mo), "
            f"{r.errors} non copiés, {r.unexplained} écarts inexpliqués"
        )
        if r.last_error:
            out.append(f"  dernière erreur: {r.last_error}")
        out.append(
            f"  {'dossier source':<30} {'dossier cible':<30} {'source':>7} {'cible':>7} "
            f"{'copiés':>7} {'déjà':>6} {'échecs':>6}"
        )
        for f in r.folders:
            target_count = "-" if f.target_count is None else str(f.target_count)
            out.append(
                f"  {f.source[:30]:<30} {f.target[:30]:<30} {f.source_count:>7} {target_count:>7} "
                f"{f.copied:>7} {f.skipped:>6} {f.failed:>6}"
            )
        if r.issues:
            out.append("  anomalies:")
            for i in r.issues:
                where = " ".join(x for x in (i.folder, i.item) if x)
                out.append(f"    - {i.label}: {where} {i.detail}".rstrip())
        out.append("")
    return "\n".join(out)


CSV_HEADER = (
    "département",
    "boîte",
    "état",
    "dossier source",
    "dossier cible",
    "messages source",
    "messages cible",
    "copiés",
    "déjà présents",
    "non copiés",
    "octets copiés",
)
ISSUE_HEADER = ("département", "boîte", "dossier", "élément", "type", "libellé", "détail")


def _csv(rows: list[Sequence[object]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=";", lineterminator="\r\n")
    writer.writerows(rows)
    return "\ufeff".encode() + buffer.getvalue().encode("utf-8")


def render_csv(reports: Sequence[JobReport]) -> bytes:
    """Per-folder lines; UTF-8 with BOM and ';' so Excel opens it with the accents right."""
    rows: list[Sequence[object]] = [CSV_HEADER]
    for r in reports:
        for f in r.folders:
            rows.append(
                (
                    r.department,
                    r.mailbox,
                    r.state,
                    f.source,
                    f.target,
                    f.source_count,
                    "" if f.target_count is None else f.target_count,
                    f.copied,
                    f.skipped,
                    f.failed,
                    f.bytes,
                )
            )
    return _csv(rows)


def render_issues_csv(reports: Sequence[JobReport]) -> bytes:
    rows: list[Sequence[object]] = [ISSUE_HEADER]
    for r in reports:
        rows.extend((r.department, r.mailbox, i.folder, i.item, i.kind, i.label, i.detail) for i in r.issues)
    return _csv(rows)


def render_json(reports: Sequence[JobReport]) -> str:
    return json.dumps([{**asdict(r), "unexplained": r.unexplained} for r in reports], ensure_ascii=False, indent=2)
