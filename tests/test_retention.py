"""Retention and rollups on the PostgreSQL backend, and the shared deletes on either backend."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import sql

from pluginmon.storage.backend import (
    MAINTENANCE_LOCK_KEY,
    MaintenanceReport,
    Retention,
    admin_connection,
    backfill_start,
    detect_backend,
)
from pluginmon.storage.engines import (
    backfill_rollups,
    maintenance_for,
)
from pluginmon.storage.partitions import ROLLUPS, PostgresMaintenance, refresh_rollup
from tests.dbutil import is_citus
from tests.schema_helpers import (
    Conn,
    add_plugin,
    assert_rollups_equal,
    database_for_backend,
    group_by_rollup,
    insert_samples,
    partitioned_backend,
    rollup_rows,
    samples_series,
)

NOW = datetime(2026, 3, 20, 12, 0, tzinfo=UTC)


@pytest.fixture
def pg_db(pg_admin_url: str) -> Iterator[str]:
    """A database migrated for the PostgreSQL backend (on any test server but a Citus
    coordinator, where the PostgreSQL backend's files cannot run: there the Citus backend,
    which keeps the same partitions and rollups and runs PostgresMaintenance's pass)."""
    with database_for_backend(pg_admin_url, partitioned_backend(pg_admin_url)) as url:
        yield url


def _partitions(conn: Conn, parent: str) -> dict[str, tuple[datetime | None, datetime | None]]:
    rows = conn.execute(
        "SELECT partition::text, lower_bound, upper_bound FROM pluginmon_partitions(%s::regclass)",
        (parent,),
    ).fetchall()
    return {str(r[0]): (r[1], r[2]) for r in rows}


def _timestamps(conn: Conn, table: str) -> list[datetime]:
    rows = conn.execute(f'SELECT "timestamp" FROM {table} ORDER BY 1').fetchall()  # noqa: S608
    return [r[0] for r in rows]


async def _run(
    url: str, maintenance: PostgresMaintenance, retention: Retention
) -> MaintenanceReport:
    async with admin_connection(url) as conn:
        return await maintenance.run(conn, retention)


async def test_partition_retention_removes_exactly_the_rows_past_the_horizon(pg_db: str) -> None:
    retention = Retention(samples=timedelta(days=10), metrics=timedelta(days=5))
    with psycopg.connect(pg_db, autocommit=True) as conn:
        plugin = add_plugin(conn, "acme", "resizer")
        rows = samples_series(
            NOW - timedelta(days=15),
            NOW + timedelta(days=1),
            timedelta(hours=1),
            [("acme", plugin)],
        )
        horizon1 = NOW - retention.samples
        # Both sides of the first horizon, to the microsecond.
        rows += [
            (horizon1, *rows[0][1:]),
            (horizon1 - timedelta(microseconds=1), *rows[0][1:]),
        ]
        insert_samples(conn, rows)
        conn.execute(
            "INSERT INTO plugin_metrics SELECT t, 'acme', %s, 'prod', 'health_score', 'gauge', 90, '{}'"
            " FROM generate_series(%s::timestamptz, %s::timestamptz, interval '1 hour') t",
            (plugin, NOW - timedelta(days=8), NOW),
        )
        all_samples = _timestamps(conn, "plugin_samples")
        all_metrics = _timestamps(conn, "plugin_metrics")

    first = await _run(pg_db, PostgresMaintenance(clock=lambda: NOW), retention)

    assert first.ran
    with psycopg.connect(pg_db) as conn:
        assert _timestamps(conn, "plugin_samples") == [t for t in all_samples if t >= horizon1]
        assert _timestamps(conn, "plugin_metrics") == [
            t for t in all_metrics if t >= NOW - retention.metrics
        ]
        # Everything left now sits in daily partitions; DEFAULT is drained.
        assert conn.execute("SELECT count(*) FROM plugin_samples_default").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM plugin_metrics_default").fetchone() == (0,)
        parts = _partitions(conn, "plugin_samples")
    assert first.removed("plugin_samples") == sum(1 for t in all_samples if t < horizon1)
    assert "plugin_samples_p20260310" in parts  # the day of the horizon, now the boundary
    for day in range(20, 28):  # today and 7 days ahead
        assert f"plugin_samples_p202603{day}" in parts

    # Three and a half days later the horizon falls mid-day: whole days before it are
    # dropped, the boundary day keeps exactly its rows younger than the horizon.
    later = NOW + timedelta(days=3, hours=18)
    horizon2 = later - retention.samples
    second = await _run(pg_db, PostgresMaintenance(clock=lambda: later), retention)

    dropped = set(second.partitions_dropped)
    assert {"plugin_samples_p20260310", "plugin_samples_p20260313"} <= dropped
    assert "plugin_samples_p20260314" not in dropped
    with psycopg.connect(pg_db) as conn:
        remaining = _timestamps(conn, "plugin_samples")
        boundary = _timestamps(conn, "plugin_samples_p20260314")
        parts = _partitions(conn, "plugin_samples")
    assert remaining == [t for t in all_samples if t >= horizon2]
    assert boundary
    assert min(boundary) >= horizon2
    assert second.removed("plugin_samples") == sum(
        1 for t in all_samples if horizon1 <= t < horizon2
    )
    assert all(upper is None or upper > horizon2 for _lower, upper in parts.values())
    assert "plugin_samples_p20260331" in parts  # created ahead of `later`

    # Nothing more to do at the same time.
    third = await _run(pg_db, PostgresMaintenance(clock=lambda: later), retention)
    assert third.partitions_created == ()
    assert third.partitions_dropped == ()
    assert third.removed("plugin_samples") == 0


async def test_late_rows_in_default_get_their_partition(pg_db: str) -> None:
    """A spool replayed after days away lands in DEFAULT; maintenance gives it a partition."""
    with psycopg.connect(pg_db, autocommit=True) as conn:
        plugin = add_plugin(conn, "acme", "resizer")
        await _run(pg_db, PostgresMaintenance(clock=lambda: NOW), Retention())
        late = samples_series(
            NOW - timedelta(days=3, hours=12),
            NOW - timedelta(days=2, hours=12),
            timedelta(minutes=10),
            [("acme", plugin)],
        )
        insert_samples(conn, late)
        assert conn.execute("SELECT count(*) FROM plugin_samples_default").fetchone() == (
            len(late),
        )

    report = await _run(pg_db, PostgresMaintenance(clock=lambda: NOW), Retention())

    assert "plugin_samples_p20260317" in report.partitions_created
    with psycopg.connect(pg_db) as conn:
        assert conn.execute("SELECT count(*) FROM plugin_samples_default").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM plugin_samples_p20260317").fetchone() == (
            len(late),
        )


