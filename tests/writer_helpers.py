"""Helpers for the writer tests: plugin rows, sample rows, and a child process that spools.

``python -m tests.writer_helpers SPOOL_DIR ROWS`` runs a spool-backed writer against a
database that is not there, puts ROWS sample rows, prints ``SPOOLED <n>`` once they are all
in the spool, and then waits to be killed.
"""

from __future__ import annotations

import asyncio
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg

from pluginmon.storage.pool import close_pool, open_pool
from pluginmon.storage.spool import Spool
from pluginmon.storage.writer import PLUGIN_SAMPLES_COLUMNS, PLUGIN_SAMPLES_TABLE, BatchWriter
from tests.net_helpers import free_port

Row = tuple[object, ...]

BASE_TIME = datetime(2026, 1, 1, tzinfo=UTC)


async def create_plugins(database_url: str, *, tenant: str, count: int) -> list[int]:
    """Insert a tenant and ``count`` plugins; return their ids in name order."""
    connection = await asyncpg.connect(database_url)
    try:
        await connection.execute(
            "INSERT INTO tenants (id, name) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            tenant,
            tenant.title(),
        )
        rows = await connection.fetch(
            "INSERT INTO plugins (tenant_id, name)"
            " SELECT $1, 'plugin-' || lpad(n::text, 5, '0') FROM generate_series(1, $2) AS n"
            " RETURNING id",
            tenant,
            count,
        )
        return sorted(int(row["id"]) for row in rows)
    finally:
        await connection.close()


def sample_row(sequence: int, plugin_ids: list[int], *, tenant: str = "acme") -> Row:
    """A plugin_samples row whose values are derived from ``sequence`` (so tests can check).

    The timestamp is unique per sequence number; optional fields are NULL on every third
    row; cpu_percent is a multiple of 0.25, so sums are exact in double precision.
    """
    optional = sequence % 3 != 0
    return (
        BASE_TIME + timedelta(milliseconds=sequence),
        tenant,
        plugin_ids[sequence % len(plugin_ids)],
        "production",
        f"host-{sequence % 7}",
        (sequence % 400) * 0.25,
        1_000_000 + sequence,
        2_000_000 + sequence,
        500_000 + sequence if optional else None,
        sequence % 5 if optional else None,
        1 + sequence % 16,
        10 + sequence % 50 if optional else None,
        sequence * 10 if optional else None,
        sequence * 20 if optional else None,
        sequence if optional else None,
        sequence // 2 if optional else None,
        1 + sequence % 4,
        sequence % 2,
        sequence % 10 != 0,
    )


async def copy_samples(database_url: str, rows: list[Row]) -> None:
    """``rows`` written by a BatchWriter (100-row batches, ingest ledger) on a pool of its own."""
    pool = await open_pool(database_url, min_size=0)
    try:
        async with BatchWriter(
            pool, table=PLUGIN_SAMPLES_TABLE, columns=PLUGIN_SAMPLES_COLUMNS, max_rows=100
        ) as writer:
            writer.put(rows)
            await writer.flush()
    finally:
        await close_pool(pool)


def sample_rows(start: int, stop: int, plugin_ids: list[int]) -> list[Row]:
    return [sample_row(sequence, plugin_ids) for sequence in range(start, stop)]


def sequence_of(timestamp: datetime) -> int:
    return (timestamp - BASE_TIME) // timedelta(milliseconds=1)


async def _spool_and_wait(spool_dir: Path, rows: int) -> None:
    # Nothing listens on this port: every write fails with a transient error.
    pool = await open_pool(
        f"postgresql://nobody:secret@127.0.0.1:{free_port()}/nothing", min_size=0
    )
    spool = Spool(spool_dir)
    writer = BatchWriter(
        pool,
        table=PLUGIN_SAMPLES_TABLE,
        columns=PLUGIN_SAMPLES_COLUMNS,
        max_rows=500,
        max_delay_seconds=0.05,
        max_queue_rows=10_000,
        spool=spool,
    )
    await writer.__aenter__()
    for start in range(0, rows, 250):
        writer.put(sample_rows(start, min(start + 250, rows), [1, 2, 3]))
        await asyncio.sleep(0)
    # With the database away, flush() returns once every row is in the spool.
    await writer.flush()
    print(f"SPOOLED {writer.stats().spool_rows}", flush=True)
    # Abandoned, as by a crash: no close(), no flush; the test kills this process.
    await asyncio.sleep(3600)
    await close_pool(pool)


if __name__ == "__main__":
    asyncio.run(_spool_and_wait(Path(sys.argv[1]), int(sys.argv[2])))
