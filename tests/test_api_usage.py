"""The registry job's refresh: plugins' usage columns and per-environment usage and health from
the latest samples, and the operation gauges the built-in rules and health component read."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from pluginmon.alerts.health import (
    BACKUP_STALE,
    BACKUP_VERIFICATION_FAILED,
    DEPENDENCIES_UNSATISFIED,
    OPERATIONS_FAILED,
    VULNERABILITIES_CRITICAL,
    HealthSettings,
)
from pluginmon.alerts.rules import builtin_rules
from pluginmon.registry import maintenance, usage

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


async def _plugin(conn: asyncpg.Connection, tenant: str, name: str) -> int:
    await conn.execute("INSERT INTO tenants (id) VALUES ($1) ON CONFLICT DO NOTHING", tenant)
    plugin_id: int = await conn.fetchval(
        "INSERT INTO plugins (tenant_id, name) VALUES ($1, $2) RETURNING id", tenant, name
    )
    return plugin_id


async def _sample(
    conn: asyncpg.Connection,
    plugin: int,
    *,
    environment: str,
    host: str,
    age_seconds: float,
    cpu: float,
    rss: int,
) -> None:
    await conn.execute(
        """INSERT INTO plugin_samples ("timestamp", tenant_id, plugin_id, environment, host,
               cpu_percent, rss_bytes, vms_bytes, threads, process_count, up)
           VALUES ($1, 'acme', $2, $3, $4, $5, $6, $6, 1, 1, true)""",
        NOW - timedelta(seconds=age_seconds),
        plugin,
        environment,
        host,
        cpu,
        rss,
    )


async def test_usage_sums_the_newest_sample_of_each_host(conn: asyncpg.Connection) -> None:
    resizer = await _plugin(conn, "acme", "resizer")
    idle = await _plugin(conn, "acme", "idle")
    for host, cpu in (("h1", 10.0), ("h2", 30.0)):
        await _sample(
            conn, resizer, environment="production", host=host, age_seconds=50, cpu=99.0, rss=1
        )
        await _sample(
            conn, resizer, environment="production", host=host, age_seconds=5, cpu=cpu, rss=100
        )
    await _sample(conn, resizer, environment="staging", host="h1", age_seconds=5, cpu=5.0, rss=7)
    await _sample(conn, resizer, environment="bad env", host="h1", age_seconds=5, cpu=1.0, rss=1)
    await _sample(conn, idle, environment="production", host="h1", age_seconds=600, cpu=50.0, rss=9)
    await conn.execute(
        """INSERT INTO plugin_metrics VALUES ($1, 'acme', $2, 'production', 'health_score', 'gauge',
               87.5, '{}'), ($3, 'acme', $2, 'production', 'health_score', 'gauge', 12, '{}')""",
        NOW - timedelta(seconds=3),
        resizer,
        NOW - timedelta(seconds=40),
    )
    report = await maintenance.run(conn, now=NOW, usage_window_seconds=60)
    assert report.usage_refreshed == 1
    row = await conn.fetchrow("SELECT cpu_usage, memory_usage FROM plugins WHERE id = $1", resizer)
    assert (row["cpu_usage"], row["memory_usage"]) == (46.0, 208)
    # Nothing recent for the idle one: left as it was.
    row = await conn.fetchrow("SELECT cpu_usage FROM plugins WHERE id = $1", idle)
    assert row["cpu_usage"] is None
    environments = await conn.fetch(
        "SELECT environment, cpu_usage, memory_usage, health_score, last_health_check"
        " FROM plugin_environments ORDER BY environment"
    )
    assert [tuple(r) for r in environments] == [
        ("production", 40.0, 200, 87.5, NOW - timedelta(seconds=3)),
        ("staging", 5.0, 7, None, None),
    ]

    # The next run over the same samples changes nothing and rewrites no row (a fleet's
    # mostly idle plugins, refreshed every minute).
    versions = (
        "SELECT array_agg(x) FROM (SELECT xmin::text FROM plugins"
        " UNION ALL SELECT xmin::text FROM plugin_environments) v(x)"
    )
    before = sorted(await conn.fetchval(versions))
    again = await maintenance.run(conn, now=NOW, usage_window_seconds=60)
    assert again.ran
    assert again.usage_refreshed == 0
    assert sorted(await conn.fetchval(versions)) == before


async def test_usage_is_written_in_batches_outside_a_transaction(
    conn: asyncpg.Connection,
) -> None:
    """Each batch commits on its own (an agent's health update of a plugin waits for one
    batch at most); only the plugins whose usage moved are written the next time."""
    plugins = [await _plugin(conn, "acme", f"p{i}") for i in range(5)]
    for i, plugin in enumerate(plugins):
        await _sample(
            conn, plugin, environment="production", host="h1", age_seconds=5, cpu=i, rss=i
        )
    assert await usage.refresh(conn, now=NOW, window_seconds=60, batch=2) == 5
    rows = await conn.fetch(
        "SELECT id, cpu_usage, memory_usage FROM plugins WHERE id = ANY($1) ORDER BY id", plugins
    )
    assert [(r["cpu_usage"], r["memory_usage"]) for r in rows] == [(i, i) for i in range(5)]
    assert await conn.fetchval("SELECT count(*) FROM plugin_environments") == 5
    for plugin in plugins[:2]:
        await _sample(
            conn, plugin, environment="production", host="h1", age_seconds=1, cpu=50.0, rss=9
        )
    assert await usage.refresh(conn, now=NOW, window_seconds=60, batch=2) == 2
    assert (
        await conn.fetchval(
            "SELECT count(*) FROM plugin_environments WHERE cpu_usage = 50 AND memory_usage = 9"
        )
        == 2
    )
    async with conn.transaction():
        with pytest.raises(RuntimeError, match="outside a transaction"):
            await usage.refresh(conn, now=NOW)


async def test_operation_gauges(conn: asyncpg.Connection) -> None:
    plugin = await _plugin(conn, "acme", "resizer")

    async def operation(status: str, environment: str, **times: datetime | None) -> None:
        await conn.execute(
            """INSERT INTO plugin_operations (tenant_id, plugin_id, environment, operation_type,
                   status, started_at, finished_at, not_before, created_at)
               VALUES ('acme', $1, $2, 'update', $3, $4, $5, $6, $7)""",
            plugin,
            environment,
            status,
            times.get("started", NOW - timedelta(hours=5)),
            times.get("finished"),
            times.get("not_before"),
            times.get("created", NOW - timedelta(hours=5)),
        )

    # production: one failed 10 minutes ago, one failed 2 hours ago (outside the hour),
    # one running for 2 hours (stuck), one running for a minute (not stuck).
    await operation("failed", "production", finished=NOW - timedelta(minutes=10))
    await operation("failed", "production", finished=NOW - timedelta(hours=2))
    await operation("running", "production", started=NOW - timedelta(hours=2))
    await operation("running", "production", started=NOW - timedelta(minutes=1))
    # staging: a retry waiting for its backoff is not stuck; a pending one due long ago is.
    await operation("pending", "staging", not_before=NOW + timedelta(minutes=5))
    await operation("pending", "staging", not_before=NOW - timedelta(hours=1))
    await maintenance.run(conn, now=NOW)
    rows = await conn.fetch(
        """SELECT environment, metric_name, value FROM plugin_metrics
            WHERE "timestamp" = $1 ORDER BY environment, metric_name""",
        NOW,
    )
    assert [tuple(r) for r in rows] == [
        ("production", "operations_failed", 1.0),
        ("production", "operations_stuck", 1.0),
        ("staging", "operations_failed", 0.0),
        ("staging", "operations_stuck", 1.0),
    ]


def test_rules_and_health_read_the_registry_gauges() -> None:
    rules = {r.name: r for r in builtin_rules()}
    assert rules["PluginOperationFailed"].metric == OPERATIONS_FAILED
    assert rules["PluginOperationStuck"].metric == usage.OPERATIONS_STUCK
    assert rules["PluginOperationFailed"].compare(1.0, rules["PluginOperationFailed"].threshold)
    assert not rules["PluginOperationFailed"].compare(0.0, rules["PluginOperationFailed"].threshold)
    assert [m.name for m in HealthSettings().metrics] == [
        OPERATIONS_FAILED,
        DEPENDENCIES_UNSATISFIED,
        BACKUP_VERIFICATION_FAILED,
        BACKUP_STALE,
        VULNERABILITIES_CRITICAL,
    ]
