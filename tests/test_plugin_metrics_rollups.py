"""Rollups of plugin_metrics on both backends: each kind keeps what it needs (gauges
avg/min/max/last, counters and histogram buckets their last value per bucket, so rates and
quantiles still come out), PostgreSQL's refresh equals a GROUP BY of the raw rows and the
TimescaleDB continuous aggregates equal PostgreSQL's, under the tenant check."""

from __future__ import annotations

import itertools
import json
import math
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg import sql

from pluginmon.storage import timescale
from pluginmon.storage.backend import Retention, admin_connection, bucket_floor
from pluginmon.storage.engines import prepare_database
from pluginmon.storage.metric_rollups import METRIC_ROLLUPS, maintain_metric_rollups
from pluginmon.storage.migrate import Backend
from pluginmon.storage.partitions import PostgresMaintenance
from pluginmon.storage.queries import set_local_tenant_sql
from tests.dbutil import is_citus
from tests.schema_helpers import Conn, add_plugin, database_for_backend, partitioned_backend

STEP = timedelta(seconds=15)
Key = tuple[Any, ...]  # (bucket, tenant, plugin id, environment, name, kind, labels json)


def _start() -> datetime:
    return datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=4)


def _series(start: datetime, plugins: list[tuple[str, int]]) -> list[tuple[Any, ...]]:
    """Two hours of a gauge, a counter that resets once, and a histogram, per plugin; and
    pluginmon's own health_score rows, each with labels of its own (not rolled up, sql/129)."""
    rows: list[tuple[Any, ...]] = []
    for n, (tenant, plugin_id) in enumerate(plugins):
        for i in range(int(timedelta(hours=2) / STEP)):
            at = start + i * STEP
            counter = 10.0 * (i - 300) if i >= 300 else 10.0 * i  # the plugin restarted
            rows += [
                (at, tenant, plugin_id, "production", "queue_depth", "gauge", float((i + n) % 17), "{}"),
                (at, tenant, plugin_id, "production", "requests_total", "counter", counter,
                 '{"method": "get"}'),
                (at, tenant, plugin_id, "production", "lat_bucket", "histogram", 2.0 * i,
                 '{"le": "0.5"}'),
                (at, tenant, plugin_id, "production", "lat_bucket", "histogram", 3.0 * i,
                 '{"le": "+Inf"}'),
                (at, tenant, plugin_id, "production", "health_score", "gauge", 90.0 - i % 7,
                 json.dumps({"components": {"cpu": 90.0 - i % 7}, "weakest": "cpu",
                             "weakest_detail": f"cpu {i % 7}%"})),
            ]  # fmt: skip
    return rows


def _insert(conn: Conn, rows: list[tuple[Any, ...]]) -> None:
    with conn.cursor() as cur:
        cur.executemany(
            'INSERT INTO plugin_metrics ("timestamp", tenant_id, plugin_id, environment,'
            " metric_name, metric_kind, value, labels) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
            rows,
        )


def _expected(rows: list[tuple[Any, ...]], width: timedelta) -> dict[Key, tuple[Any, ...]]:
    groups: dict[Key, list[tuple[datetime, float]]] = defaultdict(list)
    for at, tenant, plugin_id, env, name, kind, value, labels in rows:
        if name == "health_score":
            continue  # pluginmon's own health rows are not rolled up (sql/129)
        key = (bucket_floor(at, width), tenant, plugin_id, env, name, kind,
               json.dumps(json.loads(labels), sort_keys=True))  # fmt: skip
        groups[key].append((at, value))
    out: dict[Key, tuple[Any, ...]] = {}
    for key, points in groups.items():
        points.sort()
        values = [v for _, v in points]
        out[key] = (len(values), math.fsum(values) / len(values), min(values), max(values),
                    values[0], values[-1])  # fmt: skip
    return out


def _rollup(conn: Conn, view: str) -> dict[Key, tuple[Any, ...]]:
    query = sql.SQL(
        "SELECT bucket, tenant_id, plugin_id, environment, metric_name, metric_kind,"
        " labels::text, sample_count, value_avg, value_min, value_max, value_first, value_last"
        " FROM {}"
    ).format(sql.Identifier(view))
    rows = conn.execute(query).fetchall()
    return {
        (r[0], r[1], r[2], r[3], r[4], r[5], json.dumps(json.loads(r[6]), sort_keys=True)): tuple(
            r[7:]
        )
        for r in rows
    }


def _assert_same(actual: dict[Key, tuple[Any, ...]], expected: dict[Key, tuple[Any, ...]]) -> None:
    assert actual.keys() == expected.keys()
    for key, want in expected.items():
        got = actual[key]
        assert got[0] == want[0], key
        assert got[1] == pytest.approx(want[1]), key
        assert got[2:] == want[2:], key


def _rate_from_buckets(rollup: dict[Key, tuple[Any, ...]], name: str, plugin_id: int) -> float:
    """A counter's per-second rate over the rollup's buckets, from each bucket's last value
    with resets handled (a lower value starts again from 0)."""
    lasts = sorted((k[0], v[5]) for k, v in rollup.items() if k[4] == name and k[2] == plugin_id)
    increase = math.fsum(b if b < a else b - a for (_, a), (_, b) in itertools.pairwise(lasts))
    seconds: float = (lasts[-1][0] - lasts[0][0]).total_seconds()
    return increase / seconds


