"""Engine selection: the maintenance and start-up work of whichever backend a database has.

``backend`` holds what the engines share; ``partitions`` (PostgreSQL), ``timescale``
(TimescaleDB) and ``citus`` (Citus) each implement it; this module is the one place that knows
them all.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg

from pluginmon.storage.backend import (
    Clock,
    Maintenance,
    Retention,
    RollupRefresh,
    admin_connection,
    detect_backend,
    utc_now,
)
from pluginmon.storage.citus import CitusMaintenance
from pluginmon.storage.migrate import (
    DEFAULT_CONNECT_TIMEOUT_SECONDS,
    Backend,
    MigrationResult,
    connect_timeout_param,
    migrate,
)
from pluginmon.storage.partitions import PostgresMaintenance
from pluginmon.storage.timescale import TimescaleMaintenance, apply_policies


def maintenance_for(backend: Backend, *, clock: Clock = utc_now) -> Maintenance:
    if backend is Backend.TIMESCALEDB:
        return TimescaleMaintenance(clock=clock)
    if backend is Backend.CITUS:
        return CitusMaintenance(clock=clock)
    return PostgresMaintenance(clock=clock)


async def backfill_rollups(
    database_url: str,
    since: datetime,
    retention: Retention,
    *,
    connect_timeout_seconds: float = DEFAULT_CONNECT_TIMEOUT_SECONDS,
    clock: Clock = utc_now,
) -> tuple[RollupRefresh, ...]:
    """``Maintenance.backfill`` on its own connection, for whichever backend the database has.

    The daemon calls this after replaying its spool, with the oldest replayed timestamp.
    """
    async with admin_connection(
        database_url, connect_timeout_seconds=connect_timeout_seconds
    ) as conn:
        maintenance = maintenance_for(await detect_backend(conn), clock=clock)
        return await maintenance.backfill(conn, since, retention)


# -- schema and policies at start-up or on `pluginmon migrate` (blocking psycopg) ----------


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
    connect_timeout_seconds: float = DEFAULT_CONNECT_TIMEOUT_SECONDS,
) -> PreparedDatabase:
    """Apply pending migrations, then (TimescaleDB) register policies with ``retention``.

    Blocking: call through ``asyncio.to_thread`` from async code. Each connection attempt
    gives up after ``connect_timeout_seconds`` (``psycopg.OperationalError``).
    """
    result = migrate(
        database_url,
        sql_dir=sql_dir,
        backend=backend,
        connect_timeout_seconds=connect_timeout_seconds,
    )
    changes: tuple[str, ...] = ()
    if result.backend is Backend.TIMESCALEDB:
        conn: psycopg.Connection[Any]
        with psycopg.connect(
            database_url,
            autocommit=True,
            connect_timeout=connect_timeout_param(connect_timeout_seconds),
        ) as conn:
            changes = tuple(str(change) for change in apply_policies(conn, retention))
    return PreparedDatabase(migrations=result, policy_changes=changes)
