"""`balf serve` as systemd runs it: ready notification, reload on SIGHUP, clean stop."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.ports import free_port, port_is_open


class NotifySocket:
    """The datagram socket systemd gives a Type=notify service ($NOTIFY_SOCKET)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(30)

    def wait_for(self, word: str) -> list[str]:
        seen: list[str] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            message = self.sock.recv(4096).decode()
            seen.append(message)
            if word in message.split("\n"):
                return seen
        raise AssertionError(f"{word} never notified; got {seen}")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], NotifySocket, Path, Path]]:
    data = tmp_path / "data"
    subprocess.run([sys.executable, "-m", "balf.cli.main", "init", "--dir", str(data)],
                   check=True, capture_output=True, stdin=subprocess.DEVNULL)
    config = data / "balf.toml"
    text = config.read_text().replace("port = 2525", f"port = {free_port()}")
    config.write_text(text)
    notify = NotifySocket(tmp_path / "notify")
    log = tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BALF_")}
    env["NOTIFY_SOCKET"] = str(notify.path)
    with log.open("w") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "balf.cli.main", "--config", str(config), "serve"],
                                stdout=log_file, stderr=subprocess.STDOUT, env=env, text=True,
                                stdin=subprocess.DEVNULL)
    try:
        yield proc, notify, config, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_notifies_ready_reloads_and_stops_cleanly(
    served: tuple[subprocess.Popen[str], NotifySocket, Path, Path],
) -> None:
    proc, notify, config, log = served
    notify.wait_for("READY=1")
    assert proc.poll() is None
    port = int(next(line for line in config.read_text().splitlines() if line.startswith("port = ")).split("=")[1])
    assert port_is_open(port)  # READY means the SMTP listener is bound

    # A broken file on reload is refused; the daemon keeps running on the old configuration.
    good = config.read_text()
    config.write_text(good + "\n[smtp]\nbogus = 1\n")
    proc.send_signal(signal.SIGHUP)
    notify.wait_for("READY=1")
    assert proc.poll() is None

    # A file that loads but that the gateway cannot start with (its port is taken) is refused
    # too: the gateway comes back on the running configuration.
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        config.write_text(good.replace(f"port = {port}", f"port = {taken}"))
        proc.send_signal(signal.SIGHUP)
        notify.wait_for("READY=1")
        deadline = time.monotonic() + 30
        while "event=config.refused part=gateway" not in log.read_text() or not port_is_open(port):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)

    config.write_text(good.replace('level = "INFO"', 'level = "DEBUG"'))
    proc.send_signal(signal.SIGHUP)
    notify.wait_for("READY=1")

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    notify.wait_for("STOPPING=1")
    text = log.read_text()
    assert "event=config.refused kept=running" in text
    assert "event=config.reloaded changed=log" in text
    assert "event=config.reloaded changed=smtp" in text
    assert "event=daemon.stopped" in text
    assert "Traceback" not in text
    for line in text.strip().splitlines():  # structured: timestamp level logger message key=value
        stamp, level, logger, event = line.split(" ")[:4]
        assert stamp[:4].isdigit() and level in ("DEBUG", "INFO", "WARNING", "ERROR"), line
        assert logger.startswith("balf.") and event.startswith(("event=", "msg=")), line
