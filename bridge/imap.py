"""IMAP through imapclient: the IMAP source and the IMAP target of the bascule (I/O: network).

The only module that imports imapclient's connection classes; its exceptions (and socket
errors) are translated here into ``balf.bridge.errors``. imapclient is blocking: callers run one
connection per thread (``asyncio.to_thread``), never one connection from two threads at once.
Folder names are Unicode on this side; imapclient encodes them in modified UTF-7 (RFC 3501 5.1.3).
"""

from __future__ import annotations

import datetime as dt
import imaplib
import logging
import re
import ssl
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientAbortError, IMAPClientError, LoginError

from balf.bridge.errors import (
    QuotaExceeded,
    SourceRefused,
    SourceUnavailable,
    TargetRefused,
    TargetUnavailable,
    TemporaryFailure,
)
from balf.bridge.keys import dedup_key, key_from_message_id_header
from balf.bridge.login import Login
from balf.bridge.model import Quota, Role, SourceDamage, SourceFolder, SourceItem, SourceMessage

T = TypeVar("T")

FETCH_BATCH_BYTES = 4 * 1024 * 1024  # what one FETCH brings at most (a bigger message alone)
FETCH_BATCH_COUNT = 200
HEADER_BATCH = 1000
RECONNECT_DELAYS = (1.0, 3.0, 6.0)  # seconds before each new attempt: a restarting server gets ~10 s
RECONNECTS = len(RECONNECT_DELAYS)
_APPENDUID = re.compile(rb"APPENDUID (\d+) ([\d:,]+)", re.I)
_ROLE_FLAGS = {
    b"\\sent": Role.SENT,
    b"\\drafts": Role.DRAFTS,
    b"\\trash": Role.TRASH,
    b"\\junk": Role.JUNK,
    b"\\archive": Role.ARCHIVE,
}
_NOT_STORABLE = {"\\recent"}


def connect(login: Login, *, for_source: bool) -> IMAPClient:
    """An authenticated IMAPClient; raises the source or target flavour of our errors."""
    unavailable = SourceUnavailable if for_source else TargetUnavailable
    refused = SourceRefused if for_source else TargetRefused
    where = f"{login.username}@{login.host}:{login.port}"
    try:
        client = IMAPClient(login.host, port=login.port, ssl=login.tls == "ssl", timeout=login.timeout)
        if login.tls == "starttls":
            client.starttls(ssl.create_default_context())
        client.normalise_times = False  # aware INTERNALDATEs
        _quiet_imaplib(client)
        client.login(login.username, login.password)
        return client
    except LoginError as exc:
        raise refused(f"IMAP login refused for {where}: {_text(exc)}") from exc
    except (OSError, IMAPClientError, imaplib.IMAP4.error) as exc:
        raise unavailable(f"IMAP server {where} unreachable: {_text(exc)}") from exc


def _quiet_imaplib(client: IMAPClient) -> None:
    """Turn off imaplib's protocol trace unless imapclient's logger would print it.

    imapclient sets imaplib's debug level to 5 so that its "imapclient.imaplib" logger sees the
    protocol; imaplib then formats the repr of every response, message bodies included, before
    the logger drops it. Measured on the benchmark's mailbox: 4.6 s of the 5.2 s of CPU spent
    reading 226 MB from the source, which made the source reader the bascule's bottleneck."""
    imap = getattr(client, "_imap", None)
    if imap is not None and not logging.getLogger("imapclient.imaplib").isEnabledFor(logging.DEBUG):
        imap.debug = 0


def _response_text(data: Any) -> str:
    parts = data if isinstance(data, (list, tuple)) else [data]
    return " ".join(p.decode("utf-8", "replace") if isinstance(p, bytes) else str(p) for p in parts if p)


def _text(exc: BaseException) -> str:
    return str(exc)


def parse_uid_set(text: bytes) -> list[int]:
    """``3:5,9`` -> [3, 4, 5, 9] (RFC 4315 uid-set)."""
    uids: list[int] = []
    for part in text.split(b","):
        low, _, high = part.partition(b":")
        a = int(low)
        b = int(high) if high else a
        uids.extend(range(min(a, b), max(a, b) + 1))
    return uids


def appended_uids(response: Any, count: int) -> list[int] | None:
    """The UIDs from an APPENDUID response code (RFC 4315 3), None when absent or inconsistent."""
    data = response if isinstance(response, bytes) else str(response).encode()
    match = _APPENDUID.search(data)
    if not match:
        return None
    uids = parse_uid_set(match.group(2))
    return uids if len(uids) == count else None


