"""The sample sink on a real database: rows by column name, samples of unknown plugins on
disk and replayed in order, bounded id lookups, and drops counted by reason where they happen."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import psycopg
from prometheus_client import CollectorRegistry

from pluginmon.collectors.models import SAMPLE_MEASUREMENTS, PluginKey, PluginSample, Snapshot
from pluginmon.storage.drops import DropReason
from pluginmon.storage.ingest import (
    RESOLVE_TIMEOUT_SECONDS,
    SampleSink,
    SampleSpool,
    UnresolvedSpool,
    row_key,
    sample_row,
    with_plugin_id,
)
from pluginmon.storage.pool import close_pool, open_pool
from pluginmon.storage.reachability import DatabaseWatch
from pluginmon.storage.spool import Spool
from pluginmon.storage.writer import PLUGIN_SAMPLES_COLUMNS, PLUGIN_SAMPLES_TABLE, BatchWriter

KEY = PluginKey("apptest", "worker", "test")
UNREACHABLE = "postgresql://pluginmon:x@127.0.0.1:1/pluginmon?connect_timeout=2"


def snapshot_at(offset_seconds: float, *keys: PluginKey) -> Snapshot:
    at = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=offset_seconds)
    samples = tuple(
        PluginSample(
            key=key,
            timestamp=at,
            up=True,
            process_count=1,
            cpu_percent=1.0,
            rss_bytes=10,
            vms_bytes=20,
            threads=1,
        )
        for key in keys or (KEY,)
    )
    return Snapshot(timestamp=at, host="h", samples=samples, duration_seconds=0.01)


def make_sink(
    pool: asyncpg.Pool, writer: BatchWriter, unresolved: UnresolvedSpool, *, schema_ready: bool
) -> SampleSink:
    database = DatabaseWatch(pool, writer=writer)
    if schema_ready:
        database.mark_schema_ready()
    return SampleSink(
        pool=pool, writer=writer, unresolved=unresolved, database=database, replay_seconds=5.0
    )


@asynccontextmanager
async def writer_on(pool: asyncpg.Pool, spool: Spool | None = None) -> AsyncIterator[BatchWriter]:
    async with BatchWriter(
        pool,
        table=PLUGIN_SAMPLES_TABLE,
        columns=PLUGIN_SAMPLES_COLUMNS,
        spool=spool,
        close_timeout_seconds=2,
    ) as writer:
        yield writer


def test_sample_row_puts_each_value_in_its_named_column() -> None:
    at = datetime(2026, 1, 1, tzinfo=UTC)
    sample = PluginSample(
        key=KEY,
        timestamp=at,
        up=True,
        process_count=1,
        cpu_percent=-0.0,
        rss_bytes=10,
        vms_bytes=20,
        threads=3,
        restarts=-1,
        uss_bytes=5,
        fds=7,
        read_bytes=11,
        ctx_switches_involuntary=13,
    )
    row = sample_row(sample, plugin=7, host="h")
    assert len(row) == len(PLUGIN_SAMPLES_COLUMNS)
    named = dict(zip(PLUGIN_SAMPLES_COLUMNS, row, strict=True))
    assert named["timestamp"] == at
    assert named["plugin_id"] == 7
    assert named["tenant_id"] == "apptest"
    assert named["environment"] == "test"
    assert named["host"] == "h"
    assert named["restarts"] == 0  # never negative (CHECK restarts >= 0)
    assert named["cpu_percent"] == 0.0
    # Every other measurement is the sample's attribute of the same name.
    for name in set(SAMPLE_MEASUREMENTS) - {"restarts", "cpu_percent"}:
        assert named[name] == getattr(sample, name), name
    # Unresolved: the plugin's name stands in for its id, and reads back as its key.
    waiting = sample_row(sample, plugin=KEY.plugin, host="h")
    assert row_key(waiting) == KEY
    assert with_plugin_id(waiting, 7) == row


async def test_samples_of_unknown_plugins_are_on_disk_and_replay_in_order(
    migrated_db: str, tmp_path: Path
) -> None:
    """A plugin first seen while the database is away: its samples are fsync'ed to the
    unresolved spool (not memory), survive the process, and replay oldest first, before the
    plugin's newer samples, once the id resolves."""
    pool = await open_pool(UNREACHABLE, min_size=0)
    unresolved = UnresolvedSpool(tmp_path / "spool-unresolved", max_bytes=1 << 20)
    try:
        async with writer_on(pool) as writer:
            first = make_sink(pool, writer, unresolved, schema_ready=True)
            await first.put(snapshot_at(0))
            await first.put(snapshot_at(1))
            assert unresolved.rows == 2
            assert unresolved.keys == {KEY}
            assert KEY not in first.plugin_ids
    finally:
        unresolved.close()  # as a crash would leave it: nothing else kept anywhere
        await close_pool(pool)

    pool = await open_pool(migrated_db, min_size=0)
    unresolved = UnresolvedSpool(tmp_path / "spool-unresolved", max_bytes=1 << 20)
    assert unresolved.keys == {KEY}  # rebuilt from disk
    try:
        async with writer_on(pool) as writer:
            second = make_sink(pool, writer, unresolved, schema_ready=True)
            await second.put(snapshot_at(2))
            await writer.flush()
        assert unresolved.rows == 0
        assert unresolved.keys == set()
        async with pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT s.timestamp, p.name FROM plugin_samples s "
                "JOIN plugins p ON p.tenant_id = s.tenant_id AND p.id = s.plugin_id "
                "ORDER BY s.ctid"
            )
    finally:
        unresolved.close()
        await close_pool(pool)
    base = datetime(2026, 1, 1, tzinfo=UTC)
    assert [r["timestamp"] for r in rows] == [base + timedelta(seconds=i) for i in range(3)]
    assert {r["name"] for r in rows} == {"worker"}


