"""Fleet benchmark: how many agents of 1,000 plugins at a 10 s interval one database on this
machine takes.

Each agent is the daemon's pipeline without the sampler: its own asyncpg pool, sample sink
(plugin ids resolved once per plugin, the unresolved spool), BatchWriter with its disk spool,
AlertEngine (the built-in rules, health rows every ``health_write_interval_seconds``, the
registry's gauges read once per maintenance interval, its journal), OutboxDeliverer with a
real webhook receiver, the database probe, and every 60 s the maintenance job and the
registry job with its backups duty (all agents contend for their advisory locks and
maintenance_runs rows, as daemons sharing a database do). A generator stands in for the sampler (measured by bench/scale.py): 1,000
plugins per agent, 60% idle with constant readings, 35% with CPU and RSS moving a little
every cycle, 5% busy (some over the CPU alert threshold, some leaking memory), one in 500
down now and then. Agents start at random phases of the interval, like hosts do.

Agents run in WORKERS worker processes (one asyncio loop each). N grows in STEPS; at each
step, once every agent has all its plugin ids and empty spools and after a warm-up, the
fleet is measured for DURATION seconds:

  rows/s             sample rows committed per second (the writers' counters)
  DB CPU / 1k rows   the database server's CPU (postmaster, backends, exited backends:
                     bench/procstat.py) per 1,000 sample rows, all its work included
  p99 commit lag     sample time to the COPY holding it committed, per cycle of each agent
  spool depth        rows in the agents' disk spools (both) at the end of the window
  split              execution time of the statements of each kind (pg_stat_statements,
                     top-level statements): samples, health + alerts, plugin ids,
                     maintenance, other; and the server CPU outside all statements
                     (commits, connections, WAL writer, checkpoints, autovacuum,
                     TimescaleDB's background jobs; on TimescaleDB also the samples'
                     COPYs: pg_stat_statements does not record a COPY into a hypertable)
  agents' CPU        the worker processes' CPU: the agents share the 2 cores too

The fleet stops growing when p99 lag exceeds one interval, a spool holds rows at the end of
a window, or agents skip cycles. Before the fleet starts, the same rows are COPYed raw, as
the writers send them (1,000-row batches, one COPY each) and nothing else: at each step's
concurrency (N connections, each one batch per interval, at its own phase) and back-to-back on
one connection (also after the fleet stops). The database CPU per sample row of the whole
workload is compared with both. Steady state, before the warm-up, is when every agent has all
its plugin ids, both its spools are empty and no rollup back-fill runs (agents that replayed
their unresolved spool at start back-fill the rollups from their oldest row).

What each part of the workload costs the database: ``--without PARTS`` leaves parts out
(the agents stay real pipelines; see PARTS), and ``--ablate`` runs the steps with the full
workload, then without each part in turn (the full workload again halfway and at the end),
each on a fresh database of the same server, and prints each part's database CPU per sample
row (the full workload's, the mean of its three runs, minus the workload's without it).
Server CPU, unlike statement time, does not count waiting for a CPU; on a shared machine the
three full runs show how far apart runs of the same workload land.

Run: .venv/bin/python bench/fleet.py [--steps 25,50,100,150,200] [--database-url URL]
Without --database-url an embedded PostgreSQL 18 is started with pg_stat_statements
preloaded, max_connections 1000 and shared_buffers 1 GB. With one, the server must run on this host, have
pg_stat_statements in shared_preload_libraries and enough max_connections (4 per agent).
A URL naming a Citus database on a coordinator (e.g. the one `python -m tests.citus_cluster
DIR` prints, its nodes given pg_stat_statements after citus in shared_preload_libraries)
runs the fleet on a new Citus database on the same nodes; the database CPU is then the
coordinator's and the workers' together, and the split is the coordinator's statements
(their execution time includes the workers' part of each).
Last line: fleet_agents_1k_plugins_10s=<largest N within the limits>.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.procstat import postmaster_of, server_cpu_seconds
from bench.scratch import new_database, node_urls, with_database
from pluginmon.alerts import persistence as alert_persistence
from pluginmon.alerts.engine import AlertEngine
from pluginmon.alerts.outbox import OutboxDeliverer
from pluginmon.alerts.rules import WebhookConfig, builtin_rules
from pluginmon.collectors.models import PluginKey, PluginSample, Snapshot
from pluginmon.daemon.api_backups import backup_job
from pluginmon.daemon.api_wiring import registry_job
from pluginmon.registry.backup_readers import Readers
from pluginmon.registry.backup_schedule import BackupSchedule
from pluginmon.storage import health_store, metric_rollups, partitions
from pluginmon.storage import writer as writer_module
from pluginmon.storage.backend import Retention, RollupRefresh
from pluginmon.storage.embedded import EmbeddedPostgres
from pluginmon.storage.engines import prepare_database
from pluginmon.storage.errors import TRANSIENT_ERRORS
from pluginmon.storage.ingest import SampleSink, SampleSpool, UnresolvedSpool, sample_row
from pluginmon.storage.ledger import Committed, LedgerBatch
from pluginmon.storage.pool import close_pool, open_pool
from pluginmon.storage.queries import ensure_tenant_and_plugin
from pluginmon.storage.reachability import DatabaseWatch
from pluginmon.storage.upkeep import Maintainer
from pluginmon.storage.writer import PLUGIN_SAMPLES_COLUMNS, PLUGIN_SAMPLES_TABLE, BatchWriter

MIB = 1 << 20
PLUGINS_PER_AGENT = 1000
TENANTS = 20
HEALTH_WRITE_INTERVAL_SECONDS = 60.0  # the daemon's default
MAINTENANCE_INTERVAL_SECONDS = 60.0
FLUSH_INTERVAL_SECONDS = 2.0
POOL_SIZE = 4  # the daemon's default database_pool_max_size


# -- parts of the workload that --without / --ablate leave out --------------------------------

# Each agent stays a real pipeline; a part left out does no database work (in the worker
# processes: the function that does it is replaced by one that does nothing, or its job is
# not scheduled). The difference between the full workload and one without a part is that
# part's database CPU, measured (not statement time, which counts waiting for a CPU too).
PARTS: dict[str, str] = {
    "samples-rollups": "the maintenance job's refresh of the samples rollups (1 m and 1 h)",
    "metrics-rollups": "the maintenance job's refresh of the plugin_metrics rollups "
    "(here: of the health rows)",
    "health": "the alert engine's health writes (health_score rows and UPDATE plugins)",
    "alerts-reads": "the alert engine's reads each cycle (silences, acknowledgements, "
    "dependencies, plugin metrics)",
    "registry": "the registry job with its backups duty (usage refresh included)",
    "outbox": "the outbox delivery poll every 5 s (a cycle's notifications are still delivered)",
    "ledger": "the ingest ledger row of each COPY's transaction (the rows COPYed alone in it)",
}


def parse_parts(text: str) -> frozenset[str]:
    parts = frozenset(p.strip() for p in text.split(",") if p.strip())
    unknown = sorted(parts - PARTS.keys())
    if unknown:
        raise SystemExit(
            f"--without: unknown part(s) {', '.join(unknown)}; known: {', '.join(PARTS)}"
        )
    return parts


async def _no_health(conn: Any, rows: Any, at: datetime) -> None:
    return None


async def _no_reads(
    self: alert_persistence.AlertPersistence, now: datetime, keys: Any, metric_names: Any
) -> alert_persistence.Inputs:
    return alert_persistence.Inputs([], set(), None, None)


async def _no_samples_rollup(conn: Any, spec: Any, now: datetime, **_: Any) -> RollupRefresh:
    return RollupRefresh(rollup=spec.relation, window_start=None, window_end=None, buckets=0)


async def _no_metrics_rollups(
    conn: Any, retention: Any, now: datetime, **_: Any
) -> metric_rollups.MetricRollupReport:
    return metric_rollups.MetricRollupReport(refreshed=(), removed=(), failed=())


async def _copy_without_ledger(
    connection: asyncpg.Connection,
    *,
    table: str,
    columns: Any,
    batches: list[LedgerBatch],
    timeout_seconds: float,
    isolate_rejected: bool,
) -> Committed:
    records = [row for batch in batches for row in batch.rows]
    async with connection.transaction():
        await connection.copy_records_to_table(
            table, records=records, columns=columns, timeout=timeout_seconds
        )
    return Committed(rows_written=len(records), batches_deduplicated=0, rows_deduplicated=0)


def leave_out(parts: frozenset[str]) -> None:
    """In a worker process: the database work of ``parts`` (those not scheduled by the
    agent itself: "registry", "outbox") replaced by nothing."""
    # setattr: the functions are looked up through their modules at each call
    if "health" in parts:
        setattr(health_store, "write_health", _no_health)  # noqa: B010
    if "alerts-reads" in parts:
        setattr(alert_persistence.AlertPersistence, "read_inputs", _no_reads)  # noqa: B010
    if "samples-rollups" in parts:
        setattr(partitions, "refresh_rollup", _no_samples_rollup)  # noqa: B010
    if "metrics-rollups" in parts:
        setattr(partitions, "maintain_metric_rollups", _no_metrics_rollups)  # noqa: B010
    if "ledger" in parts:
        setattr(writer_module, "copy_batches", _copy_without_ledger)  # noqa: B010


# -- the generator -----------------------------------------------------------------------------


class FleetGenerator:
    """Realistic snapshots of one agent's plugins (see the module docstring)."""

    def __init__(self, agent: int, plugins: int, rng: random.Random) -> None:
        self.host = f"agent-{agent:04d}"
        self._rng = rng
        self.keys = [
            PluginKey(f"t{(agent + j) % TENANTS:02d}", f"a{agent:04d}-p{j:04d}", "production")
            for j in range(plugins)
        ]
        kinds = []
        for _ in range(plugins):
            r = rng.random()
            kinds.append("idle" if r < 0.60 else "jitter" if r < 0.95 else "busy")
        self._kinds = kinds
        self._cpu = [0.0 if k == "idle" else rng.uniform(0.5, 20.0) for k in kinds]
        self._rss = [int(rng.uniform(30, 600) * MIB) for _ in kinds]
        self._busy_level = [rng.uniform(40.0, 99.0) for _ in kinds]
        self._leaking = [k == "busy" and rng.random() < 0.3 for k in kinds]
        self._down_until = [0.0] * plugins
        self._threads = [rng.randint(1, 40) for _ in kinds]
        self._started = datetime.now(UTC)

    def snapshot(self, at: datetime) -> Snapshot:
        rng = self._rng
        t = at.timestamp()
        samples = []
        for j, key in enumerate(self.keys):
            kind = self._kinds[j]
            if kind == "jitter":
                self._cpu[j] = max(0.0, min(60.0, self._cpu[j] + rng.uniform(-2.0, 2.0)))
                # a random walk, kept above 16 MiB (long runs walked it below zero)
                self._rss[j] = max(16 * MIB, self._rss[j] + int(rng.uniform(-1.0, 1.0) * MIB))
            elif kind == "busy":
                self._cpu[j] = max(0.0, self._busy_level[j] + rng.uniform(-8.0, 8.0))
                self._rss[j] += int(rng.uniform(0.5, 3.0) * MIB) if self._leaking[j] else 0
            if rng.random() < 0.0002:
                self._down_until[j] = t + rng.uniform(20.0, 120.0)
            up = self._down_until[j] <= t
            samples.append(
                PluginSample(
                    key=key,
                    timestamp=at,
                    up=up,
                    process_count=1 if up else 0,
                    cpu_percent=round(self._cpu[j], 1) if up else 0.0,
                    rss_bytes=max(self._rss[j], MIB) if up else 0,
                    vms_bytes=4 * self._rss[j] if up else 0,
                    threads=self._threads[j] if up else 0,
                    oldest_start_time=self._started if up else None,
                )
            )
        return Snapshot(timestamp=at, host=self.host, samples=tuple(samples), duration_seconds=0.01)


