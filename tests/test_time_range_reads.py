"""Reads of the newest rows by time alone read those rows, not the whole day (sql/128).

The registry job's usage refresh reads the last 120 s of plugin_samples and the newest
health_score rows of plugin_metrics every minute, and the 1-minute rollups read the minute's
rows. Before sql/128 no index of either table started with the time, so before PostgreSQL 18
(which can skip-scan the tenant index) such a read scanned the whole day's partition: a cost
that grew with every hour of the day. Each test fills one day's partition with eight hours of
rows in time order, as agents write them, then counts the pages the read took from each
partition and its indexes (EXPLAIN's buffers), on PostgreSQL 15 (the oldest supported;
Debian's package) where it is installed, which without the index reads a whole index of the
partition or the partition itself, and on the default test server (on PostgreSQL 18 a skip
scan of the tenant index would also do).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from pluginmon.registry import usage
from pluginmon.storage.migrate import migrate
from tests.pg_cluster import system_postgres_bin_dir, throwaway_cluster

PLUGINS = 200
SAMPLE_SECONDS = 20
HOURS = 8
PG15 = system_postgres_bin_dir("15")


@pytest.fixture(params=["default", "postgresql-15"])
def database(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "default":
        yield request.getfixturevalue("migrated_db")
        return
    if PG15 is None:
        pytest.skip("no PostgreSQL 15 server installed (postgresql-15 on Debian 12)")
    with throwaway_cluster(PG15) as url:
        migrate(url)
        yield url


async def fill(conn: asyncpg.Connection, day: datetime) -> datetime:
    """HOURS of samples every SAMPLE_SECONDS and health rows every minute for PLUGINS plugins,
    in time order from ``day`` on; returns the time of the newest."""
    await conn.execute("INSERT INTO tenants (id, name) VALUES ('acme', 'acme')")
    await conn.execute(
        "INSERT INTO plugins (tenant_id, name) SELECT 'acme', 'p' || i FROM generate_series(1, $1) i",
        PLUGINS,
    )
    end = day + timedelta(hours=HOURS)
    await conn.execute(
        """INSERT INTO plugin_samples ("timestamp", tenant_id, plugin_id, environment, host,
                                       cpu_percent, rss_bytes, vms_bytes, threads,
                                       process_count, up)
           SELECT t, 'acme', p.id, 'production', 'h', 1.5, 1000000, 4000000, 2, 1, true
             FROM generate_series($1::timestamptz, $2::timestamptz, $3::interval) AS t,
                  plugins p
            ORDER BY t""",
        day,
        end,
        timedelta(seconds=SAMPLE_SECONDS),
    )
    await conn.execute(
        """INSERT INTO plugin_metrics ("timestamp", tenant_id, plugin_id, environment,
                                       metric_name, metric_kind, value)
           SELECT t, 'acme', p.id, 'production', 'health_score', 'gauge', 90
             FROM generate_series($1::timestamptz, $2::timestamptz, '1 minute') AS t,
                  plugins p
            ORDER BY t""",
        day,
        end,
    )
    await conn.execute("VACUUM ANALYZE plugin_samples, plugin_metrics")
    return end


async def partitions(conn: asyncpg.Connection, day: datetime) -> dict[str, tuple[str, int]]:
    """Each table's partition holding ``day``'s rows (on TimescaleDB, its chunk), as the
    rows' own table tells: its name and its size in pages."""
    rows = await conn.fetch(
        """SELECT t.name, c.relname, pg_relation_size(c.oid) / current_setting('block_size')::int
             FROM (SELECT 'plugin_samples',
                          (SELECT tableoid FROM plugin_samples WHERE "timestamp" = $1 LIMIT 1)
                   UNION ALL
                   SELECT 'plugin_metrics',
                          (SELECT tableoid FROM plugin_metrics WHERE "timestamp" = $1 LIMIT 1))
                  AS t(name, oid)
             JOIN pg_class c ON c.oid = t.oid""",
        day,
    )
    return {str(r[0]): (str(r[1]), int(r[2])) for r in rows}


def pages_read(plan: list[dict[str, Any]], relnames: dict[str, str]) -> dict[str, int]:
    """Shared buffers (hit or read) of the scans of each partition in an EXPLAIN (ANALYZE,
    BUFFERS, FORMAT JSON) plan, their indexes' pages included."""
    tables = {relname: table for table, relname in relnames.items()}
    out = dict.fromkeys(relnames, 0)

    def walk(node: dict[str, Any]) -> None:
        table = tables.get(str(node.get("Relation Name", "")))
        if table is not None:
            # a scan node's buffers include those of its children (a bitmap's index scan)
            out[table] += int(node["Shared Hit Blocks"]) + int(node["Shared Read Blocks"])
            return
        for child in node.get("Plans", []):
            walk(child)

    for top in plan:
        walk(top["Plan"])
    return out


async def test_the_usage_refresh_reads_the_last_minutes_not_the_day(database: str) -> None:
    # Tomorrow's partition exists already (the daily partitions are made ahead; TimescaleDB
    # makes the chunk on the first row), and nothing else writes to it.
    day = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1)
    conn = await asyncpg.connect(database)
    try:
        newest = await fill(conn, day)
        now = newest + timedelta(seconds=1)
        found = await partitions(conn, day)
        relnames = {table: relname for table, (relname, _) in found.items()}
        pages = {table: size for table, (_, size) in found.items()}
        explained = await conn.fetchval(
            "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + usage._CHANGES_SQL,
            now - timedelta(seconds=120),
        )
        # The read is the refresh's own: every plugin's usage and environment row is new.
        assert await usage.refresh(conn, now=now) == PLUGINS
    finally:
        await conn.close()
    read = pages_read(json.loads(explained), relnames)
    # The last 120 s hold 6 samples and 2 health rows of each plugin, on a few pages at the
    # end of each partition: what the BRIN index (or, on PostgreSQL 18, a skip scan of the
    # tenant index) reads, not the other 8 hours.
    assert 0 < read["plugin_samples"] < pages["plugin_samples"] // 20, (read, pages)
    assert 0 < read["plugin_metrics"] < pages["plugin_metrics"] // 20, (read, pages)
