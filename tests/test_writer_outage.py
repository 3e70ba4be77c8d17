"""BatchWriter when the database goes away: the spool, recovery in order, crashes, deadlines."""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from pluginmon.storage.embedded import EmbeddedPostgres
from pluginmon.storage.migrate import migrate
from pluginmon.storage.pool import pool_context
from pluginmon.storage.spool import Spool
from pluginmon.storage.writer import PLUGIN_SAMPLES_COLUMNS, PLUGIN_SAMPLES_TABLE, BatchWriter
from tests.net_helpers import free_port
from tests.waiting import wait_until
from tests.writer_helpers import create_plugins, sample_rows, sequence_of

# Fast retries: the tests wait for recovery, not for production backoff.
FAST_RETRY: dict[str, Any] = {"retry_initial_seconds": 0.05, "retry_max_seconds": 0.3}


@pytest.fixture
def own_server(server_tmp_dir: Path) -> Iterator[tuple[EmbeddedPostgres, str]]:
    """A migrated PostgreSQL of this test's own, so the test can stop and start it."""
    # Outside pytest's basetemp, which any pytest start resets to 0700 (conftest.py says why).
    server = EmbeddedPostgres(server_tmp_dir / "pg")
    url = server.start()
    migrate(url)
    try:
        yield server, url
    finally:
        server.stop(mode="immediate")


@pytest.fixture
async def black_hole() -> AsyncIterator[str]:
    """URL of a TCP server that accepts connections and never answers (a hung database)."""
    held: list[asyncio.StreamWriter] = []

    async def hold(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"postgresql://nobody:secret@127.0.0.1:{port}/nothing"
    finally:
        server.close()
        for writer in held:
            writer.close()
        await server.wait_closed()


async def xmins_by_sequence(connection: asyncpg.Connection) -> dict[int, int]:
    """Sequence number of each row -> the transaction that wrote it."""
    records = await connection.fetch(
        'SELECT "timestamp", xmin::text::bigint AS xid FROM plugin_samples'
    )
    return {sequence_of(record["timestamp"]): int(record["xid"]) for record in records}


async def wait_for_recovery(writer: BatchWriter) -> None:
    for _ in range(1500):
        stats = writer.stats()
        if stats.database_available and stats.spool_rows == 0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"writer did not recover: {writer.stats()}")