async def test_expired_operations_audit_and_analytics_are_deleted(migrated_db: str) -> None:
    """Shared by both backends: runs whichever maintenance the database was migrated for."""
    now = datetime.now(UTC)
    day = timedelta(days=1)
    with psycopg.connect(migrated_db, autocommit=True) as conn:
        plugin = add_plugin(conn, "acme", "resizer")
        operations = [
            ("succeeded", now - 40 * day, now - 31 * day, False),
            ("failed", now - 40 * day, now - 30 * day - timedelta(minutes=1), False),
            ("succeeded", now - 40 * day, now - 29 * day, True),
            ("running", now - 60 * day, None, True),  # not completed: kept however old
            ("pending", now - 90 * day, None, True),
        ]
        for status, started, finished, _kept in operations:
            conn.execute(
                "INSERT INTO plugin_operations (tenant_id, plugin_id, environment, operation_type,"
                " status, started_at, finished_at) VALUES ('acme', %s, 'prod', 'update', %s, %s, %s)",
                (plugin, status, started, finished),
            )
        for age in (731 * day, 729 * day):
            conn.execute(
                "INSERT INTO audit_log (tenant_id, occurred_at, actor, action, entity_type)"
                " VALUES ('acme', %s, 'ann', 'update', 'plugin')",
                (now - age,),
            )
        for age in (366 * day, 364 * day):
            conn.execute(
                "INSERT INTO plugin_analytics (tenant_id, plugin_id, environment, period,"
                " period_start) VALUES ('acme', %s, 'prod', 'day', %s)",
                (plugin, now - age),
            )

    async with admin_connection(migrated_db) as conn_async:
        backend = await detect_backend(conn_async)
        report = await maintenance_for(backend, clock=lambda: now).run(conn_async, Retention())

    assert report.ran
    assert report.removed("plugin_operations") == 2
    assert report.removed("audit_log") == 1
    assert report.removed("plugin_analytics") == 1
    with psycopg.connect(migrated_db) as conn:
        left = conn.execute("SELECT status FROM plugin_operations ORDER BY id").fetchall()
        assert [r[0] for r in left] == [op[0] for op in operations if op[3]]
        # The kept entry, and each retention run's own record in the tenant's chain: the
        # operations' and the analytics' (retention.run, by the daemon, target the table,
        # with the count) around the audit trail's own.
        entries = conn.execute(
            "SELECT actor, action, entity_type, details->>'removed', details ? 'horizon'"
            " FROM audit_log WHERE tenant_id = 'acme' ORDER BY seq"
        ).fetchall()
        assert entries == [
            ("ann", "update", "plugin", None, False),
            ("daemon", "retention.run", "plugin_operations", "2", True),
            ("daemon", "audit.expire", "audit_log", "1", True),
            ("daemon", "retention.run", "plugin_analytics", "1", True),
        ]
        assert conn.execute("SELECT count(*) FROM plugin_analytics").fetchone() == (1,)

    # A run that removes nothing records nothing.
    async with admin_connection(migrated_db) as conn_async:
        again = await maintenance_for(backend, clock=lambda: now).run(conn_async, Retention())
    assert again.removed("plugin_operations") == 0
    with psycopg.connect(migrated_db) as conn:
        assert conn.execute(
            "SELECT count(*) FROM audit_log WHERE action = 'retention.run'"
        ).fetchone() == (2,)


