"""TimescaleDB: policy registration, rollup refresh and inspection (the only module calling it)."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql

from pluginmon.storage.analytics import daily_analytics_step
from pluginmon.storage.backend import (
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
from pluginmon.storage.metric_rollups import metric_rollup_policies, retire_superseded_aggregates
from pluginmon.storage.migrate import Backend

logger = logging.getLogger(__name__)

HYPERTABLES: tuple[str, ...] = ("plugin_samples", "plugin_metrics")
# The percentile aggregates (sql/090) sit beside the others: a continuous aggregate's query
# cannot be altered, and the contract views plugin_samples_1m / _1h join each pair.
CONTINUOUS_AGGREGATES: tuple[str, ...] = (
    "rollup_samples_1m",
    "rollup_samples_1h",
    "rollup_samples_pct_1m",
    "rollup_samples_pct_1h",
)

RETENTION_PROC = "policy_retention"
COMPRESSION_PROC = "policy_compression"
REFRESH_PROC = "policy_refresh_continuous_aggregate"

_REFRESH_SQL = "CALL refresh_continuous_aggregate(%s::regclass, %s::timestamptz, %s::timestamptz)"
# TimescaleDB refuses a refresh whose window overlaps one in progress (its refresh policy's
# job, another agent's back-fill) with LockNotAvailable, "due to a concurrent refresh", at
# once rather than waiting. Each aggregate's refresh is retried after these pauses (about 8 s
# for one, at most 31 s for the four), then the error is raised: a back-fill's caller keeps
# its late rows for its next run. Any other LockNotAvailable (a lock_timeout) is raised at once.
CONCURRENT_REFRESH_PAUSES: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)
_CONCURRENT_REFRESH = "due to a concurrent refresh"


@dataclass(frozen=True, slots=True)
class RefreshWindow:
    """A continuous aggregate refresh policy: materialise [now - start, now - end) every run."""

    bucket_width: timedelta
    start_offset: timedelta
    end_offset: timedelta
    schedule_interval: timedelta


# Both windows end one bucket back (a bucket still filling is not materialised) and reach far
# enough back to absorb late rows; both stay well inside the raw retention (Retention checks).
REFRESH_WINDOWS: dict[str, RefreshWindow] = {
    "rollup_samples_1m": RefreshWindow(
        bucket_width=timedelta(minutes=1),
        start_offset=timedelta(hours=2),
        end_offset=timedelta(minutes=1),
        schedule_interval=timedelta(minutes=1),
    ),
    "rollup_samples_1h": RefreshWindow(
        bucket_width=timedelta(hours=1),
        start_offset=timedelta(days=1),
        end_offset=timedelta(hours=1),
        schedule_interval=timedelta(minutes=30),
    ),
}
# The percentile aggregates refresh over the same windows as their siblings, so a bucket's
# averages and percentiles appear together.
REFRESH_WINDOWS["rollup_samples_pct_1m"] = REFRESH_WINDOWS["rollup_samples_1m"]
REFRESH_WINDOWS["rollup_samples_pct_1h"] = REFRESH_WINDOWS["rollup_samples_1h"]


@dataclass(frozen=True, slots=True)
class PolicyChange:
    relation: str
    policy: str
    action: str  # "registered" | "re-registered"

    def __str__(self) -> str:
        return f"{self.relation}: {self.policy} {self.action}"


@dataclass(frozen=True, slots=True)
class PolicyJob:
    job_id: int
    relation: str
    proc_name: str
    config: dict[str, Any]
    schedule_interval: timedelta


# Jobs of the hypertables and continuous aggregates in the current schema, by the user-facing
# name (older releases list a continuous aggregate's jobs under its materialisation
# hypertable, newer ones under the view).
_JOBS_SQL = """
SELECT j.job_id, rel.name, j.proc_name, j.config, j.schedule_interval
  FROM timescaledb_information.jobs j
  JOIN (SELECT h.hypertable_schema AS schema, h.hypertable_name AS table_name,
               h.hypertable_name AS name
          FROM timescaledb_information.hypertables h
         WHERE h.hypertable_schema = current_schema()
        UNION ALL
        SELECT c.materialization_hypertable_schema, c.materialization_hypertable_name,
               c.view_name
          FROM timescaledb_information.continuous_aggregates c
         WHERE c.view_schema = current_schema()
        UNION ALL
        SELECT c.view_schema, c.view_name, c.view_name
          FROM timescaledb_information.continuous_aggregates c
         WHERE c.view_schema = current_schema()) rel
    ON rel.schema = j.hypertable_schema AND rel.table_name = j.hypertable_name
 ORDER BY rel.name, j.proc_name
