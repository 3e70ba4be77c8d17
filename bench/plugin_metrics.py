"""Plugin metrics scraping: 1,000 plugins x 50 series at 10 s, daemon CPU and rows/s, against the same rows COPYed raw.

Setup, all on this machine:

  servers  SERVERS (default 4) aiohttp processes on loopback, each serving PLUGINS/SERVERS
           plugins at ``/plugin/<n>/metrics``: 1,000 distinct endpoints, each a Prometheus
           text body of 50 series (10 counters, 26 gauges, one histogram of 12 buckets with
           _sum and _count) whose values move with time. The servers' CPU is not the
           daemon's and is not counted.
  daemon   this process: the daemon's own PluginMetricsService (daemon.plugin_metrics) with
           its Scraper (aiohttp, 32 requests at a time, parsing in worker threads), the
           MetricSink and a BatchWriter (5,000-row batches, 2 s delay, as the daemon's
           defaults) into plugin_metrics of a scratch database, every target on a 10 s
           interval. The database server's CPU is not counted either.

After a warm-up (the first cycle looks up 1,000 plugin ids), DURATION seconds are measured:
this process's CPU time (all threads: the event loop, the parsing threads, asyncpg) over
the wall time, the rows stored per second, the scrapes and their refusals, and how late a
50 ms ticker on the event loop ran (median, p99, max: parsing must not run on the loop).

Baseline in the same run: the rows stored during the measured window are read back, the
table is truncated, and the same rows are written by one raw ``copy_records_to_table`` on
one connection: its rows/s and its client CPU per 1,000 rows next to the scrape path's.

Run: .venv/bin/python bench/plugin_metrics.py [--database-url URL] [--duration 60]
Last line: plugin_metrics_scrape_cpu_percent=<x> (100 = one core).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.scratch import free_port, scratch_database
from pluginmon.collectors.exposition import ExpositionLimits, parse_exposition
from pluginmon.collectors.models import PluginKey
from pluginmon.collectors.push import PushConfig
from pluginmon.collectors.scrape import ScrapeConfig, ScrapeTarget
from pluginmon.daemon.plugin_metrics import PluginMetricsService
from pluginmon.storage.plugin_metrics import (
    PLUGIN_METRICS_COLUMNS,
    PLUGIN_METRICS_TABLE,
    MetricSink,
)
from pluginmon.storage.pool import pool_context, redact_url
from pluginmon.storage.reachability import DatabaseWatch
from pluginmon.storage.writer import BatchWriter

SERVER = r"""
import sys, time
from aiohttp import web

port, first, count = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
started = time.monotonic()
BOUNDS = ("0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1.0", "2.5", "5.0", "10.0", "+Inf")


def body(n):
    t = time.monotonic() - started
    tick = int(t)
    out = ["# HELP app_requests_total Requests served\n# TYPE app_requests_total counter\n"]
    out += [f'app_requests_total{{route="/r{r}"}} {int(t * (r + 1)) + n}\n' for r in range(10)]
    out.append("# HELP app_queue_depth Jobs waiting\n# TYPE app_queue_depth gauge\n")
    out += [f'app_queue_depth{{queue="q{q}"}} {(n * 31 + q * 7 + tick) % 100}\n' for q in range(25)]
    out.append(f"# HELP app_workers Workers\n# TYPE app_workers gauge\napp_workers {n % 16}\n")
    out.append("# HELP app_latency_seconds Latency\n# TYPE app_latency_seconds histogram\n")
    total = int(t * 50) + n
    out += [
        f'app_latency_seconds_bucket{{le="{b}"}} {total * (i + 1) // len(BOUNDS)}\n'
        for i, b in enumerate(BOUNDS)
    ]
    out.append(f"app_latency_seconds_sum {total * 0.21:.3f}\napp_latency_seconds_count {total}\n")
    return "".join(out)


async def metrics(request):
    n = int(request.match_info["n"])
    if not first <= n < first + count:
        raise web.HTTPNotFound()
    return web.Response(text=body(n), content_type="text/plain", charset="utf-8",
                        headers={"X-Series": "50"})


