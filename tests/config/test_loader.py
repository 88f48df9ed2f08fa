"""Configuration: defaults, TOML, environment overrides, and one-line errors (pure)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from balf.config.example import render_example
from balf.config.loader import ConfigError, build_config, config_path, load_config
from balf.config.schema import Config

REPO = Path(__file__).resolve().parents[2]


def test_defaults_are_embedded_sqlite_and_loopback() -> None:
    config = build_config({}, {}, source="t.toml")
    assert config.database_url.startswith("sqlite+aiosqlite:///")
    assert config.smtp.host == "127.0.0.1" and config.smtp.port == 2525
    assert config.imap.host == "127.0.0.1"


def test_file_values_and_environment_overrides() -> None:
    config = build_config(
        {"data_dir": "/srv/balf", "smtp": {"port": 25, "max_recipients": 10}},
        {"BALF_SMTP__PORT": "2526", "BALF_IMAP__TLS": "ssl", "BALF_GATEWAY__ACKNOWLEDGE": "off",
         "BALF_SPOOL__GROUP_COMMIT_MS": "5", "BALF_CONFIG": "/ignored", "OTHER": "x"},
        source="t.toml",
    )
    assert config.data_dir == "/srv/balf"
    assert config.smtp.port == 2526 and config.smtp.max_recipients == 10
    assert config.imap.tls == "ssl"
    assert config.gateway.acknowledge is False
    assert config.spool.group_commit_ms == 5.0
    assert config.spool_dir == "/srv/balf/spool"


@pytest.mark.parametrize(
    ("data", "environ", "expected"),
    [
        ({"smtp": {"prot": 25}}, {}, "t.toml: unknown key 'smtp.prot'; known keys here:"),
        ({"smtpd": {}}, {}, "t.toml: unknown key 'smtpd'"),
        ({"smtp": {"port": "25"}}, {}, "t.toml: 'smtp.port' must be a whole number, got a string ('25')"),
        ({"smtp": {"enabled": 1}}, {}, "t.toml: 'smtp.enabled' must be true or false, got a number (1)"),
        ({"smtp": 3}, {}, "t.toml: [smtp] must be a table of keys"),
        ({"imap": {"tls": "tls"}}, {}, "t.toml: 'imap.tls' must be one of none, starttls, ssl; got 'tls'"),
        ({"smtp": {"port": -1}}, {}, "t.toml: 'smtp.port' must be zero or more, got -1"),
        ({}, {"BALF_SMTP__PORT": "twenty"}, "BALF_SMTP__PORT: 'smtp.port' must be a whole number, got 'twenty'"),
        ({}, {"BALF_SMTP__PORTE": "1"}, "BALF_SMTP__PORTE: unknown key 'smtp.porte'"),
        ({}, {"BALF_SMTP": "1"}, "BALF_SMTP: 'smtp' is a section; set its keys as BALF_SMTP__<KEY>"),
        ({}, {"BALF_SMTPP__PORT": "1"}, "BALF_SMTPP__PORT: unknown key 'smtpp'"),
        ({"smtp": {"port": 70000}}, {}, "t.toml: 'smtp.port' must be a port number from 1 to 65535, got 70000"),
        ({}, {"BALF_IMAP__PORT": "0"}, "BALF_IMAP__PORT: 'imap.port' must be a port number from 1 to 65535, got 0"),
    ],
)
def test_errors_name_the_origin_the_key_and_what_is_expected(
    data: dict, environ: dict[str, str], expected: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        build_config(data, environ, source="t.toml")
    message = str(caught.value)
    assert message.startswith(expected)
    assert "\n" not in message


def test_unreadable_files_give_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "none.toml"
    with pytest.raises(ConfigError, match="no such configuration file; create one with `balf init`"):
        load_config(missing, {})
    bad = tmp_path / "bad.toml"
    bad.write_text("[smtp\nport = 1\n")
    with pytest.raises(ConfigError, match=r"bad.toml: not valid TOML"):
        load_config(bad, {})
    latin = tmp_path / "latin.toml"
    latin.write_bytes('data_dir = "/var/lib/balf-é"\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(latin, {})


def test_path_precedence() -> None:
    assert config_path("/a.toml", {"BALF_CONFIG": "/b.toml"}) == Path("/a.toml")
    assert config_path(None, {"BALF_CONFIG": "/b.toml"}) == Path("/b.toml")
    assert config_path(None, {}) == Path("/etc/balf/balf.toml")


def test_shipped_example_is_the_rendered_schema_and_documents_every_key(tmp_path: Path) -> None:
    shipped = (REPO / "config" / "balf.example.toml").read_text(encoding="utf-8")
    assert shipped == render_example(), "regenerate config/balf.example.toml from the schema"
    assert load_config(REPO / "config" / "balf.example.toml", {}) == Config()
    for section in dataclasses.fields(Config):
        if section.default_factory is dataclasses.MISSING:  # a top-level key
            assert f"\n{section.name} = " in shipped
            continue
        assert f"[{section.name}]" in shipped
        for key in dataclasses.fields(section.default_factory()):  # type: ignore[misc]
            assert key.metadata["doc"], f"{section.name}.{key.name} has no documentation"
            assert f"\n{key.name} = " in shipped.split(f"[{section.name}]", 1)[1]


def test_rendered_overrides_load_back() -> None:
    text = render_example({"data_dir": "/tmp/x", "gateway": {"secret": "s3cr\"et-long-enough-for-a-key"}})
    import tomllib

    config = build_config(tomllib.loads(text), {}, source="t")
    assert config.data_dir == "/tmp/x" and config.gateway.secret == 's3cr"et-long-enough-for-a-key'