async def test_a_thousand_new_plugins_resolve_in_one_put(migrated_db: str, tmp_path: Path) -> None:
    """An agent's first snapshot of many plugins: every id is looked up (and created) in
    batches within the one put, so no sample waits in the unresolved spool; a plugin the
    schema refuses is dropped and counted, not retried."""
    keys = [PluginKey(f"t{i % 5}", f"p{i:04d}", "prod") for i in range(1500)]
    refused = PluginKey("Not A Slug", "x", "prod")
    pool = await open_pool(migrated_db, min_size=0)
    unresolved = UnresolvedSpool(tmp_path / "spool-unresolved", max_bytes=1 << 24)
    try:
        async with writer_on(pool) as writer:
            sink = make_sink(pool, writer, unresolved, schema_ready=True)
            await sink.put(snapshot_at(0, *keys, refused))
            await writer.flush()
            assert unresolved.rows == 0
            assert set(sink.plugin_ids) == set(keys)
            assert sink.dropped()[DropReason.INVALID_PLUGIN] == 1
        async with pool.acquire() as conn:
            stored = await conn.fetch(
                "SELECT p.tenant_id, p.name, p.id FROM plugin_samples s "
                "JOIN plugins p ON p.tenant_id = s.tenant_id AND p.id = s.plugin_id"
            )
    finally:
        unresolved.close()
        await close_pool(pool)
    assert len(stored) == 1500
    assert {PluginKey(r["tenant_id"], r["name"], "prod"): r["id"] for r in stored} == dict(
        sink.plugin_ids
    )