def _flag_str(flag: Any) -> str:
    return flag.decode("utf-8", "replace") if isinstance(flag, bytes) else str(flag)


def fetch_keys(client: IMAPClient, uids: Sequence[int], *, local_part_only: bool) -> Iterator[tuple[int, str, int]]:
    """(uid, dedup key, size) for ``uids`` of the selected folder; whole messages are fetched
    only for those without a Message-ID (their key is a content hash)."""
    for start in range(0, len(uids), HEADER_BATCH):
        chunk = list(uids[start : start + HEADER_BATCH])
        data = client.fetch(chunk, [b"BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]", b"RFC822.SIZE"])
        need_body = []
        for uid in chunk:
            item = data.get(uid)
            if item is None:
                continue
            header = next((v for k, v in item.items() if k.startswith(b"BODY[HEADER")), b"") or b""
            key = key_from_message_id_header(header, local_part_only=local_part_only)
            if key is None:
                need_body.append(uid)
            else:
                yield uid, key, int(item.get(b"RFC822.SIZE", 0))
        for uid in need_body:
            body = client.fetch([uid], [b"BODY.PEEK[]"]).get(uid, {}).get(b"BODY[]") or b""
            yield uid, dedup_key(body, local_part_only=local_part_only), len(body)


def uid_sizes(client: IMAPClient, after: int) -> list[tuple[int, int]]:
    """(uid, RFC822.SIZE) of the selected folder's messages with a UID above ``after``, in order."""
    uids = sorted(u for u in client.search(["UID", f"{after + 1}:*"]) if u > after)
    result: list[tuple[int, int]] = []
    for start in range(0, len(uids), HEADER_BATCH):
        chunk = uids[start : start + HEADER_BATCH]
        data = client.fetch(chunk, [b"RFC822.SIZE"])
        result.extend((u, int(data[u].get(b"RFC822.SIZE", 0))) for u in chunk if u in data)
    return result


def _status_triple(info: Any, exists: bytes = b"MESSAGES") -> tuple[int, int | None, int | None]:
    def number(key: bytes) -> int | None:
        value = info.get(key)
        return int(value) if value is not None else None

    return number(exists) or 0, number(b"UIDVALIDITY"), number(b"UIDNEXT")


