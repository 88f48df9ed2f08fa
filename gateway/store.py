"""The IMAP store (I/O): APPEND to a service's mailbox through aioimaplib, exactly once.

``ImapStore`` logs in as ``<account>*<master user>`` (Dovecot master users), keeps a small pool
of connections per mailbox, APPENDs with INTERNALDATE = arrival time and returns the UIDPLUS
APPENDUID. Before a re-APPEND (the spool entry was claimed before, so a crash may have happened
after the APPEND and before it was recorded) it searches the mailbox for the spool id that our
Received header carries and returns the copy already there instead of adding a second one.
aioimaplib errors never leave this module: they become StoreUnavailable / StoreRejected.

``deliver_many`` files a worker batch's copies for one mailbox on one connection, in the order
given (= arrival order): those never tried before go in one MULTIAPPEND (RFC 3502) when the
server has MULTIAPPEND and LITERAL+ (Dovecot has both), which is one transaction and one round
trip for the batch; the APPENDUID response (RFC 4315) gives one UID per message, in order.
MULTIAPPEND is atomic: if the server refuses, nothing was added and each message is then
APPENDed alone so that only the offending one fails.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import re
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Protocol

import aioimaplib

from balf.gateway.errors import GatewayError, StoreDown, StoreRejected, StoreUnavailable
from balf.gateway.model import Delivered

log = logging.getLogger("balf.gateway.store")

_APPENDUID = re.compile(r"\[APPENDUID (\d+) ([\d:,]+)\]", re.IGNORECASE)
_UIDVALIDITY = re.compile(r"\[UIDVALIDITY (\d+)\]", re.IGNORECASE)
_SEARCH = re.compile(r"^\*?\s*SEARCH\b(.*)$", re.IGNORECASE)
# NO responses worth retrying (RFC 5530 response codes); any other NO/BAD is permanent.
_TEMPORARY_CODES = ("OVERQUOTA", "UNAVAILABLE", "INUSE", "SERVERBUG", "AUTHENTICATIONFAILED",
                    "LIMIT", "EXPUNGEISSUED", "CONTACTADMIN")
INBOX = "INBOX"
# One MULTIAPPEND carries at most this many bytes of messages; a larger batch is split.
MULTIAPPEND_MAX_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class Copy:
    """One message to file in a mailbox (``check_existing``: an earlier attempt may have)."""

    raw: bytes
    internaldate: dt.datetime
    spool_id: str
    check_existing: bool = False


class MailStore(Protocol):
    """Where a service's mail is filed."""

    async def deliver(self, account: str, raw: bytes, *, internaldate: dt.datetime,
                      spool_id: str, check_existing: bool) -> Delivered: ...

    async def deliver_many(self, account: str,
                           copies: Sequence[Copy]) -> list[Delivered | GatewayError]: ...

    async def close(self) -> None: ...


def parse_appenduid(lines: list[bytes | str]) -> tuple[int | None, int | None]:
    uidvalidity, uids = parse_appenduid_set(lines)
    return uidvalidity, (uids[-1] if uids else None)


def parse_appenduid_set(lines: list[bytes | str]) -> tuple[int | None, list[int]]:
    """UIDVALIDITY and the UIDs of an APPENDUID response code (RFC 4315 3: a uid-set, in
    the order the messages were given, for MULTIAPPEND)."""
    for line in lines:
        text = line.decode("ascii", "replace") if isinstance(line, bytes) else line
        m = _APPENDUID.search(text)
        if m:
            return int(m.group(1)), _uid_set(m.group(2))
    return None, []


def _uid_set(text: str) -> list[int]:
    uids: list[int] = []
    for part in text.split(","):
        low, _, high = part.partition(":")
        if high:
            a, b = int(low), int(high)
            uids.extend(range(a, b + 1) if a <= b else range(a, b - 1, -1))
        elif low:
            uids.append(int(low))
    return uids


def multiappend_payload(copies: Sequence[Copy]) -> tuple[str, bytes]:
    """The first message's arguments (synchronising literal, sent by aioimaplib) and the bytes
    sent after the server's continuation: the first message, then each further one as
    `` "date" {n+}CRLF<bytes>`` (LITERAL+, RFC 7888), so one round trip files them all."""
    first = copies[0]
    head = f"{INBOX} {aioimaplib.time2internaldate(first.internaldate)} {{{len(first.raw)}}}"
    parts = [first.raw]
    for c in copies[1:]:
        parts.append(f" {aioimaplib.time2internaldate(c.internaldate)} {{{len(c.raw)}+}}\r\n"
                     .encode("ascii"))
        parts.append(c.raw)
    return head, b"".join(parts)


