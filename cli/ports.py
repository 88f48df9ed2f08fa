"""Loopback TCP port helpers (I/O): pick free ports, wait for a listener to open or close."""

from __future__ import annotations

import contextlib
import socket
import time

LOOPBACK = "127.0.0.1"


def free_ports(count: int, host: str = LOOPBACK) -> list[int]:
    """Return ``count`` distinct ports that were free on ``host`` a moment ago.

    All sockets are held open until every port is chosen, so the kernel cannot hand out the same
    port twice. A port can still be taken by someone else before the caller binds it: callers
    that chose ports this way should retry with new ones on "address in use".
    """
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((host, 0))
            ports.append(sock.getsockname()[1])
        return ports


def free_port(host: str = LOOPBACK) -> int:
    """Return one port that was free on ``host`` a moment ago (see ``free_ports``)."""
    return free_ports(1, host)[0]


def port_is_open(port: int, host: str = LOOPBACK, timeout: float = 0.5) -> bool:
    """True if something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_port_closed(port: int, host: str = LOOPBACK, timeout: float = 10.0) -> None:
    """Wait until ``host:port`` refuses connections; raise ``TimeoutError`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while port_is_open(port, host, timeout=0.2):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{host}:{port} still accepts connections after {timeout:.0f} s")
        time.sleep(0.02)