class ImapSource:
    """An IMAP server as a MailSource; Domino-aware (see the module docstring of ``folders``).

    Positions are ``UIDVALIDITY:UID``; a dropped connection is reopened up to RECONNECTS times,
    RECONNECT_DELAYS apart (a restarting server), and reading resumes after the last message
    handed over, provided the folder kept its UIDVALIDITY.
    """

    kind = "imap"

    def __init__(self, login: Login) -> None:
        self.login = login
        self.remarks: list[tuple[str, str]] = []
        self._client: IMAPClient | None = None
        self._selected: tuple[int, str] | None = None  # (id of the connection, folder it has selected)
        self._status: dict[str, tuple[int, int | None, int | None]] = {}  # messages, UIDVALIDITY, UIDNEXT

    @property
    def client(self) -> IMAPClient:
        if self._client is None:
            self._client = connect(self.login, for_source=True)
        return self._client

    def _retry(self, fn: Callable[[IMAPClient], T], what: str = "") -> T:
        """``fn(client)``, reconnecting after a dropped connection (or one that cannot be
        reopened yet: a restarting server) up to RECONNECTS times, waiting RECONNECT_DELAYS."""
        last: BaseException | None = None
        for delay in (0.0, *RECONNECT_DELAYS):
            if delay:
                self._sleep(delay)
            try:
                return fn(self.client)
            except SourceUnavailable as exc:  # connect() failed: the server is not back yet
                last = exc
                self._drop()
            except (TimeoutError, OSError, IMAPClientAbortError, imaplib.IMAP4.abort) as exc:
                last = exc
                self._drop()
            except (IMAPClientError, imaplib.IMAP4.error) as exc:
                raise SourceRefused(f"source IMAP error{' during ' + what if what else ''}: {_text(exc)}") from exc
        where = f"{self.login.username}@{self.login.host}:{self.login.port}"
        raise SourceUnavailable(
            f"source IMAP {where}: connection lost{' during ' + what if what else ''}, "
            f"{RECONNECTS} reconnections failed ({_text(last or Exception())})"
        )

    _sleep = staticmethod(time.sleep)  # replaced by tests

    def _drop(self) -> None:
        client, self._client, self._selected = self._client, None, None
        if client is not None:
            try:
                client.shutdown()
            except (OSError, IMAPClientError, imaplib.IMAP4.error):
                pass

    def folders(self) -> list[SourceFolder]:
        def go(client: IMAPClient) -> list[SourceFolder]:
            self._selected = None
            result = []
            for flags, delimiter, name in client.list_folders():
                lower = {f.lower() if isinstance(f, bytes) else str(f).lower().encode() for f in flags}
                if b"\\noselect" in lower or b"\\nonexistent" in lower:
                    continue
                delim = _flag_str(delimiter) if delimiter else ""
                path = tuple(p for p in (name.split(delim) if delim else [name]) if p != "")
                role = (
                    Role.INBOX
                    if name.upper() == "INBOX"
                    else next((r for f, r in _ROLE_FLAGS.items() if f in lower), Role.NONE)
                )
                count, size = self._sizes(client, name)
                result.append(SourceFolder(path or (name,), name, role, estimated_count=count, estimated_bytes=size))
            return result

        return self._retry(go, "LIST")

    def _sizes(self, client: IMAPClient, name: str) -> tuple[int, int]:
        """(messages, bytes) of a folder; its UIDVALIDITY and UIDNEXT are kept for ``unchanged_since``."""
        if client.has_capability("STATUS=SIZE"):  # RFC 8438: one command instead of a FETCH of every size
            status = client.folder_status(name, [b"MESSAGES", b"SIZE", b"UIDVALIDITY", b"UIDNEXT"])
            self._status[name] = _status_triple(status)
            return int(status.get(b"MESSAGES", 0)), int(status.get(b"SIZE", 0))
        info = client.select_folder(name, readonly=True)
        self._status[name] = _status_triple(info, exists=b"EXISTS")
        if not info.get(b"EXISTS"):
            return 0, 0
        sizes = uid_sizes(client, 0)
        return len(sizes), sum(s for _u, s in sizes)

    def listed_status(self) -> dict[str, tuple[int, int | None, int | None]]:
        """(messages, UIDVALIDITY, UIDNEXT) of each folder as ``folders()`` saw it, by name."""
        return dict(self._status)

    def unchanged_since(self, folder: SourceFolder, checkpoint: str | None) -> bool:
        """True when ``messages(folder, checkpoint)`` would yield nothing, as told by the folder's
        status when ``folders()`` listed it: no message at all, or the same UIDVALIDITY and no UID
        given since the checkpoint's (UIDNEXT, RFC 3501 2.3.1.1). Lets a rerun skip the folder."""
        status = self._status.get(folder.native)
        if status is None:
            return False
        messages, validity, uidnext = status
        if messages == 0:
            return True
        if not checkpoint or validity is None or uidnext is None:
            return False
        v, _, u = checkpoint.partition(":")
        return v.isdigit() and u.isdigit() and int(v) == validity and uidnext <= int(u) + 1

    def messages(self, folder: SourceFolder, after: str | None = None) -> Iterator[SourceItem]:
        last_uid = 0
        validity_before: int | None = None
        if after:
            v, _, u = after.partition(":")
            validity_before, last_uid = int(v), int(u)

        def listing(client: IMAPClient) -> tuple[int, list[tuple[int, int]]]:
            info = client.select_folder(folder.native, readonly=True)
            self._selected = (id(client), folder.native)
            validity = int(info.get(b"UIDVALIDITY", 0))
            start = last_uid if validity == validity_before else 0
            if not info.get(b"EXISTS"):
                return validity, []
            return validity, uid_sizes(client, start)

        validity, pending = self._retry(listing, f"SELECT {folder.display}")
        if validity_before is not None and validity != validity_before:
            self.remarks.append(("uidvalidity", f"{folder.display}: UIDVALIDITY changed, folder read again"))
        index = 0
        while index < len(pending):
            batch: list[int] = []
            size = 0
            while index < len(pending) and (
                not batch or (size + pending[index][1] <= FETCH_BATCH_BYTES and len(batch) < FETCH_BATCH_COUNT)
            ):
                batch.append(pending[index][0])
                size += pending[index][1]
                index += 1

            def fetch(client: IMAPClient, uids: list[int] = batch) -> dict[int, dict[bytes, Any]]:
                if self._selected != (id(client), folder.native):  # a new connection: same UIDs?
                    info = client.select_folder(folder.native, readonly=True)
                    if int(info.get(b"UIDVALIDITY", 0)) != validity:
                        raise TemporaryFailure(
                            f"source folder {folder.display}: UIDVALIDITY changed while reading; "
                            "run again to read it anew"
                        )
                    self._selected = (id(client), folder.native)
                return client.fetch(uids, [b"BODY.PEEK[]", b"FLAGS", b"INTERNALDATE"])

            data = self._retry(fetch, f"FETCH {folder.display}")
            for uid in batch:
                item = data.pop(uid, None)  # hold only what is not handed over yet
                position = f"{validity}:{uid}"
                if item is None:
                    continue  # expunged meanwhile
                raw = item.get(b"BODY[]")
                if not raw:
                    yield SourceDamage(position, "message_illisible", f"UID {uid}: the server sent no content")
                    continue
                flags = tuple(_flag_str(f) for f in item.get(b"FLAGS", ()) if _flag_str(f).lower() not in _NOT_STORABLE)
                when = item.get(b"INTERNALDATE")
                yield SourceMessage(position, bytes(raw), flags, when if isinstance(when, dt.datetime) else None)

    def keys(self, folder: SourceFolder, *, local_part_only: bool) -> list[tuple[str, str, int]]:
        """(position, key, size) of every message of ``folder``: what verification compares."""

        def go(client: IMAPClient) -> list[tuple[str, str, int]]:
            self._selected = None
            info = client.select_folder(folder.native, readonly=True)
            validity = int(info.get(b"UIDVALIDITY", 0))
            uids = client.search(["ALL"]) if info.get(b"EXISTS") else []
            return [
                (f"{validity}:{u}", k, s)
                for u, k, s in fetch_keys(client, sorted(uids), local_part_only=local_part_only)
            ]

        return self._retry(go, f"FETCH {folder.display}")

    def close(self) -> None:
        if self._client is not None:
            try:
                self._client.logout()
            except (OSError, IMAPClientError, imaplib.IMAP4.error):
                pass
            self._client = None


