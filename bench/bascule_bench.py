"""Benchmark of the bascule: balf against mbsync, offlineimap, imapsync and doveadm (I/O: runs servers and tools).

One generated corpus (default 5,000 messages in 5 folders: most 5-50 KB, some with 1-5 MB
attachments) is put into a source account of a private Dovecot, then migrated IMAP to IMAP into
a fresh target account of the same Dovecot by each tool in turn, in one run:

    balf        `balf bascule run` (state in SQLite), N connections, MULTIAPPEND
    mbsync      Debian isync, `CopyArrivalDate yes`
    offlineimap Debian offlineimap3, IMAP-to-IMAP, SQLite status
    imapsync    only when $IMAPSYNC points to the imapsync script
    doveadm     `doveadm copy` inside the server: the store's own ceiling

For each: messages/s, MB/s, peak memory (RSS of the tool's process tree, polled VmHWM), the time
of a second pass over the migrated mailbox (median of five), and whether every message arrived
byte-exact. ``--department 20`` then times the campaign's everyday case, a second pass over a
whole department of 20 small migrated mailboxes, by balf (one `balf bascule run -d 33`) and by
mbsync (``mbsync -a`` over one channel per mailbox). Ratios against mbsync are printed at the
end. ``--scale 10`` repeats balf on a corpus ten times larger to show that its peak memory does
not grow with the mailbox, and times both second passes there (mbsync's reads every message's
UID and flags, balf's only each folder's STATUS). balf runs as administrators install it: its
wheel is built and installed into a venv of the benchmark's own (byte-compiled, without the
checkout's editable-install hook, which costs every start 10-15 ms), beside the dependencies of
the running interpreter. Second passes are timed from fork to exit, without polling.

    .venv/bin/python bench/bascule_bench.py [--messages 5000] [--connections 4] [--scale 10]
        [--department 20] [--department-messages 100] [--tools balf,mbsync] [--json out.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from imapclient import IMAPClient  # noqa: E402

from tests.harness.dovecot import Account, Dovecot, ensure_dovecot  # noqa: E402

FOLDERS = ("INBOX", "Réclamations", "Réclamations/Été 2024", "Envoyés", "Archives/2015")
BALF = Path(sys.executable).with_name("balf")  # replaced by the installed wheel's in main()
RERUNS = 11  # second passes are short: the median of several


@dataclass
class Result:
    tool: str
    seconds: float
    messages: int
    megabytes: float
    peak_rss_mb: float
    rerun_seconds: float | None
    byte_exact: str
    note: str = ""

    @property
    def msg_per_s(self) -> float:
        return self.messages / self.seconds if self.seconds else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.megabytes / self.seconds if self.seconds else 0.0


# --- corpus --------------------------------------------------------------------------------


def make_message(n: int, folder: str, rng: random.Random) -> bytes:
    """A plausible BALF message: 99.5 % text of 5-50 KB, 0.5 % with a 1-5 MB attachment."""
    big = rng.random() < 0.005
    size = rng.randint(1_000_000, 5_000_000) if big else int(rng.triangular(5_000, 50_000, 12_000))
    words = (
        "réclamation",
        "avis",
        "impôt",
        "délai",
        "paiement",
        "dossier",
        "référence",
        "madame",
        "monsieur",
        "taxe",
        "foncière",
        "habitation",
        "échéance",
        "remise",
        "gracieuse",
        "contribuable",
    )
    text_len = 3_000 if big else size
    body = []
    length = 0
    while length < text_len:
        line = " ".join(rng.choice(words) for _ in range(12))
        body.append(line)
        length += len(line.encode()) + 2
    head = (
        f"From: Usager {n} <usager{n}@example.org>\r\nTo: sip.33001@dgfip.example\r\n"
        f"Subject: =?utf-8?q?R=C3=A9clamation_n=C2=B0{n}?=\r\n"
        f"Date: Mon, {1 + n % 28:02d} Mar 2024 10:{n % 60:02d}:00 +0100\r\n"
        f"Message-ID: <bench-{n}@example.org>\r\nMIME-Version: 1.0\r\n"
    )
    text = "\r\n".join(body).encode()
    if not big:
        return (
            head.encode()
            + b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
            + text
            + b"\r\n"
        )
    blob = rng.randbytes(size * 3 // 4)
    import base64

    b64 = base64.encodebytes(blob).replace(b"\n", b"\r\n")
    return (
        head.encode() + b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n'
        b"Content-Type: text/plain; charset=utf-8\r\n\r\n" + text + b"\r\n--b\r\n"
        b'Content-Type: application/pdf; name="piece.pdf"\r\nContent-Transfer-Encoding: base64\r\n\r\n'
        + b64
        + b"--b--\r\n"
    )


def login(account: Account) -> IMAPClient:
    client = IMAPClient(account.host, port=account.port, ssl=False, timeout=300)
    client.login(account.username, account.password)
    return client


def fill(account: Account, count: int, seed: int = 4) -> tuple[int, int]:
    """Put ``count`` messages into the source account; returns (messages, bytes)."""
    rng = random.Random(seed)
    client = login(account)
    total = 0
    for folder in FOLDERS:
        if folder != "INBOX" and not client.folder_exists(folder):
            client.create_folder(folder)
    batch: dict[str, list[dict[str, object]]] = {f: [] for f in FOLDERS}
    batch_bytes = 0
    for n in range(count):
        folder = FOLDERS[n % len(FOLDERS)]
        raw = make_message(n, folder, rng)
        total += len(raw)
        flags = ("\\Seen",) if n % 3 else ("\\Seen", "\\Answered") if n % 2 else ()
        batch[folder].append({"msg": raw, "flags": flags})
        batch_bytes += len(raw)
        if batch_bytes > 20_000_000 or n == count - 1:
            for name, items in batch.items():
                if items:
                    client.multiappend(name, items)
            batch = {f: [] for f in FOLDERS}
            batch_bytes = 0
    client.logout()
    return count, total


def digests(account: Account) -> dict[str, list[str]]:
    """sha256 of every message, per folder (what byte-exact means)."""
    client = login(account)
    out: dict[str, list[str]] = {}
    for flags, _d, name in client.list_folders():
        if b"\\Noselect" in flags:
            continue
        client.select_folder(name, readonly=True)
        uids = client.search(["ALL"])
        hashes = []
        for start in range(0, len(uids), 200):
            data = client.fetch(uids[start : start + 200], [b"BODY.PEEK[]"])
            hashes.extend(hashlib.sha256(d[b"BODY[]"]).hexdigest() for d in data.values())
        out[name] = sorted(hashes)
    client.logout()
    return out


def compare(source: dict[str, list[str]], target: dict[str, list[str]]) -> str:
    want = sorted(h for v in source.values() for h in v)
    got = sorted(h for v in target.values() for h in v)
    if want == got:
        return "yes"
    missing = len(set(want) - set(got))
    return f"no ({missing} of {len(want)} differ or are missing, {len(got)} in target)"


# --- running tools -------------------------------------------------------------------------


def _tree_hwm(root: int) -> float:
    """Sum of VmHWM (peak RSS since exec) over ``root`` and its descendants, in MB."""
    total = 0
    pids = [root]
    seen: set[int] = set()
    while pids:
        pid = pids.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                total += int(line.split()[1])
        pids.extend(int(c) for c in children)
    return total / 1024


def timed(cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> tuple[float, float, str]:
    """(seconds, peak RSS in MB of the process tree, output tail); raises on failure.

    The peak is VmHWM polled every 20 ms (wait4's ru_maxrss would count the benchmark's own
    memory, inherited by fork before exec)."""
    import threading

    start = time.monotonic()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=cwd
    )
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.append(proc.stdout.read() if proc.stdout else b""))
    reader.start()
    peak = 0.0
    while proc.poll() is None:
        peak = max(peak, _tree_hwm(proc.pid))
        time.sleep(0.02)
    seconds = time.monotonic() - start
    reader.join()
    tail = b"".join(chunks).decode("utf-8", "replace")[-800:]
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} exited {proc.returncode}: {tail}")
    return seconds, peak, tail


def balf_files(server: Dovecot, pairs: list[tuple[Account, Account]], work: Path, connections: int) -> Path:
    """The configuration and the department's plan (one line per mailbox); returns the config."""
    config = work / "balf.toml"
    config.write_text(
        "\n".join(
            [
                f'data_dir = "{work}"',
                "[database]",
                f'url = "sqlite+aiosqlite:///{work}/balf.sqlite3"',
                "[imap]",
                f'host = "{server.host}"',
                f"port = {server.imap_port}",
                f'master_user = "{server.master_user}"',
                f'master_password = "{server.master_password}"',
                "[bascule]",
                f"connections_per_mailbox = {connections}",
            ]
        )
        + "\n",
        encoding="utf-8",
    )
    plan = work / "plan.csv"
    plan.write_text(
        "mailbox;source;target_account;planned_date;options\n"
        + "".join(
            f"{target.username};imap://{source.username}@{source.host}:{source.port};{target.username};;"
            "password_env=BENCH_PW\n"
            for source, target in pairs
        ),
        encoding="utf-8",
    )
    subprocess.run(
        [str(BALF), "-c", str(config), "bascule", "plan", "-d", "33", str(plan)], check=True, capture_output=True
    )
    return config