app = web.Application()
app.router.add_get("/plugin/{n}/metrics", metrics)
web.run_app(app, host="127.0.0.1", port=port, print=lambda *a: print("ready", flush=True),
            access_log=None)
"""


@contextlib.contextmanager
def servers(count: int, plugins: int) -> Iterator[list[tuple[int, int, int]]]:
    """(port, first plugin, plugin count) of each server process, stopped afterwards."""
    per = -(-plugins // count)
    procs: list[subprocess.Popen[bytes]] = []
    layout: list[tuple[int, int, int]] = []
    try:
        for index in range(count):
            first = index * per
            size = min(per, plugins - first)
            port = free_port()
            proc = subprocess.Popen(
                [sys.executable, "-c", SERVER, str(port), str(first), str(size)],
                stdout=subprocess.PIPE,
                start_new_session=True,
            )
            procs.append(proc)
            assert proc.stdout is not None
            if not proc.stdout.readline():
                raise RuntimeError(f"server {index} did not start")
            layout.append((port, first, size))
        yield layout
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)


class LoopLag:
    """The lateness of a 50 ms ticker: how long the event loop was kept from running it
    (by our work, or by a machine too busy to schedule this process)."""

    def __init__(self) -> None:
        self.late: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(0.05)
            self.late.append(max(0.0, time.perf_counter() - before - 0.05))

    def start(self) -> None:
        self.late = []
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def summary(self) -> str:
        ordered = sorted(self.late) or [0.0]
        p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
        return (
            f"median {statistics.median(ordered) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, "
            f"max {ordered[-1] * 1000:.1f} ms over {len(self.late)} ticks"
        )


async def raw_copy(url: str, rows: list[tuple[object, ...]]) -> tuple[float, float]:
    """(wall, CPU) seconds of one raw COPY of ``rows`` into the truncated table."""
    connection = await asyncpg.connect(url)
    try:
        await connection.execute("TRUNCATE plugin_metrics")
        await connection.execute("CHECKPOINT")
        cpu, wall = time.process_time(), time.perf_counter()
        await connection.copy_records_to_table(
            PLUGIN_METRICS_TABLE, records=rows, columns=PLUGIN_METRICS_COLUMNS, timeout=3600
        )
        return time.perf_counter() - wall, time.process_time() - cpu
    finally:
        await connection.close()


async def main_async(
    args: argparse.Namespace, url: str, layout: list[tuple[int, int, int]]
) -> float:
    targets = [
        ScrapeTarget(
            key=PluginKey("bench", f"plugin-{n}", "production"),
            url=f"http://127.0.0.1:{port}/plugin/{n}/metrics",
            interval_seconds=args.interval,
            timeout_seconds=5.0,
            limits=ExpositionLimits(),
        )
        for port, first, size in layout
        for n in range(first, first + size)
    ]
    connection = await asyncpg.connect(url)
    try:
        version = await connection.fetchval("SHOW server_version")
        timescale = await connection.fetchval(
            "SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'"
        )
    finally:
        await connection.close()
    backend = f"TimescaleDB {timescale} (hypertable)" if timescale else "PostgreSQL (partitioned)"
    print(f"server: PostgreSQL {version}, {backend}; {redact_url(url)}")
    print(
        f"targets: {len(targets)} plugins on {len(layout)} aiohttp servers "
        f"(distinct paths), 50 series each, every {args.interval:g} s"
    )
    async with (
        pool_context(url) as pool,
        BatchWriter(
            pool,
            table=PLUGIN_METRICS_TABLE,
            columns=PLUGIN_METRICS_COLUMNS,
            max_rows=5000,
            max_delay_seconds=2.0,
            max_queue_rows=100_000,
        ) as writer,
    ):
        database = DatabaseWatch(pool, writer=writer)
        database.mark_schema_ready()
        sink = MetricSink(pool=pool, writer=writer, database=database)
        service = PluginMetricsService(
            scrape=ScrapeConfig(targets=tuple(targets), discovered=False),
            push=PushConfig(),
            sink=sink,
            discovered=lambda: (),
        )
        lag = LoopLag()
        async with service:
            await asyncio.sleep(args.warmup)
            await writer.flush()
            scrapes0, points0 = service.scraper.scrapes, sink.points_stored
            window_start = datetime.now(UTC)
            lag.start()
            cpu0, wall0 = time.process_time(), time.perf_counter()
            await asyncio.sleep(args.duration)
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
            window_end = datetime.now(UTC)
            await lag.stop()
            scrapes = service.scraper.scrapes - scrapes0
            points = sink.points_stored - points0
            refused = {
                reason: count
                for t in targets
                for reason, count in service.scraper.stats.rejected(t.key).items()
                if count
            }
        await writer.flush()
        stats = writer.stats()
    if stats.rows_dropped or stats.rows_rejected or any(sink.dropped().values()):
        raise RuntimeError(f"rows lost: {stats} {sink.dropped()}")
    connection = await asyncpg.connect(url)
    try:
        stored = await connection.fetch(
            'SELECT "timestamp", tenant_id, plugin_id, environment, metric_name, metric_kind, '
            'value, labels::text FROM plugin_metrics WHERE "timestamp" >= $1 AND "timestamp" < $2',
            window_start,
            window_end,
        )
    finally:
        await connection.close()
    rows = [tuple(record) for record in stored]
    share = 100 * cpu / wall
    print(
        f"measured {wall:.1f} s after a {args.warmup:g} s warm-up: {scrapes} scrapes "
        f"({scrapes / wall:.1f}/s), refused: {refused or 'none'}"
    )
    print(
        f"  rows stored: {points} ({points / wall:,.0f} rows/s; expected "
        f"{len(targets) * 50 / args.interval:,.0f}); rows of the window in the table: {len(rows)}"
    )
    print(f"  daemon CPU: {cpu:.2f} s over {wall:.1f} s = {share:.2f}% of one core")
    print(f"  daemon CPU per 1,000 rows: {1000 * cpu / max(points, 1) * 1000:.1f} ms")
    print(f"  event-loop lateness of a 50 ms ticker: {lag.summary()}")
    print(f"  load average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")

    # What parsing alone costs, for the record: one body parsed 200 times.
    body = await asyncio.to_thread(_fetch, targets[0].url)
    parse_cpu = time.process_time()
    for _ in range(200):
        parse_exposition(body, content_type="text/plain; version=0.0.4", limits=ExpositionLimits())
    parse_ms = (time.process_time() - parse_cpu) / 200 * 1000
    print(f"  parse alone: {parse_ms:.2f} ms CPU per 50-series body")

    raw_wall, raw_cpu = await raw_copy(url, rows)
    print(
        f"baseline, the same {len(rows)} rows in one raw COPY: {len(rows) / raw_wall:,.0f} rows/s "
        f"({raw_wall:.2f} s), client CPU {1000 * raw_cpu / max(len(rows), 1) * 1000:.1f} ms per "
        "1,000 rows"
    )
    print(
        f"  scrape path CPU per row / raw COPY CPU per row: "
        f"{(cpu / max(points, 1)) / max(raw_cpu / max(len(rows), 1), 1e-12):.1f}x"
    )
    return share


def _fetch(url: str) -> bytes:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 (loopback)
        data: bytes = response.read()
        return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--database-url", help="server to create the scratch database on")
    parser.add_argument("--plugins", type=int, default=1000)
    parser.add_argument("--servers", type=int, default=4)
    parser.add_argument("--interval", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=25.0)
    parser.add_argument("--duration", type=float, default=60.0)
    args = parser.parse_args()
    with (
        scratch_database(args.database_url, server_dir_prefix="pluginmon-bench-pm-") as url,
        servers(args.servers, args.plugins) as layout,
    ):
        share = asyncio.run(main_async(args, url, layout))
    print(f"plugin_metrics_scrape_cpu_percent={share:.2f}")


if __name__ == "__main__":
    main()