"""

# What each job's config must hold: (relation, proc, {config key: interval}).
_Desired = tuple[str, str, dict[str, timedelta], timedelta | None]


def _desired_policies(
    retention: Retention, aggregates: frozenset[str] = frozenset()
) -> list[_Desired]:
    """The policies pluginmon's relations should have; ``aggregates``: the database's
    continuous aggregates (the superseded metrics aggregates of sql/132 keep a retention
    policy while they exist)."""
    desired: list[_Desired] = [
        ("plugin_samples", RETENTION_PROC, {"drop_after": retention.samples}, None),
        ("plugin_metrics", RETENTION_PROC, {"drop_after": retention.metrics}, None),
        ("rollup_samples_1m", RETENTION_PROC, {"drop_after": retention.rollup_1m}, None),
        ("rollup_samples_1h", RETENTION_PROC, {"drop_after": retention.rollup_1h}, None),
        ("rollup_samples_pct_1m", RETENTION_PROC, {"drop_after": retention.rollup_1m}, None),
        ("rollup_samples_pct_1h", RETENTION_PROC, {"drop_after": retention.rollup_1h}, None),
        ("plugin_samples", COMPRESSION_PROC, {"compress_after": retention.compress_after}, None),
        ("plugin_metrics", COMPRESSION_PROC, {"compress_after": retention.compress_after}, None),
    ]
    desired.extend(
        metric_rollup_policies(
            retention,
            retention_proc=RETENTION_PROC,
            refresh_proc=REFRESH_PROC,
            superseded=aggregates,
        )
    )
    for name, window in REFRESH_WINDOWS.items():
        desired.append(
            (
                name,
                REFRESH_PROC,
                {"start_offset": window.start_offset, "end_offset": window.end_offset},
                window.schedule_interval,
            )
        )
    return desired


def policy_jobs(conn: psycopg.Connection[Any]) -> list[PolicyJob]:
    """Retention, compression and refresh jobs of pluginmon's relations."""
    rows = conn.execute(_JOBS_SQL).fetchall()
    return [
        PolicyJob(
            job_id=int(row[0]),
            relation=str(row[1]),
            proc_name=str(row[2]),
            config=dict(row[3] or {}),
            schedule_interval=row[4],
        )
        for row in rows
        if row[2] in (RETENTION_PROC, COMPRESSION_PROC, REFRESH_PROC)
    ]


def _config_interval(conn: psycopg.Connection[Any], value: object) -> timedelta | None:
    if value is None:
        return None
    row = conn.execute("SELECT %s::text::interval", (str(value),)).fetchone()
    return None if row is None else row[0]


def _matches(
    conn: psycopg.Connection[Any],
    job: PolicyJob,
    config: dict[str, timedelta],
    schedule_interval: timedelta | None,
) -> bool:
    if schedule_interval is not None and job.schedule_interval != schedule_interval:
        return False
    return all(_config_interval(conn, job.config.get(key)) == want for key, want in config.items())