# -- one agent ----------------------------------------------------------------------------------


@dataclass(slots=True)
class AgentCounters:
    cycles: int = 0
    skipped: int = 0
    errors: int = 0
    # "job: ExceptionClass" -> [count, first message], so a run can say what its errors were
    error_kinds: dict[str, list[Any]] = field(default_factory=dict)
    lags: list[float] = field(default_factory=list)
    settled: bool = False

    def count_error(self, where: str, exc: BaseException) -> None:
        self.errors += 1
        kind = f"{where}: {type(exc).__name__}"
        self.error_kinds.setdefault(kind, [0, str(exc)[:200]])[0] += 1


class Agent:
    """One daemon's pipeline minus the sampler and the exporter."""

    def __init__(
        self,
        index: int,
        *,
        url: str,
        workdir: Path,
        interval: float,
        hook: WebhookConfig,
        without: frozenset[str] = frozenset(),
        health_write_interval: float = HEALTH_WRITE_INTERVAL_SECONDS,
    ) -> None:
        self.index = index
        self._health_write_interval = health_write_interval
        self._without = without
        self._url = url
        self._dir = workdir / f"agent-{index:04d}"
        self._interval = interval
        self._hook = hook
        self._gen = FleetGenerator(index, PLUGINS_PER_AGENT, random.Random(index))
        self.counters = AgentCounters()
        self.spool_rows = 0
        self.rows_written = 0
        self._put = 0  # rows handed to the writer so far, counted once settled
        self._pending: deque[tuple[int, float]] = deque()  # (rows put so far, sample time)

    async def run(self, stop: asyncio.Event) -> None:
        self._dir.mkdir(parents=True, exist_ok=True)
        pool = await open_pool(self._url, min_size=0, max_size=POOL_SIZE)
        try:
            spool = SampleSpool(self._dir / "spool", max_bytes=1 << 30)
            unresolved = UnresolvedSpool(self._dir / "unresolved", max_bytes=1 << 30)
            try:
                async with BatchWriter(
                    pool,
                    table=PLUGIN_SAMPLES_TABLE,
                    columns=PLUGIN_SAMPLES_COLUMNS,
                    max_rows=5000,
                    max_delay_seconds=FLUSH_INTERVAL_SECONDS,
                    max_queue_rows=100_000,
                    spool=spool,
                ) as writer:
                    await self._run_pipeline(pool, writer, spool, unresolved, stop)
            finally:
                unresolved.close()
                spool.close()
        finally:
            await close_pool(pool, timeout_seconds=10)

    async def _run_pipeline(
        self,
        pool: asyncpg.Pool,
        writer: BatchWriter,
        spool: SampleSpool,
        unresolved: UnresolvedSpool,
        stop: asyncio.Event,
    ) -> None:
        database = DatabaseWatch(pool, writer=writer)
        database.mark_schema_ready()
        sink = SampleSink(
            pool=pool,
            writer=writer,
            unresolved=unresolved,
            database=database,
            replay_seconds=max(1.0, self._interval / 2),
        )
        engine = AlertEngine(
            pool,
            builtin_rules(),
            webhooks=[self._hook],
            spool_dir=self._dir / "alert-spool",
            instance=self._gen.host,
            health_write_interval_seconds=self._health_write_interval,
            plugin_health_update_seconds=self._health_write_interval,
            # as the daemon does: the registry job's interval
            registry_metrics_interval_seconds=MAINTENANCE_INTERVAL_SECONDS,
        )
        try:
            try:
                await engine.start()
            except TRANSIENT_ERRORS as exc:
                # As the daemon does (Coordinator.start_alerts): the engine loads its state
                # again at the next evaluations; counted as an error of the run.
                self.counters.count_error("alert state start", exc)
            async with OutboxDeliverer(pool, [self._hook], None, instance=self._gen.host) as outbox:
                maintainer = Maintainer(
                    self._url,
                    retention=Retention(),
                    spools=[spool, unresolved.spool],
                    interval_seconds=MAINTENANCE_INTERVAL_SECONDS,
                    instance=self._gen.host,
                )
                # The daemon's "registry" job (daemon/app.py), with its backups duty.
                registry = registry_job(
                    lambda: pool,
                    metrics=None,
                    usage_window_seconds=max(30.0, 3 * self._interval),
                    backups=backup_job(
                        readers=Readers(),
                        schedule=BackupSchedule(),
                        metrics=None,
                        interval_seconds=MAINTENANCE_INTERVAL_SECONDS,
                        instance=self._gen.host,
                    ),
                    interval_seconds=MAINTENANCE_INTERVAL_SECONDS,
                    instance=self._gen.host,
                )
                async with asyncio.TaskGroup() as group:
                    group.create_task(
                        self._every(
                            stop,
                            self._interval,
                            self._cycle,
                            sink,
                            engine,
                            outbox,
                            writer,
                            unresolved,
                            counts_skips=True,
                        )
                    )
                    group.create_task(self._every(stop, FLUSH_INTERVAL_SECONDS, self._flush, sink))
                    group.create_task(self._every(stop, 5.0, self._probe, database))
                    if "outbox" not in self._without:
                        group.create_task(self._every(stop, 5.0, self._deliver, outbox))
                    group.create_task(
                        self._every(stop, MAINTENANCE_INTERVAL_SECONDS, self._maintain, maintainer)
                    )
                    if "registry" not in self._without:
                        group.create_task(
                            self._every(
                                stop, MAINTENANCE_INTERVAL_SECONDS, self._registry, registry
                            )
                        )
                    group.create_task(self._watch(stop, writer, unresolved))
        finally:
            await engine.aclose()

    async def _every(
        self, stop: asyncio.Event, period: float, job: Any, *args: Any, counts_skips: bool = False
    ) -> None:
        """Run ``job`` every ``period`` from a random phase; runs that would start late
        are skipped (coalesced), as the daemon's scheduler does."""
        next_at = time.monotonic() + random.uniform(0, period)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, next_at - time.monotonic())):
                    await stop.wait()
            if stop.is_set():
                return
            try:
                await job(*args)
            except Exception as exc:  # counted and named; a benchmark keeps going
                self.counters.count_error(getattr(job, "__name__", "job").lstrip("_"), exc)
            next_at += period
            now = time.monotonic()
            if now > next_at:
                missed = math.ceil((now - next_at) / period)
                if counts_skips:
                    self.counters.skipped += missed
                next_at += missed * period

    async def _cycle(
        self,
        sink: SampleSink,
        engine: AlertEngine,
        outbox: OutboxDeliverer,
        writer: BatchWriter,
        unresolved: UnresolvedSpool,
    ) -> None:
        at = datetime.now(UTC)
        snapshot = await asyncio.to_thread(self._gen.snapshot, at)
        settled = self.counters.settled
        if not settled and unresolved.rows == 0 and len(sink.plugin_ids) >= PLUGINS_PER_AGENT:
            stats = writer.stats()
            if stats.spool_rows == 0:
                # From now on every sample goes straight to the writer: its commit is
                # the writer's counter passing this cycle's rows.
                self.counters.settled = settled = True
                self._put = stats.rows_written + stats.rows_queued
        await sink.put(snapshot)
        if settled:
            self._put += len(snapshot.samples)
            self._pending.append((self._put, at.timestamp()))
        report = await engine.process(snapshot, sink.plugin_ids)
        if report.notifications_queued:
            await outbox.deliver_due()
        self.counters.cycles += 1

    async def _flush(self, sink: SampleSink) -> None:
        await sink.flush(timeout_seconds=10.0)

    async def _probe(self, database: DatabaseWatch) -> None:
        await database.probe()

    async def _deliver(self, outbox: OutboxDeliverer) -> None:
        await outbox.deliver_due()

    async def _maintain(self, maintainer: Maintainer) -> None:
        await maintainer.run()

    async def _registry(self, job: Any) -> None:
        await job()

    async def _watch(
        self, stop: asyncio.Event, writer: BatchWriter, unresolved: UnresolvedSpool
    ) -> None:
        while not stop.is_set():
            stats = writer.stats()
            now = time.time()
            pending = self._pending
            while pending and pending[0][0] <= stats.rows_written:
                self.counters.lags.append(now - pending.popleft()[1])
            self.spool_rows = stats.spool_rows + unresolved.rows
            self.rows_written = stats.rows_written
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.25):
                    await stop.wait()


