"""Load, override and validate the configuration (reads the TOML file and the environment).

Order of precedence: built-in defaults < TOML file < BALF_<SECTION>__<KEY> environment
variables. Every problem is a :class:`ConfigError` whose message is one line naming the
file, the key and what was expected, which the CLI prints and exits 2 with.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from balf.config.checks import check_config
from balf.config.errors import ConfigError
from balf.config.schema import Config

DEFAULT_PATH = Path("/etc/balf/balf.toml")
ENV_PREFIX = "BALF_"
ENV_PATH = "BALF_CONFIG"


def config_path(explicit: str | os.PathLike[str] | None, environ: Mapping[str, str]) -> Path:
    """The file to read: --config, else $BALF_CONFIG, else /etc/balf/balf.toml."""
    if explicit:
        return Path(explicit)
    if environ.get(ENV_PATH):
        return Path(environ[ENV_PATH])
    return DEFAULT_PATH


def load_config(
    path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    require_file: bool = True,
) -> Config:
    """Read the TOML file at ``path`` (see :func:`config_path`) and the environment overrides."""
    environ = os.environ if environ is None else environ
    file = config_path(path, environ)
    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        if require_file:
            raise ConfigError(
                f"{file}: no such configuration file; create one with `balf init` "
                f"or name another with --config or BALF_CONFIG"
            ) from None
        raw = b""
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read the configuration: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{file}: not UTF-8 text; save the file as UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: not valid TOML: {exc}") from None
    return build_config(data, environ, source=str(file))


def build_config(data: Mapping[str, Any], environ: Mapping[str, str], *, source: str) -> Config:
    """Validate a parsed TOML mapping plus environment overrides into a frozen Config."""
    merged = _apply_environment(data, environ)
    config: Config = _build(Config, merged, source, prefix="")
    check_config(config, source)
    return config


def _apply_environment(data: Mapping[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    merged: dict[str, Any] = {k: dict(v) if isinstance(v, Mapping) else v for k, v in data.items()}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_PATH:
            continue
        dotted = name[len(ENV_PREFIX):].lower().split("__")
        if len(dotted) == 1:
            merged[dotted[0]] = _EnvValue(name, value)
        elif len(dotted) == 2:
            section = merged.setdefault(dotted[0], {})
            if isinstance(section, dict):
                section[dotted[1]] = _EnvValue(name, value)
        # Longer names are not ours (BALF_TEST__X__Y...): ignored rather than rejected.
    return merged


@dataclasses.dataclass(frozen=True)
class _EnvValue:
    """A value that came from the environment: a string to be converted to the key's type."""

    variable: str
    text: str


def _build(cls: type, data: Mapping[str, Any], source: str, prefix: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: [{prefix.rstrip('.')}] must be a table of keys")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for name, value in data.items():
        where = f"{prefix}{name}"
        if name not in fields:
            origin = _origin_of(value, source)
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{origin}: unknown key '{where}'; known keys here: {known}")
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if isinstance(value, _EnvValue):
                raise ConfigError(f"{value.variable}: '{where}' is a section; set its keys as "
                                  f"BALF_{name.upper()}__<KEY>")
            values[name] = _build(hint, value, source, prefix=f"{where}.")  # type: ignore[arg-type]
        else:
            values[name] = _convert(value, hint, where, source, fields[name].metadata)
    return cls(**values)


def _origin_of(value: Any, source: str) -> str:
    """The environment variable a value came from, else the file."""
    if isinstance(value, _EnvValue):
        return value.variable
    if isinstance(value, dict) and value and all(isinstance(v, _EnvValue) for v in value.values()):
        return next(iter(value.values())).variable  # a whole section made up from the environment
    return source


def _convert(value: Any, hint: Any, where: str, source: str, meta: Mapping[str, Any]) -> Any:
    origin = value.variable if isinstance(value, _EnvValue) else source
    expected = _type_name(hint)
    if isinstance(value, _EnvValue):
        value = _parse_env(value.text, hint, where, origin, expected)
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif hint is str:
        ok = isinstance(value, str)
    else:  # pragma: no cover - the schema only uses the types above
        raise TypeError(f"unsupported configuration type {hint!r}")
    if not ok:
        raise ConfigError(f"{origin}: '{where}' must be {expected}, got {_describe(value)}")
    choices = meta.get("choices") or ()
    if choices and value not in choices:
        raise ConfigError(f"{origin}: '{where}' must be one of {', '.join(choices)}; got {value!r}")
    if hint in (int, float) and value < 0:
        raise ConfigError(f"{origin}: '{where}' must be zero or more, got {value}")
    if hint is int and where.endswith("port") and not 1 <= value <= 65535:
        raise ConfigError(f"{origin}: '{where}' must be a port number from 1 to 65535, got {value}")
    return value


def _parse_env(text: str, hint: Any, where: str, origin: str, expected: str) -> Any:
    if hint is str:
        return text
    if hint is bool:
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
    try:
        if hint is int:
            return int(text)
        if hint is float:
            return float(text)
    except ValueError:
        pass
    raise ConfigError(f"{origin}: '{where}' must be {expected}, got {text!r}")


def _type_name(hint: Any) -> str:
    return {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}.get(
        hint, getattr(hint, "__name__", str(hint))
    )


def _describe(value: Any) -> str:
    kind = {bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "a list", dict: "a table"}.get(type(value), type(value).__name__)
    return f"{kind} ({value!r})"


__all__ = ["ConfigError", "DEFAULT_PATH", "build_config", "config_path", "load_config"]
