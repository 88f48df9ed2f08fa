"""The one distribution `balf` installs everything under balf.* and one console script."""

from __future__ import annotations

import configparser
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PARTS = ("gateway", "bridge", "counters", "cli", "config", "db")


def test_wheel_installs_only_under_the_balf_namespace(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
                    "-w", str(tmp_path), str(REPO)], check=True, capture_output=True, timeout=300)
    wheel = next(tmp_path.glob("balf-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/", 1)[0] for n in names}
    assert {t for t in top_level if not t.endswith(".dist-info")} == {"balf"}
    for part in PARTS:
        assert f"balf/{part}/__init__.py" in names
    assert "balf/config/balf.example.toml" in names
    assert any(n.startswith("balf/db/migrations/versions/0001_") for n in names)
    assert any(n.startswith("balf/db/migrations/versions/0002_") for n in names)
    # Data files setuptools warns it may stop taking (they are not listed packages): the French
    # acknowledgement must still ship.
    assert "balf/gateway/templates/acknowledgement.txt" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "balf = balf.cli.main:main" in text


def test_pyproject_holds_only_the_build_system() -> None:
    import tomllib

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert set(pyproject) == {"build-system"}
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    assert setup["metadata"]["name"] == "balf"
