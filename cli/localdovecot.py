"""A private Dovecot on 127.0.0.1 for `balf demo`, the live tests and the benchmarks (I/O: runs dovecot).

One ``Dovecot`` owns one directory: its config, sockets, state, log, passwd-files and Maildirs all
live under ``root``, so several instances (a test session's, a kill test's, a benchmark's two
ends) run side by side without touching the system's Dovecot. It is shaped like the production
store the agents' Thunderbird reads: French special-use folders, "/" hierarchy, a master user
for balf, quota, IMAP for clients and LMTP for delivery.

    with Dovecot(Path("/tmp/dc")) as server:
        account = server.add_user("sip.75001")
        ...  # IMAPClient(account.host, account.port).login(account.username, account.password)
"""

from __future__ import annotations

import grp
import hashlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from balf.cli.ports import LOOPBACK, free_ports, wait_port_closed

MASTER_SEPARATOR = "*"
MAIL_USER = "balftest"
"""System user that owns the Maildirs when the harness runs as root (Dovecot refuses uid 0)."""

# RFC 6154 special-use folders with the names a French Thunderbird shows; Dovecot has no
# CREATE-SPECIAL-USE, so they are declared here, auto-created and auto-subscribed (Thunderbird
# lists only subscribed folders, and recognises Sent/Drafts/... only by these flags).
SPECIAL_USE: tuple[tuple[str, str], ...] = (
    ("Envoyés", "\\Sent"),
    ("Brouillons", "\\Drafts"),
    ("Corbeille", "\\Trash"),
    ("Indésirables", "\\Junk"),
    ("Archives", "\\Archive"),
)

START_TIMEOUT = 10.0
# sun_path is 108 bytes; the longest socket Dovecot 2.3 creates is "token-login/imap-urlauth".
_MAX_BASE_DIR = 80



# Servers live in sbin or under /usr/lib/PKG; a non-root PATH often lacks sbin.
_EXTRA_PATH = ("/usr/sbin", "/sbin", "/usr/bin", "/bin")


def find_binary(binary: str) -> str | None:
    """The path of ``binary`` (a name looked up in PATH and the sbin folders, or an absolute path)."""
    if os.path.isabs(binary):
        return binary if os.access(binary, os.X_OK) else None
    return shutil.which(binary, path=os.pathsep.join([os.environ.get("PATH", ""), *_EXTRA_PATH]))


class DovecotError(RuntimeError):
    """The private Dovecot could not be configured, started, stopped or queried."""


@dataclass(frozen=True)
class Account:
    """One IMAP login on a private Dovecot, with the master login that reaches the same mailbox."""

    username: str
    password: str
    host: str
    port: int
    master_login: str  # f"{username}*{master_user}", log in with master_password
    master_password: str


if TYPE_CHECKING:
    _Finalizer = weakref.finalize[[subprocess.Popen[bytes], signal.Signals], "Dovecot"]


@dataclass(frozen=True)
class _Identity:
    """Who owns the mail files and who Dovecot's unprivileged processes run as."""

    mail_uid: int
    mail_gid: int
    internal_user: str  # auth, stats, ...: must be able to read ROOT/*.passwd
    internal_group: str
    login_user: str
    as_root: bool