# -- a worker process: many agents on one event loop ---------------------------------------------


async def worker_main(
    url: str,
    interval: float,
    without: frozenset[str],
    health_write_interval: float = HEALTH_WRITE_INTERVAL_SECONDS,
) -> None:
    """Reads commands on stdin (one JSON object a line), answers on stdout."""
    leave_out(without)
    workdir = Path(tempfile.mkdtemp(prefix="pluginmon-bench-fleet-agents-"))
    received = 0

    async def hook_handler(request: web.Request) -> web.Response:
        nonlocal received
        await request.read()
        received += 1
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", hook_handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    hook = WebhookConfig(name="bench", url=f"http://127.0.0.1:{port}/hook")
    stop = asyncio.Event()
    agents: list[Agent] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        while True:
            line = await asyncio.to_thread(sys.stdin.readline)
            if not line:
                break
            command = json.loads(line)
            if command["cmd"] == "add":
                for index in command["agents"]:
                    agent = Agent(
                        index,
                        url=url,
                        workdir=workdir,
                        interval=interval,
                        hook=hook,
                        without=without,
                        health_write_interval=health_write_interval,
                    )
                    agents.append(agent)
                    tasks.append(asyncio.create_task(agent.run(stop), name=str(index)))
                reply: dict[str, Any] = {"agents": len(agents)}
            elif command["cmd"] == "report":
                lags: list[float] = []
                for agent in agents:
                    lags.extend(agent.counters.lags)
                    agent.counters.lags = []
                reply = {
                    "agents": len(agents),
                    "settled": sum(a.counters.settled for a in agents),
                    "cycles": sum(a.counters.cycles for a in agents),
                    "skipped": sum(a.counters.skipped for a in agents),
                    "errors": sum(a.counters.errors for a in agents),
                    "error_kinds": merge_error_kinds(a.counters.error_kinds for a in agents),
                    "spool_rows": sum(a.spool_rows for a in agents),
                    "rows_written": sum(a.rows_written for a in agents),
                    "failed": sum(1 for t in tasks if t.done()),
                    "failures": [
                        f"agent {t.get_name()}: {where_raised(t.exception())}"
                        for t in tasks
                        if t.done() and not t.cancelled() and t.exception() is not None
                    ][:3],
                    "lags": lags,
                    "webhooks": received,
                    "cpu": time.process_time(),
                }
            else:
                break
            sys.stdout.write(json.dumps(reply) + "\n")
            sys.stdout.flush()
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await runner.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)


