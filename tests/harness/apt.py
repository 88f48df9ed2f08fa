"""Make sure a Debian package is installed (I/O: runs apt-get), for servers the harness starts.

Used for dovecot-imapd/dovecot-lmtpd by the Dovecot harness, and by benchmarks for postfix or
isync. Only installs when the package's binary is missing, so machines that already have it
(CI images, developer laptops) never touch apt.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess

from balf.cli.localdovecot import find_binary


class AptError(RuntimeError):
    """A package could not be installed; the message says what to run by hand."""


def ensure_package(package: str, binary: str) -> str:
    """Return the path of ``binary``, installing Debian ``package`` first if it is missing.

    Runs ``apt-get update`` at most once per process, then
    ``DEBIAN_FRONTEND=noninteractive apt-get install -y PACKAGE``. Raises ``AptError`` naming
    the package and the tail of apt's output if that is impossible (not root, no apt, offline).
    """
    found = find_binary(binary)
    if found:
        return found
    hint = f"install it by hand: apt-get install -y {package}"
    if shutil.which("apt-get") is None:
        raise AptError(f"{binary!r} is missing and there is no apt-get to get {package}; {hint}")
    if os.geteuid() != 0:
        raise AptError(f"{binary!r} is missing and installing {package} needs root; {hint}")
    _apt_update()
    _run_apt(["apt-get", "install", "-y", "--no-install-recommends", package], hint)
    found = find_binary(binary)
    if not found:
        raise AptError(f"installed {package} but {binary!r} is still missing; {hint}")
    return found


@functools.cache
def _apt_update() -> None:
    """``apt-get update``, once per process (package lists on fresh images are empty)."""
    _run_apt(["apt-get", "update"], "check the network and /etc/apt/sources.list")


def _run_apt(argv: list[str], hint: str) -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise AptError(f"`{' '.join(argv)}` failed (exit {done.returncode}); {hint}\n{tail}")