async def test_maintenance_skips_while_another_daemon_holds_the_lock(pg_db: str) -> None:
    async with admin_connection(pg_db) as holder:
        cur = await holder.execute("SELECT pg_try_advisory_lock(%s)", (MAINTENANCE_LOCK_KEY,))
        assert await cur.fetchone() == (True,)
        report = await _run(pg_db, PostgresMaintenance(clock=lambda: NOW), Retention())
        assert not report.ran
        assert report.partitions_created == ()
    report = await _run(pg_db, PostgresMaintenance(clock=lambda: NOW), Retention())
    assert report.ran


async def test_rollup_refresh_is_incremental_and_matches_group_by(pg_db: str) -> None:
    if is_citus(pg_db):
        pytest.skip(
            "on Citus: no rollup invalidation log (sql/092's statement trigger is refused on a"
            " distributed table); the Citus refresh re-reads its lookback"
            " (tests/test_citus.py::test_rollups_refresh_incrementally_and_match_a_group_by)"
        )
    start = datetime(2026, 3, 20, 10, 0, tzinfo=UTC)
    spec_1m, spec_1h = ROLLUPS
    with psycopg.connect(pg_db, autocommit=True) as conn:
        plugins = [
            ("acme", add_plugin(conn, "acme", "resizer")),
            ("acme", add_plugin(conn, "acme", "codec")),
            ("globex", add_plugin(conn, "globex", "indexer")),
        ]
        insert_samples(
            conn,
            samples_series(
                start, start + timedelta(hours=2), timedelta(seconds=10), plugins, seed=1
            ),
        )

    async with admin_connection(pg_db) as conn_async:
        at = start + timedelta(hours=2, seconds=30)
        first = await refresh_rollup(conn_async, spec_1m, at)
        await refresh_rollup(conn_async, spec_1h, at)
        assert (first.window_start, first.window_end) == (start, start + timedelta(hours=2))
        assert first.buckets == 120 * len(plugins)

        with psycopg.connect(pg_db, autocommit=True) as conn:
            assert_rollups_equal(
                rollup_rows(conn, "plugin_samples_1m"), group_by_rollup(conn, "1 minute")
            )
            assert_rollups_equal(
                rollup_rows(conn, "plugin_samples_1h"), group_by_rollup(conn, "1 hour")
            )
            # A bucket outside the next window, marked so a recomputation would show.
            tampered = start + timedelta(minutes=10)
            conn.execute(
                "UPDATE rollup_samples_1m SET sample_count = -1 WHERE bucket = %s", (tampered,)
            )
            insert_samples(
                conn,
                samples_series(
                    start + timedelta(hours=2),
                    start + timedelta(hours=3),
                    timedelta(seconds=10),
                    plugins,
                    seed=2,
                ),
            )
            # A late row inside the lookback (just behind the watermark).
            late_at = start + timedelta(hours=2) - spec_1m.lookback / 2
            insert_samples(
                conn,
                samples_series(
                    late_at,
                    late_at + timedelta(seconds=1),
                    timedelta(seconds=1),
                    plugins[:1],
                    seed=3,
                ),
            )

        at = start + timedelta(hours=3, seconds=5)
        second = await refresh_rollup(conn_async, spec_1m, at)
        await refresh_rollup(conn_async, spec_1h, at)
        # From the log (sql/092): the buckets the late row touched, then the new ones; the
        # late row is folded in at once, nothing else behind the watermark is read.
        late_bucket = late_at.replace(second=0)
        assert second.window_start == late_bucket
        assert second.window_end == start + timedelta(hours=3)
        assert second.buckets == 60 * len(plugins) + len(plugins)
        with psycopg.connect(pg_db) as conn:
            folded = rollup_rows(conn, "plugin_samples_1m")
            truth = group_by_rollup(conn, "1 minute")
            late_key = next(k for k in truth if k[0] == late_bucket and k in folded)
            assert_rollups_equal({late_key: folded[late_key]}, {late_key: truth[late_key]})

        # The next minute: only the bucket completed since.
        at = start + timedelta(hours=3, minutes=1, seconds=5)
        third = await refresh_rollup(conn_async, spec_1m, at)
        assert third.window_start == start + timedelta(hours=3)
        assert third.window_end == start + timedelta(hours=3, minutes=1)
        assert third.buckets == 0  # no rows in it

        with psycopg.connect(pg_db) as conn:
            expected = group_by_rollup(conn, "1 minute")
            actual = rollup_rows(conn, "plugin_samples_1m")
            stale = {key for key in actual if key[0] == tampered}
            assert len(stale) == len(plugins)
            assert all(actual[key][0] == -1 for key in stale)
            assert_rollups_equal(
                {k: v for k, v in actual.items() if k not in stale},
                {k: v for k, v in expected.items() if k not in stale},
            )
            assert_rollups_equal(
                rollup_rows(conn, "plugin_samples_1h"), group_by_rollup(conn, "1 hour")
            )

        # A row later than the lookback stays out until an explicit back-fill, as before.
        too_late = start + timedelta(hours=3) - 2 * spec_1m.lookback
        with psycopg.connect(pg_db, autocommit=True) as conn:
            insert_samples(
                conn,
                samples_series(
                    too_late,
                    too_late + timedelta(seconds=1),
                    timedelta(seconds=1),
                    plugins[:1],
                    seed=4,
                ),
            )

        # Nothing completed since: an idle refresh does no work.
        idle = await refresh_rollup(conn_async, spec_1m, at + timedelta(seconds=20))
        assert idle.buckets == 0
        assert idle.window_start == idle.window_end == start + timedelta(hours=3, minutes=1)

        with psycopg.connect(pg_db) as conn:
            truth = group_by_rollup(conn, "1 minute")
            held = rollup_rows(conn, "plugin_samples_1m")
            in_bucket = [k for k in truth if k[0] == too_late.replace(second=0)]
            assert len(in_bucket) == len(plugins)
            assert sum(held[k] != truth[k] for k in in_bucket) == 1  # the too-late row's plugin

        # An explicit back-fill recomputes from the given time, fixing everything.
        await refresh_rollup(conn_async, spec_1m, at, refresh_from=start)
        with psycopg.connect(pg_db) as conn:
            assert_rollups_equal(
                rollup_rows(conn, "plugin_samples_1m"), group_by_rollup(conn, "1 minute")
            )
            watermark = conn.execute(
                "SELECT watermark FROM rollup_watermarks WHERE rollup = 'rollup_samples_1m'"
            ).fetchone()
        assert watermark == (start + timedelta(hours=3, minutes=1),)


