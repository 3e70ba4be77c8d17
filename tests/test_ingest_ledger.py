"""Exactly-once ingest on a real PostgreSQL: batch ids through the spool, the ledger in the
COPY's transaction, a commit the client timed out on, rejected rows, a killed writer's
write-ahead spool, and the ledger pruned by age under the maintenance lock."""

from __future__ import annotations

import asyncio
import shutil
import signal
import struct
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import asyncpg
import psycopg
import pytest
from prometheus_client import CollectorRegistry

from pluginmon.storage.backend import MAINTENANCE_LOCK_KEY, Retention, admin_connection
from pluginmon.storage.ledger import LedgerBatch, copy_batches
from pluginmon.storage.pool import pool_context
from pluginmon.storage.spool import (
    SEGMENT_FORMAT_VERSION,
    SEGMENT_MAGIC,
    Spool,
    SpoolFullError,
)
from pluginmon.storage.upkeep import Maintainer, prune_ingest_ledger
from pluginmon.storage.writer import PLUGIN_SAMPLES_COLUMNS, PLUGIN_SAMPLES_TABLE, BatchWriter
from tests.dbutil import is_citus, worker_urls
from tests.waiting import wait_until
from tests.writer_helpers import create_plugins, sample_row, sample_rows, sequence_of

Row = tuple[object, ...]

FAST_RETRY = {"retry_initial_seconds": 0.05, "retry_max_seconds": 0.3}


@pytest.fixture
async def plugin_ids(migrated_db: str) -> list[int]:
    return await create_plugins(migrated_db, tenant="acme", count=10)


@pytest.fixture
async def pool(migrated_db: str) -> AsyncIterator[asyncpg.Pool]:
    async with pool_context(migrated_db, max_size=4) as opened:
        yield opened


def writer_for(pool: asyncpg.Pool, spool: Spool | None = None, **settings: object) -> BatchWriter:
    return BatchWriter(
        pool,
        table=PLUGIN_SAMPLES_TABLE,
        columns=PLUGIN_SAMPLES_COLUMNS,
        spool=spool,
        **settings,  # type: ignore[arg-type]
    )


async def stored_sequences(pool: asyncpg.Pool) -> list[int]:
    async with pool.acquire() as connection:
        records = await connection.fetch('SELECT "timestamp" FROM plugin_samples')
    return sorted(sequence_of(record["timestamp"]) for record in records)


async def ledger_rows(pool: asyncpg.Pool) -> dict[uuid.UUID, tuple[str, int]]:
    async with pool.acquire() as connection:
        records = await connection.fetch(
            "SELECT batch_id, table_name, row_count FROM ingest_ledger"
        )
    return {record["batch_id"]: (record["table_name"], record["row_count"]) for record in records}


# -- batch ids in the spool ----------------------------------------------------------------


