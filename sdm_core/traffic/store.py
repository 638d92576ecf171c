"""Access to the traffic store: the server writes verifications and labels through it, ``training.update`` reads
the labelled rows back. Any SQLAlchemy URL works; SQLite (one file, one host) and PostgreSQL (psycopg, several
replicas sharing one database) are the tested ones.

Every method is synchronous and opens its own short transaction: callers that must not block (the server's event
loop) call them from a worker thread.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import ColumnElement, and_, create_engine, delete, event, func, insert, select, text, update
from sqlalchemy.engine import Engine, Row, make_url
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.exc import ArgumentError
from sqlalchemy.pool import ConnectionPoolEntry

from sdm_core.traffic.schema import LABELS, VERSION_TABLE, verifications

__all__ = [
    "TrafficRecord",
    "Feedback",
    "FeedbackResult",
    "TrafficStore",
    "StoreError",
    "sqlite_url",
    "redact_url",
    "MIGRATIONS",
]

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
# A fixed key for PostgreSQL's advisory lock: replicas starting together run the migrations one after the other.
_MIGRATION_LOCK_KEY = 0x5D31_7A7F


class StoreError(RuntimeError):
    """The store cannot be opened or used; the message says what to check."""


def sqlite_url(path: str | os.PathLike) -> str:
    """The SQLAlchemy URL of an SQLite file (its folder is created when missing)."""
    file = Path(path).expanduser().resolve()
    return f"sqlite:///{file}"


def redact_url(url: str) -> str:
    """The URL without its password, for logs, provenance and /ready."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<invalid URL>"


@dataclass
class TrafficRecord:
    """One verification the server made (and its label, once given)."""

    id: str
    created_at: float
    bundle: str
    bundle_sha256: str
    head_version: str
    route: str
    alpha: float
    admitted: bool
    prediction: int
    probability: float
    q: int
    q_prime: float
    d: float
    abstention_reason: str | None
    h: bytes
    h_dim: int
    prompt: str | None = None
    answer: str | None = None
    label: str | None = None
    labelled_at: float | None = None
    note: str | None = None

    @staticmethod
    def encode_h(values: Sequence[float] | np.ndarray) -> tuple[bytes, int]:
        """``h`` as stored: little-endian float32 bytes, and its length."""
        array = np.ascontiguousarray(np.asarray(values, dtype="<f4").reshape(-1))
        return array.tobytes(), int(array.shape[0])

    def embedding(self) -> np.ndarray:
        """The head's input as a float32 vector of ``h_dim`` values."""
        array = np.frombuffer(self.h, dtype="<f4")
        if array.shape[0] != self.h_dim:
            raise StoreError(f"record {self.id!r}: h holds {array.shape[0]} values, h_dim says {self.h_dim}")
        return array.astype(np.float32)

    def row(self) -> dict:
        return {name: getattr(self, name) for name in _COLUMNS}


_COLUMNS = tuple(c.name for c in verifications.columns)


@dataclass(frozen=True)
class Feedback:
    id: str
    label: str
    note: str | None = None


@dataclass
class FeedbackResult:
    """What :meth:`TrafficStore.set_feedback` did: the records labelled (as they are now) and the label each had
    before."""

    records: list[TrafficRecord] = field(default_factory=list)
    previous: dict[str, str | None] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)


def _record(row: Row[Any]) -> TrafficRecord:
    data = dict(row._mapping)
    data["admitted"] = bool(data["admitted"])
    data["h"] = bytes(data["h"])
    return TrafficRecord(**data)


