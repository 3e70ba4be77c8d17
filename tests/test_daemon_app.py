"""The composition root's own behaviour on a real database: a dead writer stops the daemon,
samples of unknown plugins survive on disk, drop reasons, the shutdown deadline, the data_dir lock."""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from pluginmon.collectors.models import PluginKey, PluginSample, Snapshot
from pluginmon.daemon.app import RESOLVE_TIMEOUT_SECONDS, Daemon, ShutdownBudget, sample_row
from pluginmon.daemon.config import resolve
from pluginmon.daemon.settings import Settings
from pluginmon.daemon.spools import CountingSpool, DataDirLock, DataDirLockedError, UnresolvedSpool
from pluginmon.storage.pool import close_pool, open_pool
from pluginmon.storage.writer import PLUGIN_SAMPLES_COLUMNS, PLUGIN_SAMPLES_TABLE, BatchWriter

KEY = PluginKey("apptest", "worker", "test")


def snapshot() -> Snapshot:
    now = datetime.now(UTC)
    sample = PluginSample(
        key=KEY,
        timestamp=now,
        up=True,
        process_count=1,
        cpu_percent=-0.0,
        rss_bytes=10,
        vms_bytes=20,
        threads=1,
        restarts=-1,
    )
    return Snapshot(timestamp=now, host="h", samples=(sample,), duration_seconds=0.01)


def test_sample_row_matches_the_writer_columns() -> None:
    row = sample_row(snapshot().samples[0], 7, "h")
    assert len(row) == len(PLUGIN_SAMPLES_COLUMNS)
    named = dict(zip(PLUGIN_SAMPLES_COLUMNS, row, strict=True))
    assert named["plugin_id"] == 7
    assert named["tenant_id"] == "apptest"
    assert named["environment"] == "test"
    assert named["restarts"] == 0  # never negative (CHECK restarts >= 0)
    assert named["cpu_percent"] == 0.0


async def test_dead_writer_stops_the_daemon(migrated_db: str) -> None:
    daemon = Daemon(resolve(Settings()), version="test", registry=CollectorRegistry())
    stop = asyncio.Event()
    daemon._stop = stop
    pool = await open_pool(migrated_db, min_size=0)
    try:
        writer = BatchWriter(pool, table=PLUGIN_SAMPLES_TABLE, columns=PLUGIN_SAMPLES_COLUMNS)
        await writer.close()  # closed before use: put() raises WriterClosedError
        daemon.pool = pool
        daemon.schema_ready = True
        daemon.writer = writer
        await daemon._write(snapshot())  # resolves the plugin id for real, then put()
        assert KEY in daemon._plugin_ids
        assert stop.is_set()
        assert daemon._failure is not None
    finally:
        await close_pool(pool)


UNREACHABLE = "postgresql://pluginmon:x@127.0.0.1:1/pluginmon?connect_timeout=2"


def snapshot_at(offset_seconds: float, key: PluginKey = KEY) -> Snapshot:
    at = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=offset_seconds)
    sample = PluginSample(
        key=key,
        timestamp=at,
        up=True,
        process_count=1,
        cpu_percent=1.0,
        rss_bytes=10,
        vms_bytes=20,
        threads=1,
    )
    return Snapshot(timestamp=at, host="h", samples=(sample,), duration_seconds=0.01)


def make_daemon(data_dir: Path) -> Daemon:
    settings = Settings(data_dir=data_dir, sample_interval_seconds=1)
    return Daemon(resolve(settings), version="test", registry=CollectorRegistry())


async def test_samples_of_unknown_plugins_are_on_disk_and_replay_in_order(
    migrated_db: str, tmp_path: Path
) -> None:
    """A plugin first seen while the database is away: its samples are fsync'ed to the
    unresolved spool (not memory), survive the process, and replay oldest first, before the
    plugin's newer samples, once the id resolves."""
    first = make_daemon(tmp_path)
    pool = await open_pool(UNREACHABLE, min_size=0)
    unresolved = UnresolvedSpool(tmp_path / "spool-unresolved", max_bytes=1 << 20)
    try:
        first.pool, first.unresolved, first.schema_ready = pool, unresolved, True
        await first._write(snapshot_at(0))
        await first._write(snapshot_at(1))
        assert unresolved.rows == 2
        assert unresolved.keys == {KEY}
        assert KEY not in first._plugin_ids
    finally:
        unresolved.close()  # as a crash would leave it: nothing else kept anywhere
        await close_pool(pool)

    second = make_daemon(tmp_path)
    pool = await open_pool(migrated_db, min_size=0)
    unresolved = UnresolvedSpool(tmp_path / "spool-unresolved", max_bytes=1 << 20)
    assert unresolved.keys == {KEY}  # rebuilt from disk
    try:
        async with BatchWriter(
            pool, table=PLUGIN_SAMPLES_TABLE, columns=PLUGIN_SAMPLES_COLUMNS
        ) as writer:
            second.pool, second.writer, second.schema_ready = pool, writer, True
            second.unresolved = unresolved
            await second._write(snapshot_at(2))
            await writer.flush()
        assert unresolved.rows == 0
        assert unresolved.keys == set()
        async with pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT s.timestamp, p.name FROM plugin_samples s "
                "JOIN plugins p ON p.id = s.plugin_id ORDER BY s.ctid"
            )
    finally:
        unresolved.close()
        await close_pool(pool)
    base = datetime(2026, 1, 1, tzinfo=UTC)
    assert [r["timestamp"] for r in rows] == [base + timedelta(seconds=i) for i in range(3)]
    assert {r["name"] for r in rows} == {"worker"}


