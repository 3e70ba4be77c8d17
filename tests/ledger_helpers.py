"""A child process for the write-ahead tests: a writer on a live database that is killed.

``python -m tests.ledger_helpers DATABASE_URL SPOOL_DIR ROWS`` puts ROWS sample rows into a
spool-backed writer whose batches would wait a minute before their COPY, waits until they
are in the spool, prints ``LOGGED <n>`` and then waits to be killed.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from pluginmon.storage.pool import open_pool
from pluginmon.storage.spool import Spool
from pluginmon.storage.writer import PLUGIN_SAMPLES_COLUMNS, PLUGIN_SAMPLES_TABLE, BatchWriter
from tests.writer_helpers import sample_rows


async def _log_and_wait(database_url: str, spool_dir: Path, rows: int) -> None:
    pool = await open_pool(database_url, min_size=0)
    spool = Spool(spool_dir)
    writer = BatchWriter(
        pool,
        table=PLUGIN_SAMPLES_TABLE,
        columns=PLUGIN_SAMPLES_COLUMNS,
        max_rows=100_000,
        max_delay_seconds=60.0,
        max_queue_rows=200_000,
        spool=spool,
    )
    await writer.__aenter__()
    for start in range(0, rows, 250):
        writer.put(sample_rows(start, min(start + 250, rows), [1, 2, 3]))
    await writer.wait_logged()
    stats = writer.stats()
    print(f"LOGGED {spool.rows} WRITTEN {stats.rows_written}", flush=True)
    # Abandoned, as by a crash: the test kills this process.
    await asyncio.sleep(3600)


if __name__ == "__main__":
    asyncio.run(_log_and_wait(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])))
