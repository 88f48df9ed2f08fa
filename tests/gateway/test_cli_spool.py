"""`balf spool list|show|retry|purge` against a real database."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

from click.testing import CliRunner

from balf.cli.group import cli
from balf.db.engine import create_engine
from balf.gateway.ledger import SqlLedger
from balf.gateway.model import Envelope, SpooledMessage
from balf.gateway.parse import sha256_of

RAW = b"From: jean@exemple.fr\r\nSubject: x\r\n\r\nbody\r\n"


async def _seed(url: str) -> None:
    engine = create_engine(url)
    ledger = SqlLedger(engine, secret=b"s" * 32, domain="balf.test", instance="t")
    now = dt.datetime.now(dt.UTC)
    await ledger.index([SpooledMessage(Envelope(f"ID{i}", "jean@exemple.fr", ("a@balf.test",),
                                                now - dt.timedelta(hours=i)), RAW, sha256_of(RAW))
                        for i in range(3)])
    await ledger.dead_letter("ID1", "deliver: APPEND to a: NO [TRYCREATE] no mailbox", now)
    await ledger.mark_done("ID2", now)
    await engine.dispose()


def test_spool_commands(db_url: str, tmp_path: Path) -> None:
    asyncio.run(_seed(db_url))
    conf = tmp_path / "balf.toml"
    conf.write_text(f'data_dir = "{tmp_path}"\n[database]\nurl = "{db_url}"\n[gateway]\nsecret = "{"s" * 32}"\n')
    run = lambda *args: CliRunner().invoke(cli, ["--config", str(conf), "spool", *args])  # noqa: E731

    out = run("list")
    assert out.exit_code == 0, out.output
    assert "ID0" in out.output and "ID1" in out.output and "TRYCREATE" in out.output
    assert "ID2" not in out.output
    assert "ID2" in run("list", "--state", "all").output

    shown = run("show", "ID1")
    assert "state: dead" in shown.output and "last error: deliver: APPEND" in shown.output
    assert run("show", "ID0", "--raw").stdout_bytes == RAW
    missing = run("show", "NOPE")
    assert missing.exit_code == 1 and "no spool entry NOPE" in missing.output

    assert "1 entry due now" in run("retry", "ID1").output
    assert "state: queued" in run("show", "ID1").output
    assert run("retry").exit_code == 2

    assert "1 entry purged" in run("purge").output  # done only
    assert "0 entries purged" in run("purge", "--state", "dead", "--yes").output
    assert "ID2" not in run("list", "--state", "all").output
