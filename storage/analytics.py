"""Daily plugin_analytics rows per plugin and environment, computed by the maintenance job on both backends.

Each UTC day gets, per (tenant, plugin, environment) that had samples or operations:

* ``observed_seconds``: the time the samples cover. A sample stands for the time since the
  previous sample of its series when that is at most ``MAX_SAMPLE_GAP``; otherwise (the
  first sample, or after a gap: the daemon was down, the plugin was not watched) it starts a
  new stretch and stands for nothing. So a gap counts neither as up nor as down.
* ``up_seconds`` (samples with ``up``) and ``uptime_ratio = up_seconds / observed_seconds``.
* ``cpu_seconds``: the sum of ``cpu_percent / 100 x`` the seconds each sample stands for
  (cpu_percent is the average over the time since the previous sample).
* ``rss_bytes_p50/p95/p99``: ``percentile_cont`` over the day's raw rss_bytes of samples with
  ``up`` (a down sample's 0 bytes is no usage).
* ``restarts``: the sum of the samples' restart counts; ``operations`` and
  ``operation_failures``: plugin_operations started that day, and those of them ``failed``.

Why raw rows and not the 1-hour rollup: a day's percentiles cannot be derived from hourly
percentiles, and the seconds a sample stands for need consecutive samples, which no rollup
keeps. To keep that cheap each day is computed once, when it is complete and ``LOOKBACK``
has passed since its end (so rows up to that late are folded in): a day's raw rows are read
once. Recomputing "today so far" every hour would read them about twelve times, which for a
fleet of agents on one database is more than the samples cost to write (docs/scaling.md).
Today's figures are in the rollups and the dashboards meanwhile. An interval that straddles
midnight counts for the day of the sample that ends it.

Missed days (the daemon was down) are caught up from where analytics_progress stopped, no
further back than the raw retention, ``MAX_DAYS_PER_RUN`` days per maintenance run; a
database that never ran it starts ``FIRST_RUN_DAYS`` back. The upsert touches only these
columns, so the platform's usage columns stay as written.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

from pluginmon.storage.backend import MAINTENANCE_STEP_ERRORS, AdminConnection, Retention

logger = logging.getLogger(__name__)

DAY: Final = timedelta(days=1)
# Longer than any sampling interval pluginmon allows, short enough that a daemon restart
# shows as a gap rather than as observed time.
MAX_SAMPLE_GAP: Final = timedelta(minutes=5)
# Rows this late are still folded into the day they belong to.
LOOKBACK: Final = timedelta(hours=2)
# How far back the first run ever (no analytics_progress yet) starts.
FIRST_RUN_DAYS: Final = 7
# Days one run computes at most: a catch-up (the first run, or after an outage) spreads over
# several maintenance runs instead of holding one transaction over weeks of raw rows.
MAX_DAYS_PER_RUN: Final = 4


@dataclass(frozen=True, slots=True)
class DayWindow:
    """[start, end) of one whole UTC day's computation."""

    day: datetime
    end: datetime


@dataclass(frozen=True, slots=True)
class AnalyticsPlan:
    through: datetime
    windows: tuple[DayWindow, ...]


@dataclass(frozen=True, slots=True)
class AnalyticsRefresh:
    through: datetime | None
    days: tuple[datetime, ...]
    rows: int


def day_floor(moment: datetime) -> datetime:
    moment = moment.astimezone(UTC)
    return moment.replace(hour=0, minute=0, second=0, microsecond=0)


