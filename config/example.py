"""Render the commented example configuration from the schema (no I/O).

The same text is shipped as config/balf.example.toml (a test keeps the two equal) and
written by `balf init`, with the data directory and a fresh secret filled in.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from balf.config.schema import Config

HEADER = """\
# balf configuration (TOML). Every key is optional: the value shown is the default.
# Any key can be overridden from the environment as BALF_<SECTION>__<KEY>,
# e.g. BALF_SMTP__PORT=25 or BALF_DATABASE__URL=postgresql+asyncpg://balf@db/balf.
"""


def render_example(overrides: dict[str, Any] | None = None) -> str:
    """The example file: every key, its default (or override) and its documentation."""
    overrides = overrides or {}
    lines = [HEADER]
    sections: list[dataclasses.Field[Any]] = []
    for f in dataclasses.fields(Config):
        if dataclasses.is_dataclass(f.default_factory) or f.default_factory is not dataclasses.MISSING:
            sections.append(f)
            continue
        lines += _key_lines(f, overrides.get(f.name, f.default))
    for section in sections:
        instance = section.default_factory()  # type: ignore[operator]
        lines.append("")
        lines.append(f"# {type(instance).__doc__.strip()}")  # type: ignore[union-attr]
        lines.append(f"[{section.name}]")
        given = overrides.get(section.name, {})
        for f in dataclasses.fields(instance):
            lines += _key_lines(f, given.get(f.name, getattr(instance, f.name)))
    return "\n".join(lines) + "\n"


def _key_lines(f: dataclasses.Field[Any], value: Any) -> list[str]:
    return [f"# {f.metadata['doc']}", f"{f.name} = {_toml_value(value)}"]


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid TOML basic string
