"""systemd/balf.service is hardened as the issue asks and passes `systemd-analyze verify`."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "balf.service"


def _service_section() -> dict[str, str]:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNIT)
    return dict(parser["Service"])


def test_unit_is_hardened() -> None:
    service = _service_section()
    assert service["Type"] == "notify"
    assert service["User"] == "balf"
    assert service["StateDirectory"] == "balf"
    assert service["ProtectSystem"] == "strict"
    assert service["NoNewPrivileges"] == "yes"
    assert service["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"
    assert service["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE"
    assert "serve" in service["ExecStart"] and "kill -HUP" in service["ExecReload"]


def test_systemd_analyze_verify_passes(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is missing: apt-get install systemd")
    # verify checks that ExecStart exists: point it at the balf of this environment.
    balf = Path(sys.executable).with_name("balf")
    assert balf.exists(), "balf is not installed in this environment"
    unit = tmp_path / "balf.service"
    unit.write_text(UNIT.read_text().replace("/usr/bin/balf", str(balf)))
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "balf.service" not in result.stderr, result.stderr