def second_pass(cmd: list[str], env: dict[str, str] | None = None, repeat: int = RERUNS) -> float:
    """The median time of ``repeat`` runs of ``cmd`` over an already migrated mailbox, from fork
    to exit (no memory polling: its 20 ms period would be longer than the runs)."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        done = subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, check=False)
        times.append(time.perf_counter() - start)
        if done.returncode != 0:
            tail = (done.stdout + done.stderr).decode("utf-8", "replace")[-800:]
            raise RuntimeError(f"second pass: {cmd[0]} exited {done.returncode}: {tail}")
    return statistics.median(times)


def run_balf(
    server: Dovecot, source: Account, target: Account, work: Path, connections: int
) -> tuple[float, float, float]:
    config = balf_files(server, [(source, target)], work, connections)
    env = {"BENCH_PW": source.password}
    run = [str(BALF), "-c", str(config), "bascule", "run", "-d", "33", "-q"]
    seconds, rss, _ = timed(run, env)
    return seconds, rss, second_pass(run, env)


def mbsync_rc(pairs: list[tuple[Account, Account]], work: Path) -> Path:
    """One mbsync configuration with a channel per mailbox (``mbsync -a`` runs them all)."""
    state = work / "state"
    state.mkdir()
    parts = []
    for n, (source, target) in enumerate(pairs):
        parts.append(
            f"""IMAPAccount src{n}
