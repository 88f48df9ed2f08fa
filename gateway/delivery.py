"""The delivery side of the daemon (I/O): delivery workers and notifier in one TaskGroup, run
inside the listener's process or in a process of its own.

Accepting mail (SMTP, the spool's fsyncs) and delivering it (parsing, SQL, IMAP) are both CPU
work in Python, and one process runs Python on one core. With ``gateway.delivery_process``
(the default) the listener process accepts, spools and indexes the spool files (the spool's
unconfirmed files are known only there: see spool.py); a second process, started with
``multiprocessing``'s *spawn* (no fork of a running event loop), claims, delivers, records
and sends the notifications. The two share the database:

* the listener pokes the delivery process through a pipe after each index batch (a byte;
  never blocking: a full pipe means a wake-up is already pending); the workers also poll;
* on SQLite two processes write (index batches; claims and record batches): each write is one
  short transaction, and WAL with ``busy_timeout`` serialises them;
* it has its own asyncio supervisor (a TaskGroup), stops cleanly on SIGTERM/SIGINT and is
  SIGKILLed by the kernel if the listener process dies (``PR_SET_PDEATHSIG``), so that no
  orphan holds claims while a restarted instance releases them; everything after the 250 is
  idempotent, so a kill at any point is safe;
* there is one delivery process, not several: it keeps the per-mailbox arrival order (its
  ticket chains), which processes claiming concurrently could not.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import sys
from multiprocessing.connection import Connection

from balf.config.schema import Config
from balf.gateway.errors import DatabaseUnavailable
from balf.gateway.ledger import SqlLedger
from balf.gateway.notify import RelaySettings, notify_loop
from balf.gateway.services import ServiceTable
from balf.gateway.smtp import Directory
from balf.gateway.spool import FileSpool
from balf.gateway.worker import Breaker, Context, deliver_loop, index_loop

log = logging.getLogger("balf.gateway.delivery")


async def refresh_directory(ledger: SqlLedger, directory: Directory, stop: asyncio.Event,
                            every: float) -> None:
    breaker = Breaker(0.5, cap=every)
    while not stop.is_set():
        try:
            directory.table = await ledger.load_services()
            breaker.reset()
            wait = every
        except DatabaseUnavailable as exc:
            # Keep the last table: RCPT checks go on while the database is down.
            wait = breaker.trip(asyncio.get_running_loop().time())
            log.warning("event=directory.reload_failed error=%r kept=%d", exc.detail,
                        len(directory.table or ServiceTable()))
        try:
            await asyncio.wait_for(stop.wait(), wait)
        except TimeoutError:
            pass


async def run_workers(config: Config, ctx: Context, stop: asyncio.Event, wake: asyncio.Event,
                      *, spool: FileSpool | None = None, directory: Directory | None = None) -> None:
    """Delivery loop and notifier until ``stop``; with ``spool``, the indexer too (in the
    listener's process); with ``directory``, keep that address directory fresh."""
    relay = RelaySettings(config.relay.host, config.relay.port, config.relay.tls,
                          config.relay.username, config.relay.password)
    async with asyncio.TaskGroup() as tg:
        if directory is not None:
            tg.create_task(refresh_directory(ctx.ledger, directory, stop, config.gateway.directory_refresh))
        if spool is not None:
            tg.create_task(index_loop(spool, ctx.ledger, stop, wake))
        tg.create_task(deliver_loop(ctx, stop, wake))
        tg.create_task(notify_loop(ctx.ledger, relay, stop))


# --- the listener's handle on the delivery process ----------------------------------------

class DeliveryProcess:
    """Starts, wakes and stops the delivery process (parent side)."""

    def __init__(self, config: Config) -> None:
        mp = multiprocessing.get_context("spawn")
        reader, self._writer = mp.Pipe(duplex=False)
        self.process = mp.Process(target=child_main, args=(config, reader, os.getpid()),
                                  name="balf-delivery")
        self._reader: Connection | None = reader
        self._end: asyncio.Future[None] | None = None

    def start(self) -> None:
        # Started from the event loop's (main) thread: PR_SET_PDEATHSIG follows this thread.
        self.process.start()
        assert self._reader is not None
        self._reader.close()
        self._reader = None
        os.set_blocking(self._writer.fileno(), False)

    def wake(self) -> None:
        try:
            os.write(self._writer.fileno(), b".")
        except BlockingIOError:
            pass  # the pipe is full: the child has wake-ups pending already
        except OSError:
            pass  # the child is gone; watch() reports it

    def _ended(self) -> asyncio.Future[None]:
        """Done once the process has ended and been reaped. One reaper: the loop watches the
        process's sentinel and joins it (at once: it has ended) in the loop's thread, so
        ``watch`` and ``stop`` never join it from two threads."""
        if self._end is None:
            loop = asyncio.get_running_loop()
            end: asyncio.Future[None] = loop.create_future()
            sentinel = self.process.sentinel

            def reap() -> None:
                loop.remove_reader(sentinel)
                # The sentinel closes as the process exits, a moment before waitpid can reap it.
                self.process.join(0)
                if self.process.exitcode is None:
                    loop.call_later(0.01, reap)
                elif not end.done():
                    end.set_result(None)
            loop.add_reader(sentinel, reap)
            self._end = end
        return self._end

    async def watch(self) -> None:
        """Return when the process has ended (for whatever reason)."""
        await asyncio.shield(self._ended())

    async def stop(self, timeout: float) -> None:
        """SIGTERM, wait ``timeout`` seconds for the clean stop, then SIGKILL."""
        if self.process.pid is not None:  # started
            end = self._ended()
            if not end.done():
                self.process.terminate()
                try:
                    await asyncio.wait_for(asyncio.shield(end), timeout)
                except TimeoutError:
                    log.warning("event=delivery.kill pid=%s", self.process.pid)
                    self.process.kill()
                    try:
                        await asyncio.wait_for(asyncio.shield(end), 5)
                    except TimeoutError:
                        log.error("event=delivery.not_reaped pid=%s", self.process.pid)
        self._writer.close()


async def forward_wakes(indexed: asyncio.Event, child: DeliveryProcess, stop: asyncio.Event) -> None:
    """Poke the delivery process whenever the listener's indexer has added entries."""
    while not stop.is_set():
        await _wait_first(indexed, stop)
        indexed.clear()
        child.wake()


async def _wait_first(*events: asyncio.Event) -> None:
    """Until one of ``events`` is set; the waiters are gone when this returns (or is cancelled)."""
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)


