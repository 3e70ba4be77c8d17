"""Backend detection, retention settings and the Maintenance interface both backends implement."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import psycopg

from pluginmon.storage.migrate import (
    DEFAULT_CONNECT_TIMEOUT_SECONDS,
    OFFER_SQL,
    PRELOAD_SQL,
    Backend,
    TimescaleOffer,
    choose_backend,
    connect_timeout_param,
    offer_from,
)

logger = logging.getLogger(__name__)

# A maintenance step (one rollup, one retention statement, the daily analytics) that fails
# one of these is postponed, not fatal: the next maintenance run tries it again. (Here, in the
# admin plane, not in storage.errors, which imports asyncpg.)
MAINTENANCE_STEP_ERRORS: tuple[type[Exception], ...] = (
    psycopg.errors.LockNotAvailable,
    psycopg.errors.QueryCanceled,
    psycopg.errors.TransactionRollback,
)

# Any constant works as long as every pluginmon process uses the same one ("plmain").
MAINTENANCE_LOCK_KEY = 0x706C_6D61_696E

# TimescaleDB's time_bucket origin for sub-month widths (a Monday); the PostgreSQL rollup
# functions bucket from the same origin, so both backends agree on every bucket.
BUCKET_ORIGIN = datetime(2000, 1, 3, tzinfo=UTC)

Clock = Callable[[], datetime]

# Maintenance and back-fills run on the admin plane: one psycopg connection in autocommit
# mode (each step opens its own transaction; the advisory lock is held by the session).
AdminConnection = psycopg.AsyncConnection[Any]


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
    # The plugin_metrics rollups (storage.metric_rollups), apart from the samples' ``rollups``.
    metric_rollups: tuple[RollupRefresh, ...] = ()
    # UTC days whose plugin_analytics rows this run (re)computed (storage.analytics).
    analytics_days: tuple[datetime, ...] = ()

    def removed(self, relation: str) -> int:
        return sum(rows for name, rows in self.rows_removed if name == relation)


class Maintenance(Protocol):
    """Once-per-database housekeeping, run periodically by the daemon on every instance.

    ``conn`` is an admin-plane connection in autocommit mode (``admin_connection``).
    """

    @property
    def backend(self) -> Backend: ...

    async def run(self, conn: AdminConnection, retention: Retention) -> MaintenanceReport: ...

    async def backfill(
        self, conn: AdminConnection, since: datetime, retention: Retention
    ) -> tuple[RollupRefresh, ...]:
        """Recompute both rollups from ``since`` up to the last complete bucket.

        For rows that arrived later than the regular refresh looks back (a disk spool
        replayed after a long outage): call it once after the replay with the oldest
        replayed timestamp. Buckets whose raw rows retention may already have dropped
        (older than ``now - retention.samples``) are left alone. Safe to run while the
        maintenance job runs on this or another daemon.
        """
        ...


@asynccontextmanager
async def admin_connection(
    database_url: str, *, connect_timeout_seconds: float = DEFAULT_CONNECT_TIMEOUT_SECONDS
) -> AsyncIterator[AdminConnection]:
    """An autocommit psycopg connection for maintenance and back-fills, closed on exit.

    A host that does not answer fails after ``connect_timeout_seconds`` (libpq counts whole
    seconds, at least 2) instead of the operating system's TCP timeout.
    """
    conn = await psycopg.AsyncConnection.connect(
        database_url,
        autocommit=True,
        connect_timeout=connect_timeout_param(connect_timeout_seconds),
    )
    async with conn:
        yield conn


def require_autocommit(conn: AdminConnection) -> None:
    if not conn.autocommit:
        raise ValueError("maintenance needs an autocommit connection (see admin_connection)")


async def detect_backend(conn: AdminConnection) -> Backend:
    """The backend the database was migrated for, else what auto would choose
    (``storage.migrate.choose_backend``: TimescaleDB only when offered, preloaded and new
    enough)."""
    # Two statements: a CASE around the subquery still needs the table to exist to plan it.
    exists = await (await conn.execute("SELECT to_regclass('schema_migrations')")).fetchone()
    if exists is not None and exists[0] is not None:
        row = await (await conn.execute("SELECT min(backend) FROM schema_migrations")).fetchone()
        if row is not None and row[0] is not None:
            return Backend(str(row[0]))
    return choose_backend(None, await read_timescale_offer(conn)).backend


async def read_timescale_offer(conn: AdminConnection) -> TimescaleOffer:
    """``storage.migrate.read_timescale_offer`` on an async (autocommit) connection."""
    offer_row = await (await conn.execute(OFFER_SQL)).fetchone()
    try:
        preload_row = await (await conn.execute(PRELOAD_SQL)).fetchone()
    except psycopg.errors.InsufficientPrivilege:
        return offer_from(offer_row, None, shown=False)  # the loader's setting answers
    return offer_from(offer_row, preload_row, shown=True)


def bucket_floor(moment: datetime, width: timedelta) -> datetime:
    """Start of the ``width`` bucket holding ``moment`` (TimescaleDB's time_bucket)."""
    return BUCKET_ORIGIN + ((moment - BUCKET_ORIGIN) // width) * width


def backfill_start(
    since: datetime, width: timedelta, now: datetime, retention: Retention
) -> datetime:
    """The first bucket to recompute for rows since ``since``: ``since``'s bucket, or the
    first bucket wholly inside the raw retention when that is later (recomputing a bucket
    whose raw rows were dropped would erase it from the rollup)."""
    start = bucket_floor(since, width)
    horizon = now - retention.samples
    if start < horizon:
        start = bucket_floor(horizon, width)
        if start < horizon:
            start += width
    return start


@asynccontextmanager
async def maintenance_lock(conn: AdminConnection) -> AsyncIterator[bool]:
    """Yield whether this session holds the database-wide maintenance lock (never waits)."""
    cur = await conn.execute("SELECT pg_try_advisory_lock(%s)", (MAINTENANCE_LOCK_KEY,))
    row = await cur.fetchone()
    acquired = bool(row is not None and row[0])
    try:
        yield acquired
    finally:
        if acquired and not conn.closed:
            await conn.execute("SELECT pg_advisory_unlock(%s)", (MAINTENANCE_LOCK_KEY,))


def _expire_audited(relation: str, condition: str) -> str:
    """DELETE from a tenant table and, in the same statement, record the run as one audit
    entry (actor ``daemon``, action ``retention.run``, target the table) in each tenant whose
    rows it removed, like the audit trail's own retention (``_expire_audit``) does. The
    entries are plain inserts: the audit trigger chains them (storage may not import the
    registry's helpers). Returns the number of rows removed."""
    return f"""
WITH removed AS (
    DELETE FROM {relation} WHERE {condition} RETURNING tenant_id
), per_tenant AS (
    SELECT tenant_id, count(*) AS rows_removed FROM removed GROUP BY tenant_id
), recorded AS (
    INSERT INTO audit_log (tenant_id, actor, action, entity_type, details)
    SELECT tenant_id, 'daemon', 'retention.run', '{relation}',
           jsonb_build_object('removed', rows_removed, 'horizon', %(horizon)s::timestamptz)
      FROM per_tenant ORDER BY tenant_id
    RETURNING 1
)
SELECT coalesce(sum(rows_removed), 0)::bigint FROM per_tenant
"""  # noqa: S608 - constants of this module, never input


# Plain tables with time-based retention on both backends: (relation, SQL, retention field).
# Each statement returns the number of rows it removed; None: the audit trail's own way.
_EXPIRY: tuple[tuple[str, str | None, str], ...] = (
    (
        "plugin_operations",
        _expire_audited(
            "plugin_operations",
            "status IN ('succeeded', 'failed', 'cancelled') AND finished_at < %(horizon)s",
        ),
        "operations",
    ),
    # The audit trail: see _expire_audit.
    ("audit_log", None, "audit"),
    (
        "plugin_analytics",
        _expire_audited("plugin_analytics", "period_start < %(horizon)s"),
        "analytics",
    ),
)


# Audit entries one call of pluginmon_audit_expire_tenant removes at most, each call its own
# transaction: an audited write of the tenant waits for a lane only while a call holds all 16.
AUDIT_EXPIRE_BATCH = 5000
# How long one call waits for a lane's head that a writer holds (a writer's transaction is
# short); past it that tenant waits for the next pass, and the maintenance job goes on.
AUDIT_EXPIRE_LOCK_TIMEOUT = "5s"

# Tenants with a lane whose next entry is past the horizon (or missing: the function warns).
_AUDIT_DUE_SQL = b"""
SELECT DISTINCT c.tenant_id
  FROM audit_chain c
  LEFT JOIN audit_log l
    ON l.tenant_id = c.tenant_id AND l.lane = c.lane AND l.seq = c.anchor_seq + 1
 WHERE c.head_seq > c.anchor_seq AND (l.occurred_at < %s OR l.seq IS NULL)
 ORDER BY 1
"""


async def _expire_audit(conn: AdminConnection, horizon: datetime) -> int:
    """Audit entries leave only through sql/130's function (sql/030's per chain): per tenant,
    the oldest part of each lane past ``horizon``, an anchor kept, the run recorded in the
    tenant's chain; one short transaction per tenant and batch, so no other tenant's writes
    wait for it. Returns the entries removed."""
    cur = await conn.execute(_AUDIT_DUE_SQL, (horizon,))
    tenants = [str(r[0]) for r in await cur.fetchall()]
    total = 0
    for tenant in tenants:
        while True:
            try:
                async with conn.transaction():
                    await conn.execute(
                        b"SELECT set_config('lock_timeout', %s, true)",
                        (AUDIT_EXPIRE_LOCK_TIMEOUT,),
                    )
                    cur = await conn.execute(
                        b"SELECT pluginmon_audit_expire_tenant(%s, %s, %s)",
                        (tenant, horizon, AUDIT_EXPIRE_BATCH),
                    )
                    row = await cur.fetchone()
            except psycopg.errors.LockNotAvailable:
                logger.warning(
                    "audit retention: tenant %s: a lane stayed held by a writer for %s;"
                    " its entries are removed at the next pass",
                    tenant,
                    AUDIT_EXPIRE_LOCK_TIMEOUT,
                )
                break
            step = int(row[0]) if row is not None and row[0] is not None else 0
            total += step
            if step < AUDIT_EXPIRE_BATCH:
                break
    return total


async def delete_expired(
    conn: AdminConnection, retention: Retention, now: datetime
) -> list[tuple[str, int]]:
    """Delete completed operations, audit entries and analytics past their horizons; each
    run that removes a tenant's rows leaves an audit entry in that tenant's chain."""
    require_autocommit(conn)
    removed: list[tuple[str, int]] = []
    for relation, statement, retention_field in _EXPIRY:
        horizon = now - getattr(retention, retention_field)
        if statement is None:
            count = await _expire_audit(conn, horizon)
        else:
            async with conn.transaction():
                cur = await conn.execute(statement.encode(), {"horizon": horizon})
                row = await cur.fetchone()
            count = int(row[0]) if row is not None and row[0] is not None else 0
        if count:
            logger.info(
                "retention: deleted %d rows from %s older than %s", count, relation, horizon
            )
        removed.append((relation, count))
    return removed