class Worker:
    def __init__(
        self, url: str, interval: float, without: frozenset[str], health_write_interval: float
    ) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--worker",
                "--worker-url",
                url,
                "--interval",
                str(interval),
                "--without",
                ",".join(sorted(without)),
                "--health-write-interval",
                str(health_write_interval),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
        )

    def ask(self, command: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.proc.pid} exited with {self.proc.poll()}")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def stop(self) -> None:
        """The worker stops its agents (each flushes its writer) and exits."""
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.write(json.dumps({"cmd": "stop"}) + "\n")
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# -- the database --------------------------------------------------------------------------------


@contextlib.contextmanager
def database_server(database_url: str | None) -> Iterator[str]:
    """Admin URL of a server with pg_stat_statements loaded (started here without a URL)."""
    if database_url is not None:
        yield database_url
        return
    with tempfile.TemporaryDirectory(prefix="pluginmon-bench-fleet-pg-") as directory:
        server = EmbeddedPostgres(Path(directory))
        url = server.start()
        try:
            admin = with_database(url, "postgres")
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
                conn.execute("ALTER SYSTEM SET max_connections = 1000")
                conn.execute("ALTER SYSTEM SET pg_stat_statements.max = 10000")
                # Statements inside functions too (--top-statements names them); the split
                # by kind counts top-level statements only, so nothing is counted twice.
                conn.execute("ALTER SYSTEM SET pg_stat_statements.track = 'all'")
                # The embedded default is 128 MB; a database for a fleet gets more.
                conn.execute("ALTER SYSTEM SET shared_buffers = '1GB'")
            server.stop()
            server.start()
            yield admin
        finally:
            server.stop()


