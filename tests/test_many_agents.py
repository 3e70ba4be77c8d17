"""Many agents on one database: migrations and maintenance under their advisory locks with 20
agents starting at once, rollups refreshed while agents write, one id per plugin whichever
agent asks first, and six real `pluginmon run` processes sharing one database."""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from pluginmon.collectors.models import PluginKey, PluginSample, Snapshot
from pluginmon.storage.backend import (
    MaintenanceReport,
    Retention,
    admin_connection,
    bucket_floor,
)
from pluginmon.storage.engines import PreparedDatabase, prepare_database
from pluginmon.storage.ingest import SampleSink, SampleSpool, UnresolvedSpool
from pluginmon.storage.migrate import Backend
from pluginmon.storage.partitions import ROLLUPS, PostgresMaintenance, refresh_rollup
from pluginmon.storage.reachability import DatabaseWatch
from pluginmon.storage.writer import PLUGIN_SAMPLES_COLUMNS, PLUGIN_SAMPLES_TABLE, BatchWriter
from tests.daemon_helpers import DaemonProcess, PluginProcesses, wait_for
from tests.dbutil import create_database, drop_database, is_citus, with_database
from tests.schema_helpers import (
    SAMPLE_COLUMNS,
    add_plugin,
    assert_rollups_equal,
    backend_of,
    database_for_backend,
    group_by_rollup,
    partitioned_backend,
    rollup_rows,
    sample_row,
)

AGENTS_AT_ONCE = 20
DAEMONS = 6  # real `pluginmon run` processes: what a loaded 2-core test machine holds well


@pytest.fixture
def empty_db(pg_admin_url: str) -> Iterator[str]:
    name = create_database(pg_admin_url, prefix="agents")
    try:
        yield with_database(pg_admin_url, name)
    finally:
        drop_database(pg_admin_url, name)


@pytest.fixture
def pg_db(pg_admin_url: str) -> Iterator[str]:
    with database_for_backend(pg_admin_url, partitioned_backend(pg_admin_url)) as url:
        yield url


def partitions(url: str, parent: str) -> list[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT partition::text FROM pluginmon_partitions(%s::regclass)", (parent,)
        ).fetchall()
    return [str(r[0]) for r in rows]