def plan_days(
    *,
    computed_through: datetime | None,
    now: datetime,
    raw_retention: timedelta,
    max_days: int = MAX_DAYS_PER_RUN,
) -> AnalyticsPlan | None:
    """Which whole days to compute now, or None when no day completed ``LOOKBACK`` ago since
    the last run.

    Pure: ``now`` is the caller's clock. Days run from ``computed_through`` (or
    ``FIRST_RUN_DAYS`` back on the first run) to the last day that ended at least
    ``LOOKBACK`` before ``now``, never before the first whole day the raw retention still
    holds; at most ``max_days`` of them, the plan's ``through`` then being the end of the last
    (the next run goes on from there).
    """
    if max_days < 1:
        raise ValueError(f"max_days must be at least 1, got {max_days}")
    through = day_floor(now - LOOKBACK)
    if computed_through is not None and computed_through >= through:
        return None
    if computed_through is None:
        first = through - FIRST_RUN_DAYS * DAY
    else:
        first = day_floor(computed_through)
    oldest = day_floor(now - raw_retention)
    if oldest < now - raw_retention:
        oldest += DAY  # that day's first rows are gone already
    first = max(first, oldest)
    windows: list[DayWindow] = []
    day = first
    while day < through and len(windows) < max_days:
        windows.append(DayWindow(day=day, end=day + DAY))
        day += DAY
    if not windows:
        return None
    return AnalyticsPlan(through=windows[-1].end, windows=tuple(windows))


# One day for every plugin: samples (with the one before the day, for the first interval)
# and operations, upserted. $-style names are psycopg's %(name)s.
_UPSERT_DAY = """
WITH series AS (
    SELECT s.tenant_id, s.plugin_id, s.environment, s."timestamp" AS at, s.cpu_percent,
           s.rss_bytes, s.up, s.restarts,
           lag(s."timestamp") OVER (PARTITION BY s.tenant_id, s.plugin_id, s.environment
                                    ORDER BY s."timestamp") AS previous
      FROM plugin_samples s
     WHERE s."timestamp" >= %(day)s::timestamptz - %(gap)s::interval
       AND s."timestamp" < %(end)s
), counted AS (
    SELECT *, CASE WHEN previous IS NOT NULL AND at - previous <= %(gap)s::interval
                   THEN extract(epoch FROM at - previous)::double precision ELSE 0 END AS seconds
      FROM series
     WHERE at >= %(day)s
), samples AS (
    SELECT tenant_id, plugin_id, environment,
           count(*) AS sample_count,
           sum(seconds) AS observed_seconds,
           coalesce(sum(seconds) FILTER (WHERE up), 0) AS up_seconds,
           sum(cpu_percent / 100.0 * seconds) AS cpu_seconds,
           -- Memory while the process ran: a down sample's rss_bytes is 0, not usage.
           percentile_cont(0.50) WITHIN GROUP (ORDER BY rss_bytes::double precision)
               FILTER (WHERE up) AS p50,
           percentile_cont(0.95) WITHIN GROUP (ORDER BY rss_bytes::double precision)
               FILTER (WHERE up) AS p95,
           percentile_cont(0.99) WITHIN GROUP (ORDER BY rss_bytes::double precision)
               FILTER (WHERE up) AS p99,
           sum(restarts) AS restarts
      FROM counted
     GROUP BY 1, 2, 3
), ops AS (
    SELECT o.tenant_id, o.plugin_id, o.environment,
           count(*) AS operations,
           count(*) FILTER (WHERE o.status = 'failed') AS failures
      FROM plugin_operations o
     WHERE o.started_at >= %(day)s AND o.started_at < %(end)s
     GROUP BY 1, 2, 3
), merged AS (
    SELECT coalesce(s.tenant_id, o.tenant_id) AS tenant_id,
           coalesce(s.plugin_id, o.plugin_id) AS plugin_id,
           coalesce(s.environment, o.environment) AS environment,
           coalesce(s.sample_count, 0) AS sample_count,
           coalesce(s.observed_seconds, 0) AS observed_seconds,
           coalesce(s.up_seconds, 0) AS up_seconds,
           coalesce(s.cpu_seconds, 0) AS cpu_seconds,
           s.p50, s.p95, s.p99,
           coalesce(s.restarts, 0) AS restarts,
           coalesce(o.operations, 0) AS operations,
           coalesce(o.failures, 0) AS failures
      FROM samples s
      FULL JOIN ops o
        ON o.tenant_id = s.tenant_id AND o.plugin_id = s.plugin_id
       AND o.environment = s.environment
)
INSERT INTO plugin_analytics AS a (
    tenant_id, plugin_id, environment, period, period_start, sample_count, observed_seconds,
    up_seconds, uptime_ratio, cpu_seconds, rss_bytes_p50, rss_bytes_p95, rss_bytes_p99,
    restarts, operations, operation_failures, computed_through)
SELECT m.tenant_id, m.plugin_id, m.environment, 'day', %(day)s, m.sample_count,
       m.observed_seconds, m.up_seconds,
       -- least(): two float sums of the same seconds may differ in the last bit.
       CASE WHEN m.observed_seconds > 0 THEN least(1.0, m.up_seconds / m.observed_seconds) END,
       m.cpu_seconds, m.p50, m.p95, m.p99, m.restarts, m.operations, m.failures, %(end)s
  FROM merged m
  -- Samples of a plugin deleted since have nowhere to go (the foreign key). A join, not a
  -- correlated EXISTS: Citus plans no correlated subquery over a CTE.
  JOIN plugins p ON p.id = m.plugin_id AND p.tenant_id = m.tenant_id
ON CONFLICT (tenant_id, plugin_id, environment, period, period_start) DO UPDATE SET
    sample_count = EXCLUDED.sample_count,
    observed_seconds = EXCLUDED.observed_seconds,
    up_seconds = EXCLUDED.up_seconds,
    uptime_ratio = EXCLUDED.uptime_ratio,
    cpu_seconds = EXCLUDED.cpu_seconds,
    rss_bytes_p50 = EXCLUDED.rss_bytes_p50,
    rss_bytes_p95 = EXCLUDED.rss_bytes_p95,
    rss_bytes_p99 = EXCLUDED.rss_bytes_p99,
    restarts = EXCLUDED.restarts,
    operations = EXCLUDED.operations,
    operation_failures = EXCLUDED.operation_failures,
    computed_through = EXCLUDED.computed_through
"""


