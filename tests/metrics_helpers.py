"""Real plugin processes serving real /metrics for the plugin-metrics tests, and the storage side built for real."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg

from pluginmon.collectors.models import PluginKey
from pluginmon.storage.plugin_metrics import (
    PLUGIN_METRICS_COLUMNS,
    PLUGIN_METRICS_TABLE,
    MetricSink,
)
from pluginmon.storage.reachability import DatabaseWatch
from pluginmon.storage.writer import BatchWriter
from tests.collector_helpers import Spawner

# Request rate of the plugin child's counter: exactly this many per second of its uptime.
REQUESTS_PER_SECOND = 10.0
# The child's latency histogram: buckets every 0.1 s, observations cycling through the
# uniform values (i + 0.5) / 100, so the true p95 is 0.945.
LATENCY_BUCKETS = tuple(round(0.1 * i, 1) for i in range(1, 11))
LATENCY_VALUES = tuple((i + 0.5) / 100 for i in range(100))
TRUE_P95 = sorted(LATENCY_VALUES)[94]
# Series of the "big" child: enough that parsing takes a good fraction of a second.
BIG_SERIES = 60_000

# argv: mode, port ("0": any). Prints the port it serves on, then serves until stdin closes.
#   plugin: prometheus-client's own start_http_server with a gauge, a counter (growing at
#           REQUESTS_PER_SECOND), a histogram observed continuously, labels that try to
#           pass for pluginmon's own (tenant, plugin, environment) and a health_score gauge.
#   hang:   accepts, reads the request and never answers.
#   huge:   answers 200 with 10 MB of valid text format, no Content-Length.
#   declared: the same, announcing its 10 MB in Content-Length.
#   big:    answers 200 with BIG_SERIES valid gauge series (about 1.5 MB), Content-Length set.
PLUGIN_CHILD = (
    r"""
import sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

mode, port = sys.argv[1], int(sys.argv[2])
if mode == "plugin":
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
    from prometheus_client.core import CounterMetricFamily

    registry = CollectorRegistry()
    started = time.monotonic()

    class Requests:
        def collect(self):
            family = CounterMetricFamily("requests", "Requests served", labels=["method"])
            family.add_metric(["GET"], RATE * (time.monotonic() - started))
            yield family

    registry.register(Requests())
    Gauge("queue_depth", "Jobs waiting", registry=registry).set(7)
    Gauge("workers", "Workers by pool", ["pool"], registry=registry).labels("a").set(3)
    Gauge("health_score", "The plugin's own idea of its health", registry=registry).set(1)
    forged = Counter(
        "forged_events", "Events with labels that try to pass for pluginmon's",
        ["tenant", "plugin", "environment", "exported_tenant"], registry=registry,
    )
    forged.labels("other-tenant", "victim", "staging", "x").inc(3)
    latency = Histogram(
        "request_duration_seconds", "Request latency", buckets=BUCKETS, registry=registry
    )

    def observe():
        i = 0
        while True:
            for _ in range(20):
                latency.observe(VALUES[i % len(VALUES)])
                i += 1
            time.sleep(0.01)

    threading.Thread(target=observe, daemon=True).start()
    server, _ = start_http_server(port, addr="127.0.0.1", registry=registry)
else:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def do_GET(self):
            if mode == "hang":
                time.sleep(3600)
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            if mode == "big":
                body = b"".join(b"big_gauge{i=\"%d\"} %d\n" % (i, i) for i in range(BIG_SERIES))
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            if mode == "declared":
                self.send_header("Content-Length", str(10 * 1024 * 1024))
            self.end_headers()
            line = b"huge_gauge{i=\"%d\"} 1\n"
            sent = 0
            i = 0
            while sent < 10 * 1024 * 1024:
                chunk = b"".join(line % (i + k) for k in range(1000))
                i += 1000
                try:
                    self.wfile.write(chunk)
                except OSError:
                    return
                sent += len(chunk)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
print(server.server_port, flush=True)
sys.stdin.read()
""".replace("BIG_SERIES", repr(BIG_SERIES))
    .replace("RATE", repr(REQUESTS_PER_SECOND))
    .replace("BUCKETS", repr(LATENCY_BUCKETS))
    .replace("VALUES", repr(LATENCY_VALUES))
)


def start_plugin(
    spawner: Spawner,
    mode: str,
    port: int = 0,
    *,
    marker: str = "",
    env: dict[str, str] | None = None,
) -> tuple[Any, str]:
    """A child serving ``mode`` on loopback; (process, its /metrics URL). ``marker`` ends its
    command line (for a cmdline match); ``env`` adds to its environment."""
    args = (mode, str(port), marker) if marker else (mode, str(port))
    child, line = spawner.python(PLUGIN_CHILD, *args, env=env)
    return child, f"http://127.0.0.1:{int(line)}/metrics"


@dataclass
class Storage:
    pool: asyncpg.Pool
    writer: BatchWriter
    sink: MetricSink


@asynccontextmanager
async def metric_storage(url: str) -> AsyncIterator[Storage]:
    """A pool, a running plugin_metrics BatchWriter (flushing every 0.2 s) and its sink."""
    async with AsyncExitStack() as stack:
        pool = await stack.enter_async_context(asyncpg.create_pool(url, min_size=1, max_size=4))
        writer = await stack.enter_async_context(
            BatchWriter(
                pool,
                table=PLUGIN_METRICS_TABLE,
                columns=PLUGIN_METRICS_COLUMNS,
                max_rows=1000,
                max_delay_seconds=0.2,
            )
        )
        database = DatabaseWatch(pool, writer=writer)
        database.mark_schema_ready()
        yield Storage(pool, writer, MetricSink(pool=pool, writer=writer, database=database))


async def rows_of(
    pool: asyncpg.Pool, key: PluginKey, name: str | None = None
) -> Sequence[asyncpg.Record]:
    """The plugin_metrics rows of ``key`` (by its plugins row), oldest first."""
    rows: Sequence[asyncpg.Record] = await pool.fetch(
        """SELECT m."timestamp", m.tenant_id, m.plugin_id, m.environment, m.metric_name,
                  m.metric_kind, m.value, m.labels::text AS labels
             FROM plugin_metrics m
             JOIN plugins p ON p.tenant_id = m.tenant_id AND p.id = m.plugin_id
            WHERE p.tenant_id = $1 AND p.name = $2 AND m.environment = $3
              AND ($4::text IS NULL OR m.metric_name = $4)
            ORDER BY m."timestamp", m.metric_name, m.labels::text""",
        key.tenant,
        key.plugin,
        key.environment,
        name,
    )
    return rows


async def scrapes_stored(pool: asyncpg.Pool, key: PluginKey, name: str) -> int:
    """How many distinct scrapes of ``key`` stored a ``name`` row."""
    rows = await rows_of(pool, key, name)
    return len({r["timestamp"] for r in rows})


async def sleep_briefly() -> None:
    await asyncio.sleep(0.05)