@pytest.mark.parametrize("chunk", [None, timedelta(hours=1)], ids=["helper", "hourly-chunks"])
async def test_backfill_puts_rows_older_than_the_lookback_into_both_rollups(
    pg_db: str, chunk: timedelta | None
) -> None:
    """A spool replayed after a 3-hour outage: the regular refresh never looks that far back;
    ``backfill`` from the oldest replayed timestamp makes both rollups equal raw again."""
    start = NOW - timedelta(hours=6)
    with psycopg.connect(pg_db, autocommit=True) as conn:
        plugins = [
            ("acme", add_plugin(conn, "acme", "resizer")),
            ("globex", add_plugin(conn, "globex", "indexer")),
        ]
        insert_samples(conn, samples_series(start, NOW, timedelta(seconds=20), plugins, seed=11))
    first = await _run(pg_db, PostgresMaintenance(clock=lambda: NOW), Retention())
    assert [r.window_end for r in first.rollups] == [NOW, NOW]

    # Rows from three hours back arrive after the watermarks moved on.
    late_start = NOW - timedelta(hours=3, minutes=7, seconds=30)
    with psycopg.connect(pg_db, autocommit=True) as conn:
        late = samples_series(
            late_start, late_start + timedelta(minutes=20), timedelta(seconds=5), plugins, seed=12
        )
        insert_samples(conn, late)
    later = NOW + timedelta(minutes=2)
    await _run(pg_db, PostgresMaintenance(clock=lambda: later), Retention())
    with psycopg.connect(pg_db) as conn:
        # The defect being fixed: the regular refresh leaves the late rows out.
        assert rollup_rows(conn, "plugin_samples_1m") != group_by_rollup(conn, "1 minute")
        assert rollup_rows(conn, "plugin_samples_1h") != group_by_rollup(conn, "1 hour")

    if chunk is None:
        refreshed = await backfill_rollups(pg_db, late_start, Retention(), clock=lambda: later)
    else:
        async with admin_connection(pg_db) as conn_async:
            maintenance = PostgresMaintenance(clock=lambda: later, backfill_chunk=chunk)
            refreshed = await maintenance.backfill(conn_async, late_start, Retention())

    spec_1m, spec_1h = ROLLUPS
    assert [(r.rollup, r.window_start, r.window_end) for r in refreshed] == [
        (spec_1m.relation, NOW - timedelta(hours=3, minutes=8), later),
        (spec_1h.relation, NOW - timedelta(hours=4), NOW),
    ]
    # Every minute from 08:52 to 11:52 and every hour from 08:00 to 11:00, for both plugins:
    # the buckets since the watermark minus the lookback are the log's (sql/092), and no row
    # was written there since the last refresh.
    assert [r.buckets for r in refreshed] == [180 * 2, 3 * 2]
    with psycopg.connect(pg_db) as conn:
        assert_rollups_equal(
            rollup_rows(conn, "plugin_samples_1m"), group_by_rollup(conn, "1 minute")
        )
        assert_rollups_equal(
            rollup_rows(conn, "plugin_samples_1h"), group_by_rollup(conn, "1 hour")
        )
        late_rows = rollup_rows(
            conn, "plugin_samples_1m", "bucket = timestamptz '2026-03-20 08:55+00'"
        )
        # 20 s base rows plus 5 s late rows in that minute, for each plugin.
        assert sorted(v[0] for v in late_rows.values()) == [15, 15]
        marks = conn.execute(
            "SELECT rollup, watermark FROM rollup_watermarks ORDER BY 1"
        ).fetchall()
    assert marks == [("rollup_samples_1h", NOW), ("rollup_samples_1m", later)]