class TrafficStore:
    """A traffic store at ``url``. :meth:`migrate` brings its schema to the current revision (idempotent)."""

    def __init__(self, url: str, *, connect_timeout_s: float = 5.0) -> None:
        self.url = url
        try:
            parsed = make_url(url)
        except ArgumentError:
            raise StoreError(
                f"{url!r} is not a SQLAlchemy URL; use e.g. sqlite:////var/lib/sdm/traffic.sqlite3 or "
                "postgresql+psycopg://user:password@host/db"
            ) from None
        self.dialect = parsed.get_backend_name()
        kwargs: dict = {"pool_pre_ping": True, "future": True}
        if self.dialect == "sqlite":
            database = parsed.database
            if database and database != ":memory:":
                Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
            # The writer thread and request threads share the engine; SQLite waits this long for a lock.
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": connect_timeout_s}
        elif self.dialect == "postgresql":
            kwargs["connect_args"] = {"connect_timeout": max(1, int(math.ceil(connect_timeout_s)))}
        try:
            self.engine: Engine = create_engine(url, **kwargs)
        except (ArgumentError, ImportError) as exc:
            raise StoreError(
                f"cannot open the traffic store {redact_url(url)}: {exc} (for PostgreSQL install psycopg: pip install "
                "'sdm-lm[store]')"
            ) from None
        if self.dialect == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)

    def __repr__(self) -> str:
        return f"TrafficStore({redact_url(self.url)!r})"

    def close(self) -> None:
        self.engine.dispose()

    # -- schema ----------------------------------------------------------------------------------------------
    def migrate(self) -> str:
        """Upgrade the schema to the newest Alembic revision; returns it."""
        from alembic import command
        from alembic.config import Config
        from alembic.runtime.migration import MigrationContext

        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        with self.engine.begin() as connection:
            if self.dialect == "postgresql":
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
            return (
                MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE}).get_current_revision()
                or ""
            )

    def revision(self) -> str | None:
        from alembic.runtime.migration import MigrationContext

        with self.engine.connect() as connection:
            return MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE}).get_current_revision()

    def ping(self) -> None:
        with self.engine.connect() as connection:
            connection.execute(select(1))

    # -- writing ---------------------------------------------------------------------------------------------
    def insert(self, records: Iterable[TrafficRecord]) -> int:
        rows = [r.row() for r in records]
        if not rows:
            return 0
        with self.engine.begin() as connection:
            connection.execute(insert(verifications), rows)
        return len(rows)

    def set_feedback(self, items: Sequence[Feedback], at: float | None = None) -> FeedbackResult:
        """Label records, all or nothing: when an id is unknown (never stored, sampled out or expired) nothing is
        written and ``missing`` names it. Within ``items`` the last label for an id wins."""
        for item in items:
            if item.label not in LABELS:
                raise ValueError(f"label must be one of {', '.join(LABELS)}, got {item.label!r}")
        when = time.time() if at is None else float(at)
        latest: dict[str, Feedback] = {}
        for item in items:
            latest[item.id] = item
        result = FeedbackResult()
        with self.engine.begin() as connection:
            found: dict[str, str | None] = {}
            ids = list(latest)
            for start in range(0, len(ids), 500):  # keeps the IN list within every database's parameter limit
                chunk = ids[start : start + 500]
                for row in connection.execute(
                    select(verifications.c.id, verifications.c.label).where(verifications.c.id.in_(chunk))
                ):
                    found[row.id] = row.label
            result.missing = [i for i in ids if i not in found]
            if result.missing:
                return result
            for identifier, item in latest.items():
                connection.execute(
                    update(verifications)
                    .where(verifications.c.id == identifier)
                    .values(label=item.label, labelled_at=when, note=item.note)
                )
            result.previous = found
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                result.records.extend(
                    _record(r) for r in connection.execute(select(verifications).where(verifications.c.id.in_(chunk)))
                )
        order = {identifier: n for n, identifier in enumerate(ids)}
        result.records.sort(key=lambda r: order[r.id])
        return result

    def prune(self, *, max_age_s: float | None = None, max_rows: int | None = None, now: float | None = None) -> int:
        """Delete records older than ``max_age_s`` and, beyond ``max_rows``, the oldest ones; returns how many."""
        deleted = 0
        now = time.time() if now is None else now
        with self.engine.begin() as connection:
            if max_age_s is not None and max_age_s > 0:
                deleted += (
                    connection.execute(
                        delete(verifications).where(verifications.c.created_at < now - max_age_s)
                    ).rowcount
                    or 0
                )
            if max_rows is not None and max_rows > 0:
                total = connection.execute(select(func.count()).select_from(verifications)).scalar_one()
                excess = int(total) - int(max_rows)
                if excess > 0:
                    oldest = (
                        select(verifications.c.id)
                        .order_by(verifications.c.created_at.asc(), verifications.c.id.asc())
                        .limit(excess)
                    )
                    ids = [r.id for r in connection.execute(oldest)]
                    for start in range(0, len(ids), 500):
                        deleted += (
                            connection.execute(
                                delete(verifications).where(verifications.c.id.in_(ids[start : start + 500]))
                            ).rowcount
                            or 0
                        )
        return deleted

    # -- reading ---------------------------------------------------------------------------------------------
    def get(self, identifier: str) -> TrafficRecord | None:
        with self.engine.connect() as connection:
            row = connection.execute(select(verifications).where(verifications.c.id == identifier)).first()
        return _record(row) if row is not None else None

    def count(self, labelled: bool | None = None) -> int:
        query = select(func.count()).select_from(verifications)
        if labelled is not None:
            query = query.where(verifications.c.label.is_not(None) if labelled else verifications.c.label.is_(None))
        with self.engine.connect() as connection:
            return int(connection.execute(query).scalar_one())

    def labelled(
        self,
        *,
        since: float | None = None,
        until: float | None = None,
        head_versions: Sequence[str] | None = None,
        labels: Sequence[str] = LABELS,
    ) -> list[TrafficRecord]:
        """Labelled records, oldest label first (ties by id): a deterministic order for a deterministic update."""
        conditions: list[ColumnElement[bool]] = [verifications.c.label.in_(list(labels))]
        if since is not None:
            conditions.append(verifications.c.labelled_at >= since)
        if until is not None:
            conditions.append(verifications.c.labelled_at <= until)
        if head_versions:
            conditions.append(verifications.c.head_version.in_(list(head_versions)))
        query = (
            select(verifications)
            .where(and_(*conditions))
            .order_by(verifications.c.labelled_at.asc(), verifications.c.id.asc())
        )
        with self.engine.connect() as connection:
            return [_record(r) for r in connection.execute(query)]


def _sqlite_pragmas(connection: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
    # WAL lets the update command read while the server writes; NORMAL sync is durable across process crashes.
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()