def day_partitions(url: str, parent: str) -> list[tuple[datetime, datetime]]:
    """(lower, upper) of every bounded partition, in order (the default one has none)."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT lower_bound, upper_bound FROM pluginmon_partitions(%s::regclass)"
            " WHERE lower_bound IS NOT NULL ORDER BY lower_bound",
            (parent,),
        ).fetchall()
    return [(r[0], r[1]) for r in rows]


def assert_contiguous_days(days: list[tuple[datetime, datetime]]) -> None:
    assert days
    assert all(hi - lo == timedelta(days=1) for lo, hi in days)
    assert all(a[1] == b[0] for a, b in pairwise(days))


def test_twenty_agents_starting_at_once_migrate_and_maintain_the_database_once(
    empty_db: str,
) -> None:
    # Migrations: each agent's start-up migrates; the advisory lock lets one apply them.
    backend = partitioned_backend(empty_db)
    barrier = threading.Barrier(AGENTS_AT_ONCE)
    prepared: list[PreparedDatabase] = []
    errors: list[BaseException] = []

    def start_agent() -> None:
        barrier.wait()
        try:
            prepared.append(prepare_database(empty_db, Retention(), backend=backend))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start_agent) for _ in range(AGENTS_AT_ONCE)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    applied = sorted(len(p.migrations.applied) for p in prepared)
    assert applied[:-1] == [0] * (AGENTS_AT_ONCE - 1)
    assert applied[-1] > 0

    before = set(partitions(empty_db, "plugin_samples"))
    now = datetime.now(UTC)

    async def maintain_at_once() -> list[MaintenanceReport]:
        go = asyncio.Event()

        async def one() -> MaintenanceReport:
            async with admin_connection(empty_db) as conn:
                await go.wait()
                return await PostgresMaintenance(clock=lambda: now).run(conn, Retention())

        tasks = [asyncio.create_task(one()) for _ in range(AGENTS_AT_ONCE)]
        await asyncio.sleep(0.5)  # every connection open, then all start together
        go.set()
        return await asyncio.gather(*tasks)

    reports = asyncio.run(maintain_at_once())
    assert [r.failed_steps for r in reports] == [()] * AGENTS_AT_ONCE
    assert any(r.ran for r in reports)
    created = [name for r in reports for name in r.partitions_created]
    assert len(created) == len(set(created))  # no partition created twice
    names = partitions(empty_db, "plugin_samples")
    assert len(names) == len(set(names))
    assert {n for n in names if n not in before} <= set(created)
    days = day_partitions(empty_db, "plugin_samples")
    assert_contiguous_days(days)
    assert any(lo <= now < hi for lo, hi in days)
    assert days[-1][1] - now >= timedelta(days=6)


async def test_rollups_refreshed_while_agents_write_equal_a_group_by(pg_db: str) -> None:
    start = datetime(2026, 3, 20, 10, 0, tzinfo=UTC)
    agents, per_agent, step, steps = 6, 4, timedelta(seconds=15), 4 * 65  # 65 minutes
    with psycopg.connect(pg_db, autocommit=True) as conn:
        plugins = [
            [("acme", add_plugin(conn, "acme", f"a{a}-p{p}")) for p in range(per_agent)]
            for a in range(agents)
        ]
    # Simulated time: the agents' newest row, as a daemon's clock runs just ahead of its
    # samples. Maintenance refreshes with it while the rows keep coming.
    clock = {"now": start}
    retention = Retention(samples=timedelta(days=3650))
    stop = asyncio.Event()
    refreshes = 0

    # Real agents' clocks and commits stay within seconds of each other; these race through
    # simulated time on one event loop and could drift apart without bound on a loaded
    # machine. An agent waits while it is more than two simulated minutes ahead of the
    # slowest: rows up to that late, well within the 1-minute rollup's lookback (10 min).
    done = [0] * agents
    progress = asyncio.Condition()
    max_ahead = 8  # steps
    # Nor may the agents outrun maintenance: a run takes milliseconds on one server but
    # seconds on a Citus cluster (its first creates the partitions), where the agents had
    # written everything before the first refresh. Every 20 steps (5 simulated minutes) an
    # agent waits for one more maintenance run to have finished; runs still overlap writes.
    per_run = 20  # steps
    runs = 0

    async def agent(index: int, conn: asyncpg.Connection) -> None:
        rng = random.Random(index)
        for k in range(steps):
            async with progress:
                while k - min(done) > max_ahead or k // per_run > runs:
                    await progress.wait()
            at = start + step * k + timedelta(seconds=rng.uniform(0, 5))
            rows = [sample_row(at, tenant, pid, rng) for tenant, pid in plugins[index]]
            await conn.copy_records_to_table(
                "plugin_samples", records=rows, columns=list(SAMPLE_COLUMNS)
            )
            clock["now"] = max(clock["now"], at + timedelta(seconds=5))
            async with progress:
                done[index] = k + 1
                progress.notify_all()

    async def maintenance() -> None:
        nonlocal refreshes, runs
        async with admin_connection(pg_db) as conn:
            while not stop.is_set():
                report = await PostgresMaintenance(clock=lambda: clock["now"]).run(conn, retention)
                assert report.failed_steps == ()
                refreshes += sum(1 for r in report.rollups if r.buckets)
                async with progress:
                    runs += 1
                    progress.notify_all()

    connections = [await asyncpg.connect(pg_db) for _ in range(agents)]
    try:
        maintaining = asyncio.create_task(maintenance())
        await asyncio.gather(*(agent(i, c) for i, c in enumerate(connections)))
        stop.set()
        await maintaining
    finally:
        for conn in connections:
            await conn.close()
    assert refreshes >= 5  # rollups really were refreshed while rows arrived
    # The daemon's job goes on once a minute for one lookback more: every row up to a
    # lookback late is folded in by then (sql/061: one bucket back each minute, the whole
    # lookback once a lookback passed).
    spec_1m, spec_1h = ROLLUPS
    end = start + step * steps + timedelta(minutes=1)
    async with admin_connection(pg_db) as admin:
        for minute in range(int(spec_1m.lookback / timedelta(minutes=1)) + 2):
            clock["now"] = end + timedelta(minutes=minute)
            report = await PostgresMaintenance(clock=lambda: clock["now"]).run(admin, retention)
            assert report.ran
            assert report.failed_steps == ()
    end = clock["now"]
    with psycopg.connect(pg_db) as conn:
        assert conn.execute("SELECT count(*) FROM plugin_samples").fetchone() == (
            agents * per_agent * steps,
        )
        for view, width, spec in (
            ("plugin_samples_1m", "1 minute", spec_1m),
            ("plugin_samples_1h", "1 hour", spec_1h),
        ):
            complete = bucket_floor(end, spec.width)  # the refresh stops at complete buckets
            got = {k: v for k, v in rollup_rows(conn, view).items() if k[0] < complete}
            want = {k: v for k, v in group_by_rollup(conn, width).items() if k[0] < complete}
            assert len(want) >= agents * per_agent
            assert_rollups_equal(got, want)


def snapshot_of(keys: list[PluginKey], host: str, at: datetime) -> Snapshot:
    samples = tuple(
        PluginSample(
            key=k,
            timestamp=at,
            up=True,
            process_count=1,
            cpu_percent=1.5,
            rss_bytes=10 << 20,
            vms_bytes=20 << 20,
            threads=2,
        )
        for k in keys
    )
    return Snapshot(timestamp=at, host=host, samples=samples, duration_seconds=0.01)


async def test_agents_asking_at_once_get_one_id_per_plugin(
    migrated_db: str, tmp_path: Path
) -> None:
    shared = [PluginKey(f"t{i % 3}", f"shared-{i:02d}", "production") for i in range(40)]
    agents = 8

    async def agent(index: int) -> tuple[dict[PluginKey, int], int]:
        own = [PluginKey("t0", f"own-{index}-{j}", "production") for j in range(5)]
        keys = shared + own
        random.Random(index).shuffle(keys)  # each agent meets the plugins in its own order
        async with asyncpg.create_pool(migrated_db, min_size=0, max_size=2) as pool:
            spool = SampleSpool(tmp_path / f"spool-{index}", max_bytes=1 << 24)
            unresolved = UnresolvedSpool(tmp_path / f"unresolved-{index}", max_bytes=1 << 24)
            try:
                async with BatchWriter(
                    pool, table=PLUGIN_SAMPLES_TABLE, columns=PLUGIN_SAMPLES_COLUMNS, spool=spool
                ) as writer:
                    database = DatabaseWatch(pool, writer=writer)
                    database.mark_schema_ready()
                    sink = SampleSink(
                        pool=pool,
                        writer=writer,
                        unresolved=unresolved,
                        database=database,
                        replay_seconds=1.0,
                    )
                    await sink.put(snapshot_of(keys, f"agent-{index}", datetime.now(UTC)))
                    await sink.flush(timeout_seconds=30)
                    return dict(sink.plugin_ids), unresolved.rows
            finally:
                unresolved.close()
                spool.close()

    results = await asyncio.gather(*(agent(i) for i in range(agents)))
    assert [left for _, left in results] == [0] * agents  # every id resolved at once
    for key in shared:
        assert len({ids[key] for ids, _ in results}) == 1, key
    conn = await asyncpg.connect(migrated_db)
    try:
        plugins = await conn.fetch(
            "SELECT tenant_id, name, count(*) AS n FROM plugins GROUP BY 1, 2"
        )
        rows = await conn.fetch(
            "SELECT p.name, count(DISTINCT s.host) AS hosts, count(DISTINCT s.plugin_id) AS ids"
            "  FROM plugin_samples s"
            "  JOIN plugins p ON p.tenant_id = s.tenant_id AND p.id = s.plugin_id"
            " WHERE p.name LIKE 'shared-%' GROUP BY 1"
        )
    finally:
        await conn.close()
    assert {r["n"] for r in plugins} == {1}
    assert len(plugins) == len(shared) + 5 * agents
    assert sorted((r["hosts"], r["ids"]) for r in rows) == [(agents, 1)] * len(shared)


def test_several_real_daemons_share_one_database(empty_db: str, tmp_path: Path) -> None:
    """Six `pluginmon run` processes start at once on one empty database: one migrates,
    maintenance runs every second under its lock, each plugin has one id whichever daemon
    saw it first, and every daemon's rows and health arrive, with no error anywhere."""
    processes = PluginProcesses()
    try:
        processes.start("shared", "import time; time.sleep(3600)")
        for i in range(DAEMONS):
            processes.start(f"own{i}", "import time; time.sleep(3600)")
        daemons = []
        for i in range(DAEMONS):
            config = "".join(
                f"""
[[plugins]]
tenant = "fleet"
name = "{name}"
environment = "test"
match = {{ cmdline = "{processes.marker}-{name}$" }}
"""
                for name in ("shared", f"own{i}")
            )
            daemon_dir = tmp_path / f"d{i}"
            daemon_dir.mkdir()
            daemons.append(
                DaemonProcess(
                    tmp_path=daemon_dir,
                    database_url=empty_db,
                    config_text=config,
                    interval=0.5,
                    name=f"agent{i}",
                    extra_env={
                        "PLUGINMON_HOST": f"agent-{i}",
                        "PLUGINMON_MAINTENANCE_INTERVAL_SECONDS": "1",
                        "PLUGINMON_HEALTH_WRITE_INTERVAL_SECONDS": "2",
                    },
                )
            )
        for daemon in daemons:  # all at once: migration and maintenance contend
            daemon.start()
        try:
            for daemon in daemons:
                daemon.wait_ready(timeout=120)

            def every_host_written() -> list[Any] | None:
                with psycopg.connect(empty_db) as conn:
                    rows = conn.execute(
                        "SELECT p.name, s.host, count(*), count(DISTINCT s.plugin_id)"
                        "  FROM plugin_samples s"
                        "  JOIN plugins p ON p.tenant_id = s.tenant_id AND p.id = s.plugin_id"
                        " GROUP BY 1, 2"
                    ).fetchall()
                    health = conn.execute(
                        "SELECT count(DISTINCT plugin_id) FROM plugin_metrics"
                        " WHERE metric_name = 'health_score'"
                    ).fetchone()
                pairs = {(r[0], r[1]) for r in rows if r[2] >= 4}
                wanted = {("shared", f"agent-{i}") for i in range(DAEMONS)}
                wanted |= {(f"own{i}", f"agent-{i}") for i in range(DAEMONS)}
                if wanted <= pairs and health == (DAEMONS + 1,):
                    return rows
                return None

            rows = wait_for("rows and health of every daemon", every_host_written, timeout=90)
            assert all(r[3] == 1 for r in rows)  # one plugin id per plugin and host
            # Let maintenance contend a few more rounds, then look for trouble.
            wait_for(
                "maintenance rounds",
                lambda: all(
                    (
                        d.metric("pluginmon_job_last_success_timestamp_seconds", task="maintenance")
                        or 0
                    )
                    > 0
                    for d in daemons
                ),
                timeout=60,
            )
            for daemon in daemons:
                daemon.assert_alive()
                failures = {
                    labels: value
                    for (name, labels), value in daemon.metrics().items()
                    if name == "pluginmon_job_failures_total" and value
                }
                assert failures == {}, daemon.log_text()[-3000:]
        finally:
            for daemon in daemons:
                daemon.signal(15)
            codes = [daemon.wait_exit(timeout=60) for daemon in daemons]
    finally:
        processes.stop()
    assert codes == [0] * DAEMONS
    for daemon in daemons:
        bad = [r for r in daemon.log_records() if r.get("level") in ("ERROR", "CRITICAL")]
        assert bad == [], bad[:3]
    with psycopg.connect(empty_db) as conn:
        plugins = conn.execute(
            "SELECT name, count(*) FROM plugins WHERE tenant_id = 'fleet' GROUP BY 1"
        ).fetchall()
        applied = conn.execute(
            "SELECT count(*), count(DISTINCT version) FROM schema_migrations"
        ).fetchone()
        shared_ids = conn.execute(
            "SELECT count(DISTINCT s.plugin_id), count(DISTINCT s.host) FROM plugin_samples s"
            " JOIN plugins p ON p.tenant_id = s.tenant_id AND p.id = s.plugin_id"
            " WHERE p.name = 'shared'"
        ).fetchone()
    assert sorted(plugins) == sorted([("shared", 1)] + [(f"own{i}", 1) for i in range(DAEMONS)])
    assert applied is not None
    assert applied[0] == applied[1]  # each migration applied once
    assert shared_ids == (1, DAEMONS)
    with psycopg.connect(empty_db) as conn:
        backend = backend_of(conn)
        hypertables = (
            {
                str(r[0])
                for r in conn.execute(
                    "SELECT hypertable_name FROM timescaledb_information.hypertables"
                ).fetchall()
            }
            if backend is Backend.TIMESCALEDB
            else set()
        )
    if backend is Backend.TIMESCALEDB:
        # The daemons chose TimescaleDB (the test database offers it): chunks are its own.
        assert {"plugin_samples", "plugin_metrics"} <= hypertables
        return
    for parent in ("plugin_samples", "plugin_metrics"):
        names = partitions(empty_db, parent)
        assert len(names) == len(set(names))
        days = day_partitions(empty_db, parent)
        assert_contiguous_days(days)
        assert len(days) >= 7, parent