async def test_backfill_of_rows_newer_than_the_watermarks_leaves_them_to_the_refresh(
    pg_db: str,
) -> None:
    """A replay of the last seconds (a fleet's start, a database restart): nothing is older
    than either watermark, so the back-fill recomputes nothing and takes no watermark lock;
    the next regular refresh puts the rows in both rollups."""
    with psycopg.connect(pg_db, autocommit=True) as conn:
        plugins = [("acme", add_plugin(conn, "acme", "resizer"))]
        insert_samples(
            conn, samples_series(NOW - timedelta(hours=2), NOW, timedelta(seconds=20), plugins)
        )
    await _run(pg_db, PostgresMaintenance(clock=lambda: NOW), Retention())
    replayed = NOW + timedelta(seconds=30)
    with psycopg.connect(pg_db, autocommit=True) as conn:
        insert_samples(
            conn,
            samples_series(
                replayed, replayed + timedelta(minutes=2), timedelta(seconds=10), plugins
            ),
        )
        before = conn.execute(
            "SELECT rollup, watermark FROM rollup_watermarks ORDER BY 1"
        ).fetchall()
    later = NOW + timedelta(minutes=3)
    refreshed = await backfill_rollups(pg_db, replayed, Retention(), clock=lambda: later)
    assert [(r.rollup, r.window_start, r.window_end, r.buckets) for r in refreshed] == [
        (spec.relation, NOW, NOW, 0) for spec in ROLLUPS
    ]
    with psycopg.connect(pg_db) as conn:
        assert (
            conn.execute("SELECT rollup, watermark FROM rollup_watermarks ORDER BY 1").fetchall()
            == before
        )
        assert rollup_rows(conn, "plugin_samples_1m", f"bucket >= '{NOW.isoformat()}'") == {}
    await _run(pg_db, PostgresMaintenance(clock=lambda: later), Retention())
    with psycopg.connect(pg_db) as conn:
        cut = f"bucket < '{later.isoformat()}'"
        raw_cut = f"\"timestamp\" < '{later.isoformat()}'"
        assert_rollups_equal(
            rollup_rows(conn, "plugin_samples_1m", cut), group_by_rollup(conn, "1 minute", raw_cut)
        )
        assert len(rollup_rows(conn, "plugin_samples_1m", f"bucket >= '{NOW.isoformat()}'")) == 3