def _chunks(copies: Sequence[Copy], positions: Sequence[int]) -> list[list[int]]:
    """``positions`` (indexes into ``copies``) cut into MULTIAPPENDs of at most
    ``MULTIAPPEND_MAX_BYTES``, in order."""
    out: list[list[int]] = []
    size = 0
    for i in positions:
        n = len(copies[i].raw)
        if not out or size + n > MULTIAPPEND_MAX_BYTES:
            out.append([])
            size = 0
        out[-1].append(i)
        size += n
    return out


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
        caps = {c.upper() for c in getattr(client.protocol, "capabilities", ())}
        self.multiappend = "MULTIAPPEND" in caps and "LITERAL+" in caps


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

    async def deliver_many(self, account: str,
                           copies: Sequence[Copy]) -> list[Delivered | GatewayError]:
        """File ``copies`` in order on one connection; one result per copy. A connection
        failure fails the copies not yet filed (StoreDown): they are retried, and as their
        entries were claimed, the retry checks for each copy before APPENDing it again."""
        results: list[Delivered | GatewayError | None] = [None] * len(copies)
        try:
            async with self._connection(account) as conn:
                fresh: list[int] = []
                for i, c in enumerate(copies):
                    if c.check_existing:
                        found = await self._find(conn, c.spool_id)
                        if found is not None:
                            log.info("event=store.already_there spool_id=%s account=%s uid=%s",
                                     c.spool_id, account, found)
                            results[i] = Delivered(INBOX, conn.uidvalidity, found, already_there=True)
                            continue
                    fresh.append(i)
                multi = conn.multiappend and len(fresh) > 1
                # Positions, not values: two equal copies (one message for two services that
                # share an account) each get their own result.
                for chunk in (_chunks(copies, fresh) if multi else []):
                    done = await self._multiappend(conn, account, [copies[i] for i in chunk])
                    for i, d in zip(chunk, done, strict=True):
                        results[i] = d
                for i in fresh:
                    if results[i] is None:
                        try:
                            results[i] = await self._append(conn, account, copies[i])
                        except (StoreRejected, StoreUnavailable) as exc:
                            results[i] = exc
        except StoreDown as exc:
            return [r if r is not None else exc for r in results]
        except GatewayError as exc:
            # LOGIN or SELECT refused (StoreUnavailable: retried; StoreRejected: dead-lettered):
            # a result for each copy not yet filed, not an error escaping the adapter.
            log.warning("event=store.session_failed account=%s error=%r", account, exc.detail)
            return [r if r is not None else exc for r in results]
        return [r if r is not None else StoreDown("not filed") for r in results]

    async def _append(self, conn: _Connection, account: str, copy: Copy) -> Delivered:
        resp = await self._call(conn.client.append(copy.raw, mailbox=INBOX, date=copy.internaldate),
                                f"APPEND to {account}")
        if resp.result != "OK":
            raise _classify(f"APPEND to {account}", resp.lines)
        uidvalidity, uid = parse_appenduid(resp.lines)
        return Delivered(INBOX, uidvalidity, uid)

    async def _multiappend(self, conn: _Connection, account: str,
                           chunk: list[Copy]) -> list[Delivered | None]:
        """One MULTIAPPEND; ``None`` for each copy when the server refused it (then nothing
        was added, RFC 3502 6.3.11, and the caller APPENDs them one by one)."""
        if len(chunk) == 1:
            return [None]
        head, payload = multiappend_payload(chunk)
        protocol = conn.client.protocol
        # aioimaplib has no MULTIAPPEND: its APPEND machinery sends our command line, waits
        # for the continuation of the first (synchronising) literal and then writes
        # ``literal_data``, which carries every further message as a LITERAL+ literal.
        command = aioimaplib.Command("APPEND", protocol.new_tag(), head, loop=protocol.loop)
        protocol.literal_data = payload
        resp = await self._call(protocol.execute(command), f"MULTIAPPEND to {account}")
        if resp.result != "OK":
            log.warning("event=store.multiappend_refused account=%s count=%d response=%r",
                        account, len(chunk), str(resp.lines)[:300])
            return [None] * len(chunk)
        uidvalidity, uids = parse_appenduid_set(resp.lines)
        if len(uids) != len(chunk):
            uids = []  # no UIDPLUS: the copies are there, their UIDs unknown
        return [Delivered(INBOX, uidvalidity, uids[i] if uids else None) for i in range(len(chunk))]

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
