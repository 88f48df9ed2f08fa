"""Checks across keys of a built configuration: one line, naming the key (pure)."""

from __future__ import annotations

from pathlib import Path

import pytest

from balf.config.checks import check_config
from balf.config.loader import ConfigError, build_config, load_config
from balf.config.schema import Config

GOOD_SECRET = "s" * 32


@pytest.mark.parametrize(("data", "environ", "expected"), [
    ({"relay": {"username": "balf", "password": "pw"}}, {},
     "t.toml: 'relay.username' is set but 'relay.tls' is \"none\": the relay login is only sent over TLS"),
    ({"relay": {"tls": "none"}}, {"BALF_RELAY__PASSWORD": "pw"},
     "t.toml: 'relay.password' is set but 'relay.tls' is \"none\""),
    ({"gateway": {"secret": "short"}}, {},
     "t.toml: 'gateway.secret' must be at least 16 characters, got 5"),
    ({}, {"BALF_GATEWAY__SECRET": "x" * 15}, "t.toml: 'gateway.secret' must be at least 16 characters"),
])
def test_refused_in_one_line_naming_the_key(data: dict, environ: dict[str, str], expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build_config(data, environ, source="t.toml")  # builds, then checks
    assert str(caught.value).startswith(expected)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("data", [
    {},  # the defaults: no credentials; no secret yet (the gateway refuses to start without one)
    {"relay": {"tls": "starttls", "username": "balf", "password": "pw"}},
    {"relay": {"tls": "ssl", "username": "balf", "password": "pw"}},
    {"gateway": {"secret": GOOD_SECRET}},
])
def test_accepted(data: dict) -> None:
    config = build_config(data, {}, source="t.toml")
    assert isinstance(config, Config)
    check_config(config, "t.toml")


def test_load_config_runs_the_checks(tmp_path: Path) -> None:
    conf = tmp_path / "balf.toml"
    conf.write_text('[relay]\nusername = "balf"\npassword = "pw"\n')
    with pytest.raises(ConfigError, match="'relay.username' is set but 'relay.tls' is \"none\""):
        load_config(conf, {})