@contextlib.contextmanager
def fresh_database(admin_url: str) -> Iterator[str]:
    """A new database, migrated; when ``admin_url`` names a Citus database on a coordinator,
    a Citus database on the same nodes (bench/scratch.py)."""
    with new_database(admin_url, prefix="pluginmon_bench_fleet") as url:
        prepare_database(url, Retention())
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        yield url


def postmasters(url: str) -> tuple[int, ...]:
    """The server's postmaster, and on Citus each worker's too (all on this host): the
    database's CPU is theirs together."""
    found = []
    for node in node_urls(url):
        with psycopg.connect(node) as conn:
            row = conn.execute("SELECT pg_backend_pid()").fetchone()
            assert row is not None
            found.append(postmaster_of(int(row[0])))  # while the backend is there to be read
    return tuple(found)


def database_cpu_seconds(servers: tuple[int, ...]) -> float:
    return sum(server_cpu_seconds(pid) for pid in servers)


# Statement text -> what it is part of, first match wins.
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    # the registry job and its backups duty (its usage refresh reads plugin_samples)
    (
        "registry",
        (
            "plugin_environments",
            "plugin_operations",
            "approvals",
            "vulnerabilit",
            "backup",
            "sbom",
            "pg_try_advisory_xact_lock",
            "dependency_",
        ),
    ),
    ("samples", ("plugin_samples",)),
    (
        "health+alerts",
        (
            "plugin_metrics",
            "update plugins",
            "plugin_alerts",
            "notification_outbox",
            "alert_silences",
            "alert_notifications_sent",
            "plugin_dependencies",
        ),
    ),
    # (the audit entries of the tenants and plugins an agent creates on first sight too)
    (
        "plugin ids",
        ("insert into plugins", "insert into tenants", "from plugins", "'daemon', e.action"),
    ),
    (
        "maintenance",
        (
            "rollup",
            "partition",
            "advisory",
            "delete from",
            "pg_inherits",
            "create table",
            "drop table",
            "schema_migrations",
            "pg_class",
            "_timescaledb",
            "timescaledb_information",
            "policy",
            "continuous",
            "compress",
            "chunk",
        ),
    ),
)


def category(query: str) -> str:
    text = " ".join(query.lower().split())
    for name, needles in CATEGORIES:
        if any(n in text for n in needles):
            return name
    return "other"


@dataclass(frozen=True, slots=True)
class Statement:
    kind: str
    toplevel: bool
    calls: int
    total_seconds: float
    rows: int
    query: str


def statements_tracked(conn: psycopg.Connection[Any]) -> bool:
    """Whether the server counts statements (pg_stat_statements preloaded); without it the
    run goes on, and its split by kind is empty."""
    row = conn.execute("SELECT current_setting('shared_preload_libraries')").fetchone()
    return row is not None and "pg_stat_statements" in str(row[0])


def statements(url: str) -> list[Statement]:
    """This database's statements since the last reset (nested ones too when the server
    tracks them: pg_stat_statements.track = all)."""
    with psycopg.connect(url) as conn:
        if not statements_tracked(conn):
            return []
        rows = conn.execute(
            "SELECT query, toplevel, calls, total_exec_time, rows FROM pg_stat_statements"
            " WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())"
        ).fetchall()
    return [
        Statement(
            kind=category(str(query)),
            toplevel=bool(toplevel),
            calls=int(calls),
            total_seconds=float(total_ms) / 1000,
            rows=int(nrows),
            query=" ".join(str(query).split()),
        )
        for query, toplevel, calls, total_ms, nrows in rows
    ]


def statement_times(found: list[Statement]) -> dict[str, float]:
    """Execution seconds per category of the top-level statements."""
    out: dict[str, float] = {}
    for st in found:
        if st.toplevel:
            out[st.kind] = out.get(st.kind, 0.0) + st.total_seconds
    return out


def print_top_statements(found: list[Statement], *, limit: int, wall: float) -> None:
    """The ``limit`` statements of each kind but "other" (nested ones included, marked) with
    the most execution time: which ones, how often, how long each."""
    for kind in ("samples", "maintenance", "health+alerts", "registry", "plugin ids"):
        chosen = sorted((st for st in found if st.kind == kind), key=lambda st: -st.total_seconds)
        chosen = chosen[:limit]
        print(f"  top {len(chosen)} {kind} statements by execution time ({wall:.0f} s window):")
        for st in chosen:
            print(
                f"    {100 * st.total_seconds / wall:5.1f}% of a core, {st.calls:5d} calls, "
                f"{1000 * st.total_seconds / max(st.calls, 1):8.1f} ms each, {st.rows} rows"
                f"{'' if st.toplevel else ' (nested)'}: {st.query[:160]}"
            )