async def test_newer_samples_wait_behind_spooled_ones(migrated_db: str, tmp_path: Path) -> None:
    """While a plugin has samples in the unresolved spool, its new samples join them even if
    its id is known, so the writer sees them in time order."""
    daemon = make_daemon(tmp_path)
    unresolved = UnresolvedSpool(tmp_path / "spool-unresolved", max_bytes=1 << 20)
    pool = await open_pool(migrated_db, min_size=0)
    try:
        daemon.pool, daemon.unresolved = pool, unresolved
        # Schema "not ready": ids are not looked up, the sample is spooled.
        await daemon._write(snapshot_at(0))
        assert unresolved.rows == 1
        daemon._plugin_ids[KEY] = 1  # known now, but an older sample is still on disk
        daemon.schema_ready = False  # so the drain cannot run yet
        await daemon._write(snapshot_at(1))
        assert unresolved.rows == 2
    finally:
        unresolved.close()
        await close_pool(pool)


async def test_drop_reasons_are_told_apart(tmp_path: Path) -> None:
    """A spool at its cap while the database is away: counted as spool_full, not buffer_full."""
    daemon = make_daemon(tmp_path)
    spool = CountingSpool(tmp_path / "spool", max_bytes=64)
    pool = await open_pool(UNREACHABLE, min_size=0)
    try:
        async with BatchWriter(
            pool,
            table=PLUGIN_SAMPLES_TABLE,
            columns=PLUGIN_SAMPLES_COLUMNS,
            spool=spool,
            close_timeout_seconds=2,
        ) as writer:
            daemon.writer, daemon.spool = writer, spool
            writer.put([sample_row(snapshot_at(i).samples[0], 1, "h") for i in range(3)])
            await asyncio.wait_for(writer.flush(), 30)
            daemon.refresh_stats()
    finally:
        spool.close()
        await close_pool(pool)

    def dropped(reason: str) -> float | None:
        return daemon.registry.get_sample_value(
            "pluginmon_dropped_samples_total", {"reason": reason}
        )

    assert dropped("spool_full") == 3
    assert dropped("buffer_full") == 0
    assert dropped("spool_io_error") == 0
    assert dropped("spool_codec_error") == 0
    assert dropped("spool_discarded") == 0
    assert dropped("rejected_by_database") == 0


def test_shutdown_stages_share_one_deadline() -> None:
    """Every stage takes its share of what is left, so even when each one runs out its
    whole share the stages together stay within the deadline."""
    now = [100.0]
    budget = ShutdownBudget(10.0, clock=lambda: now[0])
    assert budget.remaining() == 10.0  # not started: the whole deadline
    budget.start()
    spent = 0.0
    # (fraction, reserve) of: job drain, final outbox delivery, writer flush, writer close
    # (its fixed timeout is a quarter), pool close (everything but the HTTP stop's 5%).
    for fraction, reserve in [(0.2, 0.7), (0.15, 0.55), (1.0, 0.35), (0.25, 0.0), (1.0, 0.05)]:
        share = budget.share(fraction, reserve=reserve)
        assert share >= 0
        now[0] += share  # the stage times out
        spent += share
    spent += 0.05 * 10.0  # HTTP server stop
    assert spent <= 10.0 + 1e-9
    assert budget.remaining() >= 0.0
    budget.start()  # a second signal does not move the deadline
    assert budget.remaining() == pytest.approx(10.0 - (spent - 0.5))


def test_data_dir_lock_is_exclusive(tmp_path: Path) -> None:
    first = DataDirLock(tmp_path)
    first.acquire()
    try:
        with pytest.raises(
            DataDirLockedError, match=rf"in use by another pluginmon \(pid {os.getpid()}\)"
        ):
            DataDirLock(tmp_path).acquire()
    finally:
        first.release()
    again = DataDirLock(tmp_path)
    again.acquire()  # released: free again
    again.release()


async def test_id_lookup_against_a_silent_database_is_bounded(tmp_path: Path) -> None:
    """A server that accepts connections and never answers (a hung database): the id lookup
    gives up after RESOLVE_TIMEOUT_SECONDS, the samples go to disk, and the next tick does
    not wait again (it spools at once until RESOLVE_RETRY_SECONDS have passed)."""
    accepted: list[asyncio.StreamWriter] = []

    async def hold(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # say nothing, close nothing

    silent = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    daemon = make_daemon(tmp_path)
    pool = await open_pool(f"postgresql://pluginmon:x@127.0.0.1:{port}/pluginmon", min_size=0)
    unresolved = UnresolvedSpool(tmp_path / "spool-unresolved", max_bytes=1 << 20)
    try:
        daemon.pool, daemon.unresolved, daemon.schema_ready = pool, unresolved, True
        # Without the bound this waits for asyncpg's 60 s connect timeout.
        await asyncio.wait_for(daemon._write(snapshot_at(0)), RESOLVE_TIMEOUT_SECONDS + 20)
        assert unresolved.rows == 1
        assert accepted  # it really did try the silent server
        tries = len(accepted)
        await asyncio.wait_for(daemon._write(snapshot_at(1)), 20)
        assert unresolved.rows == 2
        assert len(accepted) == tries  # backed off: no second connection attempt
    finally:
        unresolved.close()
        pool.terminate()
        for writer in accepted:
            writer.close()
        silent.close()
        await silent.wait_closed()
