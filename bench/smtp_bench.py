"""SMTP end-to-end benchmark: balf vs a private Postfix -> LMTP -> the same private Dovecot.

balf runs as configured by default: the listener process (SMTP, spool, indexer) and one
delivery process (batches of 64: one MULTIAPPEND per mailbox, one record transaction).
Both are loaded with Postfix's ``smtp-source`` (20 sessions of 20 KB messages, split over
``--mailboxes`` recipients: one smtp-source per recipient). "End to end" ends when every message
is a file in the recipient's Maildir (and, for balf, recorded: spool entries done). Then a paced
Python client sends at half balf's measured rate and records the time to 250 of each message.

    .venv/bin/python bench/smtp_bench.py [--messages 5000] [--mailboxes 4] [--sessions 20]

Needs root or a user Dovecot/Postfix accept; installs nothing (apt-get install postfix first).
Figures and how to read them: docs/benchmarks.md (SMTP section).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.harness.dovecot import Dovecot, ensure_dovecot  # noqa: E402
from tests.harness.ports import free_ports  # noqa: E402

DOMAIN = "bench.test"
SECRET = "bench-secret-" + "y" * 32


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def maildir_count(dovecot: Dovecot, users: list[str]) -> int:
    n = 0
    for u in users:
        for sub in ("new", "cur"):
            d = dovecot.maildir(u) / sub
            if d.exists():
                n += sum(1 for _ in os.scandir(d))
    return n


def rss_kb(pid: int) -> int:
    """RSS of ``pid`` and its children (balf's delivery process)."""
    total = 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                total += rss_kb(int(child))
    except OSError:
        pass
    return total


def run_smtp_source(port: int, rcpts: list[str], messages: int, sessions: int, size: int) -> float:
    """Start one smtp-source per recipient; returns the time when all got their replies."""
    per = messages // len(rcpts)
    s_per = max(1, sessions // len(rcpts))
    procs = [subprocess.Popen(["smtp-source", "-s", str(s_per), "-m", str(per), "-l", str(size),
                               "-f", "citoyen@exemple.fr", "-t", r, f"127.0.0.1:{port}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for r in rcpts]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"smtp-source failed: {err.decode()[-500:]}")
    return time.perf_counter()


def measure(name: str, port: int, dovecot: Dovecot, users: list[str], rcpts: list[str],
            messages: int, sessions: int, size: int, pid: int | None,
            done_check: callable | None = None) -> dict[str, float]:  # type: ignore[valid-type]
    base = maildir_count(dovecot, users)
    total = base + (messages // len(rcpts)) * len(rcpts)
    rss: list[int] = []
    t0 = time.perf_counter()
    import threading
    accepted_at: list[float] = []
    th = threading.Thread(target=lambda: accepted_at.append(run_smtp_source(port, rcpts, messages, sessions, size)))
    th.start()
    while True:
        n = maildir_count(dovecot, users)
        if pid:
            rss.append(rss_kb(pid))
        if n >= total and not th.is_alive() and (done_check is None or done_check()):
            break
        if time.perf_counter() - t0 > 900:
            raise RuntimeError(f"{name}: only {n - base} of {total - base} delivered after 900 s")
        time.sleep(0.05)
    th.join()
    t_end = time.perf_counter()
    sent = total - base
    result = {"messages": sent, "accepted_per_s": sent / (accepted_at[0] - t0),
              "end_to_end_per_s": sent / (t_end - t0), "seconds": t_end - t0}
    if rss:
        result["rss_start_mb"] = rss[min(5, len(rss) - 1)] / 1024
        result["rss_max_mb"] = max(rss) / 1024
        result["rss_end_mb"] = rss[-1] / 1024
    return result


async def paced_latency(port: int, rcpt: str, rate: float, seconds: float, size: int) -> list[float]:
    """Send at ``rate`` msg/s over 20 reusable sessions; the seconds from DATA end to the 250."""
    import aiosmtplib

    body = b"From: citoyen@exemple.fr\r\nTo: " + rcpt.encode() + b"\r\nSubject: latence\r\n\r\n" + \
        (b"x" * 76 + b"\r\n") * (size // 78)
    latencies: list[float] = []
    queue: asyncio.Queue[float] = asyncio.Queue()

    async def session() -> None:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=30)
        await client.connect()
        while True:
            due = await queue.get()
            if due < 0:
                break
            await client.mail("citoyen@exemple.fr")
            await client.rcpt(rcpt)
            t = time.perf_counter()
            await client.data(body)
            latencies.append(time.perf_counter() - t)
        await client.quit()

    tasks = [asyncio.create_task(session()) for _ in range(20)]
    start = time.perf_counter()
    n = int(rate * seconds)
    for i in range(n):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        queue.put_nowait(time.perf_counter())
    for _ in tasks:
        queue.put_nowait(-1)
    await asyncio.gather(*tasks)
    return latencies


def start_postfix(root: Path, port: int, lmtp_port: int) -> Path:
    conf = root / "postfix"
    conf.mkdir()
    (root / "pf-queue").mkdir()
    (root / "pf-data").mkdir()
    master = Path("/etc/postfix/master.cf").read_text().replace(
        "smtp      inet  n       -       y       -       -       smtpd",
        f"127.0.0.1:{port} inet  n       -       n       -       -       smtpd")
    (conf / "master.cf").write_text(master)
    (conf / "main.cf").write_text(f"""
compatibility_level = 3.6
queue_directory = {root}/pf-queue
data_directory = {root}/pf-data
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix.bench.localdomain
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mydestination =
mynetworks = 127.0.0.0/8
virtual_mailbox_domains = {DOMAIN}
virtual_transport = lmtp:inet:127.0.0.1:{lmtp_port}
lmtp_destination_recipient_limit = 1
smtpd_recipient_restrictions = permit_mynetworks, reject
alias_maps =
alias_database =
local_recipient_maps =
maillog_file = {root}/postfix.log
maillog_file_prefixes = {root}
default_process_limit = 100
""")
    for cmd in (["postfix", "-c", str(conf), "set-permissions"], ["postfix", "-c", str(conf), "check"],
                ["postfix", "-c", str(conf), "start"]):
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 and cmd[-1] != "set-permissions":
            raise RuntimeError(f"{' '.join(cmd)}: {done.stdout}{done.stderr}")
    wait_port(port)
    return conf


def deferred_deliveries(log: Path) -> int:
    """Deliveries Postfix put off for a retry during its run: a run with any is not a measure of
    its speed but of its retry delay (one run of 2026-11-25 waited minutes on deferred LMTP)."""
    try:
        return sum("status=deferred" in line for line in log.read_text(errors="replace").splitlines())
    except FileNotFoundError:
        return 0


def start_balf(root: Path, port: int, dovecot: Dovecot, users: list[str],
               pg: bool = False) -> tuple[subprocess.Popen[bytes], str]:
    db = root / "balf.sqlite3"
    url = f"sqlite+aiosqlite:///{db}"
    if pg:
        name = f"balfbench_{os.getpid()}"
        subprocess.run([sys.executable, "-c", f"""
import asyncio, asyncpg
async def go():
    c = await asyncpg.connect("postgresql://postgres@127.0.0.1:5432/postgres")
    await c.execute('DROP DATABASE IF EXISTS "{name}"'); await c.execute('CREATE DATABASE "{name}"')
    await c.close()
asyncio.run(go())"""], check=True)
        url = f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"
    conf = root / "balf.toml"
    conf.write_text(f"""
data_dir = "{root / 'balf'}"
[database]
url = "{url}"
[smtp]
port = {port}
hostname = "balf.bench.localdomain"
max_connections = 500
[imap]
host = "{dovecot.host}"
port = {dovecot.imap_port}
master_user = "{dovecot.master_user}"
master_password = "{dovecot.master_password}"
[gateway]
domain = "{DOMAIN}"
secret = "{SECRET}"
workers = 8
acknowledge = true
[relay]
port = 1
[spool]
min_free_bytes = 0
[log]
level = "WARNING"
""")
    seed = f"""
import asyncio
from balf.db.engine import create_engine, session_factory
from balf.db.migrate import upgrade
from balf.db.models import Service, ServiceAddress, ServiceKind
async def go():
    e = create_engine({url!r}); await upgrade(e)
    async with session_factory(e).begin() as s:
        for i, u in enumerate({users!r}):
            svc = Service(code=f"B{{i}}", kind=ServiceKind.SIP, department="75", name=f"SIP {{i}}", imap_account=u)
            svc.addresses.append(ServiceAddress(address=f"{{u}}@{DOMAIN}", address_key=f"{{u}}@{DOMAIN}"))
            s.add(svc)
    await e.dispose()
asyncio.run(go())
"""
    subprocess.run([sys.executable, "-c", seed], check=True)
    proc = subprocess.Popen([sys.executable, "-m", "balf.gateway.daemon", "--config", str(conf)],
                            stderr=open(root / "balf.log", "ab"))
    wait_port(port)
    return proc, url


def balf_done(url: str) -> callable:  # type: ignore[valid-type]
    import sqlite3
    if url.startswith("postgresql"):
        def check_pg() -> bool:
            out = subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-tA", "-d", url.rsplit("/", 1)[1],
                                  "-c", "select count(*) from spool_entries where state='queued'"],
                                 capture_output=True, text=True)
            return out.stdout.strip() == "0"
        return check_pg
    path = url.split("///", 1)[1]

    def check() -> bool:
        with sqlite3.connect(path, timeout=30) as c:
            return c.execute("select count(*) from spool_entries where state='queued'").fetchone()[0] == 0
    return check


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=5000)
    ap.add_argument("--mailboxes", type=int, default=4)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--size", type=int, default=20000)
    ap.add_argument("--latency-seconds", type=float, default=20.0)
    ap.add_argument("--only", choices=("balf", "postfix"), default=None)
    ap.add_argument("--pg", action="store_true", help="balf on PostgreSQL (default: SQLite)")
    args = ap.parse_args()
    ensure_dovecot()
    root = Path(tempfile.mkdtemp(prefix="smtp-bench-"))
    os.chmod(root, 0o755)
    balf_port, pf_port = free_ports(2)
    results: dict[str, dict[str, float]] = {}
    with Dovecot(root / "dovecot") as dovecot:
        pf_users = [dovecot.add_user(f"pf{i}").username for i in range(args.mailboxes)]
        balf_users = [dovecot.add_user(f"balf{i}").username for i in range(args.mailboxes)]
        if args.only != "balf":
            conf = start_postfix(root, pf_port, dovecot.lmtp_port)
            try:
                results["postfix"] = measure("postfix", pf_port, dovecot, pf_users,
                                             [f"{u}@{DOMAIN}" for u in pf_users], args.messages,
                                             args.sessions, args.size, None)
            finally:
                subprocess.run(["postfix", "-c", str(conf), "stop"], capture_output=True)
            results["postfix"]["deferred"] = deferred_deliveries(root / "postfix.log")
        if args.only != "postfix":
            proc, url = start_balf(root, balf_port, dovecot, balf_users, args.pg)
            try:
                results["balf"] = measure("balf", balf_port, dovecot, balf_users,
                                          [f"{u}@{DOMAIN}" for u in balf_users], args.messages,
                                          args.sessions, args.size, proc.pid, balf_done(url))
                rate = results["balf"]["end_to_end_per_s"] / 2
                lat = asyncio.run(paced_latency(balf_port, f"{balf_users[0]}@{DOMAIN}", rate,
                                                args.latency_seconds, args.size))
                lat.sort()
                results["balf"]["latency_rate"] = rate
                results["balf"]["p50_ms"] = statistics.median(lat) * 1000
                results["balf"]["p99_ms"] = lat[int(len(lat) * 0.99) - 1] * 1000
                results["balf"]["rss_after_latency_mb"] = rss_kb(proc.pid) / 1024
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
    for name, r in results.items():
        print(name + ": " + ", ".join(f"{k}={v:.1f}" for k, v in r.items()))
    if results.get("postfix", {}).get("deferred"):
        print(f"postfix run NOT COMPARABLE: {results['postfix']['deferred']:.0f} LMTP deliveries were deferred, so "
              "its time includes Postfix's retry delay (see postfix.log); run the bench again")
    if "balf" in results and "postfix" in results:
        b, p = results["balf"], results["postfix"]
        print(f"ratio balf/postfix end-to-end: {b['end_to_end_per_s'] / p['end_to_end_per_s']:.2f}")
        print(f"ratio balf/postfix accepted:   {b['accepted_per_s'] / p['accepted_per_s']:.2f}")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
