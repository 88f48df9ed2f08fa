"""Fixtures of the gateway's live tests: services in the database, a config, IMAP counting."""

from __future__ import annotations

import asyncio
import imaplib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from balf.config.loader import build_config
from balf.config.schema import Config
from balf.db.engine import session_factory
from balf.db.models import Service, ServiceAddress, ServiceKind, SpoolEntry, SpoolState
from balf.gateway.daemon import Gateway, run_gateway
from tests.harness.ports import free_port

SECRET = "test-secret-" + "x" * 32
DOMAIN = "balf.test"


@dataclass(frozen=True)
class Mailbox:
    address: str
    account: str  # Dovecot user


def make_config(tmp_path: Path, db_url: str, dovecot: Any, **overrides: Any) -> Config:
    data: dict[str, Any] = {
        "data_dir": str(tmp_path / "data"),
        "database": {"url": db_url},
        "smtp": {"host": "127.0.0.1", "port": free_port(), "hostname": "mx.balf.test", "shutdown_grace": 1.0},
        "imap": {"host": dovecot.host, "port": dovecot.imap_port, "master_user": dovecot.master_user,
                 "master_password": dovecot.master_password, "timeout": 5.0},
        "gateway": {"domain": DOMAIN, "secret": SECRET, "retry_delay": 0.2, "retry_max_delay": 1.0,
                    "claim_lease": 30.0, "directory_refresh": 0.5},
        "spool": {"group_commit_ms": 1.0, "min_free_bytes": 0},
        "relay": {"host": "127.0.0.1", "port": 1},  # nothing listens: acknowledgements stay pending
    }
    for section, values in overrides.items():
        data.setdefault(section, {}).update(values)
    return build_config(data, {}, source="test")


async def seed_services(engine: AsyncEngine, dovecot: Any, n: int = 2) -> list[Mailbox]:
    """n services, each with a BALF address and its own Dovecot account."""
    import secrets as _s

    boxes = []
    async with session_factory(engine).begin() as s:
        for i in range(n):
            account = dovecot.add_user(f"balf-{i}-{_s.token_hex(3)}").username
            address = f"service{i}@{DOMAIN}"
            svc = Service(code=f"SIP{i:05d}", kind=ServiceKind.SIP, department="75",
                          name=f"SIP Paris {i}", imap_account=account)
            svc.addresses.append(ServiceAddress(address=address, address_key=address))
            s.add(svc)
            boxes.append(Mailbox(address, account))
    return boxes


def imap_messages(dovecot: Any, account: str) -> list[bytes]:
    """Every message's header in the account's INBOX, in UID order (master login)."""
    with imaplib.IMAP4(dovecot.host, dovecot.imap_port) as imap:
        imap.login(f"{account}*{dovecot.master_user}", dovecot.master_password)
        imap.select("INBOX", readonly=True)
        typ, data = imap.uid("FETCH", "1:*", "(BODY.PEEK[HEADER])")
        if typ != "OK":
            return []
        return [part[1] for part in data if isinstance(part, tuple)]


def spool_ids_in(headers: list[bytes]) -> list[str]:
    ids = []
    for h in headers:
        m = re.search(rb"\(balf\) with \S+ id ([0-9A-Z]+)", h)
        if m:
            ids.append(m.group(1).decode())
    return ids


async def wait_spool_state(engine: AsyncEngine, *, queued: int = 0, total: int | None = None,
                           timeout: float = 30.0) -> None:
    """Wait until ``total`` entries exist and at most ``queued`` are still queued."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        async with session_factory(engine)() as s:
            counts = dict((await s.execute(select(SpoolEntry.state, func.count())
                                           .group_by(SpoolEntry.state))).all())
        all_rows = sum(counts.values())
        if counts.get(SpoolState.QUEUED, 0) <= queued and (total is None or all_rows >= total):
            return
        if loop.time() > deadline:
            raise AssertionError(f"spool not settled: {counts}")
        await asyncio.sleep(0.1)


@pytest.fixture
async def gateway_factory(tmp_path: Path) -> AsyncIterator[Any]:
    """Start run_gateway in this loop; stopped at teardown."""
    running: list[tuple[asyncio.Event, asyncio.Task[None]]] = []

    async def start(config: Config, engine: AsyncEngine, **kwargs: Any) -> Gateway:
        stop = asyncio.Event()
        started: asyncio.Future[Gateway] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(run_gateway(config, engine, stop, started=started, **kwargs))
        running.append((stop, task))
        done, _ = await asyncio.wait([started, task], return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            task.result()
        return started.result()

    yield start
    for stop, task in running:
        stop.set()
        await asyncio.wait_for(task, 30)