def reset_statements(url: str) -> None:
    with psycopg.connect(url) as conn:
        if statements_tracked(conn):
            conn.execute("SELECT pg_stat_statements_reset()")
        else:
            print("  (pg_stat_statements is not preloaded on this server: no split by kind)")


# -- the raw COPY baseline -------------------------------------------------------------------------


async def raw_copy_cpu_per_row(url: str, server: tuple[int, ...], *, batches: int) -> float:
    """Server CPU seconds per row for the same rows COPYed raw: 1,000-row batches (what
    one agent writes per interval), one COPY each, on one connection."""
    gen = FleetGenerator(9999, PLUGINS_PER_AGENT, random.Random(9999))
    conn = await asyncpg.connect(url)
    try:
        ids = [
            await ensure_tenant_and_plugin(conn, k.tenant, k.plugin, k.environment)
            for k in gen.keys
        ]
        payloads = []
        for _ in range(batches):
            snap = gen.snapshot(datetime.now(UTC))
            payloads.append(
                [
                    sample_row(s, plugin=pid, host=gen.host)
                    for s, pid in zip(snap.samples, ids, strict=True)
                ]
            )
        before = database_cpu_seconds(server)
        for rows in payloads:
            await conn.copy_records_to_table(
                PLUGIN_SAMPLES_TABLE, records=rows, columns=PLUGIN_SAMPLES_COLUMNS, timeout=60
            )
        after = database_cpu_seconds(server)
    finally:
        await conn.close()
    return (after - before) / (batches * PLUGINS_PER_AGENT)


async def raw_fleet_cpu_per_row(
    url: str, server: tuple[int, ...], *, agents: int, interval: float, duration: float
) -> float:
    """Server CPU seconds per row when ``agents`` connections only COPY their 1,000 rows
    every ``interval`` (each at its own phase), nothing else: the fleet's ingest alone, at
    the fleet's concurrency and batch size."""
    gen = FleetGenerator(9998, PLUGINS_PER_AGENT, random.Random(9998))
    conns = [await asyncpg.connect(url) for _ in range(agents)]
    try:
        ids = [
            await ensure_tenant_and_plugin(conns[0], k.tenant, k.plugin, k.environment)
            for k in gen.keys
        ]
        snap = gen.snapshot(datetime.now(UTC))
        base = [
            sample_row(s, plugin=pid, host=gen.host)
            for s, pid in zip(snap.samples, ids, strict=True)
        ]
        stop = asyncio.Event()
        copied = 0
        counting = False

        async def agent(conn: asyncpg.Connection) -> None:
            nonlocal copied
            next_at = time.monotonic() + random.uniform(0, interval)
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, next_at - time.monotonic())):
                        await stop.wait()
                if stop.is_set():
                    return
                at = datetime.now(UTC)
                await conn.copy_records_to_table(
                    PLUGIN_SAMPLES_TABLE,
                    records=[(at, *row[1:]) for row in base],
                    columns=PLUGIN_SAMPLES_COLUMNS,
                    timeout=60,
                )
                if counting:
                    copied += len(base)
                next_at += interval

        tasks = [asyncio.create_task(agent(c)) for c in conns]
        await asyncio.sleep(interval)  # every connection has started its rhythm
        counting = True
        before = database_cpu_seconds(server)
        await asyncio.sleep(duration)
        after = database_cpu_seconds(server)
        counting = False
        stop.set()
        await asyncio.gather(*tasks)
    finally:
        for conn in conns:
            await conn.close()
    return (after - before) / max(copied, 1)


def backfills_running(url: str) -> int:
    """Rollup refreshes in progress: at a mass start, every agent that replayed its
    unresolved spool back-fills the rollups from its oldest row (storage.upkeep)."""
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND state = 'active' AND query ILIKE '%pluginmon_refresh_rollup%'"
            " AND pid <> pg_backend_pid()"
        ).fetchone()
    return 0 if row is None else int(row[0])


# -- the coordinator -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StepResult:
    agents: int
    rows_per_second: float
    db_cpu_percent: float
    db_cpu_per_1k_rows: float
    p50_lag: float
    p99_lag: float
    spool_rows: int
    skipped: int
    errors: int
    error_kinds: dict[str, list[Any]]
    agents_cpu_percent: float
    split: dict[str, float]

    def within(self, interval: float) -> bool:
        return self.p99_lag <= interval and self.spool_rows == 0 and self.skipped == 0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.inf
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def where_raised(exc: BaseException | None) -> str:
    """The exception and the last frames it came through, for a report line."""
    if exc is None:
        return "none"
    frames = traceback.extract_tb(exc.__traceback__)[-4:]
    path = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames))
    return f"{exc!r} at {path}"[:800]


def merge_error_kinds(parts: Iterable[dict[str, list[Any]]]) -> dict[str, list[Any]]:
    """Counts summed per kind; the first message seen kept."""
    merged: dict[str, list[Any]] = {}
    for part in parts:
        for kind, (count, message) in part.items():
            merged.setdefault(kind, [0, message])[0] += count
    return merged


def report_all(workers: list[Worker]) -> dict[str, Any]:
    replies = [w.ask({"cmd": "report"}) for w in workers]
    total: dict[str, Any] = {"lags": [], "cpu": 0.0, "error_kinds": {}}
    for reply in replies:
        for name, value in reply.items():
            if name == "lags":
                total["lags"].extend(value)
            elif name == "error_kinds":
                total["error_kinds"] = merge_error_kinds([total["error_kinds"], value])
            elif name == "failures":
                total["failures"] = total.get("failures", []) + value
            else:
                total[name] = total.get(name, 0) + value
    return total