@dataclass(frozen=True)
class TargetInfo:
    delimiter: str
    prefix: str
    special: dict[Role, str]
    multiappend: bool
    uidplus: bool
    append_limit: int | None
    quota: bool


class ImapTarget:
    """One connection to the target mailbox (use several for parallel APPENDs)."""

    def __init__(self, login: Login) -> None:
        self.login = login
        try:
            self.client = connect(login, for_source=False)
        except SourceRefused as exc:  # pragma: no cover - connect() picks the target flavour
            raise TargetRefused(str(exc)) from exc
        self._selected: str | None = None

    def _call(self, fn: Callable[[], T], what: str) -> T:
        try:
            return fn()
        except (TimeoutError, OSError, IMAPClientAbortError, imaplib.IMAP4.abort) as exc:
            raise TargetUnavailable(f"target IMAP connection lost during {what}: {_text(exc)}") from exc
        except (IMAPClientError, imaplib.IMAP4.error) as exc:
            text = _text(exc)
            if "OVERQUOTA" in text.upper() or "quota" in text.lower():
                raise QuotaExceeded(f"target mailbox {self.login.username} is over quota ({text})") from exc
            raise TargetRefused(f"target refused {what}: {text}") from exc

    def info(self) -> TargetInfo:
        def go() -> TargetInfo:
            caps = {c.upper() for c in self.client.capabilities()}
            delimiter, prefix = "/", ""
            if b"NAMESPACE" in caps:
                personal = self.client.namespace().personal
                if personal:
                    prefix, delim = personal[0]
                    prefix = _flag_str(prefix)
                    delimiter = _flag_str(delim) if delim else ""
            special: dict[Role, str] = {}
            for flags, delim, name in self.client.list_folders():
                if not prefix and delim:
                    delimiter = _flag_str(delim)
                lower = {f.lower() if isinstance(f, bytes) else str(f).lower().encode() for f in flags}
                for flag, role in _ROLE_FLAGS.items():
                    if flag in lower and role not in special:
                        special[role] = name
            limit = next(
                (
                    int(c.split(b"=", 1)[1])
                    for c in caps
                    if c.startswith(b"APPENDLIMIT=") and c.split(b"=", 1)[1].isdigit()
                ),
                None,
            )
            return TargetInfo(
                delimiter, prefix, special, b"MULTIAPPEND" in caps, b"UIDPLUS" in caps, limit, b"QUOTA" in caps
            )

        return self._call(go, "CAPABILITY/LIST")

    def quota(self) -> Quota | None:
        """STORAGE of INBOX's quota root (RFC 9208; units of 1024 octets), None without a limit."""

        def go() -> Quota | None:
            try:
                _roots, quotas = self.client.get_quota_root("INBOX")
            except IndexError:  # imapclient 3.x fails on a QUOTAROOT without a root: no quota
                return None
            for q in quotas:
                if str(q.resource).upper() == "STORAGE":
                    return Quota(usage=int(q.usage) * 1024, limit=int(q.limit) * 1024)
            return None

        return self._call(go, "GETQUOTAROOT")

    def ensure_folder(self, name: str, parents: Sequence[str] = ()) -> bool:
        """Create ``name`` (and its parents) if missing and subscribe them all (Thunderbird lists
        subscribed folders only). True when something was created."""

        def go() -> bool:
            created = False
            for folder in (*parents, name):
                if folder.upper() != "INBOX" and not self.client.folder_exists(folder):
                    self.client.create_folder(folder)
                    created = True
                self.client.subscribe_folder(folder)
            return created

        return self._call(go, f"CREATE {name}")

    def exists(self, name: str) -> bool:
        return bool(self._call(lambda: self.client.folder_exists(name), f"LIST {name}"))

    def uidvalidity(self, name: str) -> int | None:
        """The folder's UIDVALIDITY by STATUS (no SELECT), None when there is no such folder."""
        try:
            status = self.client.folder_status(name, [b"UIDVALIDITY"])
        except (TimeoutError, OSError, IMAPClientAbortError, imaplib.IMAP4.abort) as exc:
            raise TargetUnavailable(f"target IMAP connection lost during STATUS {name}: {_text(exc)}") from exc
        except (IMAPClientError, imaplib.IMAP4.error):
            return None  # NO: the folder was deleted (or renamed) since
        value = status.get(b"UIDVALIDITY")
        return int(value) if value is not None else None

    def select(self, name: str) -> dict[str, Any]:
        def go() -> dict[str, Any]:
            info = self.client.select_folder(name)
            self._selected = name
            return {
                "uidvalidity": int(info.get(b"UIDVALIDITY", 0)),
                "exists": int(info.get(b"EXISTS", 0)),
                "permanentflags": tuple(_flag_str(f) for f in info.get(b"PERMANENTFLAGS", ())),
            }

        return self._call(go, f"SELECT {name}")

    def keys_after(self, name: str, uid: int, *, local_part_only: bool) -> list[tuple[int, str, int]]:
        """(uid, key, size) of the messages of ``name`` with a UID above ``uid``."""

        def go() -> list[tuple[int, str, int]]:
            info = self.client.select_folder(name, readonly=True)
            self._selected = None
            if not info.get(b"EXISTS"):
                return []
            uids = sorted(u for u in self.client.search(["UID", f"{uid + 1}:*"]) if u > uid)
            return list(fetch_keys(self.client, uids, local_part_only=local_part_only))

        return self._call(go, f"FETCH {name}")

    def append(
        self, name: str, messages: Sequence[tuple[bytes, tuple[str, ...], dt.datetime | None]], *, multiappend: bool
    ) -> list[int] | None:
        """APPEND ``messages`` (raw, flags, INTERNALDATE) to ``name`` in one MULTIAPPEND (RFC 3502:
        all or none) when offered, else one by one; the new UIDs when the server says them.

        A lone message goes through imapclient's MULTIAPPEND too (the same APPEND on the wire):
        its plain ``append`` passes through imaplib, which rewrites every line ending of the
        message with a regular expression, 15 % of a run's CPU with 1-5 MB attachments."""

        def go() -> list[int] | None:
            if multiappend:
                items = []
                for raw, flags, when in messages:
                    item: dict[str, Any] = {"msg": raw, "flags": flags}
                    if when is not None:
                        item["date"] = when
                    items.append(item)
                typ, data = self.client.multiappend(name, items)
                if typ != "OK":  # imapclient returns a NO or BAD here instead of raising
                    raise imaplib.IMAP4.error(f"APPEND command error: {typ} {_response_text(data)}")
                return appended_uids(data, len(messages))
            uids: list[int] = []
            for raw, flags, when in messages:
                response = self.client.append(name, raw, flags=flags, msg_time=when)
                got = appended_uids(response, 1)
                if got is None:
                    return None
                uids.extend(got)
            return uids

        return self._call(go, f"APPEND {name}")

    def close(self) -> None:
        try:
            self.client.logout()
        except (OSError, IMAPClientError, imaplib.IMAP4.error):
            pass