Host {source.host}
Port {source.port}
User {source.username}
Pass {source.password}
SSLType None
AuthMechs LOGIN

IMAPStore src{n}
Account src{n}

IMAPAccount dst{n}
Host {target.host}
Port {target.port}
User {target.username}
Pass {target.password}
SSLType None
AuthMechs LOGIN

IMAPStore dst{n}
Account dst{n}

Channel bench{n}
Far :src{n}:
Near :dst{n}:
Patterns *
Create Near
Sync Pull
SyncState {state}/{n}-
CopyArrivalDate yes
"""
        )
    rc = work / "mbsyncrc"
    rc.write_text("\n".join(parts), encoding="utf-8")
    return rc


def run_mbsync(source: Account, target: Account, work: Path) -> tuple[float, float, float]:
    rc = mbsync_rc([(source, target)], work)
    run = ["mbsync", "-c", str(rc), "-q", "-a"]
    seconds, rss, _ = timed(run)
    return seconds, rss, second_pass(run)


def run_offlineimap(source: Account, target: Account, work: Path) -> tuple[float, float, float]:
    conf = work / "offlineimaprc"
    conf.write_text(
        f"""[general]
accounts = bench
metadata = {work}/meta
ui = quiet

[Account bench]
localrepository = dst
remoterepository = src

[Repository src]
type = IMAP
remotehost = {source.host}
remoteport = {source.port}
remoteuser = {source.username}
remotepass = {source.password}
ssl = no
starttls = no
maxconnections = 5
readonly = True