async def refresh_daily_analytics(
    conn: AdminConnection, *, now: datetime, retention: Retention
) -> AnalyticsRefresh:
    """Upsert the daily rows ``plan_days`` asks for, in one transaction holding the progress
    row, so the rows and the mark move together and a concurrent run waits, then finds
    nothing to do.

    Call it under the maintenance lock (autocommit ``conn``).
    """
    async with conn.transaction():
        cur = await conn.execute(
            "SELECT computed_through FROM analytics_progress WHERE period = 'day' FOR UPDATE"
        )
        row = await cur.fetchone()
        mark = None if row is None else row[0]
        plan = plan_days(computed_through=mark, now=now, raw_retention=retention.samples)
        if plan is None:
            return AnalyticsRefresh(through=mark, days=(), rows=0)
        rows = 0
        for window in plan.windows:
            cur = await conn.execute(
                _UPSERT_DAY.encode(),
                {"day": window.day, "end": window.end, "gap": MAX_SAMPLE_GAP},
            )
            rows += max(cur.rowcount, 0)
        await conn.execute(
            "UPDATE analytics_progress SET computed_through = %s, refreshed_at = now()"
            " WHERE period = 'day'",
            (plan.through,),
        )
    days = tuple(window.day for window in plan.windows)
    logger.info(
        "analytics: %d daily row(s) for %d day(s) through %s", rows, len(days), plan.through
    )
    return AnalyticsRefresh(through=plan.through, days=days, rows=rows)


async def daily_analytics_step(
    conn: AdminConnection, *, now: datetime, retention: Retention, failed: list[tuple[str, str]]
) -> tuple[datetime, ...]:
    """:func:`refresh_daily_analytics` as one step of a backend's maintenance run: the days
    computed, or none when a transient failure postponed it (logged, and named in
    ``failed``) to the next run."""
    try:
        return (await refresh_daily_analytics(conn, now=now, retention=retention)).days
    except MAINTENANCE_STEP_ERRORS as exc:
        logger.warning("maintenance: daily analytics postponed: %s", exc)
        failed.append(("analytics", str(exc)))
        return ()
