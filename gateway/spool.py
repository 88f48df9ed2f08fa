"""The durable file spool written before the 250 reply (I/O: files and fsync).

Layout under the spool directory::

    tmp/<id>      being written; never acknowledged, removed at start-up
    queue/<id>    acknowledged (250 sent), not yet indexed in the database

A file holds one JSON line (the envelope) then the exact message bytes. ``store`` writes and
fsyncs the file in a thread, renames it into ``queue/`` and then waits for a directory fsync
that concurrent sessions share (group commit): a burst of N sessions costs N file fsyncs but
one directory fsync per ``group_commit_ms`` window. Only then does the SMTP layer answer 250.

Until ``store`` has returned, a file in ``queue/`` is *unconfirmed*: the indexer does not see
it (``pending`` skips it), and if anything fails after the rename (the directory fsync, or the
caller being cancelled: DATA deadline, client gone, shutdown) the file is taken back out of
``queue/`` before the failure is reported. So a 451 (or no reply at all) never leaves a copy
that would be delivered next to the client's retry.

The database index (``spool_entries``) then takes over: once a row holding the bytes is
committed the file is removed (see worker.index_spool). While the database is down files
simply accumulate here and are indexed when it returns.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import datetime as dt
import errno
import json
import logging
import os
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

from balf.gateway.errors import PermanentFailure, SpoolUnavailable
from balf.gateway.model import Envelope, SpooledMessage
from balf.gateway.parse import sha256_of

log = logging.getLogger("balf.gateway.spool")
T = TypeVar("T")
WRITER_THREADS = 32  # concurrent spool writes (each mostly waits on its fsync)


def encode_entry(envelope: Envelope, raw: bytes, sha256: str) -> bytes:
    head = {k: (v.isoformat() if isinstance(v, dt.datetime) else v)
            for k, v in dataclasses.asdict(envelope).items()}
    head["sha256"] = sha256
    head["size"] = len(raw)
    return json.dumps(head, ensure_ascii=True).encode("ascii") + b"\n" + raw


def decode_entry(data: bytes) -> SpooledMessage:
    """The inverse of :func:`encode_entry`; a torn or edited file is a PermanentFailure."""
    head_bytes, sep, raw = data.partition(b"\n")
    try:
        head = json.loads(head_bytes)
        sha256 = head.pop("sha256")
        size = head.pop("size")
        head["recipients"] = tuple(head["recipients"])
        head["arrived_at"] = dt.datetime.fromisoformat(head["arrived_at"])
        envelope = Envelope(**head)
    except (ValueError, KeyError, TypeError) as exc:
        raise PermanentFailure(f"unreadable spool file header: {exc}") from None
    if not sep or len(raw) != size or sha256_of(raw) != sha256:
        raise PermanentFailure("spool file truncated or altered (size or SHA-256 mismatch)")
    return SpooledMessage(envelope, raw, sha256)


class FileSpool:
    """The spool directory; one instance per daemon."""

    def __init__(self, directory: str | os.PathLike[str], *, group_commit_ms: float = 2.0,
                 min_free_bytes: int = 0,
                 fsync_dir: Callable[[Path], None] | None = None,
                 write_file: Callable[[str, bytes], None] | None = None) -> None:
        self.root = Path(directory)
        self.tmp = self.root / "tmp"
        self.queue = self.root / "queue"
        self.group_commit = group_commit_ms / 1000
        self.min_free_bytes = min_free_bytes
        self.fsync_dir = fsync_dir or _fsync_dir  # a seam: tests make the directory fsync fail
        self.write_file = write_file or self._write  # a seam: tests hold a write in its thread
        self._unconfirmed: set[str] = set()  # in queue/ but not yet acknowledged: not indexed
        self._waiters: list[asyncio.Future[None]] = []
        self._flusher: asyncio.Future[None] | None = None
        # The daemon's TaskGroup for the background work below (directory flushes, stores
        # whose session was cancelled): it outlives the listeners, so at shutdown every
        # store finishes (and is withdrawn) before the process exits. None: the caller's loop.
        self.tasks: asyncio.TaskGroup | None = None
        self.flushes = 0  # directory fsyncs done (group commit efficiency = stored / flushes)
        self.stored = 0
        self.new_entries: asyncio.Event = asyncio.Event()
        # Writes wait on fsync, not on the CPU: one thread per concurrent session lets the
        # file system commit their journal entries together, and keeps them off the default
        # executor that other blocking calls share.
        self._writers = concurrent.futures.ThreadPoolExecutor(max_workers=WRITER_THREADS,
                                                              thread_name_prefix="spool-write")

    def close(self) -> None:
        """Stop the writer threads, after the writes in progress (call once nothing stores)."""
        self._writers.shutdown(wait=True)

    def open(self) -> None:
        """Create the directories and drop files that were never acknowledged."""
        for d in (self.tmp, self.queue):
            d.mkdir(parents=True, exist_ok=True)
        for leftover in self.tmp.iterdir():
            log.info("event=spool.discard_unacknowledged file=%s", leftover.name)
            leftover.unlink(missing_ok=True)

    async def store(self, envelope: Envelope, raw: bytes) -> SpooledMessage:
        """Durably store one message; return only once it survives a crash or power cut.

        Raises :class:`SpoolUnavailable` (nothing left in ``queue/``) when it cannot. If the
        caller is cancelled meanwhile, the store still runs to its end in the background (a
        thread cannot be interrupted) and the file is then taken back out of ``queue/``: the
        caller never answered 250, so the message must not be delivered.
        """
        spool_id = envelope.spool_id
        sha256 = sha256_of(raw)
        data = encode_entry(envelope, raw, sha256)
        self._unconfirmed.add(spool_id)
        try:
            written = self._writers.submit(self.write_file, spool_id, data)
        except RuntimeError:  # closed: the daemon is stopping
            self._unconfirmed.discard(spool_id)
            raise SpoolUnavailable("spool closed") from None
        work = self._background(self._store(envelope, raw, sha256, written))
        try:
            message = await asyncio.shield(work)
        except asyncio.CancelledError:
            def withdraw(done: asyncio.Future[SpooledMessage]) -> None:
                if not done.cancelled():
                    done.exception()  # retrieved: its outcome no longer matters
                self._withdraw_after(written, spool_id, "cancelled before the reply")
            work.add_done_callback(withdraw)
            raise
        except BaseException:
            self._unconfirmed.discard(spool_id)
            raise
        self._unconfirmed.discard(spool_id)
        self.stored += 1
        self.new_entries.set()
        return message

    async def _store(self, envelope: Envelope, raw: bytes, sha256: str,
                     written: concurrent.futures.Future[None]) -> SpooledMessage:
        try:
            await asyncio.wrap_future(written)
        except OSError as exc:
            raise SpoolUnavailable(f"spool write failed: {exc.strerror or exc}") from None
        try:
            await self._flush_directory()
        except BaseException as exc:
            # Renamed into queue/ but not known to be durable: the client will hear 451 and
            # send again, so this copy must not be delivered as well.
            self._withdraw(envelope.spool_id, repr(exc))
            raise
        return SpooledMessage(envelope, raw, sha256)

    def _withdraw_after(self, written: concurrent.futures.Future[None], spool_id: str,
                        reason: str) -> None:
        """Withdraw once the writer thread is done with the file: a thread cannot be
        interrupted, so a store cancelled (or whose task group was) while the thread still
        writes would otherwise be withdrawn first and renamed into queue/ after. Until then the
        id stays unconfirmed (the indexer leaves the file alone)."""
        loop = asyncio.get_running_loop()

        def finished(_: concurrent.futures.Future[None]) -> None:  # in the writer thread, or here
            try:
                loop.call_soon_threadsafe(self._withdraw, spool_id, reason)
            except RuntimeError:  # the loop is closed: nothing else runs, do it here
                self._withdraw(spool_id, reason)
        written.add_done_callback(finished)

    def _withdraw(self, spool_id: str, reason: str) -> None:
        """Take an unacknowledged file back out of ``queue/`` (best effort: if even the unlink
        fails the file stays, and is delivered; the log says so)."""
        try:
            (self.queue / spool_id).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self.fsync_dir(self.queue)
            log.warning("event=spool.withdrawn spool_id=%s reason=%r", spool_id, reason)
        except OSError as exc:
            log.error("event=spool.withdraw_failed spool_id=%s reason=%r error=%r", spool_id, reason, exc)
        finally:
            self._unconfirmed.discard(spool_id)

    def _write(self, spool_id: str, data: bytes) -> None:
        st = os.statvfs(self.root)
        if self.min_free_bytes and st.f_bavail * st.f_frsize - len(data) < self.min_free_bytes:
            raise OSError(errno.ENOSPC, "less free space than spool.min_free_bytes")
        tmp = self.tmp / spool_id
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        try:
            os.rename(tmp, self.queue / spool_id)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    async def _flush_directory(self) -> None:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.append(waiter)
        if self._flusher is None or self._flusher.done():
            self._flusher = self._background(self._flush_loop())
        await waiter

    def _background(self, coro: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
        """Run ``coro`` as a task of ``self.tasks`` (when set); its outcome is the returned
        future's and is never raised into the group (one failed store must not stop it)."""
        if self.tasks is None:
            return asyncio.ensure_future(coro)
        result: asyncio.Future[T] = asyncio.get_running_loop().create_future()

        async def run() -> None:
            try:
                value = await coro
            except asyncio.CancelledError:
                result.cancel()
                raise
            except Exception as exc:  # noqa: BLE001 - handed to whoever awaits the result
                if not result.done():
                    result.set_exception(exc)
            else:
                if not result.done():
                    result.set_result(value)
        self.tasks.create_task(run())
        return result

    async def _flush_loop(self) -> None:
        while self._waiters:
            if self.group_commit > 0:
                await asyncio.sleep(self.group_commit)
            batch, self._waiters = self._waiters, []
            try:
                await asyncio.to_thread(self.fsync_dir, self.queue)
                self.flushes += 1
            except OSError as exc:
                err = SpoolUnavailable(f"spool directory fsync failed: {exc.strerror or exc}")
                for w in batch:
                    if not w.done():
                        w.set_exception(err)
                continue
            for w in batch:
                if not w.done():
                    w.set_result(None)

    # --- reading back (indexer, recovery, `balf spool`) -----------------------------------

    def pending(self) -> Iterator[Path]:
        """Acknowledged files not yet indexed, oldest first (ids sort by time); files whose
        store has not finished (no 250 yet, may still be withdrawn) are left out."""
        try:
            names = sorted(p.name for p in self.queue.iterdir())
        except FileNotFoundError:
            return iter(())
        unconfirmed = set(self._unconfirmed)
        return (self.queue / n for n in names if n not in unconfirmed)

    def read(self, path: Path) -> SpooledMessage:
        return decode_entry(path.read_bytes())

    def remove(self, spool_ids: list[str]) -> None:
        self.remove_files([self.queue / spool_id for spool_id in spool_ids])

    def remove_files(self, paths: list[Path]) -> None:
        """Remove indexed files. Never raises: a file that cannot be removed is moved to
        ``corrupt/`` (its row is committed; left in queue/ it would be indexed again forever)."""
        for path in paths:
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                self.quarantine(path, f"indexed, but could not be removed: {exc!r}")
        if paths:
            try:
                self.fsync_dir(self.queue)
            except OSError as exc:  # the rows are committed: at worst a file comes back, indexed again
                log.warning("event=spool.fsync_failed directory=%s error=%r", self.queue, exc)

    def quarantine(self, path: Path, reason: str) -> None:
        """Move a file aside into ``corrupt/`` (never deleted: an administrator looks at it,
        ``balf spool list`` counts them). Never raises: if even the move fails, the log says so."""
        bad = self.root / "corrupt"
        try:
            bad.mkdir(exist_ok=True)
            os.rename(path, bad / path.name)
        except FileNotFoundError:
            return
        except OSError as exc:
            log.error("event=spool.quarantine_failed file=%s reason=%r error=%r", path.name, reason, exc)
            return
        log.error("event=spool.corrupt file=%s reason=%r", path.name, reason)

    def corrupt(self) -> list[Path]:
        """Files moved aside (unreadable, or refused by the database), oldest first."""
        try:
            return sorted((self.root / "corrupt").iterdir())
        except FileNotFoundError:
            return []


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