def apply_policies(conn: psycopg.Connection[Any], retention: Retention) -> list[PolicyChange]:
    """Register retention, compression and refresh policies with ``retention``'s intervals.

    Idempotent: a policy that already has the configured intervals is left alone; one with
    other intervals (the configuration changed) is removed and registered again. ``conn``
    must be in autocommit mode or each call commits with the caller's transaction.
    """
    existing = {(job.relation, job.proc_name): job for job in policy_jobs(conn)}
    changes: list[PolicyChange] = []
    aggregates = frozenset(continuous_aggregates(conn))
    for relation, proc, config, schedule in _desired_policies(retention, aggregates):
        job = existing.get((relation, proc))
        if job is not None and _matches(conn, job, config, schedule):
            continue
        with conn.transaction():
            if job is not None:
                _remove_policy(conn, relation, proc)
            _add_policy(conn, relation, proc, config, schedule)
        action = "re-registered" if job is not None else "registered"
        logger.info("timescaledb: %s policy on %s %s", proc, relation, action)
        changes.append(PolicyChange(relation=relation, policy=proc, action=action))
    return changes


def _add_policy(
    conn: psycopg.Connection[Any],
    relation: str,
    proc: str,
    config: dict[str, timedelta],
    schedule: timedelta | None,
) -> None:
    if proc == RETENTION_PROC:
        conn.execute(
            "SELECT add_retention_policy(%s::regclass, drop_after => %s::interval,"
            " if_not_exists => true)",
            (relation, config["drop_after"]),
        )
    elif proc == COMPRESSION_PROC:
        conn.execute(
            "SELECT add_compression_policy(%s::regclass, compress_after => %s::interval,"
            " if_not_exists => true)",
            (relation, config["compress_after"]),
        )
    elif proc == REFRESH_PROC:
        conn.execute(
            "SELECT add_continuous_aggregate_policy(%s::regclass,"
            " start_offset => %s::interval, end_offset => %s::interval,"
            " schedule_interval => %s::interval, if_not_exists => true)",
            (relation, config["start_offset"], config["end_offset"], schedule),
        )
    else:  # pragma: no cover - the table above is closed
        raise ValueError(proc)


def _remove_policy(conn: psycopg.Connection[Any], relation: str, proc: str) -> None:
    if proc == RETENTION_PROC:
        conn.execute("SELECT remove_retention_policy(%s::regclass, true)", (relation,))
    elif proc == COMPRESSION_PROC:
        conn.execute("SELECT remove_compression_policy(%s::regclass, true)", (relation,))
    elif proc == REFRESH_PROC:
        conn.execute("SELECT remove_continuous_aggregate_policy(%s::regclass, true)", (relation,))
    else:  # pragma: no cover
        raise ValueError(proc)


def hypertables(conn: psycopg.Connection[Any]) -> list[str]:
    rows = conn.execute(
        "SELECT hypertable_name FROM timescaledb_information.hypertables"
        " WHERE hypertable_schema = current_schema() ORDER BY 1"
    ).fetchall()
    return [str(row[0]) for row in rows]


def continuous_aggregates(conn: psycopg.Connection[Any]) -> list[str]:
    rows = conn.execute(
        "SELECT view_name FROM timescaledb_information.continuous_aggregates"
        " WHERE view_schema = current_schema() ORDER BY 1"
    ).fetchall()
    return [str(row[0]) for row in rows]


def refresh_rollups(
    conn: psycopg.Connection[Any], window_start: datetime | None, window_end: datetime | None
) -> None:
    """Materialise the samples' continuous aggregates (the percentile ones too) over the
    window now (autocommit ``conn``).

    The policies do this on their schedule; this is for back-fills and tests.
    """
    for relation in CONTINUOUS_AGGREGATES:
        for pause in (*CONCURRENT_REFRESH_PAUSES, None):
            try:
                conn.execute(_REFRESH_SQL, (relation, window_start, window_end))
                break
            except psycopg.errors.LockNotAvailable as exc:
                wait = _retry_after(exc, relation, pause)
                if wait is None:
                    raise
                time.sleep(wait)