def run_fleet(
    args: argparse.Namespace,
    url: str,
    server: tuple[int, ...],
    without: frozenset[str] = frozenset(),
) -> list[StepResult]:
    workers = [
        Worker(url, args.interval, without, args.health_write_interval) for _ in range(args.workers)
    ]
    results: list[StepResult] = []
    added = 0
    try:
        for step in (int(s) for s in args.steps.split(",")):
            for index in range(added, step):
                workers[index % len(workers)].ask({"cmd": "add", "agents": [index]})
                time.sleep(args.interval / max(1, step - added) / 2)  # spread the starts
            added = step
            added_at = time.monotonic()
            deadline = added_at + args.settle_timeout
            while True:
                status = report_all(workers)
                if status["failed"]:
                    raise RuntimeError(
                        f"{status['failed']} agent(s) stopped: {'; '.join(status['failures'])}"
                    )
                if (
                    status["settled"] >= step
                    and status["spool_rows"] == 0
                    and backfills_running(url) == 0
                ):
                    break
                if time.monotonic() > deadline:
                    print(
                        f"N={step}: not settled after {args.settle_timeout:.0f} s "
                        f"({status['settled']} agents settled, {status['spool_rows']} rows "
                        "in spools): stopping"
                    )
                    return results
                time.sleep(5)
            time.sleep(args.warmup)
            before = report_all(workers)
            reset_statements(url)
            cpu0, wall0 = database_cpu_seconds(server), time.monotonic()
            time.sleep(args.duration)
            cpu1, wall1 = database_cpu_seconds(server), time.monotonic()
            found = statements(url)
            times = statement_times(found)
            after = report_all(workers)
            wall = wall1 - wall0
            rows = after["rows_written"] - before["rows_written"]
            db_cpu = cpu1 - cpu0
            result = StepResult(
                agents=step,
                rows_per_second=rows / wall,
                db_cpu_percent=100 * db_cpu / wall,
                db_cpu_per_1k_rows=1000 * db_cpu / max(rows, 1),
                p50_lag=percentile(after["lags"], 0.5),
                p99_lag=percentile(after["lags"], 0.99),
                spool_rows=after["spool_rows"],
                skipped=after["skipped"] - before["skipped"],
                errors=after["errors"] - before["errors"],
                error_kinds={
                    kind: [count - before["error_kinds"].get(kind, [0])[0], message]
                    for kind, (count, message) in after["error_kinds"].items()
                    if count > before["error_kinds"].get(kind, [0])[0]
                },
                agents_cpu_percent=100 * (after["cpu"] - before["cpu"]) / wall,
                split={
                    **dict(sorted(times.items())),
                    "outside statements": max(0.0, db_cpu - sum(times.values())),
                },
            )
            results.append(result)
            print_step(result, wall, time.monotonic() - added_at)
            if args.top_statements:
                print_top_statements(found, limit=args.top_statements, wall=wall)
            if not result.within(args.interval):
                break
    finally:
        for worker in workers:
            worker.stop()
    return results


