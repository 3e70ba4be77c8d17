"""BatchWriter against a real, migrated PostgreSQL: round trips, shutdown, rejected rows."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest

from pluginmon.storage.pool import close_pool, open_pool, pool_context, redact_url
from pluginmon.storage.spool import Spool
from pluginmon.storage.writer import (
    PLUGIN_SAMPLES_COLUMNS,
    PLUGIN_SAMPLES_TABLE,
    BatchWriter,
    WriterClosedError,
)
from tests.waiting import wait_until
from tests.writer_helpers import create_plugins, sample_row, sample_rows, sequence_of


@pytest.fixture
async def pool(migrated_db: str) -> AsyncIterator[asyncpg.Pool]:
    async with pool_context(migrated_db, max_size=4) as opened:
        yield opened


@pytest.fixture
async def plugin_ids(migrated_db: str) -> list[int]:
    return await create_plugins(migrated_db, tenant="acme", count=100)


def writer_for(pool: asyncpg.Pool, **settings: object) -> BatchWriter:
    return BatchWriter(
        pool,
        table=PLUGIN_SAMPLES_TABLE,
        columns=PLUGIN_SAMPLES_COLUMNS,
        **settings,  # type: ignore[arg-type]
    )


async def test_round_trips_100k_samples_with_values_and_nulls(
    pool: asyncpg.Pool, plugin_ids: list[int]
) -> None:
    total = 100_000
    expected = sample_rows(0, total, plugin_ids)
    async with writer_for(pool) as writer:
        for start in range(0, total, 1000):
            writer.put(expected[start : start + 1000])
            await asyncio.sleep(0)
        await writer.flush()
        stats = writer.stats()
    assert stats.rows_written == total
    assert stats.batches_written >= total // 5000
    assert stats.rows_dropped == 0
    assert stats.rows_queued == 0
    assert stats.flush_seconds_count == stats.batches_written
    assert stats.flush_seconds_buckets[-1] == (float("inf"), stats.batches_written)
    assert stats.database_available

    async with pool.acquire() as connection:
        summary = await connection.fetchrow(
            'SELECT count(*) AS n, count(DISTINCT "timestamp") AS distinct_times,'
            " sum(cpu_percent) AS cpu_sum, max(rss_bytes) AS rss_max,"
            " count(*) FILTER (WHERE uss_bytes IS NULL) AS uss_nulls,"
            " count(*) FILTER (WHERE fds IS NULL) AS fds_nulls,"
            " count(*) FILTER (WHERE NOT up) AS down,"
            " sum(ctx_switches_involuntary) AS ctx_sum,"
            " count(DISTINCT plugin_id) AS plugins"
            " FROM plugin_samples"
        )
        stored = await connection.fetch(
            'SELECT * FROM plugin_samples WHERE "timestamp" = ANY($1::timestamptz[])',
            [expected[i][0] for i in (0, 1, 77_777, total - 1)],
        )
    assert summary["n"] == total
    assert summary["distinct_times"] == total
    assert summary["cpu_sum"] == sum(row[5] for row in expected)  # type: ignore[misc]
    assert summary["rss_max"] == max(row[6] for row in expected)  # type: ignore[type-var]
    nulls = sum(1 for row in expected if row[8] is None)
    assert nulls == len(range(0, total, 3))
    assert summary["uss_nulls"] == nulls
    assert summary["fds_nulls"] == nulls
    assert summary["down"] == total // 10
    assert summary["ctx_sum"] == sum(row[15] or 0 for row in expected)  # type: ignore[misc]
    assert summary["plugins"] == len(plugin_ids)
    by_sequence = {sequence_of(record["timestamp"]): tuple(record.values()) for record in stored}
    for sequence in (0, 1, 77_777, total - 1):
        assert by_sequence[sequence] == expected[sequence]


async def test_exiting_the_context_at_once_writes_everything(
    pool: asyncpg.Pool, plugin_ids: list[int]
) -> None:
    total = 50_000
    async with writer_for(pool, max_delay_seconds=60.0) as writer:
        writer.put(sample_rows(0, total, plugin_ids))
    stats = writer.stats()
    assert stats.rows_written == total
    assert stats.rows_dropped == 0
    async with pool.acquire() as connection:
        assert await connection.fetchval("SELECT count(*) FROM plugin_samples") == total
        assert (
            await connection.fetchval('SELECT count(DISTINCT "timestamp") FROM plugin_samples')
            == total
        )
    with pytest.raises(WriterClosedError):
        writer.put([sample_row(0, plugin_ids)])


async def test_a_partial_batch_is_written_when_it_is_old_enough(
    pool: asyncpg.Pool, plugin_ids: list[int]
) -> None:
    async with writer_for(pool, max_rows=1000, max_delay_seconds=0.1) as writer:
        writer.put(sample_rows(0, 10, plugin_ids))
        # No flush(): the age of the oldest row triggers the write.
        stats = await wait_until(
            lambda: stats if (stats := writer.stats()).rows_written else None,
            timeout_seconds=10,
            what="the partial batch to be written without a flush",
        )
        assert (stats.rows_written, stats.batches_written, stats.rows_queued) == (10, 1, 0)
    async with pool.acquire() as connection:
        assert await connection.fetchval("SELECT count(*) FROM plugin_samples") == 10


async def test_bad_rows_are_isolated_and_the_good_rows_of_their_batch_written(
    pool: asyncpg.Pool, plugin_ids: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    rows = sample_rows(0, 1000, plugin_ids)
    bad = {13: 5, 500: 6, 999: 10}  # sequence -> column made invalid
    for sequence, column in bad.items():
        row = list(rows[sequence])
        # cpu_percent and rss_bytes fail their CHECK constraints on the server; a string
        # in an integer column fails in the client's binary encoder.
        row[column] = -1.0 if column == 5 else (-5 if column == 6 else "ten")
        rows[sequence] = tuple(row)
    with caplog.at_level(logging.WARNING, logger="pluginmon.storage.writer"):
        async with writer_for(pool, max_rows=1000) as writer:
            writer.put(rows)
            await writer.flush()
            stats = writer.stats()
    assert stats.rows_rejected == 3
    assert stats.rows_dropped == 3
    assert stats.rows_written == 997
    assert "splitting the batch" in caplog.text
    assert "plugin_samples_cpu_percent_nonnegative" in caplog.text
    assert "Traceback" in caplog.text
    async with pool.acquire() as connection:
        stored = await connection.fetch('SELECT "timestamp" FROM plugin_samples')
    sequences = sorted(sequence_of(record["timestamp"]) for record in stored)
    assert sequences == [s for s in range(1000) if s not in bad]


async def test_identifiers_and_row_widths_are_validated(pool: asyncpg.Pool) -> None:
    with pytest.raises(ValueError, match="identifier"):
        BatchWriter(pool, table="plugin_samples; DROP TABLE x", columns=["a"])
    with pytest.raises(ValueError, match="identifier"):
        BatchWriter(pool, table="plugin_samples", columns=['"timestamp"'])
    with pytest.raises(ValueError, match="duplicate"):
        BatchWriter(pool, table="plugin_samples", columns=["a", "a"])
    with pytest.raises(ValueError, match="max_queue_rows"):
        BatchWriter(pool, table="t", columns=["a"], max_rows=100, max_queue_rows=150)
    async with writer_for(pool) as writer:
        with pytest.raises(ValueError, match="need 19 values"):
            writer.put([(1, 2, 3)])
        assert writer.stats().rows_queued == 0


async def test_queue_overflow_without_a_spool_drops_the_oldest_and_counts(
    pool: asyncpg.Pool, plugin_ids: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="pluginmon.storage.writer"):
        async with writer_for(
            pool, max_rows=100, max_queue_rows=1000, max_delay_seconds=60.0
        ) as writer:
            # One put() larger than the queue: the oldest rows go first, at once.
            writer.put(sample_rows(0, 1500, plugin_ids))
            assert writer.stats().rows_dropped == 500
            await writer.flush()
    assert caplog.text.count("dropping rows") == 1
    async with pool.acquire() as connection:
        low = await connection.fetchval('SELECT min("timestamp") FROM plugin_samples')
        assert await connection.fetchval("SELECT count(*) FROM plugin_samples") == 1000
    assert sequence_of(low) == 500


async def test_open_pool_redacts_the_password(
    migrated_db: str, caplog: pytest.LogCaptureFixture
) -> None:
    assert "secret" not in redact_url("postgresql://u:secret@h:5432/db")
    assert redact_url("postgresql://u:secret@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert "s3cr" not in redact_url("postgresql://u@h/db?password=s3cr&sslmode=require")
    assert "sslmode=require" in redact_url("postgresql://u@h/db?password=s3cr&sslmode=require")
    assert redact_url("host=h password='a b' user=u") == "host=h password=*** user=u"
    assert redact_url("postgresql://h/db") == "postgresql://h/db"
    password = urlsplit(migrated_db).password
    with caplog.at_level(logging.DEBUG):
        pool = await open_pool(migrated_db, min_size=1, max_size=1, application_name="writer-test")
        try:
            async with pool.acquire() as connection:
                name = await connection.fetchval("SELECT current_setting('application_name')")
        finally:
            await close_pool(pool)
    assert name == "writer-test"
    assert "opening database pool" in caplog.text
    if password:
        assert password not in caplog.text


async def test_cancelling_close_still_finishes_the_shutdown(
    pool: asyncpg.Pool, plugin_ids: list[int]
) -> None:
    writer = writer_for(pool, max_delay_seconds=60.0)
    await writer.__aenter__()
    writer.put(sample_rows(0, 20_000, plugin_ids))
    closing = asyncio.create_task(writer.close())
    await asyncio.sleep(0)
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    # Cancellation propagated, and the close it interrupted still wrote every row.
    assert writer.stats().rows_written == 20_000
    async with pool.acquire() as connection:
        assert await connection.fetchval("SELECT count(*) FROM plugin_samples") == 20_000


async def test_put_wait_keeps_a_fast_producer_within_the_queue(
    pool: asyncpg.Pool, plugin_ids: list[int]
) -> None:
    async with writer_for(pool, max_rows=100, max_queue_rows=1000) as writer:
        for start in range(0, 20_000, 100):
            # No other await: only put_wait() lets the writer catch up.
            await writer.put_wait(sample_rows(start, start + 100, plugin_ids))
            assert writer.stats().rows_queued <= 1000
        await writer.flush()
        stats = writer.stats()
    assert stats.rows_dropped == 0
    assert stats.rows_written == 20_000


async def test_a_blocked_table_spills_the_queue_to_the_spool_and_catches_up(
    pool: asyncpg.Pool, migrated_db: str, plugin_ids: list[int], tmp_path: Path
) -> None:
    blocker = await asyncpg.connect(migrated_db)
    try:
        transaction = blocker.transaction()
        await transaction.start()
        # The database is up but takes nothing: every COPY waits for this lock.
        await blocker.execute("LOCK TABLE plugin_samples IN ACCESS EXCLUSIVE MODE")
        with Spool(tmp_path / "spool") as spool:
            async with writer_for(
                pool, max_rows=100, max_queue_rows=1000, max_delay_seconds=0.01, spool=spool
            ) as writer:
                for start in range(0, 5000, 100):
                    writer.put(sample_rows(start, start + 100, plugin_ids))
                    await asyncio.sleep(0.002)
                # Every batch is written ahead to the spool; memory keeps up to the
                # high-water mark (500 rows: the two batches stuck in flight and three behind
                # them), the other 4,500 rows are on disk only. The stats that met the
                # condition are the ones asserted below.
                during = await wait_until(
                    lambda: stats if (stats := writer.stats()).spool_rows >= 5000 - 500 else None,
                    timeout_seconds=20,
                    what="the queue to spill to the spool",
                )
                await transaction.rollback()
                await writer.flush()
                after = writer.stats()
            assert spool.rows == 0
    finally:
        await blocker.close()
    # Memory stayed bounded (the rest went to disk), and nothing was dropped.
    assert during.rows_written == 0
    assert during.rows_dropped == 0
    assert during.rows_queued == 500
    assert during.spool_rows == 4500
    assert during.rows_spooled == 5000
    assert after.rows_dropped == 0
    assert after.rows_written == 5000
    async with pool.acquire() as connection:
        assert (
            await connection.fetchval('SELECT count(DISTINCT "timestamp") FROM plugin_samples')
            == 5000
        )


async def test_close_pool_terminates_connections_still_held_after_its_timeout(
    migrated_db: str, caplog: pytest.LogCaptureFixture
) -> None:
    pool = await open_pool(migrated_db, min_size=1, max_size=2)
    held = await pool.acquire()
    assert await held.fetchval("SELECT 1") == 1
    with caplog.at_level(logging.WARNING, logger="pluginmon.storage.pool"):
        # Graceful close would wait for `held` forever; the timeout terminates instead.
        await close_pool(pool, timeout_seconds=0.2)
    assert "terminating" in caplog.text
    with pytest.raises(asyncpg.InterfaceError):
        await held.fetchval("SELECT 1")