async def test_backfill_leaves_buckets_past_the_raw_retention_alone(pg_db: str) -> None:
    """Rollups outlive raw rows: a back-fill from before the raw horizon must not erase them."""
    with psycopg.connect(pg_db, autocommit=True) as conn:
        plugin = add_plugin(conn, "acme", "resizer")
        insert_samples(
            conn,
            samples_series(NOW - timedelta(hours=2), NOW, timedelta(minutes=1), [("acme", plugin)]),
        )
    await _run(pg_db, PostgresMaintenance(clock=lambda: NOW), Retention())
    old_bucket = NOW - timedelta(days=200)
    with psycopg.connect(pg_db, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO rollup_samples_1h (bucket, tenant_id, plugin_id, environment, sample_count)"
            " VALUES (%s, 'acme', %s, 'prod', 360)",
            (old_bucket, plugin),
        )

    async with admin_connection(pg_db) as conn_async:
        refreshed = await PostgresMaintenance(
            clock=lambda: NOW, backfill_chunk=timedelta(days=30)
        ).backfill(conn_async, NOW - timedelta(days=365), Retention())

    horizon = NOW - Retention().samples
    assert [r.window_start for r in refreshed] == [horizon, horizon]
    with psycopg.connect(pg_db) as conn:
        kept = conn.execute(
            "SELECT sample_count FROM rollup_samples_1h WHERE bucket = %s", (old_bucket,)
        ).fetchall()
        assert kept == [(360,)]
        assert_rollups_equal(
            rollup_rows(conn, "plugin_samples_1m"), group_by_rollup(conn, "1 minute")
        )


def test_backfill_start_is_the_first_bucket_raw_retention_still_holds() -> None:
    retention = Retention(samples=timedelta(days=10))
    minute, hour = timedelta(minutes=1), timedelta(hours=1)
    since = NOW - timedelta(hours=3, seconds=10)
    assert backfill_start(since, minute, NOW, retention) == NOW - timedelta(hours=3, minutes=1)
    assert backfill_start(since, hour, NOW, retention) == NOW - timedelta(hours=4)
    # The horizon falls mid-bucket: that bucket's older rows may be gone already.
    now = NOW + timedelta(minutes=30, seconds=15)
    horizon = now - retention.samples
    assert backfill_start(NOW - timedelta(days=40), hour, now, retention) == horizon + timedelta(
        minutes=29, seconds=45
    )
    assert backfill_start(NOW - timedelta(days=40), minute, now, retention) == horizon + timedelta(
        seconds=45
    )


