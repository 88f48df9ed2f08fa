"""The bascule's states as an enum importable without SQLAlchemy (no I/O).

``balf.db.models`` maps it to its column; the quick rerun (``balf.bridge.quickrun``) reads the
same values straight from the database driver and must not pay for the ORM's import.
"""

from __future__ import annotations

import enum


class BasculeState(enum.StrEnum):
    PLANIFIEE = "planifiée"
    EN_COURS = "en cours"
    MIGREE = "migrée"
    VERIFIEE = "vérifiée"
    EN_ERREUR = "en erreur"
