"""The head revision of the schema, read from the migration files without Alembic (no I/O but
reading those files).

Alembic's import and script loading cost most of a short command's time; ``at_head`` and the
quick rerun (which does not import SQLAlchemy at all) only need to know the head's id.
"""

from __future__ import annotations

import re
from pathlib import Path

MIGRATIONS = Path(__file__).with_name("migrations")

_REVISION = re.compile(r"^(down_revision|revision)\s*(?::[^=]*)?=\s*['\"]?([\w.-]+|None)['\"]?\s*$", re.M)


def head_revision() -> str | None:
    """The head revision id read from the files of ``migrations/versions`` without Alembic (its
    import and script loading cost most of a short command's time); None when the history is
    not one plain line (branches, merges, several heads): callers then ask Alembic."""
    revisions: dict[str, str | None] = {}
    for path in (MIGRATIONS / "versions").glob("*.py"):
        found = dict(_REVISION.findall(path.read_text(encoding="utf-8")))
        if "revision" in found:
            down = found.get("down_revision")
            revisions[found["revision"]] = None if down in (None, "None") else down
    heads = set(revisions) - {d for d in revisions.values() if d}
    return heads.pop() if len(heads) == 1 else None