def _tenant_view(url: str, view: str, tenant: str) -> set[str]:
    """The tenants the API role sees in ``view`` with ``tenant`` set."""
    with psycopg.connect(url) as conn:
        conn.execute("SET ROLE pluginmon_api")
        conn.execute("SELECT set_config('pluginmon.tenant_id', %s, true)", (tenant,))
        if is_citus(url):  # the workers' policies see only a propagated SET LOCAL
            conn.execute(set_local_tenant_sql(tenant))
        query = sql.SQL("SELECT DISTINCT tenant_id FROM {}").format(sql.Identifier(view))
        rows = conn.execute(query).fetchall()
    return {r[0] for r in rows}


@pytest.fixture
def postgres_url(pg_admin_url: str) -> Iterator[str]:
    with database_for_backend(pg_admin_url, partitioned_backend(pg_admin_url)) as url:
        yield url


async def test_postgres_rollups_keep_each_kind_and_equal_a_group_by(postgres_url: str) -> None:
    start = _start()
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        plugins = [("acme", add_plugin(conn, "acme", "resizer")),
                   ("globex", add_plugin(conn, "globex", "indexer"))]  # fmt: skip
        rows = _series(start, plugins)
        _insert(conn, rows)
    now = start + timedelta(hours=3)
    async with admin_connection(postgres_url) as conn_async:
        # The daemon's maintenance pass refreshes them (and the samples' rollups).
        report = await PostgresMaintenance(clock=lambda: now).run(conn_async, Retention())
        assert report.ran
        refreshed = {r.rollup: r for r in report.metric_rollups}
        assert refreshed["rollup_metrics_1m"].buckets == 120 * 4 * 2
        assert refreshed["rollup_metrics_1h"].buckets == 2 * 4 * 2
        # Nothing completed since: the next pass recomputes nothing.
        again = await maintain_metric_rollups(conn_async, Retention(), now)
        assert [r.buckets for r in again.refreshed] == [0, 0]
    with psycopg.connect(postgres_url) as conn:
        one_minute = _rollup(conn, "plugin_metrics_1m")
        _assert_same(one_minute, _expected(rows, timedelta(minutes=1)))
        _assert_same(_rollup(conn, "plugin_metrics_1h"), _expected(rows, timedelta(hours=1)))
    acme = plugins[0][1]
    # Gauge: avg/min/max/last per bucket (above). Counter: a rate still comes out of the
    # buckets' last values; in the first hour (no reset) it is the raw rate, 10 per 15 s.
    first_hour = {k: v for k, v in one_minute.items() if k[0] < start + timedelta(hours=1)}
    assert _rate_from_buckets(first_hour, "requests_total", acme) == pytest.approx(10 / 15)
    # Over the reset, the drop does not count as a negative increase.
    assert _rate_from_buckets(one_minute, "requests_total", acme) > 0
    # Histogram buckets as their last cumulative count: the share under 0.5 s is 2/3.
    last_hour = max(k[0] for k in one_minute)
    le = {json.loads(k[6])["le"]: v[5] for k, v in one_minute.items()
          if k[0] == last_hour and k[4] == "lat_bucket" and k[2] == acme}  # fmt: skip
    assert le["0.5"] / le["+Inf"] == pytest.approx(2 / 3)
    # Tenant-checked views, as the API role.
    assert _tenant_view(postgres_url, "plugin_metrics_1m", "acme") == {"acme"}
    assert _tenant_view(postgres_url, "plugin_metrics_1h", "globex") == {"globex"}


async def test_health_rows_are_not_rolled_up_and_earlier_ones_are_hidden(
    postgres_url: str,
) -> None:
    """sql/129: the refresh leaves pluginmon's health_score rows out of both tables (their
    labels differ per row, so a rollup would only copy them), and the views hide the health
    rows refreshes before 129 stored."""
    start = _start()
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        plugin_id = add_plugin(conn, "acme", "resizer")
        _insert(conn, _series(start, [("acme", plugin_id)]))
    async with admin_connection(postgres_url) as conn_async:
        report = await maintain_metric_rollups(conn_async, Retention(), start + timedelta(hours=3))
    assert [r.buckets for r in report.refreshed] == [120 * 4, 2 * 4]
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        for table in ("rollup_metrics_1m", "rollup_metrics_1h"):
            names = conn.execute(
                sql.SQL("SELECT DISTINCT metric_name FROM {} ORDER BY 1").format(
                    sql.Identifier(table)
                )
            ).fetchall()
            assert [n[0] for n in names] == ["lat_bucket", "queue_depth", "requests_total"]
        # A health row as a refresh before 129 stored it.
        conn.execute(
            "INSERT INTO rollup_metrics_1h (bucket, tenant_id, plugin_id, environment,"
            " metric_name, metric_kind, labels, sample_count, value_avg, value_min, value_max,"
            " value_first, value_last) VALUES (%s, 'acme', %s, 'production', 'health_score',"
            " 'gauge', '{\"weakest\": \"cpu\"}', 1, 80, 80, 80, 80, 80)",
            (start, plugin_id),
        )
        stored = conn.execute(
            "SELECT count(*) FROM rollup_metrics_1h WHERE metric_name = 'health_score'"
        ).fetchone()
        assert stored == (1,)
        shown = conn.execute(
            "SELECT count(*) FROM plugin_metrics_1h WHERE metric_name = 'health_score'"
        ).fetchone()
        assert shown == (0,)
        others = conn.execute("SELECT count(*) FROM plugin_metrics_1h").fetchone()
        assert others == (2 * 4,)


