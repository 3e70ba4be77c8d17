"""What the daemon keeps current in the catalogue: plugins.cpu_usage/memory_usage and each
environment's usage and health from the latest samples, and the operation gauges
(``operations_failed``, ``operations_stuck``) that the built-in rules PluginOperationFailed /
PluginOperationStuck and the health component ``metric:operations_failed`` read back from
plugin_metrics.

Run by the registry job, as the daemon's role (every tenant): the gauges in its locked
transaction, the usage columns right after it commits, in batches of their own (``plugins``
is written by every agent's health updates too: one statement updating every plugin held
their row locks, and the agents waited). The usage columns sum the newest sample of each
host within the window: a plugin that runs on three hosts uses what the three use.
plugins.health_score stays the alert engine's. Rows whose values did not change are not
rewritten (a fleet's plugins are mostly idle).
"""

from __future__ import annotations

from datetime import datetime, timedelta

import asyncpg

# The built-in rules PluginOperationFailed / PluginOperationStuck (alerts/rules.py) read these.
from pluginmon.alerts.health import OPERATIONS_FAILED
from pluginmon.alerts.health import OPERATIONS_STUCK as OPERATIONS_STUCK

# What changed: per (plugin, environment) with samples in the window, its usage and newest
# health score, whether the plugin's totals differ from plugins' columns and whether the
# environment's row differs from plugin_environments'. Read without taking a row lock.
_CHANGES_SQL = """
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
), health AS (
    SELECT DISTINCT ON (plugin_id, environment) plugin_id, environment, value, "timestamp"
      FROM plugin_metrics
     WHERE metric_name = 'health_score' AND "timestamp" > $1
     ORDER BY plugin_id, environment, "timestamp" DESC
), joined AS (
    SELECT p.tenant_id, e.plugin_id, e.environment, e.cpu, e.rss,
           CASE WHEN h.value IS NOT NULL THEN least(100, greatest(0, h.value)) END AS health,
           h."timestamp" AS checked, v.cpu AS plugin_cpu, v.rss AS plugin_rss,
           (p.cpu_usage, p.memory_usage) IS DISTINCT FROM (v.cpu, v.rss) AS plugin_changed,
           -- the table's CHECK: environments named in a way the API cannot address are left out
           e.environment ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$'
           AND (pe.plugin_id IS NULL
                OR (pe.cpu_usage, pe.memory_usage, pe.health_score, pe.last_health_check)
                   IS DISTINCT FROM
                   (e.cpu, e.rss,
                    coalesce(CASE WHEN h.value IS NOT NULL THEN least(100, greatest(0, h.value)) END,
                             pe.health_score),
                    coalesce(h."timestamp", pe.last_health_check))) AS environment_changed
      FROM per_environment e
      JOIN per_plugin v ON v.plugin_id = e.plugin_id
      JOIN plugins p ON p.id = e.plugin_id
      LEFT JOIN health h ON h.plugin_id = e.plugin_id AND h.environment = e.environment
      LEFT JOIN plugin_environments pe
        ON pe.tenant_id = p.tenant_id AND pe.plugin_id = e.plugin_id
       AND pe.environment = e.environment
)
SELECT * FROM joined WHERE plugin_changed OR environment_changed
ORDER BY plugin_id, environment
"""
_UPDATE_PLUGINS_SQL = """
UPDATE plugins p SET cpu_usage = v.cpu, memory_usage = v.rss
  FROM unnest($1::bigint[], $2::float8[], $3::bigint[]) AS v(id, cpu, rss)
 WHERE p.id = v.id
"""
_UPSERT_ENVIRONMENTS_SQL = """
INSERT INTO plugin_environments (tenant_id, plugin_id, environment, cpu_usage, memory_usage,
                                 health_score, last_health_check, created_at, updated_at)
SELECT v.tenant_id, v.plugin_id, v.environment, v.cpu, v.rss, v.health, v.checked, $8, $8
  FROM unnest($1::text[], $2::bigint[], $3::text[], $4::float8[], $5::bigint[], $6::real[],
              $7::timestamptz[]) AS v(tenant_id, plugin_id, environment, cpu, rss, health, checked)
ON CONFLICT (tenant_id, plugin_id, environment) DO UPDATE
   SET cpu_usage = EXCLUDED.cpu_usage,
       memory_usage = EXCLUDED.memory_usage,
       health_score = coalesce(EXCLUDED.health_score, plugin_environments.health_score),
       last_health_check = coalesce(EXCLUDED.last_health_check,
                                    plugin_environments.last_health_check)
"""
# Rows written per statement (each its own transaction, in id order): a writer of the same
# rows (an agent's health update of ``plugins``) waits for one batch at most, never for the
# whole refresh. At 100 agents of 1,000 plugins one statement updating every plugin held
# their row locks for 12 s, and the agents' cycles waited behind it (docs/BENCHMARKS.md).
WRITE_BATCH = 1000

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
    batch: int = WRITE_BATCH,
) -> int:
    """Refresh the usage columns and each environment's usage and health; returns the
    plugins whose usage changed.

    Outside any transaction (each batch commits on its own, so no row stays locked beyond
    its batch): rows whose values did not change are not rewritten, the others are written
    ``batch`` at a time, in id order.
    """
    if conn.is_in_transaction():
        raise RuntimeError(
            "usage.refresh writes in batches of their own: call it outside a transaction"
        )
    rows = await conn.fetch(_CHANGES_SQL, now - timedelta(seconds=window_seconds))
    plugins: dict[int, tuple[float, int]] = {}
    environments: list[asyncpg.Record] = []
    for r in rows:
        if r["plugin_changed"]:
            plugins[r["plugin_id"]] = (r["plugin_cpu"], r["plugin_rss"])
        if r["environment_changed"]:
            environments.append(r)
    ids = sorted(plugins)
    for i in range(0, len(ids), batch):
        part = ids[i : i + batch]
        await conn.execute(
            _UPDATE_PLUGINS_SQL,
            part,
            [plugins[pid][0] for pid in part],
            [plugins[pid][1] for pid in part],
        )
    for i in range(0, len(environments), batch):
        chunk = environments[i : i + batch]
        await conn.execute(
            _UPSERT_ENVIRONMENTS_SQL,
            [r["tenant_id"] for r in chunk],
            [r["plugin_id"] for r in chunk],
            [r["environment"] for r in chunk],
            [r["cpu"] for r in chunk],
            [r["rss"] for r in chunk],
            [r["health"] for r in chunk],
            [r["checked"] for r in chunk],
            now,
        )
    return len(ids)


async def write_operation_gauges(
    conn: asyncpg.Connection,
    *,
    now: datetime,
    failed_window_seconds: float = 3600.0,
    stuck_after_seconds: float = 1800.0,
) -> None:
    """The ``operations_failed`` / ``operations_stuck`` gauges (in the caller's transaction,
    after operations past their deadline were failed)."""
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
