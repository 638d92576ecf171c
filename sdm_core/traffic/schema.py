"""The traffic store's tables (SQLAlchemy Core). One row per verification the server made: its decision and the
head's input ``h``, and, once a client labels it, the last label with its time and note.

Times are UTC seconds since the epoch (a float): the same type on SQLite and PostgreSQL, cheap to index and to
compare in retention queries. ``h`` is the head input as little-endian float32 bytes (``h_dim`` values).
Schema changes go through an Alembic migration in ``migrations/versions`` (never ``metadata.create_all``).
"""

from __future__ import annotations

from sqlalchemy import Boolean, Column, Float, Index, Integer, LargeBinary, MetaData, String, Table, Text

__all__ = ["metadata", "verifications", "LABELS", "VERSION_TABLE"]

# correct: the answer did what was asked; wrong: it did not; ood: the request lies outside what the head knows.
LABELS = ("correct", "wrong", "ood")
# Alembic's own bookkeeping table, named so that it cannot collide with an application's tables in a shared database.
VERSION_TABLE = "sdm_traffic_alembic_version"

metadata = MetaData()

verifications = Table(
    "sdm_verifications",
    metadata,
    Column("id", String(128), primary_key=True),
    Column("created_at", Float(precision=53), nullable=False),
    Column("bundle", String(1024), nullable=False),
    Column("bundle_sha256", String(64), nullable=False),
    Column("head_version", String(64), nullable=False),
    Column("route", String(64), nullable=False),
    Column("alpha", Float(precision=53), nullable=False),
    Column("admitted", Boolean, nullable=False),
    Column("prediction", Integer, nullable=False),
    Column("probability", Float(precision=53), nullable=False),
    Column("q", Integer, nullable=False),
    Column("q_prime", Float(precision=53), nullable=False),
    Column("d", Float(precision=53), nullable=False),
    Column("abstention_reason", String(32), nullable=True),
    Column("h", LargeBinary, nullable=False),
    Column("h_dim", Integer, nullable=False),
    Column("prompt", Text, nullable=True),
    Column("answer", Text, nullable=True),
    Column("label", String(16), nullable=True),
    Column("labelled_at", Float(precision=53), nullable=True),
    Column("note", Text, nullable=True),
    Index("ix_sdm_verifications_created_at", "created_at"),
    Index("ix_sdm_verifications_labelled_at", "labelled_at"),
)