async def test_a_plugin_the_database_refuses_leaves_the_rest_of_its_chunk_resolved(
    migrated_db: str, tmp_path: Path
) -> None:
    """A name that passes the sink's own check but that the database refuses for good (a NUL
    byte: "invalid byte sequence", SQLSTATE 22021) is dropped and never asked again; the other
    plugins of its chunk resolve in the same put, and the database is not reported down."""
    keys = [PluginKey("tenul", f"p{i}", "prod") for i in range(20)]
    refused = [PluginKey("tenul", "nul\x00name", "prod"), PluginKey("tenul", "ok", "e\x00")]
    pool = await open_pool(migrated_db, min_size=0)
    unresolved = UnresolvedSpool(tmp_path / "spool-unresolved", max_bytes=1 << 24)
    try:
        async with writer_on(pool) as writer:
            sink = make_sink(pool, writer, unresolved, schema_ready=True)
            await sink.put(snapshot_at(0, *keys[:10], *refused, *keys[10:]))
            assert set(sink.plugin_ids) == set(keys)
            assert unresolved.rows == 0
            assert sink.dropped()[DropReason.INVALID_PLUGIN] == 2
            assert sink._database.up is not False
            # Never retried: the next snapshot drops them at once, without a lookup.
            await sink.put(snapshot_at(1, *refused, *keys))
            assert sink.dropped()[DropReason.INVALID_PLUGIN] == 4
            await writer.flush()
            assert sink.stats().rows_written == 40
        async with pool.acquire() as conn:
            names = await conn.fetch("SELECT name FROM plugins WHERE tenant_id = 'tenul'")
    finally:
        unresolved.close()
        await close_pool(pool)
    assert sorted(r["name"] for r in names) == sorted(k.plugin for k in keys)


async def test_newer_samples_wait_behind_spooled_ones(migrated_db: str, tmp_path: Path) -> None:
    """While a plugin has samples in the unresolved spool, its new samples join them even if
    its id is known, so the writer sees them in time order."""
    unresolved = UnresolvedSpool(tmp_path / "spool-unresolved", max_bytes=1 << 20)
    pool = await open_pool(migrated_db, min_size=0)
    try:
        async with writer_on(pool) as writer:
            # Schema "not ready": ids are not looked up, the sample is spooled, and the
            # replay cannot run yet.
            sink = make_sink(pool, writer, unresolved, schema_ready=False)
            await sink.put(snapshot_at(0))
            assert unresolved.rows == 1
            sink._plugin_ids[KEY] = 1  # known now, but an older sample is still on disk
            await sink.put(snapshot_at(1))
            assert unresolved.rows == 2
            assert writer.stats().rows_queued == 0
    finally:
        unresolved.close()
        await close_pool(pool)


async def test_drops_are_counted_by_reason_where_they_happen(
    migrated_db: str, tmp_path: Path
) -> None:
    """A spool at its cap while the database is away is spool_full (counted by the writer
    as it fails to spool), not buffer_full; a tenant the schema refuses is invalid_plugin
    (counted by the sink); both reach pluginmon_dropped_samples_total and the backlog of
    both spools is pluginmon_spool_samples."""
    registry = CollectorRegistry()
    spool = SampleSpool(tmp_path / "spool", max_bytes=64)
    unresolved = UnresolvedSpool(tmp_path / "spool-unresolved", max_bytes=1 << 20)
    pool = await open_pool(UNREACHABLE, min_size=0)
    try:
        async with writer_on(pool, spool) as writer:
            sink = make_sink(pool, writer, unresolved, schema_ready=True)
            registry.register(sink)
            writer.put(
                [sample_row(snapshot_at(i).samples[0], plugin=1, host="h") for i in range(3)]
            )
            await asyncio.wait_for(writer.flush(), 30)
            await sink.put(snapshot_at(0))  # no id: to the unresolved spool
    finally:
        spool.close()
        await close_pool(pool)

    def dropped(reason: str) -> float | None:
        return registry.get_sample_value("pluginmon_dropped_samples_total", {"reason": reason})

    assert dropped("spool_full") == 3
    assert dropped("buffer_full") == 0
    assert dropped("spool_io_error") == 0
    assert dropped("spool_codec_error") == 0
    assert dropped("spool_discarded") == 0
    assert dropped("rejected_by_database") == 0
    assert dropped("invalid_plugin") == 0
    assert registry.get_sample_value("pluginmon_spool_samples") == 1

    bad = PluginKey("Not A Slug!", "worker", "test")
    pool = await open_pool(migrated_db, min_size=0)
    try:
        async with writer_on(pool) as writer:
            sink = make_sink(pool, writer, unresolved, schema_ready=True)
            await sink.put(snapshot_at(1, bad, KEY))
            await sink.put(snapshot_at(2, bad))
            await writer.flush()
            assert sink.dropped()[DropReason.INVALID_PLUGIN] == 2
            assert bad not in sink.plugin_ids
            assert sink.stats().rows_written == 2  # KEY's spooled sample, then its new one
            assert sink.stats().rows_dropped == 2
    finally:
        unresolved.close()
        await close_pool(pool)