[Repository dst]
type = IMAP
remotehost = {target.host}
remoteport = {target.port}
remoteuser = {target.username}
remotepass = {target.password}
ssl = no
starttls = no
maxconnections = 5
""",
        encoding="utf-8",
    )
    seconds, rss, _ = timed(["offlineimap", "-c", str(conf), "-u", "quiet"])
    rerun, _r, _ = timed(["offlineimap", "-c", str(conf), "-u", "quiet"])
    return seconds, rss, rerun


def run_imapsync(script: str, source: Account, target: Account, work: Path) -> tuple[float, float, float]:
    cmd = [
        script,
        "--host1",
        source.host,
        "--port1",
        str(source.port),
        "--user1",
        source.username,
        "--password1",
        source.password,
        "--host2",
        target.host,
        "--port2",
        str(target.port),
        "--user2",
        target.username,
        "--password2",
        target.password,
        "--nossl1",
        "--nossl2",
        "--notls1",
        "--notls2",
        "--nolog",
        "--noreleasecheck",
        "--automap",
    ]
    seconds, rss, _ = timed(cmd, cwd=work)
    rerun, _r, _ = timed(cmd, cwd=work)
    return seconds, rss, rerun


def run_doveadm(server: Dovecot, source: Account, target: Account) -> tuple[float, float, float]:
    config = str(server.config_path)
    start = time.monotonic()
    peak = 0.0
    for folder in FOLDERS:
        if folder != "INBOX":
            subprocess.run(
                ["doveadm", "-c", config, "mailbox", "create", "-u", target.username, folder],
                capture_output=True,
                check=False,
            )
        seconds, rss, _ = timed(
            [
                "doveadm",
                "-c",
                config,
                "copy",
                "-u",
                target.username,
                folder,
                "user",
                source.username,
                "mailbox",
                folder,
                "all",
            ]
        )
        peak = max(peak, rss)
    return time.monotonic() - start, peak, None  # type: ignore[return-value]


def department_rerun(server: Dovecot, mailboxes: int, messages: int, base: Path, connections: int) -> None:
    """The campaign's everyday rerun: ``mailboxes`` small migrated mailboxes, second pass of the
    whole department by balf (one `balf bascule run -d 33`) and by mbsync (``mbsync -a``)."""
    sources = [server.add_user(f"dept-src-{n}") for n in range(mailboxes)]
    for n, source in enumerate(sources):
        fill(source, messages, seed=100 + n)
    times: dict[str, float] = {}
    for tool in ("balf", "mbsync"):
        if tool == "mbsync" and not shutil.which("mbsync"):
            continue
        work = base / f"dept-{tool}"
        work.mkdir()
        pairs = [(s, server.add_user(f"dept-{tool}-{n}")) for n, s in enumerate(sources)]
        if tool == "balf":
            config = balf_files(server, pairs, work, connections)
            run = [str(BALF), "-c", str(config), "bascule", "run", "-d", "33", "-q"]
            env = {"BENCH_PW": sources[0].password}
        else:
            run, env = ["mbsync", "-c", str(mbsync_rc(pairs, work)), "-q", "-a"], {}
        settle()
        first, _rss, _ = timed(run, env)
        times[tool] = second_pass(run, env)
        print(
            f"department of {mailboxes} mailboxes x {messages} messages, {tool}: first pass {first:.1f} s, "
            f"second pass {times[tool]:.2f} s (median of {RERUNS})",
            flush=True,
        )
    if len(times) == 2:
        print(f"department second pass balf / mbsync: {times['balf'] / times['mbsync']:.2f}x the time", flush=True)


def settle() -> None:
    """Start each tool on a quiet machine: the previous one's writes flushed to disk."""
    os.sync()
    time.sleep(2)