async def test_expired_rollup_buckets_are_deleted(pg_db: str) -> None:
    with psycopg.connect(pg_db, autocommit=True) as conn:
        for table, age in (
            ("rollup_samples_1m", timedelta(days=31)),
            ("rollup_samples_1m", timedelta(days=29)),
            ("rollup_samples_1h", timedelta(days=366)),
            ("rollup_samples_1h", timedelta(days=364)),
        ):
            conn.execute(
                f"INSERT INTO {table} (bucket, tenant_id, plugin_id, environment, sample_count)"  # noqa: S608
                " VALUES (%s, 'acme', 1, 'prod', 6)",
                (NOW - age,),
            )
    report = await _run(pg_db, PostgresMaintenance(clock=lambda: NOW), Retention())
    assert report.removed("rollup_samples_1m") == 1
    assert report.removed("rollup_samples_1h") == 1
    with psycopg.connect(pg_db) as conn:
        assert conn.execute("SELECT count(*) FROM rollup_samples_1m").fetchone() == (1,)
        assert conn.execute("SELECT count(*) FROM rollup_samples_1h").fetchone() == (1,)


def test_retention_settings_are_validated() -> None:
    assert Retention().samples == timedelta(days=90)
    assert Retention().operations == timedelta(days=30)
    assert Retention().rollup_1h == timedelta(days=365)
    assert Retention().audit == timedelta(days=730)
    assert Retention.from_days({"samples": 30}).samples == timedelta(days=30)
    with pytest.raises(ValueError, match=r"retention\.audit must be positive"):
        Retention(audit=timedelta(0))
    with pytest.raises(ValueError, match=r"retention\.rollup_1m must be at least 1 day"):
        Retention(rollup_1m=timedelta(hours=3))
    with pytest.raises(ValueError, match="unknown retention field"):
        Retention.from_days({"raw": 3})


def test_a_writer_without_rights_on_the_log_still_has_its_rows_logged(
    pg_db: str, pg_admin_url: str
) -> None:
    """sql/092's trigger runs as the schema owner: a role that may only insert samples (a
    daemon's own login, a tenant writer) logs what it wrote without any right on the log."""
    if is_citus(pg_db):
        pytest.skip(
            "on Citus: no rollup invalidation log (sql/092's statement trigger is refused on a"
            " distributed table); the Citus refresh re-reads its lookback"
            " (tests/test_citus.py::test_rollups_refresh_incrementally_and_match_a_group_by)"
        )
    role = f"pm_writer_{uuid.uuid4().hex[:8]}"
    password = secrets.token_urlsafe(16)
    with psycopg.connect(pg_db, autocommit=True) as conn:
        plugin = add_plugin(conn, "acme", "resizer")
        # BYPASSRLS: row-level security is not what this test is about.
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN BYPASSRLS PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(password)
            )
        )
        conn.execute(sql.SQL("GRANT INSERT ON plugin_samples TO {}").format(sql.Identifier(role)))
    parts = urlsplit(pg_db)
    host = parts.netloc.rpartition("@")[2]
    writer_url = urlunsplit(parts._replace(netloc=f"{role}:{quote(password, safe='')}@{host}"))
    try:
        at = NOW - timedelta(minutes=3)
        rows = samples_series(
            at, at + timedelta(seconds=30), timedelta(seconds=10), [("acme", plugin)]
        )
        with psycopg.connect(writer_url, autocommit=True) as writer:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                writer.execute("SELECT count(*) FROM rollup_invalidations")
            assert insert_samples(writer, rows) == 3
        with psycopg.connect(pg_db) as conn:
            logged = conn.execute(
                "SELECT rollup, lo, hi FROM rollup_invalidations ORDER BY rollup"
            ).fetchall()
        stamps = [row[0] for row in rows if isinstance(row[0], datetime)]
        assert len(stamps) == len(rows)
        assert logged == [
            ("rollup_samples_1h", min(stamps), max(stamps)),
            ("rollup_samples_1m", min(stamps), max(stamps)),
        ]
    finally:
        with psycopg.connect(pg_admin_url, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                (role,),
            )
        with psycopg.connect(pg_db, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
