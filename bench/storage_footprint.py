"""Storage footprint: bytes on disk per plugin_samples row (heap and indexes), and on TimescaleDB
after compression, for sizing a database (docs/scaling.md).

Writes CYCLES snapshots of PLUGINS plugins at a 10 s spacing (bench/fleet.py's generator:
60% idle, 35% moving a little each cycle, 5% busy, so the values compress as a real fleet's
do) into a fresh database, one 1,000-row-or-less COPY per snapshot as the writer sends them,
all within one UTC day (one chunk / partition). Then reads the table's size (every partition
or chunk: heap, TOAST and both indexes) and, when the database is TimescaleDB, compresses the
chunk (segmentby plugin_id, orderby timestamp, as sql/002 sets) and reads it again.

Run: .venv/bin/python bench/storage_footprint.py [--database-url URL] [--plugins 200]
[--cycles 2000]. Without --database-url an embedded PostgreSQL (no TimescaleDB) is started.
Last line: sample_row_bytes=<bytes per row as stored: compressed on TimescaleDB, else raw>.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.fleet import FleetGenerator
from bench.scratch import scratch_database
from pluginmon.storage.ingest import sample_row
from pluginmon.storage.queries import ensure_tenant_and_plugin
from pluginmon.storage.writer import PLUGIN_SAMPLES_COLUMNS, PLUGIN_SAMPLES_TABLE

SPACING = timedelta(seconds=10)


async def load(url: str, *, plugins: int, cycles: int, start: datetime) -> int:
    gen = FleetGenerator(0, plugins, random.Random(0))
    conn = await asyncpg.connect(url)
    try:
        ids = [
            await ensure_tenant_and_plugin(conn, k.tenant, k.plugin, k.environment)
            for k in gen.keys
        ]
        rows = 0
        for cycle in range(cycles):
            snapshot = gen.snapshot(start + SPACING * cycle)
            records = [
                sample_row(s, plugin=pid, host=gen.host)
                for s, pid in zip(snapshot.samples, ids, strict=True)
            ]
            await conn.copy_records_to_table(
                PLUGIN_SAMPLES_TABLE, records=records, columns=PLUGIN_SAMPLES_COLUMNS, timeout=60
            )
            rows += len(records)
    finally:
        await conn.close()
    return rows


def table_bytes(conn: psycopg.Connection[tuple[Any, ...]], timescale: bool) -> int:
    """Heap + TOAST + indexes of plugin_samples, over all its partitions or chunks."""
    if timescale:
        row = conn.execute("SELECT total_bytes FROM hypertable_detailed_size('plugin_samples')")
    else:
        row = conn.execute(
            "SELECT sum(pg_total_relation_size(relid)) FROM pg_partition_tree('plugin_samples')"
        )
    value = row.fetchone()
    assert value is not None
    return int(value[0] or 0)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--database-url", help="admin URL of a server to create a database on")
    parser.add_argument("--plugins", type=int, default=200)
    parser.add_argument("--cycles", type=int, default=2000)
    args = parser.parse_args()
    day = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    start = day - timedelta(days=1)  # yesterday: one day's chunk, complete
    if SPACING * args.cycles > timedelta(days=1):
        parser.error("--cycles: at most one day of 10 s snapshots (8640)")
    with scratch_database(
        args.database_url,
        server_dir_prefix="pluginmon-bench-footprint-",
        database_prefix="pluginmon_bench_footprint",
    ) as url:
        rows = asyncio.run(load(url, plugins=args.plugins, cycles=args.cycles, start=start))
        with psycopg.connect(url, autocommit=True) as conn:
            found = conn.execute(
                "SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'"
            ).fetchone()
            timescale = found is not None
            conn.execute("VACUUM ANALYZE plugin_samples")
            raw = table_bytes(conn, timescale)
            print(
                f"{rows:,} rows ({args.plugins} plugins x {args.cycles} snapshots at 10 s) on "
                f"{'TimescaleDB ' + str(found[0]) if found else 'PostgreSQL (partitions)'}"
            )
            print(f"as written (heap, TOAST, two indexes): {raw / rows:.1f} bytes per row")
            stored = raw / rows
            if timescale:
                conn.execute(
                    "SELECT compress_chunk(c, if_not_compressed => true)"
                    " FROM show_chunks('plugin_samples') c"
                )
                compressed = table_bytes(conn, timescale)
                stored = compressed / rows
                print(
                    f"compressed (segmentby plugin_id): {stored:.1f} bytes per row, "
                    f"{raw / max(compressed, 1):.1f}x smaller"
                )
    print(f"sample_row_bytes={stored:.1f}")


if __name__ == "__main__":
    main()
