"""A plugin's daily usage analytics through the management API: the range checked, the rows read under row-level security.

The rows are written by the maintenance job (storage.analytics: uptime, CPU time, memory
percentiles, restarts, operations) and, for the usage columns, by the platform. Like every
registry module the connection is already scoped to one tenant: another tenant's plugin is
"not found".
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

import asyncpg

from pluginmon.registry.errors import InvalidError
from pluginmon.registry.plugins import ENVIRONMENT_RE, plugin_id

# The longest range one read covers: a year of days (the analytics retention) and a day.
MAX_RANGE: Final = timedelta(days=366)
# The range when the caller gives none.
DEFAULT_RANGE: Final = timedelta(days=30)


@dataclass(frozen=True, slots=True)
class DailyAnalytics:
    """One plugin_analytics row of period ``day``; None where nobody computed the figure."""

    period_start: datetime
    sample_count: int | None
    observed_seconds: float | None
    up_seconds: float | None
    uptime_ratio: float | None
    cpu_seconds: float | None
    rss_bytes_p50: float | None
    rss_bytes_p95: float | None
    rss_bytes_p99: float | None
    restarts: int | None
    operations: int | None
    operation_failures: int | None
    computed_through: datetime | None
    invocations: int
    errors: int
    active_users: int
    latency_ms_p50: float | None
    latency_ms_p95: float | None
    latency_ms_p99: float | None


@dataclass(frozen=True, slots=True)
class AnalyticsRange:
    start: datetime
    end: datetime


def analytics_range(
    *, start: datetime | None, end: datetime | None, now: datetime
) -> AnalyticsRange:
    """[start, end) of a read: ``end`` defaults to ``now``, ``start`` to ``DEFAULT_RANGE``
    before ``end``; InvalidError naming ``from`` or ``to`` for an empty, reversed or too long
    range (the API's parameter names; for a range too long, ``to`` when the caller gave it)."""
    until = end if end is not None else now
    since = start if start is not None else until - DEFAULT_RANGE
    if since >= until:
        raise InvalidError(
            f"from ({since.isoformat()}) must be before to ({until.isoformat()})", field="from"
        )
    if until - since > MAX_RANGE:
        raise InvalidError(
            f"the range from {since.isoformat()} to {until.isoformat()} is longer than "
            f"{MAX_RANGE.days} days",
            # The bound the caller gave: ``to`` defaulted to now, ``from`` is too early.
            field="to" if end is not None else "from",
        )
    return AnalyticsRange(start=since, end=until)


_SELECT: Final = """
SELECT period_start, sample_count, observed_seconds, up_seconds, uptime_ratio, cpu_seconds,
       rss_bytes_p50, rss_bytes_p95, rss_bytes_p99, restarts, operations, operation_failures,
       computed_through, invocations, errors, active_users, latency_ms_p50, latency_ms_p95,
       latency_ms_p99
  FROM plugin_analytics
 WHERE plugin_id = $1 AND environment = $2 AND period = 'day'
   AND period_start >= $3 AND period_start < $4
 ORDER BY period_start
"""


async def daily_analytics(
    conn: asyncpg.Connection, name: str, *, environment: str, span: AnalyticsRange
) -> list[DailyAnalytics]:
    """The plugin's daily rows whose day starts in [span.start, span.end), oldest first."""
    if not ENVIRONMENT_RE.fullmatch(environment):
        raise InvalidError(f"environment {environment!r} is not a valid name", field="environment")
    found = await plugin_id(conn, name)
    rows = await conn.fetch(_SELECT, found, environment, span.start, span.end)
    return [DailyAnalytics(**dict(row)) for row in rows]