class Dovecot:
    """A private Dovecot instance rooted at ``root`` (see the module docstring).

    ``imap_port``/``lmtp_port`` default to free loopback ports (re-picked if taken at start).
    ``users_uid`` is the uid owning the Maildirs; by default the ``balftest`` system user,
    created if missing, when running as root, else the current user.
    """

    host = LOOPBACK

    def __init__(
        self,
        root: Path,
        *,
        imap_port: int | None = None,
        lmtp_port: int | None = None,
        users_uid: int | None = None,
    ) -> None:
        self.root = Path(root).absolute()
        self._auto_ports = imap_port is None and lmtp_port is None
        picked = free_ports(2)
        self.imap_port = imap_port if imap_port is not None else picked[0]
        self.lmtp_port = lmtp_port if lmtp_port is not None else picked[1]
        self._users_uid = users_uid
        self.master_user = "balf"
        self.master_password = secrets.token_urlsafe(12)
        self._process: subprocess.Popen[bytes] | None = None
        self._finalizer: _Finalizer | None = None

    # -- paths -----------------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.root / "dovecot.conf"

    @property
    def log_path(self) -> Path:
        return self.root / "dovecot.log"

    @property
    def base_dir(self) -> Path:
        """Sockets and master.pid; moved to a short /tmp path if ``root`` is too deep."""
        run = self.root / "run"
        if len(str(run)) <= _MAX_BASE_DIR:
            return run
        digest = hashlib.sha1(str(self.root).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"balf-dovecot-run-{digest}"

    def maildir(self, username: str) -> Path:
        """The user's Maildir (INBOX is its cur/new/tmp; folder ``a/b`` is the directory a/b)."""
        return self.root / "mail" / username.lower() / "Maildir"

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Write the config and start Dovecot; return once IMAP greets (LMTP listens by then).

        Raises ``DovecotError`` with the tail of the log if it exits or is not ready in
        ``START_TIMEOUT`` seconds.
        """
        if self.running:
            raise DovecotError(f"Dovecot under {self.root} is already running")
        binary = find_binary("dovecot")
        if binary is None:
            raise DovecotError(
                "no `dovecot` binary: install dovecot-imapd and dovecot-lmtpd (`make run` and `make test` do)"
            )
        identity = self._identity()
        self._prepare_dirs(identity)
        self._stop_stale()
        for attempt in range(3):
            self.config_path.write_text(self._render_config(identity), encoding="utf-8")
            try:
                self._launch(binary)
                return
            except _AddressInUse:
                if not self._auto_ports or attempt == 2:
                    raise
                self.imap_port, self.lmtp_port = free_ports(2)

    def stop(self) -> None:
        """Stop every process of this Dovecot, dropping open sessions; wait until ports close.

        SIGTERM goes to the whole process group (SIGKILL after 10 s): signalling only the master
        leaves imap processes serving their open sessions after it exits, which is not what a
        test of "the server went down" means.
        """
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL every process of this Dovecot at once: a crash, for tests of what survives."""
        self._end(signal.SIGKILL)

    def restart(self) -> None:
        """Stop then start on the same ports and store (a server restart, as clients see it)."""
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def __enter__(self) -> Dovecot:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- users -----------------------------------------------------------------------------

    def add_user(
        self, username: str, password: str = "secret", quota_bytes: int | None = None
    ) -> Account:
        """Add (or replace) a user, live: no restart, usable as soon as this returns.

        ``quota_bytes`` sets a storage quota (None: unlimited). Usernames must not contain
        ``:``, ``/``, ``%``, ``*`` (the master separator) or whitespace, and are case-insensitive
        (Dovecot lowercases logins). LMTP recipients ``username`` and, for a name without
        ``@``, ``username@any.domain`` reach the user. Replacing a user waits up to 1 s.
        """
        if not username or any(c in username for c in ":/*%") or username.split() != [username]:
            raise ValueError(f"unusable Dovecot username {username!r}")
        if ":" in password or "\n" in password or not password:
            raise ValueError("a passwd-file password may not be empty or contain ':' or newlines")
        key = username.lower()
        extra = f"userdb_quota_rule=*:bytes={quota_bytes}" if quota_bytes is not None else ""
        line = f"{key}:{{PLAIN}}{password}::::{self.root / 'mail' / key}::{extra}\n"
        (self.root / "users").mkdir(parents=True, exist_ok=True)
        _write_passwd(self.root / "users" / f"{key}.passwd", line, live=self.running)
        return Account(
            username=username,
            password=password,
            host=self.host,
            port=self.imap_port,
            master_login=f"{username}{MASTER_SEPARATOR}{self.master_user}",
            master_password=self.master_password,
        )

    def doveadm(self, *args: str) -> str:
        """Run ``doveadm -c CONF ARGS`` (e.g. ``"mailbox", "list", "-u", user``); return stdout."""
        binary = find_binary("doveadm") or "doveadm"
        done = subprocess.run(
            [binary, "-c", str(self.config_path), *args],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            command = " ".join(args)
            raise DovecotError(f"doveadm {command} failed ({done.returncode}): {done.stderr}")
        return done.stdout

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the Dovecot log and of its stderr (for error messages)."""
        text = ""
        for path in (self.root / "dovecot.stderr", self.log_path):
            if path.exists():
                text += "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) + "\n"
        return text.strip() or "(no log)"

    # -- internals -------------------------------------------------------------------------

    def _identity(self) -> _Identity:
        if os.geteuid() != 0:
            me = pwd.getpwuid(os.geteuid())
            group = grp.getgrgid(os.getegid()).gr_name
            return _Identity(me.pw_uid, os.getegid(), me.pw_name, group, me.pw_name, False)
        if self._users_uid is not None:
            uid = self._users_uid
            try:
                gid = pwd.getpwuid(uid).pw_gid
            except KeyError:
                gid = uid
        else:
            uid, gid = _system_user(MAIL_USER)
        if uid == 0:
            raise DovecotError("Dovecot refuses to store mail as uid 0: pass a non-root users_uid")
        return _Identity(uid, gid, "dovecot", "dovecot", "dovenull", True)

    def _prepare_dirs(self, identity: _Identity) -> None:
        """Create the tree: mail/ owned by the mail uid, the rest readable by Dovecot's users."""
        for sub in ("state", "mail", "users"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
            (self.root / sub).chmod(0o755)
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        if identity.as_root:
            os.chown(self.root / "mail", identity.mail_uid, identity.mail_gid)
            _check_searchable(self.root)
        master = f"{self.master_user}:{{PLAIN}}{self.master_password}\n"
        _write_passwd(self.root / "master.passwd", master, live=False)

    def _stop_stale(self) -> None:
        """Stop a Dovecot left running on this root by a crashed earlier process.

        Only if master.pid names a live ``dovecot -c OUR_CONFIG``: after a kill() the pid file
        stays behind and its pid may since belong to anything (and would make Dovecot refuse
        to start, "already running"), so it is removed.
        """
        pid_file = self.base_dir / "master.pid"
        try:
            pid = int(pid_file.read_text().strip())
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            pid_file.unlink(missing_ok=True)
            return
        if str(self.config_path).encode() in argv:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        pid_file.unlink(missing_ok=True)

    def _launch(self, binary: str) -> None:
        """Run ``dovecot -F`` (foreground, so we own its process) and wait for the greeting."""
        with open(self.root / "dovecot.stderr", "wb") as stderr:
            self._process = subprocess.Popen(
                [binary, "-F", "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                start_new_session=True,  # its own process group: stop() ends all of it
            )
        # A benchmark that dies outside its `with` block must not leave Dovecot running.
        self._finalizer = weakref.finalize(self, _end_group, self._process, signal.SIGTERM)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self._process.poll() is not None:
                code, self._process = self._process.returncode, None
                tail = self.log_tail()
                if "Address already in use" in tail:
                    raise _AddressInUse(tail)
                raise DovecotError(f"dovecot -c {self.config_path} exited with {code}:\n{tail}")
            # The master binds every listener before it forks, so the IMAP greeting means LMTP
            # listens too; probing LMTP would fork an lmtp process that can stall a quick stop().
            if _imap_greets(self.host, self.imap_port):
                return
            if time.monotonic() > deadline:
                self.stop()
                raise DovecotError(
                    f"Dovecot did not greet on {self.host}:{self.imap_port} within"
                    f" {START_TIMEOUT:.0f} s:\n{self.log_tail()}"
                )
            time.sleep(0.02)

    def _end(self, sig: signal.Signals) -> None:
        process, self._process = self._process, None
        if self._finalizer is not None:
            self._finalizer.detach()
        if process is None:
            return
        _end_group(process, sig)
        wait_port_closed(self.imap_port, self.host)
        wait_port_closed(self.lmtp_port, self.host)

    def _render_config(self, identity: _Identity) -> str:
        mailboxes = "\n".join(
            f'  mailbox "{name}" {{\n    special_use = {flag}\n    auto = subscribe\n  }}'
            for name, flag in SPECIAL_USE
        )
        login_chroot = "" if identity.as_root else "  chroot =\n"
        return _CONFIG.format(
            root=self.root,
            base_dir=self.base_dir,
            host=self.host,
            imap_port=self.imap_port,
            lmtp_port=self.lmtp_port,
            mail_uid=identity.mail_uid,
            mail_gid=identity.mail_gid,
            internal_user=identity.internal_user,
            internal_group=identity.internal_group,
            login_user=identity.login_user,
            login_chroot=login_chroot,
            mailboxes=mailboxes,
            sep=MASTER_SEPARATOR,
        )


class _AddressInUse(DovecotError):
    """A listener port was taken between choosing it and Dovecot binding it."""


def _imap_greets(host: str, port: int) -> bool:
    """True if an IMAP server on host:port sends its ``* OK`` greeting (RFC 3501 7.1.1)."""
    try:
        with socket.create_connection((host, port), timeout=0.5) as sock:
            return sock.recv(256).startswith(b"* OK")
    except OSError:
        return False


def _end_group(process: subprocess.Popen[bytes], sig: signal.Signals, timeout: float = 10) -> None:
    """Send ``sig`` to the process group led by ``process``; wait until all of it is gone.

    The group is signalled only while its leader is unreaped (so the pgid is surely ours);
    stragglers found afterwards are signalled one by one, and SIGKILLed after ``timeout``.
    """
    if process.poll() is None:
        os.killpg(process.pid, sig)
    deadline = time.monotonic() + timeout
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    while members := _group_members(process.pid):
        late = time.monotonic() > deadline
        for pid in members:
            try:
                os.kill(pid, signal.SIGKILL if late else sig)
            except ProcessLookupError:
                pass
        time.sleep(0.02)


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group ``pgid``, from /proc (Linux)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(stat.parent.name))
    return members


def _system_user(name: str) -> tuple[int, int]:
    """Return (uid, gid) of system user ``name``, creating it (no home, no shell) if missing."""
    try:
        entry = pwd.getpwnam(name)
        return entry.pw_uid, entry.pw_gid
    except KeyError:
        pass
    useradd = find_binary("useradd")
    if useradd is None:
        raise DovecotError(f"no system user {name!r} and no useradd to create it; pass users_uid")
    done = subprocess.run(
        [useradd, "--system", "--user-group", "--no-create-home", "--shell", "/usr/sbin/nologin"]
        + ["--home-dir", "/nonexistent", name],
        capture_output=True,
        text=True,
        check=False,
    )
    # exit 9: created meanwhile by a parallel test process
    if done.returncode not in (0, 9):
        raise DovecotError(f"useradd {name} failed: {done.stderr.strip()}; pass users_uid")
    entry = pwd.getpwnam(name)
    return entry.pw_uid, entry.pw_gid


def _check_searchable(path: Path) -> None:
    """Refuse a root that Dovecot's non-root processes cannot reach.

    The mail processes (mail uid) and auth (dovecot user) must traverse every ancestor of
    ``root``; pytest's base temp dir is 0700 and re-tightened by every pytest run, so fixtures
    put roots in the system temp dir instead of opening it up.
    """
    for ancestor in path.resolve().parents:
        mode = ancestor.stat().st_mode
        if not mode & 0o001:
            raise DovecotError(
                f"{ancestor} (mode {mode & 0o7777:o}) is not searchable by other users, so"
                f" Dovecot's non-root processes cannot reach {path}: `chmod o+x` it, or use"
                " a root whose parents are, such as tempfile.mkdtemp() itself"
            )


def _write_passwd(path: Path, text: str, *, live: bool = True) -> None:
    """Replace a passwd-file atomically, so that a running Dovecot (``live``) sees the change.

    Dovecot stats a passwd-file at most once a second and reloads it when its mtime (seconds)
    or size changed. A new file is read at its first lookup. For a replaced file, the mtime is
    bumped past the old one and we wait out the second, so the caller never logs in against
    the old entry. World-readable: auth runs as the dovecot user; throwaway test passwords.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.chmod(0o644)
    try:
        old_mtime = int(path.stat().st_mtime)
    except FileNotFoundError:
        live = False
    if not live:
        os.replace(tmp, path)
        return
    stamp = max(int(time.time()), old_mtime + 1)
    os.utime(tmp, (stamp, stamp))
    os.replace(tmp, path)
    time.sleep(1.05 - time.time() % 1)


# Why each setting is here:
# - mail_location maildir LAYOUT=fs with separator "/": folder "a/b" is directory a/b, and names
#   may contain "." (Maildir++'s default delimiter), which French folder names such as
#   "M. Dupont" or "2026.01" need; Thunderbird takes whatever delimiter the server announces.
#   Names are stored in modified UTF-7 on disk (Dovecot's default), e.g. R&AOk-clamations.
# - one INBOX namespace, empty prefix: folders are siblings of INBOX, as Thunderbird shows them;
#   INBOX is auto-subscribed too, since Thunderbird lists with LIST (SUBSCRIBED).
# - one passwd-file per user (users/%Lu.passwd), auth_cache_size = 0: add_user() is live at
#   once (Dovecot reads a new file at its first lookup, but re-stats a known one at most once a
#   second, so a single shared file would hide users added in the same second); a missing file
#   is "unknown user" (LMTP 550, IMAP AUTHENTICATIONFAILED).
# - the second userdb (username_format=%Ln) lets LMTP deliver to "user@domain".
# - auth_failure_delay = 0 and no auth penalty (anvil-auth-penalty mode 0, as Dovecot documents):
#   a wrong-password test would otherwise slow every later login from 127.0.0.1 by up to 15 s.
# - quota "count" (Dovecot 2.3's recommended backend, needs quota_vsizes) with no default rule:
#   unlimited unless the passwd-file sets userdb_quota_rule.
# - process and per-user connection limits raised: benchmarks open hundreds of sessions;
#   imap-login in "high-performance" mode (service_count = 0): logins do not fork a process each.
_CONFIG = """\
# Private Dovecot for balf tests and benchmarks, written by tests/harness/dovecot.py.
base_dir = {base_dir}
state_dir = {root}/state
log_path = {root}/dovecot.log
instance_name = balf-dovecot-{imap_port}
listen = {host}
protocols = imap lmtp
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_cache_size = 0
auth_verbose = yes
auth_failure_delay = 0
auth_master_user_separator = {sep}

default_internal_user = {internal_user}
default_internal_group = {internal_group}
default_login_user = {login_user}
mail_uid = {mail_uid}
mail_gid = {mail_gid}
first_valid_uid = 1
first_valid_gid = 1
default_process_limit = 1000

passdb {{
  driver = passwd-file
  args = {root}/master.passwd
  master = yes
  result_success = continue
}}
passdb {{
  driver = passwd-file
  args = {root}/users/%Lu.passwd
}}
userdb {{
  driver = passwd-file
  args = {root}/users/%Lu.passwd
}}
userdb {{
  driver = passwd-file
  args = username_format=%Ln {root}/users/%Ln.passwd
}}

mail_location = maildir:~/Maildir:LAYOUT=fs
mail_plugins = $mail_plugins quota
namespace inbox {{
  inbox = yes
  prefix =
  separator = /
  mailbox INBOX {{
    auto = subscribe
  }}
{mailboxes}
}}
plugin {{
  quota = count:User quota
  quota_vsizes = yes
}}

protocol imap {{
  mail_plugins = $mail_plugins imap_quota
  mail_max_userip_connections = 200
}}

service imap-login {{
  inet_listener imap {{
    address = {host}
    port = {imap_port}
  }}
  inet_listener imaps {{
    port = 0
  }}
  service_count = 0
  process_min_avail = 1
{login_chroot}}}
service lmtp {{
  inet_listener lmtp {{
    address = {host}
    port = {lmtp_port}
  }}
}}
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
service imap-urlauth-login {{
{login_chroot}}}
"""