def _retry_after(exc: Exception, relation: str, pause: float | None) -> float | None:
    """How long to wait before a refresh of ``relation`` that raised ``exc`` is tried again:
    ``pause``, logged, for a concurrent refresh; None (raise) for any other LockNotAvailable
    or when the pauses are used up (``pause`` None). The sync and async loops share it."""
    if pause is None or _CONCURRENT_REFRESH not in str(exc):
        return None
    logger.info(
        "%s is being refreshed over an overlapping window by another session (a refresh "
        "policy's job or another back-fill): trying again in %.2f s",
        relation,
        pause,
    )
    return pause


async def _refresh(conn: AdminConnection, relation: str, start: datetime, end: datetime) -> None:
    for pause in (*CONCURRENT_REFRESH_PAUSES, None):
        try:
            await conn.execute(_REFRESH_SQL, (relation, start, end))
            return
        except psycopg.errors.LockNotAvailable as exc:
            wait = _retry_after(exc, relation, pause)
            if wait is None:
                raise
            await asyncio.sleep(wait)


class TimescaleMaintenance:
    """TimescaleDB's own jobs drop chunks, compress and refresh; this deletes the rest.

    Completed operations, audit entries and usage analytics are plain tables on both
    backends, deleted here under the database-wide advisory lock; the daily analytics are
    computed here too (storage.analytics).
    """

    def __init__(self, *, clock: Clock = utc_now) -> None:
        self._clock = clock

    @property
    def backend(self) -> Backend:
        return Backend.TIMESCALEDB

    async def run(self, conn: AdminConnection, retention: Retention) -> MaintenanceReport:
        require_autocommit(conn)
        async with maintenance_lock(conn) as acquired:
            if not acquired:
                return MaintenanceReport(backend=self.backend, ran=False)
            now = self._clock()
            removed = await delete_expired(conn, retention, now)
            failed: list[tuple[str, str]] = []
            analytics_days = await daily_analytics_step(
                conn, now=now, retention=retention, failed=failed
            )
            await retire_superseded_aggregates(conn, failed=failed)
        return MaintenanceReport(
            backend=self.backend,
            ran=True,
            rows_removed=tuple((name, rows) for name, rows in removed if rows),
            failed_steps=tuple(failed),
            analytics_days=analytics_days,
        )

    async def backfill(
        self, conn: AdminConnection, since: datetime, retention: Retention
    ) -> tuple[RollupRefresh, ...]:
        """Materialise the samples' continuous aggregates (the percentile ones too) from
        ``since``'s bucket up to where their refresh policies stop (``now - end_offset``),
        whatever the policies' start offsets.

        See ``Maintenance.backfill``. ``refresh_continuous_aggregate`` cannot run inside a
        transaction block, hence the autocommit connection.
        """
        require_autocommit(conn)
        now = self._clock()
        refreshed: list[RollupRefresh] = []
        for relation in CONTINUOUS_AGGREGATES:
            window = REFRESH_WINDOWS[relation]
            start = backfill_start(since, window.bucket_width, now, retention)
            end = bucket_floor(now - window.end_offset, window.bucket_width)
            if start >= end:
                # Less than one complete bucket: the policy covers it (and TimescaleDB
                # refuses a window smaller than a bucket).
                refreshed.append(RollupRefresh(relation, start, start, 0))
                continue
            await _refresh(conn, relation, start, end)
            cur = await conn.execute(
                sql.SQL("SELECT count(*) FROM {} WHERE bucket >= %s AND bucket < %s").format(
                    sql.Identifier(relation)
                ),
                (start, end),
            )
            row = await cur.fetchone()
            buckets = int(row[0]) if row is not None else 0
            logger.info(
                "backfill: %s materialised from %s to %s (%d rows)", relation, start, end, buckets
            )
            refreshed.append(RollupRefresh(relation, start, end, buckets))
        return tuple(refreshed)
