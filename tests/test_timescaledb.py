"""The TimescaleDB backend: hypertables, policies with the configured intervals, caggs = PG rollups."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from pluginmon.storage import timescale
from pluginmon.storage.backend import (
    Retention,
    admin_connection,
    bucket_floor,
    detect_backend,
)
from pluginmon.storage.engines import (
    backfill_rollups,
    maintenance_for,
    prepare_database,
)
from pluginmon.storage.migrate import Backend, default_sql_dir, migrate
from pluginmon.storage.partitions import ROLLUPS, refresh_rollup
from pluginmon.storage.timescale import TimescaleMaintenance
from tests.dbutil import create_database, drop_database, with_database
from tests.schema_helpers import (
    Conn,
    add_plugin,
    assert_rollups_equal,
    database_for_backend,
    group_by_rollup,
    insert_samples,
    rollup_rows,
    samples_series,
)

pytestmark = pytest.mark.timescaledb

CONFIGURED = Retention(
    samples=timedelta(days=30),
    metrics=timedelta(days=45),
    rollup_1m=timedelta(days=14),
    rollup_1h=timedelta(days=400),
    compress_after=timedelta(days=3),
)


@pytest.fixture
def tsdb_url(requires_timescaledb: None, pg_admin_url: str) -> Iterator[str]:
    """A TimescaleDB database prepared with CONFIGURED retention (migrations + policies)."""
    name = create_database(pg_admin_url, prefix="tsdb")
    url = with_database(pg_admin_url, name)
    try:
        prepared = prepare_database(url, CONFIGURED, backend=Backend.TIMESCALEDB)
        assert prepared.backend is Backend.TIMESCALEDB
        # 8 for the samples and raw metrics, 4 for the metrics rollups (sql/051), 4 for the
        # samples' percentile aggregates (sql/090).
        assert len(prepared.policy_changes) == 16
        yield url
    finally:
        drop_database(pg_admin_url, name)


def _jobs(conn: Conn) -> dict[tuple[str, str], dict[str, Any]]:
    """{(relation, proc): config plus schedule}, straight from timescaledb_information.jobs."""
    rows = conn.execute(
        "SELECT hypertable_name, proc_name, config, schedule_interval"
        " FROM timescaledb_information.jobs WHERE hypertable_schema = 'public'"
        " AND proc_name IN ('policy_retention', 'policy_compression',"
        " 'policy_refresh_continuous_aggregate')"
    ).fetchall()
    jobs: dict[tuple[str, str], dict[str, Any]] = {}
    for relation, proc, config, schedule in rows:
        assert (relation, proc) not in jobs, f"two {proc} jobs on {relation}"
        jobs[(relation, proc)] = {**config, "schedule_interval": schedule}
    return jobs


def _interval(conn: Conn, text: str) -> timedelta:
    row = conn.execute("SELECT %s::text::interval", (text,)).fetchone()
    assert row is not None
    return row[0]  # type: ignore[no-any-return]


def test_hypertables_continuous_aggregates_and_compression(tsdb_url: str) -> None:
    with psycopg.connect(tsdb_url) as conn:
        assert timescale.hypertables(conn) == ["plugin_metrics", "plugin_samples"]
        assert timescale.continuous_aggregates(conn) == [
            "rollup_metrics_1h",
            "rollup_metrics_1m",
            "rollup_samples_1h",
            "rollup_samples_1m",
            "rollup_samples_pct_1h",
            "rollup_samples_pct_1m",
        ]
        chunk_intervals = conn.execute(
            "SELECT hypertable_name, time_interval FROM timescaledb_information.dimensions"
            " WHERE hypertable_schema = 'public' ORDER BY 1"
        ).fetchall()
        assert chunk_intervals == [
            ("plugin_metrics", timedelta(days=1)),
            ("plugin_samples", timedelta(days=1)),
        ]
        settings = conn.execute(
            "SELECT attname, segmentby_column_index, orderby_column_index, orderby_asc"
            " FROM timescaledb_information.compression_settings"
            " WHERE hypertable_name = 'plugin_samples' ORDER BY attname"
        ).fetchall()
        assert settings == [("plugin_id", 1, None, None), ("timestamp", None, 1, False)]
        materialized_only = conn.execute(
            "SELECT view_name, materialized_only FROM timescaledb_information.continuous_aggregates"
            " ORDER BY 1"
        ).fetchall()
        assert materialized_only == [
            ("rollup_metrics_1h", True),
            ("rollup_metrics_1m", True),
            ("rollup_samples_1h", True),
            ("rollup_samples_1m", True),
            ("rollup_samples_pct_1h", True),
            ("rollup_samples_pct_1m", True),
        ]


def test_policies_have_the_configured_intervals(tsdb_url: str) -> None:
    with psycopg.connect(tsdb_url) as conn:
        jobs = _jobs(conn)
        assert set(jobs) == {
            ("plugin_samples", "policy_retention"),
            ("plugin_metrics", "policy_retention"),
            ("rollup_samples_1m", "policy_retention"),
            ("rollup_samples_1h", "policy_retention"),
            ("plugin_samples", "policy_compression"),
            ("plugin_metrics", "policy_compression"),
            ("rollup_samples_1m", "policy_refresh_continuous_aggregate"),
            ("rollup_samples_1h", "policy_refresh_continuous_aggregate"),
            ("rollup_metrics_1m", "policy_retention"),
            ("rollup_metrics_1h", "policy_retention"),
            ("rollup_metrics_1m", "policy_refresh_continuous_aggregate"),
            ("rollup_metrics_1h", "policy_refresh_continuous_aggregate"),
            ("rollup_samples_pct_1m", "policy_retention"),
            ("rollup_samples_pct_1h", "policy_retention"),
            ("rollup_samples_pct_1m", "policy_refresh_continuous_aggregate"),
            ("rollup_samples_pct_1h", "policy_refresh_continuous_aggregate"),
        }
        drop = {
            relation: _interval(conn, config["drop_after"])
            for (relation, proc), config in jobs.items()
            if proc == "policy_retention"
        }
        assert drop == {
            "plugin_samples": timedelta(days=30),
            "plugin_metrics": timedelta(days=45),
            "rollup_samples_1m": timedelta(days=14),
            "rollup_samples_1h": timedelta(days=400),
            "rollup_metrics_1m": timedelta(days=14),
            "rollup_metrics_1h": timedelta(days=400),
            "rollup_samples_pct_1m": timedelta(days=14),
            "rollup_samples_pct_1h": timedelta(days=400),
        }
        for relation in ("plugin_samples", "plugin_metrics"):
            compress = jobs[(relation, "policy_compression")]["compress_after"]
            assert _interval(conn, compress) == timedelta(days=3)
        for relation, window in timescale.REFRESH_WINDOWS.items():
            config = jobs[(relation, "policy_refresh_continuous_aggregate")]
            assert _interval(conn, config["start_offset"]) == window.start_offset
            assert _interval(conn, config["end_offset"]) == window.end_offset
            assert config["schedule_interval"] == window.schedule_interval


def test_default_retention_is_the_seeds(requires_timescaledb: None, pg_admin_url: str) -> None:
    with (
        database_for_backend(pg_admin_url, Backend.TIMESCALEDB) as url,
        psycopg.connect(url, autocommit=True) as conn,
    ):
        timescale.apply_policies(conn, Retention())
        jobs = _jobs(conn)
        drop = {
            relation: _interval(conn, config["drop_after"])
            for (relation, proc), config in jobs.items()
            if proc == "policy_retention"
        }
        assert drop == {
            "plugin_samples": timedelta(days=90),
            "plugin_metrics": timedelta(days=90),
            "rollup_samples_1m": timedelta(days=30),
            "rollup_samples_1h": timedelta(days=365),
            "rollup_metrics_1m": timedelta(days=30),
            "rollup_metrics_1h": timedelta(days=365),
            "rollup_samples_pct_1m": timedelta(days=30),
            "rollup_samples_pct_1h": timedelta(days=365),
        }


def test_a_changed_interval_is_registered_again(tsdb_url: str) -> None:
    unchanged = prepare_database(tsdb_url, CONFIGURED)
    assert unchanged.migrations.applied == ()
    assert unchanged.policy_changes == ()

    changed = Retention(
        samples=timedelta(days=60),
        metrics=CONFIGURED.metrics,
        rollup_1m=CONFIGURED.rollup_1m,
        rollup_1h=CONFIGURED.rollup_1h,
        compress_after=timedelta(days=2),
    )
    result = prepare_database(tsdb_url, changed)

    assert set(result.policy_changes) == {
        "plugin_samples: policy_retention re-registered",
        "plugin_samples: policy_compression re-registered",
        "plugin_metrics: policy_compression re-registered",
    }
    with psycopg.connect(tsdb_url) as conn:
        jobs = _jobs(conn)  # still one job per (relation, policy)
        assert _interval(conn, jobs[("plugin_samples", "policy_retention")]["drop_after"]) == (
            timedelta(days=60)
        )
        assert _interval(conn, jobs[("plugin_metrics", "policy_retention")]["drop_after"]) == (
            timedelta(days=45)
        )


def test_retention_and_compression_jobs_act_on_chunks(tsdb_url: str) -> None:
    now = datetime.now(UTC)
    with psycopg.connect(tsdb_url, autocommit=True) as conn:
        plugin = add_plugin(conn, "acme", "resizer")
        old = samples_series(
            now - timedelta(days=40),
            now - timedelta(days=39),
            timedelta(hours=1),
            [("acme", plugin)],
        )
        middle = samples_series(
            now - timedelta(days=10),
            now - timedelta(days=9),
            timedelta(hours=1),
            [("acme", plugin)],
        )
        recent = samples_series(
            now - timedelta(hours=5), now, timedelta(hours=1), [("acme", plugin)]
        )
        insert_samples(conn, old + middle + recent)
        jobs = {
            proc: int(row[0])
            for proc in ("policy_retention", "policy_compression")
            if (
                row := conn.execute(
                    "SELECT job_id FROM timescaledb_information.jobs"
                    " WHERE hypertable_name = 'plugin_samples' AND proc_name = %s",
                    (proc,),
                ).fetchone()
            )
            is not None
        }
        conn.execute("CALL run_job(%s)", (jobs["policy_retention"],))
        conn.execute("CALL run_job(%s)", (jobs["policy_compression"],))
        count = conn.execute("SELECT count(*) FROM plugin_samples").fetchone()
        assert count == (len(middle) + len(recent),)
        compressed = conn.execute(
            "SELECT bool_or(is_compressed) FILTER (WHERE range_end <= %s),"
            " bool_or(is_compressed) FILTER (WHERE range_end > %s)"
            " FROM timescaledb_information.chunks WHERE hypertable_name = 'plugin_samples'",
            (now - timedelta(days=3), now - timedelta(days=1)),
        ).fetchone()
        assert compressed == (True, False)
        # Compressed rows still read back unchanged through the tenant view.
        via_view = conn.execute(
            'SELECT count(*) FROM pluginmon_tenant.plugin_samples WHERE "timestamp" < %s',
            (now - timedelta(days=3),),
        ).fetchone()
        assert via_view == (len(middle),)


async def test_continuous_aggregates_equal_the_postgres_rollups(
    requires_timescaledb: None, pg_admin_url: str
) -> None:
    start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=5)
    end = start + timedelta(hours=3)
    results: dict[Backend, dict[str, dict[tuple[Any, ...], tuple[Any, ...]]]] = {}
    for backend in (Backend.TIMESCALEDB, Backend.POSTGRES):
        with (
            database_for_backend(pg_admin_url, backend) as url,
            psycopg.connect(url, autocommit=True) as conn,
        ):
            plugins = [
                ("acme", add_plugin(conn, "acme", "resizer")),
                ("acme", add_plugin(conn, "acme", "codec")),
                ("globex", add_plugin(conn, "globex", "indexer")),
            ]
            insert_samples(conn, samples_series(start, end, timedelta(seconds=15), plugins, seed=5))
            if backend is Backend.TIMESCALEDB:
                timescale.refresh_rollups(conn, start, end)
            else:
                await _refresh_postgres(url, end)
            results[backend] = {
                "1m": rollup_rows(conn, "plugin_samples_1m"),
                "1h": rollup_rows(conn, "plugin_samples_1h"),
            }
            expected_1m = group_by_rollup(conn, "1 minute")
            expected_1h = group_by_rollup(conn, "1 hour")
            assert_rollups_equal(results[backend]["1m"], expected_1m)
            assert_rollups_equal(results[backend]["1h"], expected_1h)
    assert len(results[Backend.TIMESCALEDB]["1m"]) == 180 * 3
    assert len(results[Backend.TIMESCALEDB]["1h"]) == 3 * 3
    assert_rollups_equal(results[Backend.TIMESCALEDB]["1m"], results[Backend.POSTGRES]["1m"])
    assert_rollups_equal(results[Backend.TIMESCALEDB]["1h"], results[Backend.POSTGRES]["1h"])


async def _refresh_postgres(url: str, now: datetime) -> None:
    async with admin_connection(url) as conn:
        for spec in ROLLUPS:
            await refresh_rollup(conn, spec, now)


async def test_backend_detection_and_maintenance_choice(tsdb_url: str) -> None:
    async with admin_connection(tsdb_url) as conn:
        backend = await detect_backend(conn)
        assert backend is Backend.TIMESCALEDB
        maintenance = maintenance_for(backend)
        assert isinstance(maintenance, TimescaleMaintenance)
        report = await maintenance.run(conn, CONFIGURED)
        assert report.ran
        assert report.backend is Backend.TIMESCALEDB


async def test_backfill_materialises_late_rows_outside_the_policy_windows(tsdb_url: str) -> None:
    """Rows replayed three hours late: no refresh policy window reaches them (the 1-minute one
    starts 2 h back); ``backfill`` from the oldest replayed timestamp does."""
    end = bucket_floor(datetime.now(UTC), timedelta(hours=1)) - timedelta(hours=1)
    start = end - timedelta(hours=5)
    with psycopg.connect(tsdb_url, autocommit=True) as conn:
        plugins = [
            ("acme", add_plugin(conn, "acme", "resizer")),
            ("globex", add_plugin(conn, "globex", "indexer")),
        ]
        insert_samples(conn, samples_series(start, end, timedelta(seconds=20), plugins, seed=21))
        timescale.refresh_rollups(conn, start, end)
        assert_rollups_equal(
            rollup_rows(conn, "plugin_samples_1m"), group_by_rollup(conn, "1 minute")
        )
        late_start = end - timedelta(hours=3, minutes=7, seconds=30)
        insert_samples(
            conn,
            samples_series(
                late_start,
                late_start + timedelta(minutes=20),
                timedelta(seconds=5),
                plugins,
                seed=22,
            ),
        )
        # Not materialised yet: the continuous aggregates are materialized_only.
        assert rollup_rows(conn, "plugin_samples_1m") != group_by_rollup(conn, "1 minute")
        assert rollup_rows(conn, "plugin_samples_1h") != group_by_rollup(conn, "1 hour")

    refreshed = await backfill_rollups(tsdb_url, late_start, CONFIGURED)

    assert [(r.rollup, r.window_start) for r in refreshed] == [
        ("rollup_samples_1m", bucket_floor(late_start, timedelta(minutes=1))),
        ("rollup_samples_1h", bucket_floor(late_start, timedelta(hours=1))),
        ("rollup_samples_pct_1m", bucket_floor(late_start, timedelta(minutes=1))),
        ("rollup_samples_pct_1h", bucket_floor(late_start, timedelta(hours=1))),
    ]
    assert refreshed[1].window_end == end
    with psycopg.connect(tsdb_url) as conn:
        assert_rollups_equal(
            rollup_rows(conn, "plugin_samples_1m"), group_by_rollup(conn, "1 minute")
        )
        assert_rollups_equal(
            rollup_rows(conn, "plugin_samples_1h"), group_by_rollup(conn, "1 hour")
        )


def _hold_refresh_range(conn: Conn, holder_pid: int, relation: str) -> None:
    """Register a refresh of ``relation`` over all time in TimescaleDB's concurrent-refresh
    table, as a refresh running in backend ``holder_pid`` does while it runs (it must be a live
    backend: TimescaleDB drops the entries of dead ones)."""
    conn.execute(
        """INSERT INTO _timescaledb_catalog.continuous_aggs_jobs_refresh_ranges
               (materialization_id, start_range, end_range, pid, job_id, created_at)
           SELECT c.mat_hypertable_id, -9223372036854775000, 9223372036854775000, %s, 0, now()
             FROM _timescaledb_catalog.continuous_agg c WHERE c.user_view_name = %s""",
        (holder_pid, relation),
    )


async def test_backfill_waits_out_a_concurrent_refresh_and_gives_up_on_one_that_stays(
    tsdb_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TimescaleDB refuses a refresh that overlaps one in progress (its policy's job) at once,
    with LockNotAvailable: a back-fill waits and tries again, and raises if it stays."""
    end = bucket_floor(datetime.now(UTC), timedelta(hours=1)) - timedelta(hours=1)
    late_start = end - timedelta(hours=3)
    with psycopg.connect(tsdb_url, autocommit=True) as conn, psycopg.connect(tsdb_url) as holder:
        if conn.execute(
            "SELECT to_regclass('_timescaledb_catalog.continuous_aggs_jobs_refresh_ranges')"
        ).fetchone() == (None,):
            pytest.skip("this TimescaleDB has no concurrent-refresh table (before 2.22)")
        plugins = [("acme", add_plugin(conn, "acme", "resizer"))]
        insert_samples(
            conn,
            samples_series(late_start, late_start + timedelta(minutes=20), timedelta(seconds=5),
                           plugins, seed=23),
        )  # fmt: skip
        holder_pid = holder.info.backend_pid
        _hold_refresh_range(conn, holder_pid, "rollup_samples_1m")

        # The "other refresh" ends as soon as the back-fill has met it (its retry log line).
        met: list[str] = []

        class EndTheOtherRefresh(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                message = record.getMessage()
                if message.startswith("rollup_samples_1m is being refreshed") and not met:
                    met.append(message)
                    conn.execute(
                        "DELETE FROM _timescaledb_catalog.continuous_aggs_jobs_refresh_ranges"
                        " WHERE pid = %s",
                        (holder_pid,),
                    )

        handler = EndTheOtherRefresh(logging.INFO)
        log = logging.getLogger("pluginmon.storage.timescale")
        log.addHandler(handler)
        old_level = log.level
        log.setLevel(logging.INFO)
        try:
            refreshed = await backfill_rollups(tsdb_url, late_start, CONFIGURED)
        finally:
            log.removeHandler(handler)
            log.setLevel(old_level)
        assert met, "the back-fill never met the concurrent refresh"
        assert "trying again in 0.25 s" in met[0]
        assert refreshed[0].rollup == "rollup_samples_1m"
        assert refreshed[0].buckets == 20
        assert_rollups_equal(
            rollup_rows(conn, "plugin_samples_1m"), group_by_rollup(conn, "1 minute")
        )

        # One that stays: the error, after the pauses (shortened here).
        _hold_refresh_range(conn, holder_pid, "rollup_samples_1h")
        monkeypatch.setattr(timescale, "CONCURRENT_REFRESH_PAUSES", (0.05, 0.05))
        with pytest.raises(psycopg.errors.LockNotAvailable, match="concurrent refresh"):
            await backfill_rollups(tsdb_url, late_start, CONFIGURED)


# -- sql/132: the metrics aggregates without the health rows ------------------------------------

_METRICS_VIEW_SQL = (
    "SELECT bucket, plugin_id, metric_name, sample_count, value_avg, value_min, value_max,"
    " value_first, value_last FROM {} ORDER BY bucket, plugin_id, metric_name"
)


def _metric_rows(
    conn: Conn, plugin_id: int, start: datetime, minutes: int, value: float, tenant: str = "acme"
) -> None:
    """One queue_depth row and one health_score row (labels of its own, as the health
    engine writes them) a minute from ``start``."""
    with conn.cursor() as cur:
        cur.executemany(
            'INSERT INTO plugin_metrics ("timestamp", tenant_id, plugin_id, environment,'
            " metric_name, metric_kind, value, labels)"
            " VALUES (%s, %s, %s, 'production', %s, 'gauge', %s, %s::jsonb)",
            [
                row
                for i in range(minutes)
                for row in (
                    (start + timedelta(minutes=i, seconds=5), tenant, plugin_id, "queue_depth",
                     value + i, "{}"),
                    (start + timedelta(minutes=i, seconds=5), tenant, plugin_id, "health_score",
                     90.0 - i, f'{{"cpu": "{i}"}}'),
                )
            ],
        )  # fmt: skip


def _refresh(conn: Conn, relation: str, start: datetime, end: datetime) -> None:
    """``refresh_continuous_aggregate``, waiting out a refresh policy's run of the same
    aggregate (TimescaleDB refuses a concurrent refresh at once); raises after 10 s."""
    for attempt in range(40):
        try:
            conn.execute(
                "CALL refresh_continuous_aggregate(%s::regclass, %s, %s)", (relation, start, end)
            )
            return
        except psycopg.errors.LockNotAvailable:
            if attempt == 39:
                raise
            time.sleep(0.25)


def _health_rows(conn: Conn, relation: str) -> int:
    query = sql.SQL("SELECT count(*) FROM {} WHERE metric_name = 'health_score'").format(
        sql.Identifier(relation)
    )
    row = conn.execute(query).fetchone()
    assert row is not None
    return int(row[0])


def _rows(conn: Conn, view: str) -> list[tuple[Any, ...]]:
    return conn.execute(_METRICS_VIEW_SQL.format(view)).fetchall()


def _tenants_seen(url: str, view: str, tenant: str) -> set[str]:
    """The tenants the API role sees in ``view`` with ``tenant`` set."""
    with psycopg.connect(url) as conn:
        conn.execute("SET ROLE pluginmon_api")
        conn.execute("SELECT set_config('pluginmon.tenant_id', %s, true)", (tenant,))
        query = sql.SQL("SELECT DISTINCT tenant_id FROM {}").format(sql.Identifier(view))
        return {r[0] for r in conn.execute(query).fetchall()}


def test_new_metric_aggregates_leave_the_health_rows_out(tsdb_url: str) -> None:
    start = bucket_floor(datetime.now(UTC) - timedelta(hours=3), timedelta(hours=1))
    with psycopg.connect(tsdb_url, autocommit=True) as conn:
        plugin = add_plugin(conn, "acme", "resizer")
        _metric_rows(conn, plugin, start, 10, 1.0)
        _refresh(conn, "rollup_metrics_1m", start, start + timedelta(minutes=10))
        _refresh(conn, "rollup_metrics_1h", start, start + timedelta(hours=1))
        assert _health_rows(conn, "rollup_metrics_1m") == 0
        assert _health_rows(conn, "rollup_metrics_1h") == 0
        assert [(r[0], r[2], r[6]) for r in _rows(conn, "plugin_metrics_1m")] == [
            (start + timedelta(minutes=i), "queue_depth", 1.0 + i) for i in range(10)
        ]
        assert [(r[0], r[2], r[3], r[5], r[6]) for r in _rows(conn, "plugin_metrics_1h")] == [
            (start, "queue_depth", 10, 1.0, 10.0)
        ]
        # a new database keeps no superseded aggregate
        assert not [
            name for name in timescale.continuous_aggregates(conn) if name.endswith("_before_132")
        ]


async def test_metric_aggregates_replaced_keep_what_they_had(
    requires_timescaledb: None,
    pg_admin_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A database migrated before sql/132 with buckets in its metrics aggregates: after it,
    the views read the old buckets as they were (health rows hidden) and the new aggregate's
    from the cutover on, each bucket once and each tenant its own; the old aggregates keep a
    retention policy only, and leave once retention has emptied them."""
    before_132 = tmp_path / "sql"
    before_132.mkdir()
    for path in default_sql_dir().glob("*.sql"):
        if int(path.name[:3]) < 132:
            shutil.copy(path, before_132)
    old_start = bucket_floor(datetime.now(UTC) - timedelta(hours=4), timedelta(hours=1))
    cutover = old_start + timedelta(minutes=10)  # the old 1-minute aggregate's watermark
    new_start = bucket_floor(datetime.now(UTC) - timedelta(minutes=40), timedelta(minutes=1))
    name = create_database(pg_admin_url, prefix="ts132")
    url = with_database(pg_admin_url, name)
    try:
        migrate(url, sql_dir=before_132, backend=Backend.TIMESCALEDB)
        with psycopg.connect(url, autocommit=True) as conn:
            plugin = add_plugin(conn, "acme", "resizer")
            other = add_plugin(conn, "globex", "indexer")
            _metric_rows(conn, plugin, old_start, 10, 1.0)
            _metric_rows(conn, other, old_start, 1, 7.0, tenant="globex")
            _refresh(conn, "rollup_metrics_1m", old_start, cutover)
            _refresh(conn, "rollup_metrics_1h", old_start, old_start + timedelta(hours=1))
            assert _health_rows(conn, "rollup_metrics_1m") == 11  # what 051 materialised
            old_minutes = _rows(conn, "plugin_metrics_1m")
            old_hour = _rows(conn, "plugin_metrics_1h")
        assert len(old_minutes) == 11
        assert len(old_hour) == 2

        # A session whose DateStyle and TimeZone would misread a timestamp written as text.
        monkeypatch.setenv("PGOPTIONS", "-c DateStyle=Postgres -c TimeZone=Asia/Kolkata")
        prepare_database(url, CONFIGURED, backend=Backend.TIMESCALEDB)
        monkeypatch.delenv("PGOPTIONS")
        with psycopg.connect(url, autocommit=True) as conn:
            assert set(timescale.continuous_aggregates(conn)) >= {
                "rollup_metrics_1m",
                "rollup_metrics_1h",
                "rollup_metrics_1m_before_132",
                "rollup_metrics_1h_before_132",
            }
            jobs = _jobs(conn)
            for old, days in (
                ("rollup_metrics_1m_before_132", 14),
                ("rollup_metrics_1h_before_132", 400),
            ):
                assert (old, "policy_refresh_continuous_aggregate") not in jobs
                assert _interval(conn, jobs[(old, "policy_retention")]["drop_after"]) == timedelta(
                    days=days
                )
            assert ("rollup_metrics_1m", "policy_refresh_continuous_aggregate") in jobs
            assert timescale.apply_policies(conn, CONFIGURED) == []
            # unchanged through the views
            assert _rows(conn, "plugin_metrics_1m") == old_minutes
            assert _rows(conn, "plugin_metrics_1h") == old_hour

            # the cutover's own bucket, a late row for the bucket before it (the old
            # aggregate's, not materialised again) and newer rows
            _metric_rows(conn, plugin, cutover, 1, 50.0)
            _metric_rows(conn, plugin, cutover - timedelta(minutes=1), 1, 1000.0)
            _metric_rows(conn, plugin, new_start, 5, 100.0)
            # the new aggregates refreshed over the old buckets too, as their first policy
            # runs may: the views still read each bucket once
            _refresh(conn, "rollup_metrics_1m", old_start, new_start + timedelta(minutes=5))
            _refresh(
                conn,
                "rollup_metrics_1h",
                old_start,
                bucket_floor(new_start + timedelta(minutes=5), timedelta(hours=1))
                + timedelta(hours=1),
            )
            assert _health_rows(conn, "rollup_metrics_1m") == 0
            assert _health_rows(conn, "rollup_metrics_1h") == 0
            minutes = _rows(conn, "plugin_metrics_1m")
            assert minutes == [
                *old_minutes,
                (cutover, plugin, "queue_depth", 1, 50.0, 50.0, 50.0, 50.0, 50.0),
                *[
                    (new_start + timedelta(minutes=i), plugin, "queue_depth", 1, 100.0 + i,
                     100.0 + i, 100.0 + i, 100.0 + i, 100.0 + i)
                    for i in range(5)
                ],
            ]  # fmt: skip
            hours = _rows(conn, "plugin_metrics_1h")
            assert hours[:2] == old_hour
            # 11 old rows and the 5 new ones, none twice: the cutover's row and the late one
            # fall in an hour the old 1-hour aggregate had materialised (its cutover is the
            # next hour), so that hour reads as it was
            assert sum(r[3] for r in hours) == 16
        for view in ("plugin_metrics_1m", "plugin_metrics_1h"):
            assert _tenants_seen(url, view, "acme") == {"acme"}
            assert _tenants_seen(url, view, "globex") == {"globex"}

        # Retention empties the old aggregates: the next maintenance pass drops them and the
        # views read the new aggregates alone.
        with psycopg.connect(url, autocommit=True) as conn:
            for old in ("rollup_metrics_1m_before_132", "rollup_metrics_1h_before_132"):
                conn.execute(
                    "SELECT drop_chunks(%s::regclass, older_than => now() + interval '100 years')",
                    (old,),
                )
            # an operator's view over an old aggregate: a permanent refusal, named in the
            # pass's failed steps, the rest of the pass done
            conn.execute("CREATE VIEW operators_own AS SELECT * FROM rollup_metrics_1h_before_132")
        async with admin_connection(url) as admin:
            report = await TimescaleMaintenance().run(admin, CONFIGURED)
        assert report.ran
        assert [step for step, _ in report.failed_steps] == [
            "retire:metrics-aggregates (permanent)"
        ]
        assert "operators_own" in report.failed_steps[0][1]
        with psycopg.connect(url, autocommit=True) as conn:
            assert "rollup_metrics_1h_before_132" in timescale.continuous_aggregates(conn)
            # the old buckets went with the chunks; the rest reads as before
            assert _rows(conn, "plugin_metrics_1m") == [r for r in minutes if r[0] >= cutover]
            conn.execute("DROP VIEW operators_own")
        async with admin_connection(url) as admin:
            report = await TimescaleMaintenance().run(admin, CONFIGURED)
        assert report.ran
        assert report.failed_steps == ()
        with psycopg.connect(url, autocommit=True) as conn:
            assert not [
                n for n in timescale.continuous_aggregates(conn) if n.endswith("_before_132")
            ]
            after = _rows(conn, "plugin_metrics_1m")
            assert after == [r for r in minutes if r[0] >= cutover]
            assert not [job for job in _jobs(conn) if job[0].endswith("_before_132")]
            assert timescale.apply_policies(conn, CONFIGURED) == []
        assert _tenants_seen(url, "plugin_metrics_1m", "acme") == {"acme"}
    finally:
        drop_database(pg_admin_url, name)