async def test_the_one_minute_refresh_reads_new_buckets_and_the_ones_late_rows_touched(
    pg_db: str,
) -> None:
    """A refresh recomputes the buckets completed since the watermark and those that rows
    written since the last refresh fell into (sql/092's log), up to the lookback behind the
    watermark: a row up to the lookback late is folded in at the next refresh, and each
    minute reads one bucket of raw rows when nothing is late."""
    if is_citus(pg_db):
        pytest.skip(
            "on Citus: no rollup invalidation log (sql/092's statement trigger is refused on a"
            " distributed table); the Citus refresh re-reads its lookback (sql/101)"
        )
    start = datetime(2026, 3, 20, 10, 0, tzinfo=UTC)
    spec_1m = ROLLUPS[0]
    assert spec_1m.lookback == timedelta(minutes=10)
    rng = random.Random(5)
    with psycopg.connect(pg_db, autocommit=True) as conn:
        plugin = ("acme", add_plugin(conn, "acme", "late"))
        conn.cursor().executemany(
            f"INSERT INTO plugin_samples ({', '.join(SAMPLE_COLUMNS)}) VALUES "  # noqa: S608
            f"({', '.join(['%s'] * len(SAMPLE_COLUMNS))})",
            [sample_row(start + timedelta(seconds=10 * k), *plugin, rng) for k in range(6 * 30)],
        )

    def late_row(minutes_behind: int, at: datetime) -> None:
        with psycopg.connect(pg_db, autocommit=True) as conn:
            conn.execute(
                f"INSERT INTO plugin_samples ({', '.join(SAMPLE_COLUMNS)}) VALUES "  # noqa: S608
                f"({', '.join(['%s'] * len(SAMPLE_COLUMNS))})",
                sample_row(at - timedelta(minutes=minutes_behind), *plugin, rng),
            )

    def rollups_before(
        cut: datetime,
    ) -> tuple[dict[tuple[Any, ...], tuple[Any, ...]], dict[tuple[Any, ...], tuple[Any, ...]]]:
        """(the rollup's buckets before ``cut``, a GROUP BY's)."""
        with psycopg.connect(pg_db) as conn:
            got = {k: v for k, v in rollup_rows(conn, "plugin_samples_1m").items() if k[0] < cut}
            want = {k: v for k, v in group_by_rollup(conn, "1 minute").items() if k[0] < cut}
        return got, want

    late_bucket = start + timedelta(minutes=28)
    windows: list[tuple[datetime, datetime]] = []
    async with admin_connection(pg_db) as admin:
        at = start + timedelta(minutes=30, seconds=5)
        first = await refresh_rollup(admin, spec_1m, at)  # the first: from the oldest row
        assert first.window_start is not None
        assert first.window_end is not None
        windows.append((first.window_start, first.window_end))
        for minute in range(1, 13):
            at = start + timedelta(minutes=30 + minute, seconds=5)
            if minute == 3:
                late_row(5, at)  # 5 minutes late: inside the lookback
            if minute == 5:
                late_row(15, at)  # 15 minutes late: past the lookback, left to a back-fill
            part = await refresh_rollup(admin, spec_1m, at)
            assert part.window_start is not None
            assert part.window_end is not None
            windows.append((part.window_start, part.window_end))
            if minute == 3:
                got, want = rollups_before(at)
                (late,) = [k for k in want if k[0] == late_bucket]
                assert got[late] == want[late]  # the late row: folded in at once
    starts = [w[0] for w in windows]
    ends = [w[1] for w in windows]
    assert starts[0] == start
    # one new bucket each minute; at the third, from the late row's bucket
    expected = [end - timedelta(minutes=1) for end in ends[1:]]
    expected[2] = late_bucket
    assert starts[1:] == expected
    got, want = rollups_before(ends[-1])
    too_late = {k for k in want if k[0] == start + timedelta(minutes=20)}
    assert len(too_late) == 1
    assert all(got[k][0] == want[k][0] - 1 for k in too_late)  # not folded in
    assert_rollups_equal(
        {k: v for k, v in got.items() if k not in too_late},
        {k: v for k, v in want.items() if k not in too_late},
    )  # the 5-minute-late row too