def test_spooled_batches_keep_their_ids_across_a_reopen(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    first, third = uuid.uuid4(), uuid.uuid4()
    with Spool(directory) as spool:
        handle = spool.append(sample_rows(0, 10, [1]), batch_id=first)
        assert handle is not None
        assert handle.batch_id == first
        assert handle.rows == ()  # the caller holds the rows
        handles = spool.append_many(
            [(sample_rows(10, 30, [1]), None), (sample_rows(30, 35, [1]), third)]
        )
        assert len(handles) == 2
        assert handles[1].batch_id == third
        assert handles[0].batch_id not in (first, third)
        assert handle.end_offset == handles[0].offset < handles[1].offset
        assert spool.rows == 35
        assert spool.batches == 3
        # An append's handle acks without reading the batch back.
        spool.ack(handle)
        assert spool.rows == 25
    with Spool(directory) as reopened:
        replayed = list(reopened.replay())
        assert [item.batch_id for item in replayed] == [handles[0].batch_id, third]
        assert [len(item.rows) for item in replayed] == [20, 5]
        assert list(replayed[1].rows) == sample_rows(30, 35, [1])


# A spool written by the pluginmon before batch ids (segment format 2, codec v2): three
# batches of 10 sample rows of plugins 1-3 (tests.writer_helpers.sample_rows(0, 30, [1, 2, 3])),
# the first acknowledged (the cursor points past it).
FORMAT_2_SPOOL = Path(__file__).parent / "data" / "spool-format-2"


def format_2_spool(directory: Path) -> Path:
    shutil.copytree(FORMAT_2_SPOOL, directory)
    return directory


def test_a_format_2_spool_replays_with_stable_ids_and_gets_a_new_segment(tmp_path: Path) -> None:
    directory = format_2_spool(tmp_path / "spool")
    old = directory / "00000000000000000001.seg"
    old_bytes = old.read_bytes()
    assert old_bytes[:10] == struct.pack("<8sH", SEGMENT_MAGIC, 2)
    with Spool(directory) as spool:
        assert (spool.rows, spool.batches) == (20, 2)
        replayed = list(spool.replay())
        assert [list(item.rows) for item in replayed] == [
            sample_rows(10, 20, [1, 2, 3]),
            sample_rows(20, 30, [1, 2, 3]),
        ]
        first_ids = [item.batch_id for item in replayed]
        assert len(set(first_ids)) == 2
        # New batches go to a new segment in today's format; the old one is left as it is.
        spool.append(sample_rows(30, 35, [1, 2, 3]))
        new = directory / "00000000000000000002.seg"
        assert new.read_bytes()[:10] == struct.pack("<8sH", SEGMENT_MAGIC, SEGMENT_FORMAT_VERSION)
        assert SEGMENT_FORMAT_VERSION == 3
        assert old.read_bytes() == old_bytes
    with Spool(directory) as spool:
        again = list(spool.replay())
        # The same ids at every replay (derived from the bytes): the ledger knows them.
        assert [item.batch_id for item in again[:2]] == first_ids
        assert [len(item.rows) for item in again] == [10, 10, 5]


async def test_a_format_2_spool_replayed_twice_is_stored_once(
    pool: asyncpg.Pool, plugin_ids: list[int], tmp_path: Path
) -> None:
    """An upgrade over a spool left by a crash of the old version, and a crash after its
    replay committed but before its acks: the second replay is skipped by the ledger."""
    assert plugin_ids[:3] == [1, 2, 3]
    for attempt in ("first", "second"):
        with Spool(format_2_spool(tmp_path / attempt)) as spool:
            async with writer_for(pool, spool) as writer:
                await writer.flush()
                stats = writer.stats()
            assert spool.rows == 0
        if attempt == "first":
            assert (stats.rows_written, stats.rows_deduplicated) == (20, 0)
        else:
            assert (stats.rows_written, stats.rows_deduplicated) == (0, 20)
    assert await stored_sequences(pool) == list(range(10, 30))
    assert sorted(count for _table, count in (await ledger_rows(pool)).values()) == [10, 10]


def test_append_many_stores_all_or_nothing(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    with Spool(directory, max_bytes=64 * 1024) as spool:
        spool.append(sample_rows(0, 100, [1]))
        used = spool.bytes
        too_much = [(sample_rows(n, n + 100, [1]), None) for n in range(100, 2000, 100)]
        with pytest.raises(SpoolFullError, match="at its cap"):
            spool.append_many(too_much)
        assert spool.rows == 100
        assert spool.batches == 1
        assert spool.bytes == used
        assert sum(path.stat().st_size for path in directory.glob("*.seg")) == used
        assert spool.append_many([]) == []


def test_ack_many_acks_in_order_with_one_cursor_and_frees_segments(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    with Spool(directory, segment_bytes=4096) as spool:
        handles = [spool.append(sample_rows(n, n + 20, [1])) for n in range(0, 400, 20)]
        assert all(handle is not None for handle in handles)
        acked = [h for h in handles[:7] if h is not None]
        segments = len(list(directory.glob("*.seg")))
        assert segments > 3
        with pytest.raises(ValueError, match="in order"):
            spool.ack_many([acked[1], acked[0]])
        assert spool.batches == 20  # nothing acked by the refused call
        spool.ack_many(acked)
        assert spool.batches == 13
        assert spool.rows == 260
        assert len(list(directory.glob("*.seg"))) < segments  # the fully acked ones went
    with Spool(directory, segment_bytes=4096) as reopened:
        first = reopened.peek()
        assert first is not None
        assert list(first.rows) == sample_rows(140, 160, [1])
        rest = list(reopened.replay())
        reopened.ack_many(rest)
        assert reopened.rows == 0
    assert sorted(path.name for path in directory.iterdir()) == ["lock"]


# -- the ledger in the COPY's transaction --------------------------------------------------


async def test_a_batch_put_again_under_its_id_is_written_once(
    pool: asyncpg.Pool, plugin_ids: list[int], tmp_path: Path
) -> None:
    batch_id = uuid.uuid4()
    rows = sample_rows(0, 300, plugin_ids)
    with Spool(tmp_path / "spool") as spool:
        async with writer_for(pool, spool) as writer:
            registry = CollectorRegistry()
            registry.register(writer)
            writer.put(rows, batch_id=batch_id)
            await writer.flush()
            writer.put(rows, batch_id=batch_id)  # a caller replaying its own record
            writer.put(sample_rows(300, 310, plugin_ids))
            await writer.flush()
            stats = writer.stats()
        assert spool.rows == 0
    labels = {"table": "plugin_samples"}
    assert registry.get_sample_value("pluginmon_rows_deduplicated_total", labels) == 300
    assert registry.get_sample_value("pluginmon_rows_written_total", labels) == 310
    assert stats.rows_written == 310
    assert stats.rows_deduplicated == 300
    assert stats.rows_spooled == 610  # every batch written ahead, the repeated one too
    assert await stored_sequences(pool) == list(range(310))
    ledger = await ledger_rows(pool)
    assert ledger[batch_id] == ("plugin_samples", 300)
    assert sorted(count for _table, count in ledger.values()) == [10, 300]


async def test_copy_batches_skips_the_batches_already_in_and_writes_the_rest(
    pool: asyncpg.Pool, plugin_ids: list[int]
) -> None:
    old, new = uuid.uuid4(), uuid.uuid4()
    async with pool.acquire() as connection:
        first = await copy_batches(
            connection,
            table=PLUGIN_SAMPLES_TABLE,
            columns=PLUGIN_SAMPLES_COLUMNS,
            batches=[LedgerBatch(old, sample_rows(0, 20, plugin_ids))],
            timeout_seconds=10,
            isolate_rejected=False,
        )
        both = await copy_batches(
            connection,
            table=PLUGIN_SAMPLES_TABLE,
            columns=PLUGIN_SAMPLES_COLUMNS,
            batches=[
                LedgerBatch(old, sample_rows(0, 20, plugin_ids)),
                LedgerBatch(new, sample_rows(20, 50, plugin_ids)),
            ],
            timeout_seconds=10,
            isolate_rejected=False,
        )
    assert (first.rows_written, first.rows_deduplicated) == (20, 0)
    assert (both.rows_written, both.batches_deduplicated, both.rows_deduplicated) == (30, 1, 20)
    assert await stored_sequences(pool) == list(range(50))


# A COMMIT the client gives up on: the deferred trigger sleeps at commit time (the first time
# it fires only: nextval of a sequence where the trigger runs) and shrugs off the client's
# cancel request. Two statements: Citus sends each DDL statement to the workers on its own.
_SLOW_COMMIT = (
    """
CREATE FUNCTION test_slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.row_count = 7 AND nextval('test_slow_once') = 1 THEN
        BEGIN
            PERFORM pg_sleep(3);
        EXCEPTION WHEN query_canceled THEN
            NULL;  -- commit anyway
        END;
    END IF;
    RETURN NULL;
END $$
""",
    """
CREATE CONSTRAINT TRIGGER test_slow_commit AFTER INSERT ON ingest_ledger
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION test_slow_commit()
""",
)


async def _install_slow_commit(url: str) -> None:
    workers = worker_urls(url)
    # The trigger runs where the ledger's rows are: on Citus, in a worker's shard, so its
    # sequence is made on every worker (a worker-local object), and Citus is told to pass the
    # trigger on to the shards (it refuses triggers on distributed tables by default).
    for worker in workers:
        connection = await asyncpg.connect(worker)
        try:
            await connection.execute("CREATE SEQUENCE test_slow_once")
        finally:
            await connection.close()
    async with pool_context(url) as admin, admin.acquire() as connection:
        if not workers:
            await connection.execute("CREATE SEQUENCE test_slow_once")
        else:
            await connection.execute("SET citus.enable_unsafe_triggers = on")
        for statement in _SLOW_COMMIT:
            await connection.execute(statement)


async def _prepared_transactions_on_workers(url: str) -> list[str]:
    found: list[str] = []
    for worker in worker_urls(url):
        connection = await asyncpg.connect(worker)
        try:
            found += await connection.fetchval(
                "SELECT coalesce(array_agg(gid), '{}') FROM pg_prepared_xacts"
                " WHERE database = current_database()"
            )
        finally:
            await connection.close()
    return found


@pytest.mark.parametrize("with_spool", [True, False], ids=["spool", "memory"])
async def test_a_commit_the_client_timed_out_on_is_not_written_twice(
    migrated_db: str,
    plugin_ids: list[int],
    tmp_path: Path,
    with_spool: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    citus = is_citus(migrated_db)
    await _install_slow_commit(migrated_db)

    async def caught_up(writer: BatchWriter, admin: asyncpg.Pool) -> bool:
        stats = writer.stats()
        if citus:
            # What Citus's maintenance daemon does every citus.recover_2pc_interval (a
            # minute): a PREPARE TRANSACTION a worker finished after the coordinator gave up
            # holds the ledger row's lock until it is rolled back. Sooner here.
            await admin.execute("SELECT recover_prepared_transactions()")
        return stats.database_available and stats.rows_written + stats.rows_deduplicated == 7

    # The COMMIT's own timeout is the pool's command timeout.
    async with (
        pool_context(migrated_db) as admin,
        pool_context(migrated_db, command_timeout_seconds=0.5) as pool,
    ):
        with Spool(tmp_path / "spool") as spool:
            async with writer_for(
                pool, spool if with_spool else None, max_delay_seconds=0.05, **FAST_RETRY
            ) as writer:
                writer.put(sample_rows(0, 7, plugin_ids))
                await wait_until(
                    lambda: caught_up(writer, admin),
                    timeout_seconds=150,
                    what="the timed-out batch to be retried and stored",
                )
                await asyncio.wait_for(writer.flush(), 30)
                stats = writer.stats()
            assert spool.rows == 0
        # The client saw the timeout (and retried) ...
        assert "database unavailable for plugin_samples (TimeoutError" in caplog.text
        if citus:
            # ... and on Citus the COMMIT it gave up on is cancelled while the workers
            # prepare (then the retry writes the rows) or, once the coordinator has logged
            # the commit, completes (then the ledger has them): once either way.
            assert (stats.rows_written, stats.rows_deduplicated) in {(7, 0), (0, 7)}
        else:
            # ... and the server committed anyway: the ledger said the batch was in.
            assert stats.rows_written == 0
            assert stats.rows_deduplicated == 7
        assert stats.rows_dropped == 0
        assert await stored_sequences(pool) == list(range(7))
        assert [count for _table, count in (await ledger_rows(pool)).values()] == [7]
    assert await _prepared_transactions_on_workers(migrated_db) == []


async def test_rejected_rows_commit_with_the_ledger_and_are_not_retried(
    pool: asyncpg.Pool, plugin_ids: list[int], tmp_path: Path
) -> None:
    rows = sample_rows(0, 400, plugin_ids)
    for sequence in (3, 250, 399):
        row = list(rows[sequence])
        row[5] = -1.0  # cpu_percent: refused by its CHECK
        rows[sequence] = tuple(row)
    batch_id = uuid.uuid4()
    with Spool(tmp_path / "spool") as spool:
        async with writer_for(pool, spool, max_rows=1000) as writer:
            writer.put(rows, batch_id=batch_id)
            await writer.flush()
            writer.put(rows, batch_id=batch_id)  # replayed: the good rows are in already
            await writer.flush()
            stats = writer.stats()
        assert spool.rows == 0
    assert stats.rows_written == 397
    assert stats.rows_rejected == 3  # counted once, not again at the replay
    assert stats.rows_deduplicated == 400
    assert await stored_sequences(pool) == [s for s in range(400) if s not in (3, 250, 399)]
    assert (await ledger_rows(pool))[batch_id] == ("plugin_samples", 397)


async def test_a_spooled_batch_committed_before_a_crash_is_skipped_at_replay(
    pool: asyncpg.Pool, plugin_ids: list[int], tmp_path: Path
) -> None:
    """The edge a crash between a batch's commit and its ack leaves: the batch is still in
    the spool and already in the database."""
    committed, pending = uuid.uuid4(), uuid.uuid4()
    with Spool(tmp_path / "spool") as spool:
        spool.append(sample_rows(0, 100, plugin_ids), batch_id=committed)
        spool.append(sample_rows(100, 150, plugin_ids), batch_id=pending)
    async with pool.acquire() as connection:
        await copy_batches(
            connection,
            table=PLUGIN_SAMPLES_TABLE,
            columns=PLUGIN_SAMPLES_COLUMNS,
            batches=[LedgerBatch(committed, sample_rows(0, 100, plugin_ids))],
            timeout_seconds=10,
            isolate_rejected=False,
        )
    with Spool(tmp_path / "spool") as spool:
        async with writer_for(pool, spool) as writer:
            writer.put(sample_rows(150, 160, plugin_ids))
            await writer.flush()
            stats = writer.stats()
        assert spool.rows == 0
    assert stats.rows_deduplicated == 100
    assert stats.rows_replayed == 50 + 10  # the new rows queued behind the backlog, on disk
    assert await stored_sequences(pool) == list(range(160))


async def test_rows_a_killed_writer_had_on_disk_are_written_once_by_the_next(
    migrated_db: str, pool: asyncpg.Pool, plugin_ids: list[int], tmp_path: Path, repo_root: Path
) -> None:
    """Write-ahead: the rows are in the spool before their batch is due (a minute later),
    so a SIGKILL loses none of them while the database is up."""
    spool_dir = tmp_path / "spool"
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.ledger_helpers",
        migrated_db,
        str(spool_dir),
        "2000",
        cwd=repo_root,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        async with asyncio.timeout(120):
            line = await child.stdout.readline()
        assert line.decode().split() == ["LOGGED", "2000", "WRITTEN", "0"]
    finally:
        child.send_signal(signal.SIGKILL)
        await child.wait()
    assert child.returncode == -signal.SIGKILL
    with Spool(spool_dir) as spool:
        assert spool.rows == 2000
        async with writer_for(pool, spool) as writer:
            await writer.flush()
            stats = writer.stats()
        assert spool.rows == 0
    assert stats.rows_written == 2000
    assert await stored_sequences(pool) == list(range(2000))
    assert plugin_ids[:3] == [1, 2, 3]


async def test_wait_logged_returns_once_the_rows_are_on_disk(
    pool: asyncpg.Pool, plugin_ids: list[int], tmp_path: Path
) -> None:
    with Spool(tmp_path / "spool") as spool:
        async with writer_for(pool, spool, max_delay_seconds=60.0) as writer:
            writer.put(sample_rows(0, 10, plugin_ids))
            writer.put([sample_row(10, plugin_ids)])
            assert spool.rows == 0
            await asyncio.wait_for(writer.wait_logged(), 30)
            assert spool.rows == 11
            during = writer.stats()
        assert spool.rows == 0  # written and acked at close
    # Held in memory too, and written from there: not a backlog on disk.
    assert during.spool_rows == 0
    assert during.rows_queued == 11
    assert during.rows_written == 0
    assert await stored_sequences(pool) == list(range(11))


# -- pruning -------------------------------------------------------------------------------


async def _ledger_ages(url: str, ages_days: dict[uuid.UUID, float]) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for batch_id, days in ages_days.items():
            conn.execute(
                "INSERT INTO ingest_ledger (batch_id, table_name, row_count, committed_at)"
                " VALUES (%s, 'plugin_samples', 1, now() - %s)",
                (batch_id, timedelta(days=days)),
            )


def _ledger_ids(url: str) -> set[uuid.UUID]:
    with psycopg.connect(url) as conn:
        return {row[0] for row in conn.execute("SELECT batch_id FROM ingest_ledger")}


async def test_the_ledger_is_pruned_by_age_under_the_maintenance_lock(migrated_db: str) -> None:
    old, recent, fresh = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    await _ledger_ages(migrated_db, {old: 9.0, recent: 2.0, fresh: 0.0})
    async with admin_connection(migrated_db) as holder, admin_connection(migrated_db) as conn:
        cur = await holder.execute("SELECT pg_try_advisory_lock(%s)", (MAINTENANCE_LOCK_KEY,))
        assert await cur.fetchone() == (True,)
        # Another daemon holds the lock: it prunes, this one does not.
        assert await prune_ingest_ledger(conn, older_than=timedelta(days=7)) is None
        assert _ledger_ids(migrated_db) == {old, recent, fresh}
        await holder.execute("SELECT pg_advisory_unlock(%s)", (MAINTENANCE_LOCK_KEY,))
        assert await prune_ingest_ledger(conn, older_than=timedelta(days=7)) == 1
    assert _ledger_ids(migrated_db) == {recent, fresh}

    # The daemon's maintenance job prunes with its configured retention.
    await Maintainer(
        migrated_db, retention=Retention(), spools=[], ledger_retention=timedelta(days=1)
    ).run()
    assert _ledger_ids(migrated_db) == {fresh}
    with pytest.raises(ValueError, match="ledger_retention"):
        Maintainer(migrated_db, retention=Retention(), spools=[], ledger_retention=timedelta(0))
