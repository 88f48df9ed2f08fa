"""French department codes (INSEE) as services are filed under (no I/O)."""

from __future__ import annotations

# Metropolitan 01-95 with Corsica split into 2A/2B (there is no "20"), the overseas
# departments 971-976 and the overseas collectivities where DGFiP has services.
METROPOLITAN = {f"{n:02d}" for n in range(1, 96) if n != 20} | {"2A", "2B"}
OVERSEAS = {"971", "972", "973", "974", "975", "976", "977", "978", "986", "987", "988"}
DEPARTMENTS = frozenset(METROPOLITAN | OVERSEAS)


def normalize_department(code: str) -> str | None:
    """The canonical code (``"2a"`` -> ``"2A"``, ``"5"`` -> ``"05"``), or None if unknown."""
    text = code.strip().upper()
    if text.isdigit() and len(text) == 1:
        text = "0" + text
    return text if text in DEPARTMENTS else None
