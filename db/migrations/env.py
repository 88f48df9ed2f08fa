"""Alembic environment: migrations run on a connection handed over by balf.db.migrate."""

from __future__ import annotations

from alembic import context

from balf.db.models import Base

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - balf always passes its own connection
    raise RuntimeError("run migrations with `balf db upgrade`")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=True,  # SQLite cannot ALTER most things: batch mode copies the table
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
