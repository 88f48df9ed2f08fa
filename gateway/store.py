"""The IMAP store (I/O): APPEND to a service's mailbox through aioimaplib, exactly once.

``ImapStore`` logs in as ``<account>*<master user>`` (Dovecot master users), keeps a small pool
of connections per mailbox, APPENDs with INTERNALDATE = arrival time and returns the UIDPLUS
APPENDUID. Before a re-APPEND (the spool entry was claimed before, so a crash may have happened
after the APPEND and before it was recorded) it searches the mailbox for the spool id that our
Received header carries and returns the copy already there instead of adding a second one.
aioimaplib errors never leave this module: they become StoreUnavailable / StoreRejected.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Protocol

import aioimaplib

from balf.gateway.errors import StoreDown, StoreRejected, StoreUnavailable
from balf.gateway.model import Delivered

log = logging.getLogger("balf.gateway.store")

_APPENDUID = re.compile(r"\[APPENDUID (\d+) (\d+)\]", re.IGNORECASE)
_UIDVALIDITY = re.compile(r"\[UIDVALIDITY (\d+)\]", re.IGNORECASE)
_SEARCH = re.compile(r"^\*?\s*SEARCH\b(.*)$", re.IGNORECASE)
# NO responses worth retrying (RFC 5530 response codes); any other NO/BAD is permanent.
_TEMPORARY_CODES = ("OVERQUOTA", "UNAVAILABLE", "INUSE", "SERVERBUG", "AUTHENTICATIONFAILED",
                    "LIMIT", "EXPUNGEISSUED", "CONTACTADMIN")
INBOX = "INBOX"


class MailStore(Protocol):
    """Where a service's mail is filed."""

    async def deliver(self, account: str, raw: bytes, *, internaldate: dt.datetime,
                      spool_id: str, check_existing: bool) -> Delivered: ...

    async def close(self) -> None: ...


def parse_appenduid(lines: list[bytes | str]) -> tuple[int | None, int | None]:
    for line in lines:
        text = line.decode("ascii", "replace") if isinstance(line, bytes) else line
        m = _APPENDUID.search(text)
        if m:
            return int(m.group(1)), int(m.group(2))
    return None, None


def parse_search(lines: list[bytes | str]) -> list[int]:
    """UIDs from a SEARCH response; aioimaplib gives the untagged data without "* SEARCH"."""
    uids: list[int] = []
    for line in lines[:-1] if len(lines) > 1 else lines:
        text = (line.decode("ascii", "replace") if isinstance(line, bytes) else line).strip()
        m = _SEARCH.match(text)
        numbers = m.group(1) if m else text
        if numbers.replace(" ", "").isdigit():
            uids.extend(int(x) for x in numbers.split())
    return uids


def _classify(what: str, lines: list[bytes | str]) -> Exception:
    text = " ".join(x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x) for x in lines)
    if any(f"[{code}" in text.upper() for code in _TEMPORARY_CODES):
        return StoreUnavailable(f"{what}: {text[:300]}")
    return StoreRejected(f"{what}: {text[:300]}")


class _Connection:
    def __init__(self, client: aioimaplib.IMAP4) -> None:
        self.client = client
        self.selected = False
        self.uidvalidity: int | None = None


