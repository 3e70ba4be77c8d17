"""Ingest throughput: BatchWriter at its defaults vs one raw binary COPY of the same rows.

Writes PLUGINS x TIMESTAMPS wide samples (1,000 x 1,000 = 1,000,000 by default) into
plugin_samples, with its indexes, in a scratch database created and migrated for the run:

  raw     one ``copy_records_to_table`` of all the rows on one connection (the database's
          own limit for a single client)
  writer  BatchWriter with its default settings (5,000-row batches, 2 in flight on a pool
          of 4, no spool): each transaction writes its batches' ids into the ingest ledger
          and their rows by binary COPY (exactly once). Fed one timestamp (PLUGINS rows) at
          a time as the daemon does, through ``put_wait`` so the producer never outruns the
          queue; timed from the first put to the end of ``flush()``
  spool   the same writer with a disk spool, as the daemon runs it: every batch is also
          appended to the spool (encoded, fsync'ed) before it is written and acked there
          after its commit (the write-ahead that makes a SIGKILL lose at most the cycle in
          flight)
  ledger  the ledger's own cost, apart from the writer's concurrency (which makes the
          rounds above swing): on one connection, 5,000-row batches alternately copied in
          a plain transaction and through storage.ledger.copy_batches (the ledger insert in
          the same transaction); the medians per batch are compared

The table is truncated before every run. Each is run ROUNDS times, interleaved, and the best
of each is compared (the machine is shared; the best run is the least disturbed one). The
row tuples are built before any timing starts.

Run: .venv/bin/python bench/ingest.py [--database-url URL] [--rounds 5]
Without --database-url an embedded PostgreSQL is started in a temporary directory; with it,
a scratch database is created on that server (e.g. TimescaleDB at
postgresql://postgres@127.0.0.1:5433/postgres) and dropped afterwards; a URL naming a Citus
database on a coordinator makes the scratch database a Citus database on the same nodes
(bench/scratch.py), e.g. the one `python -m tests.citus_cluster DIR` prints.
Last lines: the ledger's cost per batch, writer_with_spool_vs_raw_copy=<ratio>, then
writer_vs_raw_copy=<ratio>.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.scratch import scratch_database
from pluginmon.storage.ledger import LedgerBatch, copy_batches
from pluginmon.storage.pool import pool_context, redact_url
from pluginmon.storage.spool import Spool
from pluginmon.storage.writer import (
    PLUGIN_SAMPLES_COLUMNS,
    PLUGIN_SAMPLES_TABLE,
    BatchWriter,
)

Row = tuple[object, ...]


async def create_plugins(
    connection: asyncpg.Connection, count: int, *, tenants: int = 1
) -> list[tuple[str, int]]:
    """``count`` plugins spread over ``tenants`` tenants (plugin n in tenant n mod tenants):
    (tenant, plugin id) in id order. On Citus the tenant picks the shard group."""
    names = ["bench"] if tenants == 1 else [f"bench-{i:03d}" for i in range(tenants)]
    await connection.executemany(
        "INSERT INTO tenants (id, name) VALUES ($1, $1)", [(name,) for name in names]
    )
    records = await connection.fetch(
        "INSERT INTO plugins (tenant_id, name)"
        " SELECT ($2::text[])[1 + n % cardinality($2::text[])], 'plugin-' || n"
        " FROM generate_series(1, $1) AS n RETURNING tenant_id, id",
        count,
        names,
    )
    return sorted(
        ((str(record["tenant_id"]), int(record["id"])) for record in records), key=lambda p: p[1]
    )


def build_rows(plugins: list[tuple[str, int]], timestamps: int) -> list[list[Row]]:
    """One list of rows per timestamp, every plugin in each (the daemon's snapshot shape)."""
    start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    hosts = [f"host-{i:02d}" for i in range(20)]
    ticks: list[list[Row]] = []
    for tick in range(timestamps):
        timestamp = start + timedelta(seconds=10 * tick)
        rows: list[Row] = []
        for index, (tenant, plugin_id) in enumerate(plugins):
            seed = tick * 7919 + index * 104_729
            rows.append(
                (
                    timestamp,
                    tenant,
                    plugin_id,
                    "production",
                    hosts[index % len(hosts)],
                    (seed % 4000) / 10.0,
                    50_000_000 + seed % 1_000_000_000,
                    200_000_000 + seed % 2_000_000_000,
                    None if index % 4 else 40_000_000 + seed % 500_000_000,
                    None if index % 4 else seed % 1_000_000,
                    1 + seed % 64,
                    None if index % 4 else 8 + seed % 1000,
                    tick * 4096 + index,
                    tick * 8192 + index,
                    tick * 100 + index,
                    tick * 3 + index,
                    1 + index % 5,
                    0,
                    seed % 97 != 0,
                )
            )
        ticks.append(rows)
    return ticks


async def truncate(url: str) -> None:
    connection = await asyncpg.connect(url)
    try:
        await connection.execute("TRUNCATE plugin_samples")
        await connection.execute("CHECKPOINT")
    finally:
        await connection.close()


async def count_rows(url: str) -> int:
    connection = await asyncpg.connect(url)
    try:
        return int(await connection.fetchval("SELECT count(*) FROM plugin_samples"))
    finally:
        await connection.close()


async def run_raw(url: str, rows: list[Row]) -> float:
    connection = await asyncpg.connect(url)
    try:
        started = time.perf_counter()
        await connection.copy_records_to_table(
            PLUGIN_SAMPLES_TABLE, records=rows, columns=PLUGIN_SAMPLES_COLUMNS, timeout=3600
        )
        return time.perf_counter() - started
    finally:
        await connection.close()


async def run_writer(url: str, ticks: list[list[Row]], *, with_spool: bool) -> float:
    with tempfile.TemporaryDirectory(prefix="pluginmon-bench-spool-") as directory:
        spool = Spool(Path(directory) / "spool") if with_spool else None
        try:
            async with (
                pool_context(url) as pool,
                BatchWriter(
                    pool, table=PLUGIN_SAMPLES_TABLE, columns=PLUGIN_SAMPLES_COLUMNS, spool=spool
                ) as writer,
            ):
                started = time.perf_counter()
                for rows in ticks:
                    await writer.put_wait(rows)
                await writer.flush()
                elapsed = time.perf_counter() - started
                stats = writer.stats()
        finally:
            if spool is not None:
                spool.close()
    if stats.rows_dropped or stats.rows_rejected or stats.rows_deduplicated:
        raise RuntimeError(f"writer lost or skipped rows: {stats}")
    if with_spool and (stats.rows_spooled != stats.rows_written or stats.spool_rows):
        raise RuntimeError(f"not every row went through the spool: {stats}")
    return elapsed


async def run_ledger_overhead(
    url: str, rows: list[Row], *, batch_rows: int = 5000
) -> tuple[float, float, int]:
    """(median seconds per batch in a plain transaction, ... through copy_batches, batches
    of each), alternating on one connection so both see the same load."""
    plain: list[float] = []
    ledger: list[float] = []
    connection = await asyncpg.connect(url)
    try:
        for number, start in enumerate(range(0, len(rows), batch_rows)):
            batch = rows[start : start + batch_rows]
            started = time.perf_counter()
            if number % 2:
                await copy_batches(
                    connection,
                    table=PLUGIN_SAMPLES_TABLE,
                    columns=PLUGIN_SAMPLES_COLUMNS,
                    batches=[LedgerBatch(uuid.uuid4(), batch)],
                    timeout_seconds=600,
                    isolate_rejected=False,
                )
                ledger.append(time.perf_counter() - started)
            else:
                async with connection.transaction():
                    await connection.copy_records_to_table(
                        PLUGIN_SAMPLES_TABLE,
                        records=batch,
                        columns=PLUGIN_SAMPLES_COLUMNS,
                        timeout=600,
                    )
                plain.append(time.perf_counter() - started)
    finally:
        await connection.close()
    return statistics.median(plain), statistics.median(ledger), min(len(plain), len(ledger))


async def main_async(args: argparse.Namespace, url: str) -> float:
    connection = await asyncpg.connect(url)
    try:
        plugin_ids = await create_plugins(connection, args.plugins, tenants=args.tenants)
        version = await connection.fetchval("SHOW server_version")
        timescale = await connection.fetchval(
            "SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'"
        )
        citus = await connection.fetchval(
            "SELECT extversion FROM pg_extension WHERE extname = 'citus'"
        )
        workers = (
            await connection.fetchval(
                "SELECT count(*) FROM pg_dist_node WHERE groupid <> 0 AND isactive"
            )
            if citus
            else 0
        )
    finally:
        await connection.close()
    ticks = build_rows(plugin_ids, args.timestamps)
    flat = [row for rows in ticks for row in rows]
    total = len(flat)
    if citus:
        backend = f"Citus {citus} (distributed by tenant over {workers} workers)"
    elif timescale:
        backend = f"TimescaleDB {timescale} (hypertable)"
    else:
        backend = "PostgreSQL (partitioned)"
    print(f"server: PostgreSQL {version}, {backend}; {redact_url(url)}")
    print(
        f"rows: {total:,} ({args.plugins:,} plugins of {args.tenants} tenant(s) x "
        f"{args.timestamps:,} timestamps)"
    )

    best_raw = best_writer = best_spool = float("inf")
    for round_number in range(1, args.rounds + 1):
        await truncate(url)
        raw_seconds = await run_raw(url, flat)
        assert await count_rows(url) == total
        await truncate(url)
        writer_seconds = await run_writer(url, ticks, with_spool=False)
        assert await count_rows(url) == total
        await truncate(url)
        spool_seconds = await run_writer(url, ticks, with_spool=True)
        assert await count_rows(url) == total
        best_raw = min(best_raw, raw_seconds)
        best_writer = min(best_writer, writer_seconds)
        best_spool = min(best_spool, spool_seconds)
        print(
            f"round {round_number}: raw copy {total / raw_seconds:,.0f} rows/s "
            f"({raw_seconds:.2f} s), writer {total / writer_seconds:,.0f} rows/s "
            f"({writer_seconds:.2f} s), writer with spool {total / spool_seconds:,.0f} rows/s "
            f"({spool_seconds:.2f} s)"
        )
    print(f"best raw copy (1 connection, 1 COPY): {total / best_raw:,.0f} rows/s")
    print(
        f"best writer (defaults: 5000-row batches, 2 in flight, ingest ledger): "
        f"{total / best_writer:,.0f} rows/s"
    )
    print(f"best writer with a spool (write-ahead + ledger): {total / best_spool:,.0f} rows/s")
    await truncate(url)
    plain, ledger, batches = await run_ledger_overhead(url, flat)
    assert await count_rows(url) == total
    print(
        f"ingest ledger, one connection, {batches} batches of 5,000 rows each way: median "
        f"{plain * 1000:.1f} ms per batch in a plain transaction, {ledger * 1000:.1f} ms with "
        f"the ledger insert ({(ledger - plain) * 1000:+.1f} ms, {ledger / plain - 1:+.1%})"
    )
    print(f"writer_with_spool_vs_raw_copy={best_raw / best_spool:.2f}")
    return best_raw / best_writer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--database-url", help="server to create the scratch database on")
    parser.add_argument("--plugins", type=int, default=1000)
    parser.add_argument("--timestamps", type=int, default=1000)
    parser.add_argument(
        "--tenants", type=int, default=1, help="plugins spread over this many tenants"
    )
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with scratch_database(args.database_url, server_dir_prefix="pluginmon-bench-") as url:
        ratio = asyncio.run(main_async(args, url))
    print(f"writer_vs_raw_copy={ratio:.2f}")


if __name__ == "__main__":
    main()
