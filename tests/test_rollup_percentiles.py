"""p50/p95/p99 of cpu_percent and rss_bytes in the 1-minute and 1-hour rollups, on both backends, against percentile_cont over the raw rows."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pluginmon.storage import timescale
from pluginmon.storage.backend import Retention, admin_connection
from pluginmon.storage.engines import backfill_rollups
from pluginmon.storage.migrate import Backend, default_sql_dir, migrate
from pluginmon.storage.partitions import ROLLUPS, refresh_rollup
from tests.dbutil import create_database, drop_database, with_database
from tests.schema_helpers import (
    Conn,
    add_plugin,
    database_for_backend,
    insert_samples,
    partitioned_backend,
    samples_series,
)

PERCENTILE_COLUMNS = (
    "cpu_percent_p50",
    "cpu_percent_p95",
    "cpu_percent_p99",
    "rss_bytes_p50",
    "rss_bytes_p95",
    "rss_bytes_p99",
)


def _raw_percentiles(conn: Conn, width: str) -> dict[tuple[Any, ...], tuple[float, ...]]:
    """percentile_cont over the raw rows of each bucket: the reference the rollups must equal."""
    rows = conn.execute(
        """
        SELECT date_bin(%s::interval, "timestamp", timestamptz '2000-01-03 00:00:00+00'),
               tenant_id, plugin_id, environment,
               percentile_cont(0.50) WITHIN GROUP (ORDER BY cpu_percent),
               percentile_cont(0.95) WITHIN GROUP (ORDER BY cpu_percent),
               percentile_cont(0.99) WITHIN GROUP (ORDER BY cpu_percent),
               percentile_cont(0.50) WITHIN GROUP (ORDER BY rss_bytes),
               percentile_cont(0.95) WITHIN GROUP (ORDER BY rss_bytes),
               percentile_cont(0.99) WITHIN GROUP (ORDER BY rss_bytes)
          FROM plugin_samples GROUP BY 1, 2, 3, 4
        """,
        (width,),
    ).fetchall()
    return {tuple(r[:4]): tuple(float(v) for v in r[4:]) for r in rows}


def _rollup_percentiles(conn: Conn, view: str) -> dict[tuple[Any, ...], tuple[Any, ...]]:
    rows = conn.execute(
        f"SELECT bucket, tenant_id, plugin_id, environment, {', '.join(PERCENTILE_COLUMNS)}"  # noqa: S608
        f" FROM {view}"
    ).fetchall()
    return {tuple(r[:4]): tuple(r[4:]) for r in rows}


def _assert_exact(
    got: dict[tuple[Any, ...], tuple[Any, ...]], want: dict[tuple[Any, ...], tuple[float, ...]]
) -> None:
    assert got.keys() == want.keys()
    for key, expected in want.items():
        actual = got[key]
        assert None not in actual, (key, actual)
        # The same expression over the same rows: equal up to float summation order.
        for column, a, w in zip(PERCENTILE_COLUMNS, actual, expected, strict=True):
            assert abs(a - w) <= 1e-9 * max(1.0, abs(w)), (key, column, a, w)


async def _refresh_postgres(url: str, now: datetime) -> None:
    async with admin_connection(url) as conn:
        for spec in ROLLUPS:
            await refresh_rollup(conn, spec, now)


def _load(conn: Conn, start: datetime, end: datetime) -> None:
    plugins = [
        ("acme", add_plugin(conn, "acme", "resizer")),
        ("acme", add_plugin(conn, "acme", "codec")),
        ("globex", add_plugin(conn, "globex", "indexer")),
    ]
    insert_samples(conn, samples_series(start, end, timedelta(seconds=5), plugins, seed=11))


async def _check_backend(pg_admin_url: str, backend: Backend) -> None:
    start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=4)
    end = start + timedelta(hours=2)
    with (
        database_for_backend(pg_admin_url, backend) as url,
        psycopg.connect(url, autocommit=True) as conn,
    ):
        _load(conn, start, end)
        if backend is Backend.TIMESCALEDB:
            timescale.refresh_rollups(conn, start, end)
        else:
            await _refresh_postgres(url, end)
        want_1m = _raw_percentiles(conn, "1 minute")
        want_1h = _raw_percentiles(conn, "1 hour")
        # 120 one-minute and 2 one-hour buckets for each of the three plugins.
        assert len(want_1m) == 120 * 3
        assert len(want_1h) == 2 * 3
        _assert_exact(_rollup_percentiles(conn, "plugin_samples_1m"), want_1m)
        _assert_exact(_rollup_percentiles(conn, "plugin_samples_1h"), want_1h)
        # Not a tautology: the 1-hour p95 is not what the 1-minute p95s would give.
        p95_of_p95 = conn.execute(
            "SELECT date_bin('1 hour', bucket, timestamptz '2000-01-03 00:00:00+00'),"
            " tenant_id, plugin_id, environment,"
            " percentile_cont(0.95) WITHIN GROUP (ORDER BY cpu_percent_p95)"
            " FROM plugin_samples_1m GROUP BY 1, 2, 3, 4"
        ).fetchall()
        assert any(abs(float(row[4]) - want_1h[tuple(row[:4])][1]) > 1e-6 for row in p95_of_p95)


async def test_postgres_rollup_percentiles_equal_percentile_cont_over_raw_rows(
    pg_admin_url: str,
) -> None:
    await _check_backend(pg_admin_url, partitioned_backend(pg_admin_url))


@pytest.mark.timescaledb
async def test_timescaledb_rollup_percentiles_equal_percentile_cont_over_raw_rows(
    requires_timescaledb: None, pg_admin_url: str
) -> None:
    await _check_backend(pg_admin_url, Backend.TIMESCALEDB)


async def test_postgres_rollup_recomputes_percentiles_for_a_late_row(pg_admin_url: str) -> None:
    """A row folded in by the lookback changes the bucket's percentiles too."""
    start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=3)
    end = start + timedelta(hours=1)
    with (
        database_for_backend(pg_admin_url, partitioned_backend(pg_admin_url)) as url,
        psycopg.connect(url, autocommit=True) as conn,
    ):
        _load(conn, start, end)
        await _refresh_postgres(url, end)
        before = _rollup_percentiles(conn, "plugin_samples_1h")
        plugin_id = conn.execute("SELECT id FROM plugins WHERE name = 'codec'").fetchone()
        assert plugin_id is not None
        late = samples_series(
            start,
            start + timedelta(minutes=10),
            timedelta(seconds=5),
            [("acme", plugin_id[0])],
            seed=99,
        )
        # Far above every other sample, so the bucket's p99 must move.
        late = [(*row[:5], 99_000.0, 10**12, *row[7:]) for row in late]
        insert_samples(conn, late)
        async with admin_connection(url) as admin:
            for spec in ROLLUPS:
                await refresh_rollup(admin, spec, end, refresh_from=start)
        after = _rollup_percentiles(conn, "plugin_samples_1h")
        _assert_exact(after, _raw_percentiles(conn, "1 hour"))
        key = next(k for k in after if k[2] == plugin_id[0])
        assert after[key] != before[key]


