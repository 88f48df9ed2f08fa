"""The `balf` command as an administrator runs it: a real subprocess, real exit codes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from balf.db.revision import head_revision

BALF = [sys.executable, "-m", "balf.cli.main"]


def balf(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("BALF_")}
    environ.update(env or {})
    return subprocess.run([*BALF, *args], capture_output=True, text=True, env=environ, cwd=cwd,
                          timeout=120, stdin=subprocess.DEVNULL)


def test_help_lists_the_command_groups() -> None:
    result = balf("--help")
    assert result.returncode == 0
    for group in ("serve", "init", "db", "service", "bascule", "spool"):
        assert f"\n  {group} " in result.stdout


@pytest.mark.parametrize(
    ("toml", "environ", "expected"),
    [
        ("[smtp]\nprot = 25\n", {}, "unknown key 'smtp.prot'"),
        ("[smtp]\nport = 'x'\n", {}, "'smtp.port' must be a whole number"),
        ("[bascule]\nlease_seconds = 1\n", {}, "'bascule.lease_seconds' must be at least 3, got 1"),
        ("", {"BALF_DATABASE__AUTO_UPGRADE": "maybe"},
         "BALF_DATABASE__AUTO_UPGRADE: 'database.auto_upgrade' must be true or false"),
    ],
)
def test_a_wrong_configuration_is_one_line_and_exit_2(
    tmp_path: Path, toml: str, environ: dict[str, str], expected: str
) -> None:
    config = tmp_path / "balf.toml"
    config.write_text(toml)
    # `bascule run` is first tried by the entry point's shortcut, before click: same words, same code.
    for command in (["db", "current"], ["serve"], ["service", "list"], ["bascule", "run", "-d", "33"]):
        result = balf("--config", str(config), *command, env=environ)
        assert result.returncode == 2, result
        assert expected in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "Traceback" not in result.stderr


def test_init_creates_config_data_dir_and_database(tmp_path: Path) -> None:
    data = tmp_path / "data"
    result = balf("init", "--dir", str(data))
    assert result.returncode == 0, result.stderr
    config = data / "balf.toml"
    text = config.read_text()
    assert f'data_dir = "{data}"' in text
    secret_line = next(line for line in text.splitlines() if line.startswith("secret = "))
    assert len(secret_line) > len('secret = ""') + 30
    assert (config.stat().st_mode & 0o777) == 0o640
    assert (data / "balf.sqlite3").exists() and (data / "spool").is_dir()
    current = balf("--config", str(config), "db", "current")
    assert current.returncode == 0 and "(latest)" in current.stdout
    again = balf("init", "--dir", str(data))
    assert again.returncode == 0 and "keeping the existing configuration" in again.stdout
    assert config.read_text() == text  # the secret is not regenerated


def test_db_current_before_upgrade_says_what_to_do(tmp_path: Path) -> None:
    config = tmp_path / "balf.toml"
    config.write_text(f'data_dir = "{tmp_path}"\n')
    before = balf("--config", str(config), "db", "current")
    assert before.returncode == 1 and "run `balf db upgrade`" in before.stdout
    up = balf("--config", str(config), "db", "upgrade")
    assert up.returncode == 0 and f"revision {head_revision()}" in up.stdout


def test_unreachable_database_is_a_clear_error(tmp_path: Path) -> None:
    config = tmp_path / "balf.toml"
    config.write_text('[database]\nurl = "postgresql+asyncpg://nobody@127.0.0.1:1/none"\n')
    result = balf("--config", str(config), "db", "upgrade")
    assert result.returncode == 1
    assert "cannot use the database" in result.stderr and "Traceback" not in result.stderr


def test_init_with_an_unreachable_database_is_one_line_without_the_password(tmp_path: Path) -> None:
    config = tmp_path / "balf.toml"
    config.write_text(f'data_dir = "{tmp_path}/data"\n[database]\n'
                      'url = "postgresql+asyncpg://balf:s3cret@127.0.0.1:1/balf"\n')
    result = balf("--config", str(config), "init")
    assert result.returncode == 1
    assert "cannot create the database postgresql+asyncpg://balf:***@127.0.0.1:1/balf" in result.stderr
    assert "s3cret" not in result.stderr + result.stdout and "Traceback" not in result.stderr
    assert (tmp_path / "data").is_dir()  # the data directory comes from --config's data_dir
