"""`balf bascule`: the migration campaign of Lotus-style BALF into IMAP (thin shells over balf.bridge)."""

from __future__ import annotations

import datetime as dt
import json
import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from balf.bridge.campaign import parse_campaign
from balf.bridge.errors import BridgeError
from balf.bridge.options import check_department
from balf.cli import shortcut
from balf.cli.context import fail, run_async, state
from balf.cli.outcomes import mode_line, outcome_lines
from balf.cli.shortcut import target_access
from balf.config.schema import Config
from balf.db.states import BasculeState

# The database layer, the copy and the reports are imported inside the commands: SQLAlchemy and
# the models cost about a second at every start, and `run` first asks balf.bridge.quickrun,
# which answers a rerun over unchanged mailboxes without them.
if TYPE_CHECKING:
    from balf.bridge import report as reports
    from balf.bridge import store
    from balf.bridge.domino import ModeNote
    from balf.bridge.outcome import JobOutcome

STATE_ORDER = [
    BasculeState.PLANIFIEE,
    BasculeState.EN_COURS,
    BasculeState.MIGREE,
    BasculeState.VERIFIEE,
    BasculeState.EN_ERREUR,
]


@click.group("bascule")
def command() -> None:
    """Migrate BALF mailboxes into IMAP, department by department (plan, run, status, verify, report)."""