async def test_postgres_metric_rollups_fold_a_late_row_in_and_read_only_what_changed(
    postgres_url: str,
) -> None:
    """sql/092: a refresh recomputes the buckets written since the last one (the log) and the
    completed ones, not the whole lookback."""
    if is_citus(postgres_url):
        pytest.skip(
            "on Citus: no rollup invalidation log (sql/092's statement trigger is refused on a"
            " distributed table); a late row is folded in by the refresh after the next bucket"
            " completes, over the lookback (sql/101)"
        )
    start = _start()
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        plugins = [("acme", add_plugin(conn, "acme", "resizer"))]
        rows = _series(start, plugins)
        _insert(conn, rows)
    now = start + timedelta(hours=3)
    async with admin_connection(postgres_url) as conn_async:
        first = await maintain_metric_rollups(conn_async, Retention(), now)
        assert [r.buckets for r in first.refreshed] == [120 * 4, 2 * 4]
        # One gauge row 5 minutes behind both watermarks, written after the refresh.
        late = (now - timedelta(minutes=5), "acme", plugins[0][1], "production", "queue_depth",
                "gauge", 99.0, "{}")  # fmt: skip
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            _insert(conn, [late])
        second = await maintain_metric_rollups(conn_async, Retention(), now + timedelta(minutes=1))
        # Only the late row's series and buckets: one a minute, one an hour (no rows in
        # the minute completed since).
        assert [r.buckets for r in second.refreshed] == [1, 1]
        assert [r.window_start for r in second.refreshed] == [
            now - timedelta(minutes=5),
            now - timedelta(hours=1),
        ]
    with psycopg.connect(postgres_url) as conn:
        _assert_same(
            _rollup(conn, "plugin_metrics_1m"), _expected([*rows, late], timedelta(minutes=1))
        )
        _assert_same(
            _rollup(conn, "plugin_metrics_1h"), _expected([*rows, late], timedelta(hours=1))
        )


async def test_postgres_metric_rollups_expire_with_the_rollup_retention(postgres_url: str) -> None:
    start = _start()
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        rows = _series(start, [("acme", add_plugin(conn, "acme", "resizer"))])
        _insert(conn, rows)
    async with admin_connection(postgres_url) as conn_async:
        await maintain_metric_rollups(conn_async, Retention(), start + timedelta(hours=3))
        # Forty days on, the 1-minute buckets (30 days) are gone, the hourly ones (365) stay.
        later = await maintain_metric_rollups(conn_async, Retention(), start + timedelta(days=40))
    removed = dict(later.removed)
    assert removed["rollup_metrics_1m"] == 120 * 4
    assert removed["rollup_metrics_1h"] == 0
    with psycopg.connect(postgres_url) as conn:
        assert _rollup(conn, "plugin_metrics_1m") == {}
        assert len(_rollup(conn, "plugin_metrics_1h")) == 2 * 4


def test_timescaledb_continuous_aggregates_equal_the_postgres_rollups(
    requires_timescaledb: None, pg_admin_url: str
) -> None:
    start = _start()
    with database_for_backend(pg_admin_url, Backend.TIMESCALEDB) as url:
        prepare_database(url, Retention(), backend=Backend.TIMESCALEDB)
        with psycopg.connect(url, autocommit=True) as conn:
            plugins = [("acme", add_plugin(conn, "acme", "resizer")),
                       ("globex", add_plugin(conn, "globex", "indexer"))]  # fmt: skip
            rows = _series(start, plugins)
            _insert(conn, rows)
            for rollup in METRIC_ROLLUPS:
                conn.execute(
                    "CALL refresh_continuous_aggregate(%s::regclass, %s::timestamptz,"
                    " %s::timestamptz)",
                    (rollup.relation, start, start + timedelta(hours=3)),
                )
            _assert_same(_rollup(conn, "plugin_metrics_1m"), _expected(rows, timedelta(minutes=1)))
            _assert_same(_rollup(conn, "plugin_metrics_1h"), _expected(rows, timedelta(hours=1)))
            jobs = {(j.relation, j.proc_name): j for j in timescale.policy_jobs(conn)}
        for rollup in METRIC_ROLLUPS:
            assert (rollup.relation, timescale.REFRESH_PROC) in jobs
            assert (rollup.relation, timescale.RETENTION_PROC) in jobs
        assert _tenant_view(url, "plugin_metrics_1m", "acme") == {"acme"}
        assert _tenant_view(url, "plugin_metrics_1h", "globex") == {"globex"}