# --- the delivery process itself ----------------------------------------------------------

def child_main(config: Config, wake: Connection, parent_pid: int) -> None:
    """Entry point of the delivery process (spawned: a fresh interpreter)."""
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # until the loop's handlers are in place
    try:
        from balf.cli.logs import setup_logging

        setup_logging(config.log.level, config.log.format)
    except Exception:  # noqa: BLE001 - logging must not keep mail from being delivered
        logging.basicConfig(level=config.log.level)
    asyncio.run(_child(config, wake))


def _die_with_parent(parent_pid: int) -> None:
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


async def _child(config: Config, wake: Connection) -> None:
    from balf.db.engine import create_engine
    from balf.gateway.daemon import make_context, make_ledger

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    engine = create_engine(config.database_url, pool_size=config.database.pool_size)
    indexed = asyncio.Event()
    fd = wake.fileno()
    os.set_blocking(fd, False)

    def on_wake() -> None:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        if not data:  # the listener process is gone
            loop.remove_reader(fd)
            stop.set()
            return
        indexed.set()

    loop.add_reader(fd, on_wake)
    ledger = make_ledger(config, engine)
    directory = Directory()
    try:
        try:
            directory.table = await ledger.load_services()
        except DatabaseUnavailable as exc:
            log.warning("event=delivery.database_down_at_start error=%r", exc.detail)
        ctx = make_context(config, ledger, None, directory)
        log.info("event=delivery.started pid=%d", os.getpid())
        try:
            await run_workers(config, ctx, stop, indexed, directory=directory)
        finally:
            await ctx.store.close()
            log.info("event=delivery.stopped delivered=%d dead=%d", ctx.delivered, ctx.dead)
    finally:
        loop.remove_reader(fd)
        await engine.dispose()

