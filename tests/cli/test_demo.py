"""`balf demo` (what `make run` runs): mail sent to the demo service lands in its IMAP INBOX."""

from __future__ import annotations

import os
import shutil
import signal
import smtplib
import subprocess
import sys
import tempfile
import time
from email.message import EmailMessage
from pathlib import Path

from imapclient import IMAPClient

from tests.harness.dovecot import ensure_dovecot
from tests.harness.ports import free_port, port_is_open, wait_port_closed


def test_demo_runs_the_gateway_with_a_private_dovecot() -> None:
    ensure_dovecot()
    # Not under pytest's tmp dir: Dovecot's unprivileged processes must traverse the path.
    directory = Path(tempfile.mkdtemp(prefix="balf-demo-"))
    directory.chmod(0o755)
    smtp_port, imap_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BALF_")}
    env["BALF_SMTP__PORT"] = str(smtp_port)
    log = directory / "demo.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "balf.cli.main", "demo", "--dir", str(directory / "data"),
             "--imap-port", str(imap_port)],
            stdout=out, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not port_is_open(smtp_port):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        text = log.read_text()
        assert f"IMAP on 127.0.0.1:{imap_port}, login demo" in text

        message = EmailMessage()
        message["From"] = "Jeanne Usager <jeanne.usager@example.org>"
        message["To"] = "demo@balf.localhost"
        message["Subject"] = "Question sur mon avis d'impôt"
        message.set_content("Bonjour,\nune question.\n")
        with smtplib.SMTP("127.0.0.1", smtp_port, timeout=30) as client:
            client.send_message(message)

        password = (directory / "data" / "demo-imap-password").read_text().strip()
        deadline = time.monotonic() + 30
        with IMAPClient("127.0.0.1", imap_port, ssl=False, timeout=30) as imap:
            imap.login("demo", password)
            while True:
                imap.select_folder("INBOX", readonly=True)
                uids = imap.search(["SUBJECT", "avis"], charset="UTF-8")
                if uids or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
        assert len(uids) == 1, log.read_text()

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0, log.read_text()
        wait_port_closed(imap_port)
        assert "Traceback" not in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        subprocess.run(["pkill", "-f", str(directory)], check=False)
        shutil.rmtree(directory, ignore_errors=True)
