"""Helpers of the bascule's live tests: a config file, the CLI, the target seen through IMAP (I/O)."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from click.testing import CliRunner, Result
from imapclient import IMAPClient

from balf.cli.group import cli
from tests.harness.dovecot import Account, Dovecot

DATA = Path(__file__).resolve().parents[1] / "data" / "bridge"
BALF = Path(sys.executable).with_name("balf")


def write_config(tmp: Path, db_url: str, dovecot: Dovecot, **bascule: Any) -> Path:
    settings = {"batch_messages": 50, "connections_per_mailbox": 3, **bascule}
    lines = [
        f'data_dir = "{tmp}/data"',
        "[database]",
        f'url = "{db_url}"',
        "auto_upgrade = true",
        "[imap]",
        f'host = "{dovecot.host}"',
        f"port = {dovecot.imap_port}",
        f'master_user = "{dovecot.master_user}"',
        f'master_password = "{dovecot.master_password}"',
        "[bascule]",
        *(f"{k} = {v!r}".replace("'", '"') for k, v in settings.items()),
    ]
    path = tmp / "balf.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_plan(tmp: Path, rows: list[tuple[str, str, str, str]]) -> Path:
    path = tmp / "plan.csv"
    text = "mailbox;source;target_account;planned_date;options\n"
    text += "".join(
        f"{mailbox};{source};{account};2026-12-01;{options}\n" for mailbox, source, account, options in rows
    )
    path.write_text("\ufeff" + text, encoding="utf-8")
    return path


def balf(config: Path, *args: str, env: dict[str, str] | None = None) -> Result:
    """Run `balf -c CONFIG ARGS` in-process (CliRunner)."""
    runner = CliRunner()
    return runner.invoke(cli, ["-c", str(config), *args], env=env, catch_exceptions=False)


def balf_process(config: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [str(BALF), "-c", str(config), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )


@dataclass(frozen=True)
class Seen:
    """A message as fetched from the target."""

    folder: str
    uid: int
    raw: bytes
    flags: frozenset[str]
    internaldate: dt.datetime


def imap(account: Account) -> IMAPClient:
    client = IMAPClient(account.host, port=account.port, ssl=False)
    client.normalise_times = False
    client.login(account.username, account.password)
    return client


def fetch_all(account: Account) -> dict[str, list[Seen]]:
    """Every selectable folder's messages, by decoded folder name."""
    client = imap(account)
    try:
        result: dict[str, list[Seen]] = {}
        for flags, _delim, name in client.list_folders():
            if b"\\Noselect" in flags:
                continue
            client.select_folder(name, readonly=True)
            uids = client.search(["ALL"])
            data = client.fetch(uids, [b"BODY.PEEK[]", b"FLAGS", b"INTERNALDATE"]) if uids else {}
            result[name] = [
                Seen(name, u, d[b"BODY[]"], frozenset(f.decode() for f in d[b"FLAGS"]), d[b"INTERNALDATE"])
                for u, d in sorted(data.items())
            ]
        return result
    finally:
        client.logout()


def subscribed(account: Account) -> set[str]:
    client = imap(account)
    try:
        return {name for _f, _d, name in client.list_sub_folders()}
    finally:
        client.logout()


def special_use(account: Account) -> dict[str, str]:
    client = imap(account)
    try:
        out = {}
        for flags, _d, name in client.list_folders():
            for flag in flags:
                if flag in (b"\\Sent", b"\\Drafts", b"\\Trash", b"\\Junk", b"\\Archive"):
                    out[flag.decode()] = name
        return out
    finally:
        client.logout()


def new_user(dovecot: Dovecot, stem: str, quota_bytes: int | None = None) -> Account:
    """A fresh account on the session Dovecot (tests run once per database backend)."""
    import secrets

    return dovecot.add_user(f"{stem}-{secrets.token_hex(3)}", quota_bytes=quota_bytes)