class ImapStore:
    """Delivery over IMAP with a pool of ``pool_size`` connections per mailbox."""

    def __init__(self, *, host: str, port: int, master_user: str, master_password: str,
                 pool_size: int = 2, timeout: float = 30.0, tls: str = "none") -> None:
        self.host, self.port, self.tls = host, port, tls
        self.master_user, self.master_password = master_user, master_password
        self.pool_size = max(1, pool_size)
        self.timeout = timeout
        self._idle: dict[str, list[_Connection]] = {}
        self._slots: dict[str, asyncio.Semaphore] = {}

    async def deliver(self, account: str, raw: bytes, *, internaldate: dt.datetime,
                      spool_id: str, check_existing: bool) -> Delivered:
        async with self._connection(account) as conn:
            if check_existing:
                found = await self._find(conn, spool_id)
                if found is not None:
                    log.info("event=store.already_there spool_id=%s account=%s uid=%s",
                             spool_id, account, found)
                    return Delivered(INBOX, conn.uidvalidity, found, already_there=True)
            resp = await self._call(conn.client.append(raw, mailbox=INBOX, date=internaldate),
                                    f"APPEND to {account}")
            if resp.result != "OK":
                raise _classify(f"APPEND to {account}", resp.lines)
            uidvalidity, uid = parse_appenduid(resp.lines)
            return Delivered(INBOX, uidvalidity, uid)

    async def _find(self, conn: _Connection, spool_id: str) -> int | None:
        if not conn.selected:
            resp = await self._call(conn.client.select(INBOX), "SELECT INBOX")
            if resp.result != "OK":
                raise _classify("SELECT INBOX", resp.lines)
            conn.selected = True
            for line in resp.lines:
                m = _UIDVALIDITY.search(line.decode() if isinstance(line, bytes) else line)
                if m:
                    conn.uidvalidity = int(m.group(1))
        else:
            await self._call(conn.client.noop(), "NOOP")  # see messages added since SELECT
        # The spool id appears in our Received header only ("... id <spool_id>"): RFC 3501 6.4.4.
        resp = await self._call(conn.client.uid_search("HEADER", "Received", f'"{spool_id}"', charset=None),
                                "UID SEARCH")
        if resp.result != "OK":
            raise _classify("UID SEARCH", resp.lines)
        uids = parse_search(resp.lines)
        return uids[-1] if uids else None

    async def _call(self, awaitable, what: str):  # type: ignore[no-untyped-def]
        try:
            return await asyncio.wait_for(awaitable, self.timeout)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, aioimaplib.Abort,
                aioimaplib.CommandTimeout) as exc:
            raise StoreDown(f"{what}: {type(exc).__name__}: {exc}") from None

    @asynccontextmanager
    async def _connection(self, account: str) -> AsyncIterator[_Connection]:
        slots = self._slots.setdefault(account, asyncio.Semaphore(self.pool_size))
        async with slots:
            idle = self._idle.setdefault(account, [])
            conn = idle.pop() if idle else await self._connect(account)
            try:
                yield conn
            except StoreUnavailable:
                await self._discard(conn)  # the connection may be broken: never reuse it
                raise
            except BaseException:
                await self._discard(conn)
                raise
            else:
                idle.append(conn)

    async def _connect(self, account: str) -> _Connection:
        cls = aioimaplib.IMAP4_SSL if self.tls == "ssl" else aioimaplib.IMAP4
        try:
            client = cls(host=self.host, port=self.port, timeout=self.timeout)
            await asyncio.wait_for(client.wait_hello_from_server(), self.timeout)
            if self.tls == "starttls":
                await asyncio.wait_for(client.starttls(), self.timeout)
            login = f"{account}*{self.master_user}" if self.master_user else account
            resp = await asyncio.wait_for(client.login(login, self.master_password), self.timeout)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, aioimaplib.Abort,
                aioimaplib.CommandTimeout) as exc:
            raise StoreDown(f"connect to {self.host}:{self.port}: {type(exc).__name__}: {exc}") from None
        if resp.result != "OK":
            # Wrong master password or unknown account: retried (an administrator can fix it)
            # until retry_max_age, then dead-lettered with this reason.
            raise StoreUnavailable(f"login {account}*{self.master_user}: "
                                   + " ".join(x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x)
                                              for x in resp.lines)[:300])
        return _Connection(client)

    async def _discard(self, conn: _Connection) -> None:
        try:
            await asyncio.wait_for(conn.client.logout(), 2)
        except Exception:  # noqa: BLE001 - already failing; closing is best effort
            pass

    async def close(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                await self._discard(conn)
        self._idle.clear()