async def _check_upgrade(pg_admin_url: str, backend: Backend, tmp_path: Path) -> None:
    """A database with rollups from before sql/090: its buckets keep their averages and read
    NULL percentiles until a back-fill recomputes them from the raw rows."""
    old_sql = tmp_path / "sql"
    old_sql.mkdir()
    for path in default_sql_dir().glob("*.sql"):
        if int(path.name[:3]) < 90:
            shutil.copy(path, old_sql / path.name)
    start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=4)
    end = start + timedelta(hours=2)
    name = create_database(pg_admin_url, prefix="pct_up")
    url = with_database(pg_admin_url, name)
    try:
        migrate(url, sql_dir=old_sql, backend=backend)
        with psycopg.connect(url, autocommit=True) as conn:
            _load(conn, start, end)
            if backend is Backend.TIMESCALEDB:
                for relation in ("rollup_samples_1m", "rollup_samples_1h"):
                    conn.execute(
                        "CALL refresh_continuous_aggregate(%s::regclass, %s::timestamptz,"
                        " %s::timestamptz)",
                        (relation, start, end),
                    )
            else:
                await _refresh_postgres(url, end)
            before = conn.execute(
                "SELECT count(*), sum(sample_count), sum(cpu_percent_avg) FROM plugin_samples_1h"
            ).fetchone()
        # (Citus runs the PostgreSQL backend's 090)
        file_backend = Backend.POSTGRES if backend is Backend.CITUS else backend
        assert migrate(url).applied[:2] == (
            f"090_rollup_percentiles.{file_backend.value}.sql",
            "091_daily_analytics.sql",
        )
        with psycopg.connect(url, autocommit=True) as conn:
            after = conn.execute(
                "SELECT count(*), sum(sample_count), sum(cpu_percent_avg) FROM plugin_samples_1h"
            ).fetchone()
            assert after == before
            assert before is not None
            assert before[0] == 2 * 3
            nulls = conn.execute(
                "SELECT count(*) FILTER (WHERE cpu_percent_p95 IS NULL), count(*)"
                " FROM plugin_samples_1m"
            ).fetchone()
            assert nulls == (120 * 3, 120 * 3)
        await backfill_rollups(url, start, Retention())
        with psycopg.connect(url, autocommit=True) as conn:
            _assert_exact(_rollup_percentiles(conn, "plugin_samples_1m"), _raw_percentiles(conn, "1 minute"))  # fmt: skip
            _assert_exact(_rollup_percentiles(conn, "plugin_samples_1h"), _raw_percentiles(conn, "1 hour"))  # fmt: skip
    finally:
        drop_database(pg_admin_url, name)


async def test_postgres_upgrade_keeps_old_buckets_and_backfill_adds_percentiles(
    pg_admin_url: str, tmp_path: Path
) -> None:
    await _check_upgrade(pg_admin_url, partitioned_backend(pg_admin_url), tmp_path)


@pytest.mark.timescaledb
async def test_timescaledb_upgrade_keeps_old_buckets_and_backfill_adds_percentiles(
    requires_timescaledb: None, pg_admin_url: str, tmp_path: Path
) -> None:
    await _check_upgrade(pg_admin_url, Backend.TIMESCALEDB, tmp_path)