def _department(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return check_department(value)
    except BridgeError as exc:
        raise click.BadParameter(str(exc)) from exc


async def _with_db(config: Config, fn: Any, *args: Any) -> Any:
    from balf.db.engine import create_engine, session_factory
    from balf.db.migrate import at_head, current, upgrade

    engine = create_engine(config.database_url, pool_size=config.database.pool_size)
    try:
        if config.database.auto_upgrade and not await at_head(engine):
            revision, head = await current(engine)
            if revision != head:
                await upgrade(engine)
        return await fn(session_factory(engine), *args)
    finally:
        await engine.dispose()


def _report_dir(config: Config, output: str | None) -> Path:
    return Path(output or config.bascule.report_dir or f"{config.data_dir}/bascule")


@command.command("plan")
@click.option("--department", "-d", required=True, help="INSEE department code (33, 2A, 971).")
@click.argument("campaign_file", type=click.Path(exists=True, dir_okay=False))
@click.pass_context
def plan_command(ctx: click.Context, department: str, campaign_file: str) -> None:
    """Record the department's mailboxes from CAMPAIGN_FILE.

    CSV with a header: mailbox;source;target_account;planned_date;options (see docs/bascule.md).
    """
    config = state(ctx).config()
    dept = _department(department) or ""
    try:
        planned = parse_campaign(Path(campaign_file).read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError:
        fail(f"{campaign_file}: not UTF-8 text (save the CSV as UTF-8)", 2)
    except BridgeError as exc:
        fail(f"{campaign_file}: {exc}", 2)
    from balf.bridge import store

    created, updated, kept = run_async(_with_db, config, store.plan_department, dept, planned)
    click.echo(f"département {dept}: {len(planned)} boîtes au plan, {created} ajoutées, {updated} mises à jour")
    for name in kept:
        click.echo(f"  {name}: déjà commencée, source et compte cible inchangés", err=True)


@command.command("run")
@click.option("--department", "-d", required=True, help="INSEE department code.")
@click.option("--mailbox", "-m", "mailboxes", multiple=True, help="Only this mailbox (repeatable).")
@click.option("--dry-run", is_flag=True, help="Show what would be copied; write nothing anywhere.")
@click.option("--connections", type=click.IntRange(1, 32), help="IMAP connections per mailbox to the target.")
@click.option("--parallel", type=click.IntRange(1, 64), help="Mailboxes migrated at the same time.")
@click.option("--quiet", "-q", is_flag=True, help="No progress lines (they are off anyway when not on a terminal).")
@click.option("--again", is_flag=True, help="Include mailboxes already verified (copies only what is new).")
@click.pass_context
def run_command(
    ctx: click.Context,
    department: str,
    mailboxes: tuple[str, ...],
    dry_run: bool,
    connections: int | None,
    parallel: int | None,
    quiet: bool,
    again: bool,
) -> None:
    """Copy the department's mailboxes (resuming where a previous run stopped)."""
    config = state(ctx).config()
    dept = _department(department) or ""
    if not dry_run and not shortcut.attempted:  # the entry point asked quickrun already
        from balf.bridge.quickrun import quick_rerun

        width = parallel or config.bascule.mailboxes_in_parallel
        quick = quick_rerun(config.database_url, dept, mailboxes, again, target_access(config), width)
        if quick is not None:  # nothing changed anywhere since the last run: nothing to copy
            for mailbox, mode in quick.notes:
                click.echo(mode_line(mailbox, mode))
            _print_outcomes(list(quick.outcomes), dry_run)
            return
    from balf.bridge import store
    from balf.bridge.domino import settle_modes
    from balf.bridge.migrate import RunSettings, run_department
    from balf.bridge.progress import TerminalProgress

    settings = RunSettings(
        connections=connections or config.bascule.connections_per_mailbox,
        batch_messages=config.bascule.batch_messages,
        batch_bytes=config.bascule.batch_bytes,
        max_message_size=config.bascule.max_message_size,
        dry_run=dry_run,
        lease=dt.timedelta(seconds=config.bascule.lease_seconds),
    )
    progress = TerminalProgress(enabled=False if quiet else None)
    _limit_heap_growth()

    async def go(sessions: store.Sessions) -> tuple[list[ModeNote], list[JobOutcome]]:
        jobs = await store.list_jobs(sessions, dept)
        if mailboxes:
            unknown = sorted(set(mailboxes) - {j.mailbox for j in jobs})
            if unknown:
                fail(f"not in the plan of department {dept}: {', '.join(unknown)}", 2)
            jobs = [j for j in jobs if j.mailbox in mailboxes]
        elif not again:
            jobs = [j for j in jobs if j.state is not BasculeState.VERIFIEE]
        if not jobs:
            fail(f"department {dept}: nothing to run (plan it with `balf bascule plan`)", 2)
        notes = await settle_modes(sessions, jobs, timeout=target_access(config).timeout, record=not dry_run)
        undecided = {n.mailbox for n in notes if n.error}
        jobs = [j for j in jobs if j.mailbox not in undecided]
        outcomes = (
            await run_department(
                sessions,
                jobs,
                settings,
                target_access(config),
                parallel or config.bascule.mailboxes_in_parallel,
                progress,
            )
            if jobs
            else []
        )
        return notes, outcomes

    notes, outcomes = run_async(_with_db, config, go)
    for note in notes:
        if note.error:
            click.echo(f"balf: {note.error}", err=True)
        else:
            click.echo(mode_line(note.mailbox, note.mode))
    _print_outcomes(outcomes, dry_run)
    codes = [o.exit_code for o in outcomes if o.exit_code] + [1 for n in notes if n.error]
    if codes:
        sys.exit(113 if 113 in codes else max(codes))


def _limit_heap_growth() -> None:
    """Keep the run's memory flat whatever the mailbox size (glibc only; a no-op elsewhere).

    glibc serves a block from mmap (returned to the system when freed) only above a threshold that
    starts at 128 KiB and rises, each time such a block is freed, up to 32 MiB: after a few 1-5 MB
    messages every message body is carved from the heap, which fragments and keeps growing with
    the number of big messages seen. A fixed threshold keeps bodies of 256 KiB and more in mmap;
    two malloc arenas instead of one per thread keep the worker threads from holding freed memory
    each. Measured on the 5,000-message benchmark: peak 210 MB -> 140 MB at the same speed.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None)  # the C library the interpreter runs on
        libc.mallopt(-3, 256 * 1024)  # M_MMAP_THRESHOLD (malloc.h); also stops its dynamic growth
        libc.mallopt(-8, 2)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def _print_outcomes(outcomes: list[JobOutcome], dry_run: bool) -> None:
    for line, to_stderr in outcome_lines(outcomes, dry_run):
        click.echo(line, err=to_stderr)


@command.command("status")
@click.option("--department", "-d", help="Only this department.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def status_command(ctx: click.Context, department: str | None, as_json: bool) -> None:
    """Where the campaign stands: state, counts, sizes and durations per mailbox."""
    from balf.bridge import store

    config = state(ctx).config()
    jobs = run_async(_with_db, config, store.list_jobs, _department(department))
    if as_json:
        click.echo(json.dumps([_job_dict(j) for j in jobs], ensure_ascii=False, indent=2))
        return
    if not jobs:
        click.echo("aucune boîte planifiée" + (f" pour le département {department}" if department else ""))
        return
    current = None
    for job in jobs:
        if job.department != current:
            current = job.department
            dept_jobs = [j for j in jobs if j.department == current]
            counts = Counter(j.state for j in dept_jobs)
            summary = ", ".join(f"{counts[s]} {s.value}" for s in STATE_ORDER if counts[s])
            click.echo(f"département {current}: {len(dept_jobs)} boîtes - {summary}")
            click.echo(
                f"  {'boîte':<24} {'état':<11} {'prévue':<10} {'messages':>15} {'taille':>10} {'durée':>9}  erreurs"
            )
        d = _job_dict(job)
        total = f"{job.messages_copied}/{job.messages_total or '?'}"
        click.echo(
            f"  {job.mailbox[:24]:<24} {job.state.value:<11} {d['planned_date'] or '-':<10} {total:>15} "
            f"{job.bytes_copied / 1_000_000:>8.1f}Mo {_duration(d['seconds']):>9}  {job.errors}"
            + (f"  ({job.last_error})" if job.last_error and job.state is BasculeState.EN_ERREUR else "")
        )


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _job_dict(job: Any) -> dict[str, Any]:
    from balf.bridge import report as reports

    seconds = None
    if job.started_at and job.finished_at:
        seconds = (job.finished_at - job.started_at).total_seconds()
    return {
        "department": job.department,
        "mailbox": job.mailbox,
        "state": job.state.value,
        "planned_date": job.planned_date.isoformat() if job.planned_date else None,
        "target_account": job.target_account,
        "messages_total": job.messages_total,
        "messages_copied": job.messages_copied,
        "bytes_copied": job.bytes_copied,
        "errors": job.errors,
        "started_at": job.started_at.isoformat() if job.started_at else None,
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
        "verified_at": job.verified_at.isoformat() if job.verified_at else None,
        "seconds": seconds,
        "last_error": job.last_error,
        "message_ids": reports.message_id_mode(job),
    }


async def _snapshots(sessions: store.Sessions, dept: str, mailboxes: tuple[str, ...]) -> list[reports.JobReport]:
    from balf.bridge import report as reports
    from balf.bridge import store

    result = []
    for job in await store.list_jobs(sessions, dept):
        if mailboxes and job.mailbox not in mailboxes:
            continue
        result.append(
            reports.snapshot(job, await store.folders_of(sessions, job.id), await store.issues_of(sessions, job.id))
        )
    return result


def _write_reports(snaps: list[reports.JobReport], directory: Path, stem: str) -> list[Path]:
    from balf.bridge import report as reports

    try:
        directory.mkdir(parents=True, exist_ok=True)
        paths = [
            directory / f"{stem}.txt",
            directory / f"{stem}.csv",
            directory / f"{stem}-anomalies.csv",
            directory / f"{stem}.json",
        ]
        paths[0].write_text(reports.render_text(snaps), encoding="utf-8")
        paths[1].write_bytes(reports.render_csv(snaps))
        paths[2].write_bytes(reports.render_issues_csv(snaps))
        paths[3].write_text(reports.render_json(snaps), encoding="utf-8")
    except OSError as exc:
        fail(f"cannot write the report in {directory}: {exc}")
    return paths


@command.command("verify")
@click.option("--department", "-d", required=True, help="INSEE department code.")
@click.option("--mailbox", "-m", "mailboxes", multiple=True, help="Only this mailbox (repeatable).")
@click.option(
    "--output", "-o", type=click.Path(file_okay=False), help="Report directory (default: bascule.report_dir)."
)
@click.pass_context
def verify_command(ctx: click.Context, department: str, mailboxes: tuple[str, ...], output: str | None) -> None:
    """Compare source and target folder by folder (counts, Message-ID sets) and write the report."""
    from balf.bridge import store
    from balf.bridge.domino import settle_modes
    from balf.bridge.verify import verify_job

    config = state(ctx).config()
    dept = _department(department) or ""

    async def go(sessions: store.Sessions) -> tuple[list[tuple[str, Any, str | None]], list[reports.JobReport]]:
        results: list[tuple[str, Any, str | None]] = []
        jobs = [j for j in await store.list_jobs(sessions, dept) if not mailboxes or j.mailbox in mailboxes]
        started = [j for j in jobs if j.state is not BasculeState.PLANIFIEE]
        await settle_modes(sessions, started, timeout=target_access(config).timeout, record=True)  # started: no probe
        for job in jobs:
            if job.state is BasculeState.PLANIFIEE:
                results.append((job.mailbox, None, "pas encore migrée"))
                continue
            verdicts, error = await verify_job(
                sessions, job.id, target_access(config), lease=dt.timedelta(seconds=config.bascule.lease_seconds)
            )
            results.append((job.mailbox, verdicts, error))
        return results, await _snapshots(sessions, dept, mailboxes)

    results, snaps = run_async(_with_db, config, go)
    if not results:
        fail(f"department {dept}: no mailbox to verify", 2)
    bad = 0
    for mailbox, verdicts, error in results:
        if error or verdicts is None:
            bad += 1
            click.echo(f"{mailbox}: NON VÉRIFIÉE - {error}")
            continue
        ok = all(v.ok for v in verdicts)
        bad += 0 if ok else 1
        click.echo(f"{mailbox}: {'vérifiée' if ok else 'ÉCARTS'}")
        for v in verdicts:
            explained = Counter(d.kind for d in v.explained)
            line = (
                f"  {v.target}: source {v.source_count}, cible {v.target_count}, manquants {len(v.missing)}, "
                f"en plus dans la cible {len(v.extra)}, en double dans la cible {len(v.duplicated)}, "
                f"expliqués {len(v.explained)}"
            )
            if explained:
                line += " (" + ", ".join(f"{k} {n}" for k, n in sorted(explained.items())) + ")"
            click.echo(line)
            for d in v.unexplained[:10]:
                click.echo(f"    {_UNEXPLAINED_WORDS[d.kind]}: {d.key}" + (f" ({d.copies})" if d.copies > 1 else ""))
    stem = f"bascule-{dept}" + (f"-{'-'.join(mailboxes)}" if len(mailboxes) == 1 else "")
    paths = _write_reports(snaps, _report_dir(config, output), stem)
    click.echo(f"rapport: {', '.join(str(p) for p in paths)}")
    if bad:
        click.echo(
            "les messages manquants seront recopiés par `balf bascule run` (puis revérifier); "
            "les messages en plus ou en double sont à examiner dans la cible (voir le rapport)",
            err=True,
        )
        sys.exit(1)


_UNEXPLAINED_WORDS = {"manquant": "manquant", "en_plus": "en plus", "en_double": "en double"}


@command.command("report")
@click.option("--department", "-d", required=True, help="INSEE department code.")
@click.option("--mailbox", "-m", "mailboxes", multiple=True, help="Only this mailbox (repeatable).")
@click.option("--output", "-o", type=click.Path(file_okay=False), help="Write text, CSV and JSON files here.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "csv", "json"]),
    default="text",
    help="What to print when no --output is given.",
)
@click.pass_context
def report_command(
    ctx: click.Context, department: str, mailboxes: tuple[str, ...], output: str | None, fmt: str
) -> None:
    """Print (or write) the department's bascule report from the recorded state."""
    from balf.bridge import report as reports

    config = state(ctx).config()
    dept = _department(department) or ""
    snaps = run_async(_with_db, config, _snapshots, dept, mailboxes)
    if not snaps:
        fail(f"department {dept}: nothing planned", 2)
    if output:
        paths = _write_reports(snaps, Path(output), f"bascule-{dept}")
        click.echo(f"rapport: {', '.join(str(p) for p in paths)}")
    elif fmt == "csv":
        click.echo(reports.render_csv(snaps), nl=False)  # bytes: written as is (BOM and all)
    elif fmt == "json":
        click.echo(reports.render_json(snaps))
    else:
        click.echo(reports.render_text(snaps))
