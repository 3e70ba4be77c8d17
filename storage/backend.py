"""Backend detection, retention settings and the Maintenance interface both backends implement."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import asyncpg
import psycopg

from storage.migrate import Backend, MigrationResult, migrate

logger = logging.getLogger(__name__)

# Any constant works as long as every pluginmon process uses the same one ("plmain").
MAINTENANCE_LOCK_KEY = 0x706C_6D61_696E

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class Retention:
    """How long each kind of data is kept. Defaults are the seed's (1-minute rollup: ours)."""

    samples: timedelta = timedelta(days=90)
    metrics: timedelta = timedelta(days=90)
    rollup_1m: timedelta = timedelta(days=30)
    rollup_1h: timedelta = timedelta(days=365)
    operations: timedelta = timedelta(days=30)
    audit: timedelta = timedelta(days=730)
    analytics: timedelta = timedelta(days=365)
    # TimescaleDB only: chunks older than this are compressed.
    compress_after: timedelta = timedelta(days=7)

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if value <= timedelta(0):
                raise ValueError(f"retention.{item.name} must be positive, got {value}")
        # Rollup refresh windows reach back up to a day (storage/timescale.py): raw rows must
        # outlive them (a refresh over dropped rows would erase buckets), and TimescaleDB
        # refuses a rollup retention that overlaps its own refresh window.
        for name, minimum in (
            ("samples", timedelta(days=2)),
            ("rollup_1m", timedelta(days=1)),
            ("rollup_1h", timedelta(days=2)),
        ):
            if getattr(self, name) < minimum:
                raise ValueError(
                    f"retention.{name} must be at least {minimum.days} day(s) "
                    "(rollup refresh windows reach that far back)"
                )

    @classmethod
    def from_days(cls, days: Mapping[str, float]) -> Retention:
        """``Retention.from_days({"samples": 30})``: the named fields in days, the rest default."""
        known = {item.name for item in fields(cls)}
        unknown = sorted(set(days) - known)
        if unknown:
            raise ValueError(f"unknown retention field(s): {', '.join(unknown)}")
        return cls(**{name: timedelta(days=value) for name, value in days.items()})


@dataclass(frozen=True, slots=True)
class RollupRefresh:
    rollup: str
    window_start: datetime | None
    window_end: datetime | None
    buckets: int


@dataclass(frozen=True, slots=True)
class MaintenanceReport:
    backend: Backend
    # False when another daemon held the maintenance lock and this run did nothing.
    ran: bool
    partitions_created: tuple[str, ...] = ()
    partitions_dropped: tuple[str, ...] = ()
    # (relation, rows) for every relation rows were deleted or dropped from.
    rows_removed: tuple[tuple[str, int], ...] = ()
    rollups: tuple[RollupRefresh, ...] = ()
    # Steps that could not run this time (lock timeout, ...), with the reason.
    failed_steps: tuple[tuple[str, str], ...] = field(default=())

    def removed(self, relation: str) -> int:
        return sum(rows for name, rows in self.rows_removed if name == relation)


class Maintenance(Protocol):
    """Once-per-database housekeeping, run periodically by the daemon on every instance."""

    @property
    def backend(self) -> Backend: ...

    async def run(self, conn: asyncpg.Connection, retention: Retention) -> MaintenanceReport: ...


async def detect_backend(conn: asyncpg.Connection) -> Backend:
    """The backend the database was migrated for, else what the server offers."""
    recorded = await conn.fetchval(
        "SELECT CASE WHEN to_regclass('schema_migrations') IS NOT NULL THEN"
        " (SELECT min(backend) FROM schema_migrations) END"
    )
    if recorded is not None:
        return Backend(str(recorded))
    offered = await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb')"
    )
    return Backend.TIMESCALEDB if offered else Backend.POSTGRES


def maintenance_for(backend: Backend, *, clock: Clock = utc_now) -> Maintenance:
    # Imported here: both modules import this one.
    if backend is Backend.TIMESCALEDB:
        from storage.timescale import TimescaleMaintenance

        return TimescaleMaintenance(clock=clock)
    from storage.partitions import PostgresMaintenance

    return PostgresMaintenance(clock=clock)


@asynccontextmanager
async def maintenance_lock(conn: asyncpg.Connection) -> AsyncIterator[bool]:
    """Yield whether this session holds the database-wide maintenance lock (never waits)."""
    acquired = bool(await conn.fetchval("SELECT pg_try_advisory_lock($1)", MAINTENANCE_LOCK_KEY))
    try:
        yield acquired
    finally:
        if acquired:
            await conn.execute("SELECT pg_advisory_unlock($1)", MAINTENANCE_LOCK_KEY)


# Plain tables with time-based retention on both backends: (relation, SQL, retention field).
_EXPIRY: tuple[tuple[str, str, str], ...] = (
    (
        "plugin_operations",
        "DELETE FROM plugin_operations"
        " WHERE status IN ('succeeded', 'failed', 'cancelled') AND finished_at < $1",
        "operations",
    ),
    ("audit_log", "DELETE FROM audit_log WHERE occurred_at < $1", "audit"),
    ("plugin_analytics", "DELETE FROM plugin_analytics WHERE period_start < $1", "analytics"),
)


async def delete_expired(
    conn: asyncpg.Connection, retention: Retention, now: datetime
) -> list[tuple[str, int]]:
    """Delete completed operations, audit entries and analytics past their horizons."""
    removed: list[tuple[str, int]] = []
    for relation, statement, retention_field in _EXPIRY:
        horizon = now - getattr(retention, retention_field)
        async with conn.transaction():
            status = await conn.execute(statement, horizon)
        count = _row_count(status)
        if count:
            logger.info(
                "retention: deleted %d rows from %s older than %s", count, relation, horizon
            )
        removed.append((relation, count))
    return removed


def _row_count(status: str) -> int:
    """Rows affected, from a command tag such as ``DELETE 42``."""
    tail = status.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else 0


# -- admin plane (psycopg): schema and policies at start-up or on `pluginmon migrate` -------


@dataclass(frozen=True, slots=True)
class PreparedDatabase:
    migrations: MigrationResult
    # TimescaleDB policies registered or re-registered now ("relation: policy"), empty on
    # PostgreSQL and when every policy already had the configured intervals.
    policy_changes: tuple[str, ...]

    @property
    def backend(self) -> Backend:
        return self.migrations.backend


def prepare_database(
    database_url: str,
    retention: Retention,
    *,
    sql_dir: Path | None = None,
    backend: Backend | None = None,
) -> PreparedDatabase:
    """Apply pending migrations, then (TimescaleDB) register policies with ``retention``.

    Blocking: call through ``asyncio.to_thread`` from async code.
    """
    result = migrate(database_url, sql_dir=sql_dir, backend=backend)
    changes: tuple[str, ...] = ()
    if result.backend is Backend.TIMESCALEDB:
        from storage.timescale import apply_policies

        conn: psycopg.Connection[Any]
        with psycopg.connect(database_url, autocommit=True) as conn:
            changes = tuple(str(change) for change in apply_policies(conn, retention))
    return PreparedDatabase(migrations=result, policy_changes=changes)
