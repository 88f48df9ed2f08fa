"""The configuration's one exception (no I/O)."""

from __future__ import annotations


class ConfigError(Exception):
    """The configuration is unusable; the message is one line saying where and what is expected."""