async def test_database_outage_spools_then_replays_every_row_once_in_order(
    own_server: tuple[EmbeddedPostgres, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server, url = own_server
    plugin_ids = await create_plugins(url, tenant="acme", count=10)
    caplog.set_level(logging.INFO, logger="pluginmon.storage.writer")
    with Spool(tmp_path / "spool") as spool:
        async with (
            pool_context(url, min_size=1, max_size=4) as pool,
            BatchWriter(
                pool,
                table=PLUGIN_SAMPLES_TABLE,
                columns=PLUGIN_SAMPLES_COLUMNS,
                max_rows=500,
                max_delay_seconds=0.05,
                copy_timeout_seconds=5.0,
                spool=spool,
                **FAST_RETRY,
            ) as writer,
        ):
            writer.put(sample_rows(0, 2000, plugin_ids))
            await writer.flush()
            assert writer.stats().rows_written == 2000

            await asyncio.to_thread(server.stop)
            # Samples keep coming while the database is down, as from a sampling loop.
            for start in range(2000, 6000, 200):
                writer.put(sample_rows(start, start + 200, plugin_ids))
                await asyncio.sleep(0.01)
            await writer.flush()  # with the database away: returns once all is spooled
            during = writer.stats()
            assert not during.database_available
            assert during.spool_rows == 4000
            assert during.rows_written == 2000
            assert during.rows_dropped == 0

            await asyncio.to_thread(server.start)
            writer.put(sample_rows(6000, 8000, plugin_ids))
            await wait_for_recovery(writer)
            await writer.flush()
            after = writer.stats()

    assert after.spool_rows == 0
    assert after.spool_bytes == 0
    assert after.rows_replayed >= 4000
    assert after.rows_written == 8000
    assert after.rows_dropped == 0
    assert caplog.text.count("database unavailable for plugin_samples") == 1
    assert caplog.text.count("database available again for plugin_samples") == 1
    assert sorted(p.name for p in (tmp_path / "spool").iterdir()) == ["lock"]

    async with pool_context(url, max_size=1) as pool, pool.acquire() as connection:
        xmins = await xmins_by_sequence(connection)
        assert await connection.fetchval("SELECT count(*) FROM plugin_samples") == 8000
    assert sorted(xmins) == list(range(8000))
    spooled = [xmins[s] for s in range(2000, 6000)]
    # Replayed one batch per transaction, oldest first, and all before any newer row.
    assert spooled == sorted(spooled)
    assert max(spooled) < min(xmins[s] for s in range(6000, 8000))
    assert max(xmins[s] for s in range(2000)) < min(spooled)


async def test_a_killed_writer_leaves_its_spool_to_the_next_one(
    migrated_db: str, tmp_path: Path, repo_root: Path
) -> None:
    spool_dir = tmp_path / "spool"
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.writer_helpers",
        str(spool_dir),
        "3000",
        cwd=repo_root,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        async with asyncio.timeout(120):
            line = await child.stdout.readline()
        assert line.decode().strip() == "SPOOLED 3000"
    finally:
        child.send_signal(signal.SIGKILL)
        await child.wait()
    assert child.returncode == -signal.SIGKILL

    plugin_ids = await create_plugins(migrated_db, tenant="acme", count=3)
    with Spool(spool_dir) as spool:
        assert spool.rows == 3000
        async with (
            pool_context(migrated_db) as pool,
            BatchWriter(
                pool, table=PLUGIN_SAMPLES_TABLE, columns=PLUGIN_SAMPLES_COLUMNS, spool=spool
            ) as writer,
        ):
            writer.put(sample_rows(3000, 3500, plugin_ids))
            await writer.flush()
            stats = writer.stats()
        assert spool.rows == 0
    # New rows put while the old ones replay queue up behind them in the spool.
    assert stats.rows_replayed == 3000 + stats.rows_spooled
    assert stats.rows_written == 3500

    async with pool_context(migrated_db, max_size=1) as pool, pool.acquire() as connection:
        xmins = await xmins_by_sequence(connection)
    assert sorted(xmins) == list(range(3500))
    assert max(xmins[s] for s in range(3000)) < min(xmins[s] for s in range(3000, 3500))


async def test_spool_cap_drops_are_counted_and_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dead = f"postgresql://nobody:secret@127.0.0.1:{free_port()}/nothing"
    caplog.set_level(logging.WARNING, logger="pluginmon.storage.writer")
    total = 6000
    with Spool(tmp_path / "spool", max_bytes=128 * 1024) as spool:
        async with (
            pool_context(dead, min_size=0) as pool,
            BatchWriter(
                pool,
                table=PLUGIN_SAMPLES_TABLE,
                columns=PLUGIN_SAMPLES_COLUMNS,
                max_rows=200,
                max_delay_seconds=0.02,
                spool=spool,
                **FAST_RETRY,
            ) as writer,
        ):
            for start in range(0, total, 200):
                writer.put(sample_rows(start, start + 200, [1, 2]))
                await asyncio.sleep(0.005)
            await writer.flush()
            stats = writer.stats()
        assert spool.bytes <= 128 * 1024
    assert stats.rows_written == 0
    assert stats.spool_rows > 0
    assert stats.rows_dropped > 0
    # Every row is accounted for: on disk or counted as dropped.
    assert stats.spool_rows + stats.rows_dropped == total
    assert stats.rows_spooled == stats.spool_rows
    assert caplog.text.count("dropping rows for plugin_samples") == 1
    assert "at its cap" in caplog.text
    assert "secret" not in caplog.text


async def test_rows_not_written_by_the_shutdown_deadline_go_to_the_spool(
    black_hole: str, migrated_db: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="pluginmon.storage.writer")
    with Spool(tmp_path / "spool") as spool:
        async with (
            pool_context(black_hole, min_size=0) as pool,
            BatchWriter(
                pool,
                table=PLUGIN_SAMPLES_TABLE,
                columns=PLUGIN_SAMPLES_COLUMNS,
                max_rows=1000,
                max_delay_seconds=60.0,
                copy_timeout_seconds=30.0,
                close_timeout_seconds=0.5,
                spool=spool,
            ) as writer,
        ):
            # The first batches hang in flight on the silent server; the rest stay queued.
            writer.put(sample_rows(0, 5000, [1, 2, 3]))
        stats = writer.stats()
        assert stats.rows_written == 0
        assert stats.rows_dropped == 0
        assert spool.rows == 5000
    assert "did not finish within 0.5 s" in caplog.text

    # Nothing was lost: the next writer, on a database that answers, writes all of it.
    plugin_ids = await create_plugins(migrated_db, tenant="acme", count=3)
    with Spool(tmp_path / "spool") as spool:
        async with (
            pool_context(migrated_db) as pool,
            BatchWriter(
                pool, table=PLUGIN_SAMPLES_TABLE, columns=PLUGIN_SAMPLES_COLUMNS, spool=spool
            ) as writer,
        ):
            await writer.flush()
        assert spool.rows == 0
    async with pool_context(migrated_db, max_size=1) as pool, pool.acquire() as connection:
        assert (
            await connection.fetchval('SELECT count(DISTINCT "timestamp") FROM plugin_samples')
            == 5000
        )
    assert plugin_ids == [1, 2, 3]


async def test_without_a_spool_the_deadline_drops_and_counts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dead = f"postgresql://nobody:secret@127.0.0.1:{free_port()}/nothing"
    caplog.set_level(logging.WARNING, logger="pluginmon.storage.writer")
    async with (
        pool_context(dead, min_size=0) as pool,
        BatchWriter(
            pool,
            table=PLUGIN_SAMPLES_TABLE,
            columns=PLUGIN_SAMPLES_COLUMNS,
            max_rows=100,
            max_delay_seconds=0.01,
            close_timeout_seconds=0.5,
            **FAST_RETRY,
        ) as writer,
    ):
        writer.put(sample_rows(0, 1000, [1]))
        down = await wait_until(
            lambda: None if (stats := writer.stats()).database_available else stats,
            timeout_seconds=10,
            what="the writer to notice the database is unreachable",
        )
        # Without a spool, rows wait in memory for the database.
        assert down.rows_queued == 1000
        assert writer.stats().rows_queued == 1000
    stats = writer.stats()
    assert stats.rows_dropped == 1000
    assert stats.rows_queued == 0
    assert "holding rows in memory" in caplog.text
    assert "shutdown deadline passed with no spool" in caplog.text


async def test_a_refused_login_is_an_outage_not_bad_rows(
    migrated_db: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    parts = urlsplit(migrated_db)
    # A role that does not exist: refused under password and trust authentication alike.
    credentials = "no_such_role" + (f":{parts.password}" if parts.password else "")
    refused = urlunsplit(
        parts._replace(netloc=f"{credentials}@{parts.hostname}:{parts.port or 5432}")
    )
    caplog.set_level(logging.WARNING, logger="pluginmon.storage.writer")
    with Spool(tmp_path / "spool") as spool:
        async with (
            pool_context(refused, min_size=0) as pool,
            BatchWriter(
                pool,
                table=PLUGIN_SAMPLES_TABLE,
                columns=PLUGIN_SAMPLES_COLUMNS,
                spool=spool,
                **FAST_RETRY,
            ) as writer,
        ):
            writer.put(sample_rows(0, 300, [1, 2, 3]))
            await writer.flush()
            stats = writer.stats()
        assert stats.rows_rejected == 0
        assert stats.rows_dropped == 0
        assert not stats.database_available
        assert spool.rows == 300
    assert "database unavailable for plugin_samples" in caplog.text
    assert re.search(r"(InvalidPassword|InvalidAuthorizationSpecification)Error", caplog.text)
    if parts.password:
        assert parts.password not in caplog.text