def install_balf(base: Path) -> Path:
    """balf's console script from its wheel, installed (and byte-compiled) into a venv of the
    benchmark's own whose .pth file lends it the running interpreter's dependencies."""
    import sysconfig

    wheels, venv = base / "wheel", base / "balf-venv"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(ROOT)],
        check=True,
        capture_output=True,
    )
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--no-deps",
            "-q",
            "--disable-pip-version-check",
            str(next(wheels.glob("balf-*.whl"))),
        ],
        check=True,
        capture_output=True,
    )
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (Path(site) / "balf-bench-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv / "bin" / "balf"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--scale", type=int, default=0, help="also run balf alone on a corpus this many times larger")
    parser.add_argument("--tools", default="balf,mbsync,offlineimap,imapsync,doveadm")
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--department", type=int, default=20, metavar="N", help="second pass over N small mailboxes (0: skip)"
    )
    parser.add_argument("--department-messages", type=int, default=100)
    args = parser.parse_args()
    tools = args.tools.split(",")

    ensure_dovecot()
    base = Path(tempfile.mkdtemp(prefix="balf-bench-"))
    base.chmod(0o711)  # Dovecot's unprivileged processes must reach its directory
    global BALF
    BALF = install_balf(base)
    results: list[Result] = []
    memory: list[tuple[int, float]] = []
    reruns: list[tuple[int, str, float]] = []  # second passes at other corpus sizes
    with Dovecot(base / "dovecot") as server:
        source = server.add_user("bench-source")
        t0 = time.monotonic()
        count, size = fill(source, args.messages)
        print(
            f"corpus: {count} messages, {size / 1e6:.1f} MB in {len(FOLDERS)} folders "
            f"(filled in {time.monotonic() - t0:.0f} s)",
            flush=True,
        )
        want = digests(source)
        runners = {
            "balf": lambda s, t, w: run_balf(server, s, t, w, args.connections),
            "mbsync": lambda s, t, w: run_mbsync(s, t, w) if shutil.which("mbsync") else None,
            "offlineimap": lambda s, t, w: run_offlineimap(s, t, w) if shutil.which("offlineimap") else None,
            "imapsync": lambda s, t, w: (
                run_imapsync(os.environ["IMAPSYNC"], s, t, w) if os.environ.get("IMAPSYNC") else None
            ),
            "doveadm": lambda s, t, w: run_doveadm(server, s, t),
        }
        for tool in tools:
            target = server.add_user(f"bench-{tool}")
            work = base / tool
            work.mkdir()
            settle()
            try:
                outcome = runners[tool](source, target, work)
            except (RuntimeError, OSError) as exc:
                print(f"{tool}: failed: {exc}", flush=True)
                results.append(Result(tool, 0, 0, 0, 0, None, "-", f"failed: {str(exc)[:200]}"))
                continue
            if outcome is None:
                print(f"{tool}: skipped (not installed / $IMAPSYNC unset)", flush=True)
                continue
            seconds, rss, rerun = outcome
            exact = compare(want, digests(target))
            result = Result(tool, seconds, count, size / 1e6, rss, rerun, exact)
            results.append(result)
            print(
                f"{tool}: {seconds:.1f} s, {result.msg_per_s:.0f} msg/s, {result.mb_per_s:.1f} MB/s, "
                f"peak {rss:.0f} MB, rerun {'-' if rerun is None else f'{rerun:.2f} s'}, byte-exact {exact}",
                flush=True,
            )
        if args.scale > 1 and "balf" in tools:
            memory.append((count, next(r.peak_rss_mb for r in results if r.tool == "balf")))
            big_source = server.add_user("bench-source-big")
            big_count, big_size = fill(big_source, args.messages * args.scale, seed=5)
            target = server.add_user("bench-balf-big")
            work = base / "balf-big"
            work.mkdir()
            settle()
            seconds, rss, rerun = run_balf(server, big_source, target, work, args.connections)
            memory.append((big_count, rss))
            print(
                f"balf x{args.scale}: {big_count} messages, {big_size / 1e6:.0f} MB in {seconds:.1f} s "
                f"({big_count / seconds:.0f} msg/s), peak {rss:.0f} MB, rerun {rerun:.2f} s",
                flush=True,
            )
            reruns.append((big_count, "balf", rerun))
            if "mbsync" in tools and shutil.which("mbsync"):
                target = server.add_user("bench-mbsync-big")
                work = base / "mbsync-big"
                work.mkdir()
                settle()
                seconds, _rss, rerun = run_mbsync(big_source, target, work)
                reruns.append((big_count, "mbsync", rerun))
                print(f"mbsync x{args.scale}: {big_count} messages in {seconds:.1f} s, rerun {rerun:.2f} s", flush=True)

        if args.department:
            department_rerun(server, args.department, args.department_messages, base, args.connections)

    print("\n| tool | msg/s | MB/s | peak memory | second pass | byte-exact |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for r in results:
        rerun = "-" if r.rerun_seconds is None else f"{r.rerun_seconds:.2f} s"
        print(
            f"| {r.tool} | {r.msg_per_s:.0f} | {r.mb_per_s:.1f} | {r.peak_rss_mb:.0f} MB | {rerun} | {r.byte_exact} |"
        )
    by_tool = {r.tool: r for r in results if r.seconds}
    if "balf" in by_tool:
        balf = by_tool["balf"]
        for tool, r in by_tool.items():
            if tool != "balf":
                print(f"balf / {tool}: {balf.msg_per_s / r.msg_per_s:.2f}x msg/s")
            if tool != "balf" and r.rerun_seconds and balf.rerun_seconds:
                print(f"second pass balf / {tool}: {balf.rerun_seconds / r.rerun_seconds:.2f}x the time")
    for n, rss in memory:
        print(f"balf peak memory with {n} messages: {rss:.0f} MB")
    for n, tool, seconds in reruns:
        print(f"second pass over {n} messages, {tool}: {seconds:.3f} s")
    big = {tool: seconds for _n, tool, seconds in reruns}
    if len(big) == 2:
        print(f"second pass over {reruns[0][0]} messages balf / mbsync: {big['balf'] / big['mbsync']:.2f}x the time")
    if args.json:
        args.json.write_text(
            json.dumps({"results": [asdict(r) for r in results], "memory": memory, "reruns": reruns}, indent=2)
        )
    shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