async def test_id_lookup_against_a_silent_database_is_bounded(tmp_path: Path) -> None:
    """A server that accepts connections and never answers (a hung database): the id lookup
    gives up after RESOLVE_TIMEOUT_SECONDS, the samples go to disk, and the next put does
    not wait again (it spools at once until RESOLVE_RETRY_SECONDS have passed)."""
    accepted: list[asyncio.StreamWriter] = []

    async def hold(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # say nothing, close nothing

    silent = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    pool = await open_pool(f"postgresql://pluginmon:x@127.0.0.1:{port}/pluginmon", min_size=0)
    unresolved = UnresolvedSpool(tmp_path / "spool-unresolved", max_bytes=1 << 20)
    writer = BatchWriter(pool, table=PLUGIN_SAMPLES_TABLE, columns=PLUGIN_SAMPLES_COLUMNS)
    try:
        sink = make_sink(pool, writer, unresolved, schema_ready=True)
        # Without the bound this waits for asyncpg's 60 s connect timeout.
        await asyncio.wait_for(sink.put(snapshot_at(0)), RESOLVE_TIMEOUT_SECONDS + 20)
        assert unresolved.rows == 1
        assert accepted  # it really did try the silent server
        tries = len(accepted)
        await asyncio.wait_for(sink.put(snapshot_at(1)), 20)
        assert unresolved.rows == 2
        assert len(accepted) == tries  # backed off: no second connection attempt
    finally:
        unresolved.close()
        pool.terminate()
        for stream in accepted:
            stream.close()
        silent.close()
        await silent.wait_closed()


async def test_unresolved_samples_replayed_twice_are_stored_once(
    migrated_db: str, tmp_path: Path
) -> None:
    """A crash after the unresolved spool's batches went to the writer and before they were
    acked replays them again: each keeps its id into the writer, so the ledger skips them."""
    pool = await open_pool(UNREACHABLE, min_size=0)
    unresolved_dir = tmp_path / "spool-unresolved"
    unresolved = UnresolvedSpool(unresolved_dir, max_bytes=1 << 20)
    try:
        async with writer_on(pool) as writer:
            sink = make_sink(pool, writer, unresolved, schema_ready=True)
            await sink.put(snapshot_at(0))
            await sink.put(snapshot_at(1))
    finally:
        unresolved.close()
        await close_pool(pool)
    before_ack = tmp_path / "before-ack"
    shutil.copytree(unresolved_dir, before_ack)

    async def run(offset_seconds: float) -> tuple[int, int]:
        pool = await open_pool(migrated_db, min_size=0)
        unresolved = UnresolvedSpool(unresolved_dir, max_bytes=1 << 20)
        try:
            with SampleSpool(tmp_path / "spool", max_bytes=1 << 20) as spool:
                async with writer_on(pool, spool) as writer:
                    sink = make_sink(pool, writer, unresolved, schema_ready=True)
                    await sink.put(snapshot_at(offset_seconds))
                    await writer.flush()
                    stats = writer.stats()
            assert unresolved.rows == 0
        finally:
            unresolved.close()
            await close_pool(pool)
        return stats.rows_written, stats.rows_deduplicated

    assert await run(2) == (3, 0)
    # As if the process had died before the acks: the unresolved spool as it was.
    shutil.rmtree(unresolved_dir)
    shutil.copytree(before_ack, unresolved_dir)
    assert await run(3) == (1, 2)
    with psycopg.connect(migrated_db) as conn:
        stored = conn.execute(
            "SELECT s.timestamp, count(*) FROM plugin_samples s GROUP BY s.timestamp ORDER BY 1"
        ).fetchall()
    base = datetime(2026, 1, 1, tzinfo=UTC)
    assert stored == [(base + timedelta(seconds=i), 1) for i in range(4)]
