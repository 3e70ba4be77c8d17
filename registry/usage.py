"""What the daemon keeps current in the catalogue: plugins.cpu_usage/memory_usage and each
environment's usage and health from the latest samples, and the operation gauges
(``operations_failed``, ``operations_stuck``) that the built-in rules PluginOperationFailed /
PluginOperationStuck and the health component ``metric:operations_failed`` read back from
plugin_metrics.

Run by the registry job under its advisory lock, as the daemon's role (every tenant). The
usage columns sum the newest sample of each host within the window: a plugin that runs on
three hosts uses what the three use. plugins.health_score stays the alert engine's.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import asyncpg

# The built-in rules PluginOperationFailed / PluginOperationStuck (alerts/rules.py) read these.
from pluginmon.alerts.health import OPERATIONS_FAILED
from pluginmon.alerts.health import OPERATIONS_STUCK as OPERATIONS_STUCK

_REFRESH_SQL = """
WITH latest AS (
    SELECT DISTINCT ON (plugin_id, environment, host) plugin_id, environment, cpu_percent, rss_bytes
      FROM plugin_samples
     WHERE "timestamp" > $1
     ORDER BY plugin_id, environment, host, "timestamp" DESC
), per_environment AS (
    SELECT plugin_id, environment, sum(cpu_percent) AS cpu, sum(rss_bytes)::bigint AS rss
      FROM latest GROUP BY plugin_id, environment
), per_plugin AS (
    SELECT plugin_id, sum(cpu) AS cpu, sum(rss)::bigint AS rss FROM per_environment GROUP BY plugin_id
), updated AS (
    UPDATE plugins p SET cpu_usage = v.cpu, memory_usage = v.rss
      FROM per_plugin v WHERE p.id = v.plugin_id
    RETURNING p.id
), health AS (
    SELECT DISTINCT ON (plugin_id, environment) plugin_id, environment, value, "timestamp"
      FROM plugin_metrics
     WHERE metric_name = 'health_score' AND "timestamp" > $1
     ORDER BY plugin_id, environment, "timestamp" DESC
), environments AS (
    INSERT INTO plugin_environments (tenant_id, plugin_id, environment, cpu_usage, memory_usage,
                                     health_score, last_health_check, created_at, updated_at)
    SELECT p.tenant_id, e.plugin_id, e.environment, e.cpu, e.rss,
           CASE WHEN h.value IS NOT NULL THEN least(100, greatest(0, h.value)) END,
           h."timestamp", $2, $2
      FROM per_environment e
      JOIN plugins p ON p.id = e.plugin_id
      LEFT JOIN health h ON h.plugin_id = e.plugin_id AND h.environment = e.environment
     -- the table's CHECK: environments named in a way the API cannot address are left out
     WHERE e.environment ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$'
    ON CONFLICT (tenant_id, plugin_id, environment) DO UPDATE
       SET cpu_usage = EXCLUDED.cpu_usage,
           memory_usage = EXCLUDED.memory_usage,
           health_score = coalesce(EXCLUDED.health_score, plugin_environments.health_score),
           last_health_check = coalesce(EXCLUDED.last_health_check,
                                        plugin_environments.last_health_check)
    RETURNING 1
)
SELECT (SELECT count(*) FROM updated) AS plugins, (SELECT count(*) FROM environments) AS environments
"""

# One gauge row per (plugin, environment) with operations recently: failed counts operations
# that ended failed within the window (retries exhausted, deadline exceeded); stuck counts
# operations running, or due to run, for longer than stuck_after. Zeros are written too, for
# a while after the last activity, so that an alert on them resolves.
_GAUGES_SQL = """
INSERT INTO plugin_metrics ("timestamp", tenant_id, plugin_id, environment, metric_name,
                            metric_kind, value, labels)
SELECT $1, o.tenant_id, o.plugin_id, o.environment, m.name, 'gauge', m.value, '{}'
  FROM (SELECT tenant_id, plugin_id, environment,
               count(*) FILTER (WHERE status = 'failed' AND finished_at > $2) AS failed,
               count(*) FILTER (WHERE (status = 'running' AND started_at < $3)
                                   OR (status = 'pending' AND coalesce(not_before, created_at) < $3))
                   AS stuck
          FROM plugin_operations
         WHERE finished_at IS NULL OR finished_at > $4
         GROUP BY tenant_id, plugin_id, environment) AS o
 CROSS JOIN LATERAL (VALUES ($5::text, o.failed::double precision),
                            ($6::text, o.stuck::double precision)) AS m(name, value)
"""


async def refresh(
    conn: asyncpg.Connection,
    *,
    now: datetime,
    window_seconds: float = 120.0,
    failed_window_seconds: float = 3600.0,
    stuck_after_seconds: float = 1800.0,
) -> int:
    """Refresh usage, environment health and operation gauges; returns the plugins updated."""
    async with conn.transaction():
        row = await conn.fetchrow(_REFRESH_SQL, now - timedelta(seconds=window_seconds), now)
        await conn.execute(
            _GAUGES_SQL,
            now,
            now - timedelta(seconds=failed_window_seconds),
            now - timedelta(seconds=stuck_after_seconds),
            # keep writing zeros for an hour after the last activity
            now - timedelta(seconds=failed_window_seconds + 3600.0),
            OPERATIONS_FAILED,
            OPERATIONS_STUCK,
        )
    return 0 if row is None else int(row["plugins"])