def print_step(r: StepResult, wall: float, since_added: float) -> None:
    split = ", ".join(f"{k} {100 * v / wall:.1f}%" for k, v in r.split.items())
    # Execution time of the statements of each kind (pg_stat_statements, top level), as %
    # of one core; "outside statements" is the server's CPU beyond all of them: commits,
    # connections, the WAL writer, checkpoints, autovacuum, background jobs.
    print(
        f"N={r.agents}: {r.rows_per_second:,.0f} sample rows/s; database CPU {r.db_cpu_percent:.1f}% "
        f"of one core = {1000 * r.db_cpu_per_1k_rows:.1f} ms per 1,000 rows; commit lag p50 "
        f"{r.p50_lag:.2f} s, p99 {r.p99_lag:.2f} s; spool depth {r.spool_rows}; cycles skipped "
        f"{r.skipped}; errors {r.errors}; agents' CPU {r.agents_cpu_percent:.1f}% "
        f"(measured from {since_added - wall:.0f} s after the step's agents were added)"
    )
    print(f"  database time by kind (% of one core): {split}")
    for kind, (count, message) in sorted(r.error_kinds.items(), key=lambda kv: -kv[1][0]):
        print(f"  errors in the window: {kind} x{count}, the first: {message}")
    print("  load average at the window's end: {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--database-url", help="admin URL of a local server (see above)")
    parser.add_argument("--steps", default="25,50,100,150,200,300")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--interval", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=30.0)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--settle-timeout", type=float, default=600.0)
    parser.add_argument("--raw-batches", type=int, default=200)
    parser.add_argument("--raw-duration", type=float, default=30.0)
    parser.add_argument(
        "--top-statements",
        type=int,
        default=0,
        metavar="K",
        help="print each step's K maintenance (and health+alerts) statements with the most "
        "execution time",
    )
    parser.add_argument(
        "--without",
        default="",
        metavar="PARTS",
        help="comma-separated parts of the workload to leave out: " + ", ".join(PARTS),
    )
    parser.add_argument(
        "--ablate",
        action="store_true",
        help="run the steps with the full workload, then once without each part (each on a "
        "fresh database of the same server), and print each part's database CPU per sample "
        "row (full minus without it)",
    )
    parser.add_argument(
        "--health-write-interval",
        type=float,
        default=HEALTH_WRITE_INTERVAL_SECONDS,
        metavar="SECONDS",
        help="each agent's health_write_interval_seconds, also its plugins.health_score "
        "update interval (default: the daemon's, 60)",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    without = parse_parts(args.without)
    if args.worker:
        asyncio.run(
            worker_main(args.worker_url, args.interval, without, args.health_write_interval)
        )
        return
    if args.ablate and without:
        raise SystemExit("--ablate leaves out each part in turn; give no --without with it")
    if without:
        print(f"left out: {', '.join(sorted(without))}")
    if args.health_write_interval != HEALTH_WRITE_INTERVAL_SECONDS:
        print(f"health_write_interval_seconds: {args.health_write_interval:g}")

    steps = [int(s) for s in args.steps.split(",")]
    ablations: list[tuple[frozenset[str], list[StepResult]]] = []
    with database_server(args.database_url) as admin:
        with fresh_database(admin) as url:
            server = postmasters(url)
            raw_before, raw_fleet = measure_raw(args, url, server, steps)
            results = run_fleet(args, url, server, without)
            if not args.ablate:
                raw_after = asyncio.run(raw_copy_cpu_per_row(url, server, batches=args.raw_batches))
        again: list[StepResult] = []
        if args.ablate:
            names = list(PARTS)
            middle = len(names) // 2
            for i, part in enumerate(names):
                # The full workload again halfway and last: how far apart runs of the same
                # thing land on this machine (its load moves) says which differences mean
                # something, and the parts are measured against their mean.
                if i == middle:
                    print("-- the full workload again (a fresh database)")
                    with fresh_database(admin) as url:
                        again += run_fleet(args, url, postmasters(url))
                print(f"-- without {part}: {PARTS[part]} (a fresh database)")
                with fresh_database(admin) as url:
                    parts = frozenset({part})
                    ablations.append((parts, run_fleet(args, url, postmasters(url), parts)))
            print("-- the full workload again (a fresh database)")
            with fresh_database(admin) as url:
                server = postmasters(url)
                again += run_fleet(args, url, server)
                raw_after = asyncio.run(raw_copy_cpu_per_row(url, server, batches=args.raw_batches))
        print(f"raw COPY after the fleet: {1e6 * raw_after:.1f} us database CPU per row")
    raw = statistics.mean([raw_before, raw_after])
    passing = [r for r in results if r.within(args.interval)]
    best = max(passing, key=lambda r: r.agents) if passing else None
    for r in results:
        per_row = r.db_cpu_per_1k_rows / 1000
        print(
            f"N={r.agents}: database CPU per sample row {1e6 * per_row:.1f} us = "
            f"{per_row / max(raw_fleet[r.agents], 1e-9):.2f}x the raw COPY at the same "
            "concurrency, "
            f"{per_row / raw:.2f}x back-to-back COPYs on one connection"
        )
    if args.ablate:
        print_ablation(results, again, ablations, raw_fleet)
    print(f"fleet_agents_1k_plugins_10s={best.agents if best else 0}")


def measure_raw(
    args: argparse.Namespace, url: str, server: tuple[int, ...], steps: list[int]
) -> tuple[float, dict[int, float]]:
    """The raw COPY baselines: back-to-back on one connection, and at each step's
    concurrency."""
    raw_before = asyncio.run(raw_copy_cpu_per_row(url, server, batches=args.raw_batches))
    print(
        f"raw COPY before the fleet: {1e6 * raw_before:.1f} us database CPU per row "
        f"({args.raw_batches} COPYs of {PLUGINS_PER_AGENT} rows on one connection)"
    )
    raw_fleet: dict[int, float] = {}
    for step in steps:
        raw_fleet[step] = asyncio.run(
            raw_fleet_cpu_per_row(
                url, server, agents=step, interval=args.interval, duration=args.raw_duration
            )
        )
        print(
            f"raw COPY at N={step}: {1e6 * raw_fleet[step]:.1f} us database CPU per row "
            f"({step} connections, {PLUGINS_PER_AGENT} rows each every "
            f"{args.interval:g} s, nothing else)"
        )
    return raw_before, raw_fleet


def print_ablation(
    full: list[StepResult],
    again: list[StepResult],
    ablations: list[tuple[frozenset[str], list[StepResult]]],
    raw_fleet: dict[int, float],
) -> None:
    """Per step: each part's database CPU per sample row = the full workload's (the mean of
    its runs: first, halfway, last) minus the workload's without it (each run on a fresh
    database), in us and as a multiple of the raw COPY at the same concurrency."""
    for r in full:
        raw = max(raw_fleet[r.agents], 1e-9)
        runs = [r.db_cpu_per_1k_rows] + [
            a.db_cpu_per_1k_rows for a in again if a.agents == r.agents
        ]
        full_us = statistics.mean(runs)
        print(
            f"ablation at N={r.agents} (database CPU per sample row; raw COPY at this "
            f"concurrency {1e6 * raw:.1f} us):"
        )
        print(
            f"  full workload: {1e3 * full_us:.1f} us = {full_us / 1000 / raw:.2f}x raw COPY "
            f"(runs: {', '.join(f'{1e3 * v:.1f}' for v in runs)} us; a difference smaller "
            "than theirs is noise)"
        )
        parts_sum = 0.0
        for parts, results in ablations:
            same = [a for a in results if a.agents == r.agents]
            name = ",".join(sorted(parts))
            if not same:
                print(f"  without {name}: not measured (the fleet did not reach N={r.agents})")
                continue
            left = same[0].db_cpu_per_1k_rows
            part = full_us - left
            parts_sum += part
            print(
                f"  without {name}: {1e3 * left:.1f} us = {left / 1000 / raw:.2f}x; "
                f"{name}: {1e3 * part:+.1f} us per sample row = {part / 1000 / raw:+.2f}x raw COPY "
                f"({100 * part / full_us:+.0f}% of the whole)"
            )
        rest = full_us - parts_sum
        print(
            f"  the rest (samples COPY and everything not left out above): {1e3 * rest:.1f} us "
            f"= {rest / 1000 / raw:.2f}x raw COPY"
        )


if __name__ == "__main__":
    main()
