"""`balf service` on both databases: add, list, show, import all-or-nothing."""

from __future__ import annotations

import json
from pathlib import Path

from tests.cli.test_cli import balf

GOOD = """\ufeffcode;kind;department;name;addresses;imap_account
SIP33A;SIP;33;SIP de Bordeaux Nord;sip.bordeaux-nord@dgfip.example;sip-bordeaux-nord
SIE2A;SIE;2a;SIE d'Ajaccio;sie.ajaccio@dgfip.example sie.ajaccio2@dgfip.example;
CDIF971;CDIF;971;CDIF de Pointe-à-Pitre;cdif.pap@dgfip.example;cdif-pap
"""

BAD = """code;kind;department;name;addresses;imap_account
SIP33B;SIP;33;SIP de Bordeaux Sud;sip.bordeaux-sud@dgfip.example;
SIE20;SIE;20;SIE ?;sie.20@dgfip.example;
SIP33C;SIP;33;SIP de Libourne;sip.bordeaux-sud@dgfip.example;
SIP33D;SIP;33;SIP de Blaye;not-an-address;
"""


def _config(tmp_path: Path, db_url: str) -> tuple[str, dict[str, str]]:
    config = tmp_path / "balf.toml"
    config.write_text(f'data_dir = "{tmp_path}"\n')
    return str(config), {"BALF_DATABASE__URL": db_url}


def test_import_list_show(tmp_path: Path, db_url: str) -> None:
    config, env = _config(tmp_path, db_url)
    csv_file = tmp_path / "services-33.csv"
    csv_file.write_text(GOOD, encoding="utf-8")
    result = balf("--config", config, "service", "import", str(csv_file), env=env)
    assert result.returncode == 0, result.stderr
    assert "imported 3 service(s)" in result.stdout
    listed = json.loads(balf("--config", config, "service", "list", "--json", env=env).stdout)
    assert [(s["code"], s["department"]) for s in listed] == [("SIE2A", "2A"), ("SIP33A", "33"), ("CDIF971", "971")]
    assert listed[0]["imap_account"] == "sie.ajaccio@dgfip.example"
    shown = balf("--config", config, "service", "show", "SIE.Ajaccio2@dgfip.example", env=env)
    assert shown.returncode == 0 and "SIE d'Ajaccio" in shown.stdout
    missing = balf("--config", config, "service", "show", "nope", env=env)
    assert missing.returncode == 1 and "no service 'nope'" in missing.stderr


def test_bad_rows_are_reported_by_line_and_nothing_is_imported(tmp_path: Path, db_url: str) -> None:
    config, env = _config(tmp_path, db_url)
    csv_file = tmp_path / "bad.csv"
    csv_file.write_text(BAD, encoding="utf-8")
    result = balf("--config", config, "service", "import", str(csv_file), env=env)
    assert result.returncode == 1
    assert "line 3, department: unknown department code '20'" in result.stderr
    assert "line 4, addresses: duplicate address sip.bordeaux-sud@dgfip.example (already on line 2)" in result.stderr
    assert "line 5, addresses: 'not-an-address' is not a valid mail address" in result.stderr
    assert "nothing was imported" in result.stderr and "Traceback" not in result.stderr
    listed = balf("--config", config, "service", "list", env=env)
    assert "no services" in listed.stdout


def test_conflicts_with_the_directory_fail_the_whole_import(tmp_path: Path, db_url: str) -> None:
    config, env = _config(tmp_path, db_url)
    added = balf("--config", config, "service", "add", "SIP33A", "--kind", "SIP", "--department", "33",
                 "--name", "SIP de Bordeaux", "--address", "sip.bordeaux-nord@dgfip.example", env=env)
    assert added.returncode == 0, added.stderr
    csv_file = tmp_path / "services.csv"
    csv_file.write_text(GOOD, encoding="utf-8")
    result = balf("--config", config, "service", "import", str(csv_file), env=env)
    assert result.returncode == 1
    assert "line 2, code: service SIP33A already exists" in result.stderr
    assert "sip.bordeaux-nord@dgfip.example already belongs to service SIP33A" in result.stderr
    codes = [s["code"] for s in json.loads(balf("--config", config, "service", "list", "--json", env=env).stdout)]
    assert codes == ["SIP33A"]


def test_add_refuses_bad_values_with_a_clear_line(tmp_path: Path, db_url: str) -> None:
    config, env = _config(tmp_path, db_url)
    result = balf("--config", config, "service", "add", "SIP99", "--kind", "SIP", "--department", "99",
                  "--name", "x", "--address", "a@b", env=env)
    assert result.returncode == 1
    assert "arguments, department: unknown department code '99'" in result.stderr
    assert "'a@b' is not a valid mail address" in result.stderr
