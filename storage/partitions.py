"""PostgreSQL backend maintenance: daily partitions, retention, rollup refresh (admin plane)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from psycopg import sql

from pluginmon.storage.analytics import daily_analytics_step
from pluginmon.storage.backend import (
    MAINTENANCE_STEP_ERRORS,
    AdminConnection,
    Clock,
    MaintenanceReport,
    Retention,
    RollupRefresh,
    backfill_start,
    bucket_floor,
    delete_expired,
    maintenance_lock,
    require_autocommit,
    utc_now,
)
from pluginmon.storage.metric_rollups import maintain_metric_rollups
from pluginmon.storage.migrate import Backend

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RollupSpec:
    relation: str
    width: timedelta
    # Buckets this far behind the watermark are recomputed whenever a new bucket completes,
    # for late rows (1,000 plugins at 10 s: a 1-minute refresh reads ~66k rows, ~0.5 s).
    lookback: timedelta
    retention_field: str


ROLLUPS: tuple[RollupSpec, ...] = (
    RollupSpec("rollup_samples_1m", timedelta(minutes=1), timedelta(minutes=10), "rollup_1m"),
    RollupSpec("rollup_samples_1h", timedelta(hours=1), timedelta(hours=1), "rollup_1h"),
)

# A back-fill recomputes this much per transaction (1,000 plugins at 10 s: ~2M raw rows).
BACKFILL_CHUNK = timedelta(hours=6)

# Time-partitioned tables and the retention field that governs each.
PARTITIONED: tuple[tuple[str, str], ...] = (
    ("plugin_samples", "samples"),
    ("plugin_metrics", "metrics"),
)


class PostgresMaintenance:
    """One maintenance pass, under the database-wide advisory lock:

    partitions created ``days_ahead`` and dropped (or trimmed, at the horizon) for retention,
    rollups refreshed from their watermarks, expired rollup buckets, completed operations,
    audit entries and analytics deleted, the daily analytics computed (storage.analytics). DDL waits at most ``lock_timeout`` for the tables,
    so a long COPY delays maintenance rather than the other way round.
    """

    def __init__(
        self,
        *,
        days_ahead: int = 7,
        lock_timeout: timedelta = timedelta(seconds=5),
        rollups: tuple[RollupSpec, ...] = ROLLUPS,
        backfill_chunk: timedelta = BACKFILL_CHUNK,
        clock: Clock = utc_now,
    ) -> None:
        if days_ahead < 1:
            raise ValueError(f"days_ahead must be at least 1, got {days_ahead}")
        for spec in rollups:
            if backfill_chunk <= timedelta(0) or backfill_chunk % spec.width:
                raise ValueError(
                    f"backfill_chunk must be a positive multiple of {spec.relation}'s "
                    f"{spec.width}, got {backfill_chunk}"
                )
        self._backfill_chunk = backfill_chunk
        self._days_ahead = days_ahead
        self._lock_timeout_ms = int(lock_timeout.total_seconds() * 1000)
        self._rollups = rollups
        self._clock = clock

    @property
    def backend(self) -> Backend:
        return Backend.POSTGRES

    async def run(self, conn: AdminConnection, retention: Retention) -> MaintenanceReport:
        require_autocommit(conn)
        async with maintenance_lock(conn) as acquired:
            if not acquired:
                logger.debug("maintenance: another session holds the lock; skipping")
                return MaintenanceReport(backend=self.backend, ran=False)
            now = self._clock()
            created: list[str] = []
            dropped: list[str] = []
            removed: list[tuple[str, int]] = []
            refreshed: list[RollupRefresh] = []
            failed: list[tuple[str, str]] = []

            for parent, retention_field in PARTITIONED:
                try:
                    rows = await self._maintain_partitions(
                        conn, parent, getattr(retention, retention_field), now
                    )
                except MAINTENANCE_STEP_ERRORS as exc:
                    logger.warning("maintenance: partitions of %s postponed: %s", parent, exc)
                    failed.append((f"partitions:{parent}", str(exc)))
                    continue
                for action, relation, count in rows:
                    if action == "created":
                        created.append(relation)
                    elif action == "dropped":
                        dropped.append(relation)
                        removed.append((parent, count))
                    else:
                        removed.append((parent, count))

            for spec in self._rollups:
                try:
                    refreshed.append(await refresh_rollup(conn, spec, now))
                except MAINTENANCE_STEP_ERRORS as exc:
                    logger.warning("maintenance: refresh of %s postponed: %s", spec.relation, exc)
                    failed.append((f"refresh:{spec.relation}", str(exc)))
                horizon = now - getattr(retention, spec.retention_field)
                async with conn.transaction():
                    cur = await conn.execute(
                        sql.SQL("DELETE FROM {} WHERE bucket < %s").format(
                            sql.Identifier(spec.relation)
                        ),
                        (horizon,),
                    )
                removed.append((spec.relation, max(cur.rowcount, 0)))

            # Plugins' own metrics: their own rollups, refresh function and watermarks.
            metrics = await maintain_metric_rollups(conn, retention, now)
            removed.extend(metrics.removed)
            failed.extend(metrics.failed)

            removed.extend(await delete_expired(conn, retention, now))

            # After the rollups and retention: the daily analytics (each day once it is over).
            analytics_days = await daily_analytics_step(
                conn, now=now, retention=retention, failed=failed
            )

        if created or dropped:
            logger.info(
                "maintenance: created %d partitions, dropped %s",
                len(created),
                ", ".join(dropped) or "none",
            )
        return MaintenanceReport(
            backend=self.backend,
            ran=True,
            partitions_created=tuple(created),
            partitions_dropped=tuple(dropped),
            rows_removed=tuple((name, rows) for name, rows in removed if rows),
            rollups=tuple(refreshed),
            failed_steps=tuple(failed),
            metric_rollups=metrics.refreshed,
            analytics_days=analytics_days,
        )

    async def backfill(
        self, conn: AdminConnection, since: datetime, retention: Retention
    ) -> tuple[RollupRefresh, ...]:
        """Recompute both rollups from ``since``'s bucket up to the last complete one.

        See ``Maintenance.backfill``. The watermark row lock serialises this with the
        maintenance job's refresh, so no advisory lock is taken (and none is waited for).

        Rows written less than the lookback behind the watermark are in the invalidation log
        (sql/092): a regular refresh folds them in now, and only the buckets before that are
        recomputed here. So the agents of a fleet starting together, each back-filling from
        its own replay a minute ago, do not each recompute the last minutes of every plugin.
        """
        require_autocommit(conn)
        now = self._clock()
        refreshed: list[RollupRefresh] = []
        for spec in self._rollups:
            mark = await _watermark(conn, spec)
            if mark is not None and since >= mark:
                # Nothing replayed is older than the watermark: the regular refresh computes
                # those buckets from the raw rows when it passes them. Every agent replaying
                # a few seconds of spool (a fleet's start, a database restart) ran a regular
                # refresh here, serialised on the watermark row: with 100 agents, 142 of
                # them in ten minutes, 8.5 s each (docs/BENCHMARKS.md, "Fleet: 100 agents").
                refreshed.append(RollupRefresh(spec.relation, mark, mark, 0))
                continue
            # Never refreshed: the first regular refresh starts at the oldest raw row anyway.
            start = None if mark is None else backfill_start(since, spec.width, now, retention)
            refresh = await refresh_rollup(conn, spec, now)
            if start is not None:
                # Every refresh that took a log row of these rows had a watermark no later
                # than this one, and recomputed from that watermark minus the lookback.
                after = await _watermark(conn, spec)
                assert after is not None
                covered = bucket_floor(after - spec.lookback, spec.width)
                older = await self._backfill_rollup(conn, spec, start, now, end=covered)
                refresh = RollupRefresh(
                    spec.relation,
                    min(start, refresh.window_start or start),
                    max(refresh.window_end or start, older.window_end or start),
                    refresh.buckets + older.buckets,
                )
            logger.info(
                "backfill: %s recomputed from %s to %s (%d rows)",
                spec.relation,
                refresh.window_start,
                refresh.window_end,
                refresh.buckets,
            )
            refreshed.append(refresh)
        return tuple(refreshed)

    async def _backfill_rollup(
        self,
        conn: AdminConnection,
        spec: RollupSpec,
        start: datetime,
        now: datetime,
        *,
        end: datetime | None = None,
    ) -> RollupRefresh:
        """Recompute [start, last complete bucket) (or [start, end) when that is earlier) one
        ``backfill_chunk`` per transaction, so a long back-fill never holds the watermark
        lock (and the regular refresh) for long."""
        last = bucket_floor(now, spec.width)
        end = last if end is None else min(end, last)
        if start >= end:
            return RollupRefresh(spec.relation, start, start, 0)
        buckets = 0
        chunk_start = start
        while chunk_start < end:
            chunk_end = min(chunk_start + self._backfill_chunk, end)
            part = await refresh_rollup(conn, spec, chunk_end, refresh_from=chunk_start)
            buckets += part.buckets
            chunk_start = chunk_end
        return RollupRefresh(spec.relation, start, end, buckets)

    async def _maintain_partitions(
        self, conn: AdminConnection, parent: str, retention: timedelta, now: datetime
    ) -> list[tuple[str, str, int]]:
        async with conn.transaction():
            await conn.execute(
                "SELECT set_config('lock_timeout', %s, true)", (f"{self._lock_timeout_ms}ms",)
            )
            cur = await conn.execute(
                "SELECT action, relation, row_count"
                " FROM pluginmon_maintain_partitions(%s::text::regclass, %s::interval,"
                " %s::integer, %s::timestamptz)",
                (parent, retention, self._days_ahead, now),
            )
            records = await cur.fetchall()
        return [(str(r[0]), str(r[1]), int(r[2])) for r in records]


async def _watermark(conn: AdminConnection, spec: RollupSpec) -> datetime | None:
    cur = await conn.execute(
        "SELECT watermark FROM rollup_watermarks WHERE rollup = %s", (spec.relation,)
    )
    row = await cur.fetchone()
    return None if row is None or row[0] is None else row[0]


async def refresh_rollup(
    conn: AdminConnection,
    spec: RollupSpec,
    now: datetime,
    *,
    refresh_from: datetime | None = None,
) -> RollupRefresh:
    """Recompute ``spec``'s buckets from its watermark (minus lookback) up to ``now``.

    ``refresh_from`` recomputes from that time instead, for rows that arrived later than the
    lookback (a spool replayed after a long outage); ``PostgresMaintenance.backfill`` picks
    it so that no bucket past the raw retention is recomputed. ``conn``: autocommit.
    """
    async with conn.transaction():
        cur = await conn.execute(
            "SELECT window_start, window_end, buckets"
            " FROM pluginmon_refresh_rollup(%s::text::regclass, %s::interval, %s::interval,"
            " %s::timestamptz, %s::timestamptz)",
            (spec.relation, spec.width, spec.lookback, now, refresh_from),
        )
        row = await cur.fetchone()
    assert row is not None
    return RollupRefresh(
        rollup=spec.relation, window_start=row[0], window_end=row[1], buckets=int(row[2])
    )
