"""Loopback TCP port helpers; they live in the package so `balf demo` can use them too."""

from balf.cli.ports import LOOPBACK, free_port, free_ports, port_is_open, wait_port_closed

__all__ = ["LOOPBACK", "free_port", "free_ports", "port_is_open", "wait_port_closed"]
