"""The gateway's part of the daemon (I/O): listeners, indexer, workers and notifier in one TaskGroup.

``run_gateway`` is what `balf serve`'s supervisor runs; ``python -m balf.gateway.daemon
--config FILE`` runs the gateway alone (tests, and a gateway-only node).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import signal
import socket
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine

from balf.config.schema import Config
from balf.gateway.delivery import DeliveryProcess, forward_wakes, refresh_directory, run_workers
from balf.gateway.errors import DatabaseUnavailable
from balf.gateway.ledger import SqlLedger
from balf.gateway.smtp import (
    Directory,
    GatewayHandler,
    SessionLimits,
    start_listener,
    stop_listener,
    tls_context,
)
from balf.gateway.spool import FileSpool
from balf.gateway.store import ImapStore, MailStore
from balf.gateway.worker import Breaker, Context, WorkerSettings, index_loop

log = logging.getLogger("balf.gateway.daemon")


def instance_name(config: Config) -> str:
    if config.gateway.instance:
        return config.gateway.instance
    digest = hashlib.sha256(config.spool_dir.encode()).hexdigest()[:8]
    return f"{socket.gethostname()}:{digest}"[:100]


def secret_of(config: Config) -> bytes:
    if len(config.gateway.secret) < 16:
        from balf.config.loader import ConfigError

        raise ConfigError("'gateway.secret' must be at least 16 characters (32+ random bytes advised); "
                          "set it in the file or with BALF_GATEWAY__SECRET, or run `balf init`")
    return config.gateway.secret.encode()


def worker_settings(config: Config) -> WorkerSettings:
    g = config.gateway
    return WorkerSettings(
        secret=secret_of(config), domain=g.domain, workers=g.workers, batch=max(1, g.batch), lease=g.claim_lease,
        retry_delay=g.retry_delay, retry_max_delay=g.retry_max_delay, retry_max_age=g.retry_max_age,
        acknowledge=g.acknowledge, acknowledgements_per_day=g.acknowledgements_per_day,
        portal_url=g.portal_url)


def make_store(config: Config) -> ImapStore:
    i = config.imap
    return ImapStore(host=i.host, port=i.port, master_user=i.master_user,
                     master_password=i.master_password, pool_size=i.pool_size, timeout=i.timeout,
                     tls=i.tls)


def make_ledger(config: Config, engine: AsyncEngine) -> SqlLedger:
    return SqlLedger(engine, secret=secret_of(config), domain=config.gateway.domain,
                     instance=instance_name(config))


def make_context(config: Config, ledger: SqlLedger, store: MailStore | None,
                 directory: Directory) -> Context:
    return Context(worker_settings(config), ledger, store or make_store(config), lambda: directory.table,
                   breaker=Breaker(min(config.gateway.retry_delay, 1.0), cap=30.0))


@dataclass
class Gateway:
    """Handles the running parts expose (tests read counters and ports from it)."""

    spool: FileSpool
    directory: Directory
    context: Context | None  # None when delivery runs in its own process
    smtp_server: asyncio.Server | None = None
    lmtp_server: asyncio.Server | None = None
    delivery: DeliveryProcess | None = None


async def run_gateway(config: Config, engine: AsyncEngine, stop: asyncio.Event, *,
                      store: MailStore | None = None, started: asyncio.Future[Gateway] | None = None) -> None:
    """Run listeners, indexer, delivery workers and notifier until ``stop`` is set.

    With ``gateway.delivery_process`` (and no ``store`` given) the indexer, workers and notifier
    run in a process of their own (see delivery.py); if that process dies, this part fails.
    Shutdown order: stop accepting (421 to new sessions), let sessions finish for
    ``smtp.shutdown_grace`` seconds, then stop the workers (in-flight deliveries finish or are
    left claimed; their lease expires and they are run again, idempotently). Files spooled but not
    yet indexed stay in the spool directory and are indexed at the next start.
    """
    ledger = make_ledger(config, engine)
    spool = FileSpool(config.spool_dir, group_commit_ms=config.spool.group_commit_ms,
                      min_free_bytes=config.spool.min_free_bytes)
    spool.open()
    directory = Directory()
    try:
        directory.table = await ledger.load_services()
        released = await ledger.release_claims()
        if released:
            log.info("event=worker.released_claims count=%d instance=%s", released, ledger.instance)
    except DatabaseUnavailable as exc:
        log.warning("event=gateway.database_down_at_start error=%r", exc.detail)
    separate = config.gateway.delivery_process and store is None
    ctx = None if separate else make_context(config, ledger, store, directory)
    gateway = Gateway(spool, directory, ctx)
    s = config.smtp
    hostname = s.hostname or socket.getfqdn()
    tls = tls_context(s.tls_cert, s.tls_key)
    listeners: list[tuple[asyncio.Server, SessionLimits]] = []
    workers_stop = asyncio.Event()
    # The spool's background work (directory flushes; stores whose session was cancelled)
    # runs in this group, which outlives the listeners: at exit every store has finished and
    # a store no client heard 250 for has been withdrawn.
    try:
        async with asyncio.TaskGroup() as spool_tasks:
            spool.tasks = spool_tasks
            try:
                if separate:
                    gateway.delivery = DeliveryProcess(config)
                    gateway.delivery.start()
                for enabled, lmtp, host, port in ((s.enabled, False, s.host, s.port),
                                                  (s.lmtp_enabled, True, s.lmtp_host, s.lmtp_port)):
                    if not enabled:
                        continue
                    limits = SessionLimits(s.max_connections, s.data_timeout)
                    handler = GatewayHandler(directory=directory, spool=spool, secret=secret_of(config),
                                             hostname=hostname, max_recipients=s.max_recipients, lmtp=lmtp)
                    server = await start_listener(handler, host=host, port=port, limits=limits, lmtp=lmtp,
                                                  hostname=hostname, data_size_limit=s.max_message_size,
                                                  command_timeout=s.command_timeout, tls=tls)
                    listeners.append((server, limits))
                    if lmtp:
                        gateway.lmtp_server = server
                    else:
                        gateway.smtp_server = server
                if started is not None and not started.done():
                    started.set_result(gateway)
                indexed = asyncio.Event()
                async with asyncio.TaskGroup() as tg:
                    if gateway.delivery is not None:
                        tg.create_task(refresh_directory(ledger, directory, workers_stop,
                                                         config.gateway.directory_refresh))
                        tg.create_task(index_loop(spool, ledger, workers_stop, indexed))
                        tg.create_task(forward_wakes(indexed, gateway.delivery, workers_stop))
                        tg.create_task(_watch_delivery(gateway.delivery, workers_stop))
                    else:
                        assert ctx is not None
                        tg.create_task(run_workers(config, ctx, workers_stop, indexed, spool=spool,
                                                   directory=directory))
                    await stop.wait()
                    log.info("event=gateway.stopping")
                    for server, limits in listeners:
                        await stop_listener(server, limits, s.shutdown_grace)
                    workers_stop.set()
                    if gateway.delivery is not None:
                        await gateway.delivery.stop(timeout=30)
            finally:
                workers_stop.set()
                for server, _ in listeners:
                    if server.is_serving():
                        server.close()
                if gateway.delivery is not None:
                    await gateway.delivery.stop(timeout=30)
                elif ctx is not None and store is None:
                    await ctx.store.close()
                log.info("event=gateway.stopped delivered=%s dead=%s", ctx.delivered if ctx else "-",
                         ctx.dead if ctx else "-")
    finally:
        spool.tasks = None
        # After the group: no store is running. Joins the writer threads (one still writing
        # for an aborted session finishes, then its file is withdrawn before we return).
        await asyncio.to_thread(spool.close)


async def _watch_delivery(child: DeliveryProcess, stopping: asyncio.Event) -> None:
    await child.watch()
    if not stopping.is_set():
        raise RuntimeError(f"the delivery process ended on its own (exit code {child.process.exitcode})")


def main(argv: list[str] | None = None) -> None:
    """Run the gateway alone: ``python -m balf.gateway.daemon --config FILE``."""
    from balf.config.loader import load_config
    from balf.db.engine import create_engine
    from balf.db.migrate import upgrade

    parser = argparse.ArgumentParser(prog="balf-gateway")
    parser.add_argument("--config", required=True)
    args = parser.parse_args(argv)
    config = load_config(args.config)
    logging.basicConfig(level=config.log.level, format="%(asctime)s %(levelname)s %(name)s %(message)s")

    async def go() -> None:
        engine = create_engine(config.database_url, pool_size=config.database.pool_size)
        if config.database.auto_upgrade:
            await upgrade(engine)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await run_gateway(config, engine, stop)
        finally:
            await engine.dispose()

    asyncio.run(go())


if __name__ == "__main__":
    main()
