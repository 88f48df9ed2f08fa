"""The daemon's supervisor (I/O): one asyncio.TaskGroup over balf's parts, signals, systemd.

Every part is ``async def part(config, engine, stop, *, started) -> None``: it resolves the
``started`` future once it serves (its sockets are bound) and returns soon after ``stop`` is
set. READY=1 goes to systemd only when every part has started, so "active" means port 25
answers. SIGTERM/SIGINT stop all parts; SIGHUP re-reads the configuration and restarts only the
parts whose sections changed; a file that does not load, or that a part cannot start with
(a port in use), is refused and the running configuration kept. A part that crashes otherwise
stops the daemon with a non-zero exit, like a failed unit, rather than running half a gateway.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, fields
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from balf.cli.logs import setup_logging
from balf.config.loader import ConfigError, load_config
from balf.config.schema import Config
from balf.db.engine import create_engine
from balf.db.migrate import current, upgrade

log = logging.getLogger("balf.daemon")

Part = Callable[..., Awaitable[None]]
START_TIMEOUT = 60.0


@dataclass(frozen=True)
class PartSpec:
    """A named part and the configuration sections it depends on."""

    name: str
    run: Part
    sections: tuple[str, ...]


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) about our state; a no-op outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        log.warning("event=daemon.notify_failed error=%r", str(exc))


def changed_sections(old: Config, new: Config) -> set[str]:
    return {f.name for f in fields(Config) if getattr(old, f.name) != getattr(new, f.name)}


class Supervisor:
    """Runs the parts; restarts some of them on reload; stops them all on a signal."""

    def __init__(self, config: Config, config_path: str | None, parts: list[PartSpec]) -> None:
        self.config = config
        self.config_path = config_path
        self.parts = parts
        self.stopping = asyncio.Event()
        self._part_stops: dict[str, asyncio.Event] = {}
        self._part_configs: dict[str, Config] = {}
        self._started: dict[str, asyncio.Future[Any]] = {}
        self._reload = asyncio.Event()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        # Signals first: a SIGTERM during a long migration still stops us cleanly.
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop, sig)
        loop.add_signal_handler(signal.SIGHUP, self._reload.set)
        engine = create_engine(self.config.database_url, pool_size=self.config.database.pool_size)
        try:
            await self._prepare_database(engine)
            if self.stopping.is_set():
                return
            async with asyncio.TaskGroup() as group:
                for spec in self.parts:
                    self._started[spec.name] = loop.create_future()
                    group.create_task(self._keep_running(spec), name=spec.name)
                await asyncio.wait_for(asyncio.gather(*self._started.values()), START_TIMEOUT)
                group.create_task(self._watch_reload(), name="reload")
                if not self.stopping.is_set():
                    sd_notify("READY=1\nSTATUS=running")
                    log.info("event=daemon.ready parts=%s", ",".join(p.name for p in self.parts))
        finally:
            sd_notify("STOPPING=1")
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            await engine.dispose()
            log.info("event=daemon.stopped")

    async def _prepare_database(self, engine: AsyncEngine) -> None:
        if self.config.database.auto_upgrade:
            await upgrade(engine)
        rev, head = await current(engine)
        if rev != head:
            raise ConfigError(f"the database is at revision {rev or 'none'}, not {head}: "
                              "run `balf db upgrade` or set [database] auto_upgrade = true")
        self.engine = engine

    def _on_stop(self, sig: signal.Signals) -> None:
        log.info("event=daemon.stopping signal=%s", sig.name)
        self.stopping.set()
        for event in self._part_stops.values():
            event.set()
        for future in self._started.values():
            if not future.done():
                future.set_result(None)  # nothing to wait for any more
        self._reload.set()  # wake the reload watcher so it ends too

    async def _keep_running(self, spec: PartSpec) -> None:
        """Run one part; run it again after a reload asked it to stop."""
        known_good: Config | None = None
        while not self.stopping.is_set():
            config = self._part_configs.get(spec.name, self.config)
            stop = self._part_stops[spec.name] = asyncio.Event()
            started: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            started.add_done_callback(lambda _: self._mark_started(spec.name))
            log.info("event=part.starting part=%s", spec.name)
            try:
                await spec.run(config, self.engine, stop, started=started)
            except Exception as exc:
                if started.done() or known_good is None:
                    raise  # a crash while serving, or the first start: the daemon fails
                log.error("event=config.refused part=%s kept=running error=%r", spec.name, str(exc))
                self._part_configs[spec.name] = known_good
                continue
            log.info("event=part.stopped part=%s", spec.name)
            if not stop.is_set():
                raise RuntimeError(f"part {spec.name} ended on its own")
            known_good = config

    def _mark_started(self, name: str) -> None:
        future = self._started.get(name)
        if future is not None and not future.done():
            future.set_result(None)

    async def _watch_reload(self) -> None:
        while True:
            await self._reload.wait()
            self._reload.clear()
            if self.stopping.is_set():
                return
            self.reload()

    def reload(self) -> None:
        """Re-read the configuration; restart the parts whose sections changed."""
        sd_notify("RELOADING=1")
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            log.error("event=config.refused kept=running error=%r", str(exc))
            sd_notify("READY=1")
            return
        changed = changed_sections(self.config, new)
        self.config = new
        setup_logging(new.log.level, new.log.format)
        for spec in self.parts:
            if changed & set(spec.sections):
                log.info("event=part.restarting part=%s reason=config", spec.name)
                self._part_configs[spec.name] = new
                self._part_stops[spec.name].set()
        log.info("event=config.reloaded changed=%s", ",".join(sorted(changed)) or "nothing")
        sd_notify("READY=1")
