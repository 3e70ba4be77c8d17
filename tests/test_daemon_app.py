"""The composition root's own behaviour on a real database: a dead writer stops the daemon,
each component's metrics under their contract names, the shutdown deadline, the data_dir lock."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics import exposition as openmetrics_exposition

from pluginmon.alerts.engine import AlertEngine
from pluginmon.alerts.outbox import OutboxDeliverer
from pluginmon.collectors.models import PluginKey, PluginSample, Snapshot
from pluginmon.collectors.sampler import Sampler
from pluginmon.daemon.coordinator import Coordinator, Heartbeat
from pluginmon.daemon.exporter import DaemonMetrics, ExporterState
from pluginmon.daemon.lifecycle import (
    SHUTDOWN_STAGES,
    DataDirLock,
    DataDirLockedError,
    ShutdownBudget,
)
from pluginmon.daemon.scheduling import Scheduler
from pluginmon.storage.backend import Retention
from pluginmon.storage.ingest import SampleSink, SampleSpool, UnresolvedSpool
from pluginmon.storage.pool import close_pool, open_pool
from pluginmon.storage.reachability import DatabaseWatch
from pluginmon.storage.upkeep import Maintainer
from pluginmon.storage.writer import PLUGIN_SAMPLES_COLUMNS, PLUGIN_SAMPLES_TABLE, BatchWriter
from tests.dashboards_helpers import DAEMON_METRICS, HISTOGRAMS

KEY = PluginKey("apptest", "worker", "test")


def snapshot() -> Snapshot:
    now = datetime.now(UTC)
    sample = PluginSample(
        key=KEY,
        timestamp=now,
        up=True,
        process_count=1,
        cpu_percent=1.0,
        rss_bytes=10,
        vms_bytes=20,
        threads=1,
    )
    return Snapshot(timestamp=now, host="h", samples=(sample,), duration_seconds=0.01)


@dataclass
class Built:
    coordinator: Coordinator
    writer: BatchWriter
    exporter: ExporterState
    registry: CollectorRegistry
    stop: asyncio.Event


@asynccontextmanager
async def built(url: str, tmp_path: Path, *, writer_running: bool = True) -> AsyncIterator[Built]:
    """The daemon's components on a real pool, wired and registered as daemon.app does."""
    async with AsyncExitStack() as stack:
        pool = await open_pool(url, min_size=0)
        stack.push_async_callback(close_pool, pool)
        spool = SampleSpool(tmp_path / "spool", max_bytes=1 << 20)
        stack.callback(spool.close)
        unresolved = UnresolvedSpool(tmp_path / "spool-unresolved", max_bytes=1 << 20)
        stack.callback(unresolved.close)
        writer = BatchWriter(
            pool, table=PLUGIN_SAMPLES_TABLE, columns=PLUGIN_SAMPLES_COLUMNS, spool=spool
        )
        if writer_running:
            await stack.enter_async_context(writer)
        else:
            await writer.close()  # closed before use: put() raises WriterClosedError
        database = DatabaseWatch(pool, writer=writer)
        database.mark_schema_ready()
        sink = SampleSink(
            pool=pool, writer=writer, unresolved=unresolved, database=database, replay_seconds=1
        )
        engine = AlertEngine(pool, [])
        stack.push_async_callback(engine.aclose)
        outbox = await stack.enter_async_context(OutboxDeliverer(pool))
        registry = CollectorRegistry()
        scheduler = Scheduler()
        stop = asyncio.Event()
        exporter = ExporterState(grace_seconds=60)
        coordinator = Coordinator(
            sampler=Sampler([], label_discovery=False),
            exporter=exporter,
            metrics=DaemonMetrics(registry, version="test"),
            sink=sink,
            engine=engine,
            outbox=outbox,
            database=database,
            maintainer=Maintainer(url, retention=Retention(), spools=[spool, unresolved.spool]),
            scheduler=scheduler,
            heartbeat=Heartbeat(stale_after_seconds=30),
            flush_timeout_seconds=10,
            stop=stop,
        )
        for component in (scheduler, writer, sink, database, outbox):
            registry.register(component)
        yield Built(coordinator, writer, exporter, registry, stop)


async def test_dead_writer_stops_the_daemon(migrated_db: str, tmp_path: Path) -> None:
    async with built(migrated_db, tmp_path, writer_running=False) as daemon:
        await daemon.coordinator.consume(snapshot())  # resolves the id for real, then put()
        assert KEY in daemon.coordinator.sink.plugin_ids
        assert daemon.stop.is_set()
        assert daemon.coordinator.failure is not None
        assert "closed" in str(daemon.coordinator.failure)


async def test_one_snapshot_feeds_the_sink_and_then_the_alert_engine(
    migrated_db: str, tmp_path: Path
) -> None:
    async with built(migrated_db, tmp_path) as daemon:
        coordinator = daemon.coordinator
        await coordinator.consume(snapshot())
        await daemon.writer.flush()
        assert daemon.writer.stats().rows_written == 1
        await coordinator.job_evaluate()
        health = daemon.exporter.view().health
        assert set(health) == {KEY}
        assert 0 <= health[KEY].score <= 100
    assert coordinator.samples_taken == 1


# What the daemon's own families said before each component exported its own (the metric
# contract: deploy/ rules and the dashboards rely on the names, and HELP/TYPE stay as they were).
CONTRACT_HEADERS = """\
# HELP pluginmon_samples_total Plugin samples taken
# TYPE pluginmon_samples_total counter
# HELP pluginmon_sample_duration_seconds Duration of one sampling cycle
# TYPE pluginmon_sample_duration_seconds histogram
# HELP pluginmon_processes_seen Processes in the last sampling cycle
# TYPE pluginmon_processes_seen gauge
# HELP pluginmon_process_read_errors_total Per-process read failures, by kind
# TYPE pluginmon_process_read_errors_total counter
# HELP pluginmon_build_info Always 1; the version label
# TYPE pluginmon_build_info gauge
# HELP pluginmon_rows_written_total Rows written to the database
# TYPE pluginmon_rows_written_total counter
# HELP pluginmon_rows_deduplicated_total Rows of batches found in the ingest ledger (written before: a replay or a retry after a commit the client did not see) and skipped
# TYPE pluginmon_rows_deduplicated_total counter
# HELP pluginmon_spool_samples Rows waiting in the disk spool for the database
# TYPE pluginmon_spool_samples gauge
# HELP pluginmon_dropped_samples_total Samples dropped, by reason
# TYPE pluginmon_dropped_samples_total counter
# HELP pluginmon_database_up 1 when the database answered the last write or probe
# TYPE pluginmon_database_up gauge
# HELP pluginmon_notifications_total Notification attempts by receiver and outcome
# TYPE pluginmon_notifications_total counter
# HELP pluginmon_outbox_pending Notifications waiting in the outbox
# TYPE pluginmon_outbox_pending gauge
# HELP pluginmon_job_last_success_timestamp_seconds Unix time of each job's last successful run
# TYPE pluginmon_job_last_success_timestamp_seconds gauge
# HELP pluginmon_job_failures_total Failed runs of each job
# TYPE pluginmon_job_failures_total counter
# HELP pluginmon_write_duration_seconds Duration of one COPY batch
# TYPE pluginmon_write_duration_seconds histogram
"""


def _headers(text: str) -> set[str]:
    return {
        line
        for line in text.splitlines()
        if line.startswith("# ") and not line.split()[2].endswith("_created")
    }


async def test_each_component_exports_its_own_metrics_under_the_contract(
    migrated_db: str, tmp_path: Path
) -> None:
    """Writer, sink, database watch, outbox and scheduler each registered as a Collector:
    every daemon family of the contract, with its HELP and TYPE as before, and values read
    from the components at scrape time (no copy refreshed before the scrape)."""
    async with built(migrated_db, tmp_path) as daemon:
        registry = daemon.registry
        text = generate_latest(registry).decode()
        assert _headers(text) == set(CONTRACT_HEADERS.splitlines())
        names = {line.split()[2] for line in CONTRACT_HEADERS.splitlines()}
        assert names >= DAEMON_METRICS | HISTOGRAMS
        # OpenMetrics: the same families, counters named without _total in the headers.
        om_headers = {
            line for line in generate_openmetrics(registry).decode().splitlines() if "# " in line
        }
        assert "# TYPE pluginmon_dropped_samples counter" in om_headers
        assert "# TYPE pluginmon_rows_written counter" in om_headers

        get = registry.get_sample_value
        assert get("pluginmon_rows_written_total", {"table": "plugin_samples"}) == 0
        assert get("pluginmon_database_up") == 0  # not probed yet
        await daemon.coordinator.job_probe()
        assert get("pluginmon_database_up") == 1
        await daemon.coordinator.consume(snapshot())
        await daemon.writer.flush()
        # Read at scrape time: no refresh step in between.
        assert get("pluginmon_rows_written_total", {"table": "plugin_samples"}) == 1
        assert get("pluginmon_rows_deduplicated_total", {"table": "plugin_samples"}) == 0
        assert get("pluginmon_write_duration_seconds_count") == 1
        assert get("pluginmon_samples_total") == 1
        assert get("pluginmon_spool_samples") == 0
        assert get("pluginmon_dropped_samples_total", {"reason": "invalid_plugin"}) == 0
        assert get("pluginmon_outbox_pending") == 0


def test_shutdown_stages_share_one_deadline() -> None:
    """Every stage of the daemon's shutdown plan (SHUTDOWN_STAGES, which daemon.app spends
    from) runs out its whole time, in order: together they stay within the deadline, and a
    second start() does not move it."""
    now = [100.0]
    total = 10.0
    budget = ShutdownBudget(total, clock=lambda: now[0])
    assert budget.remaining() == total  # not started: the whole deadline
    budget.start()
    for stage in SHUTDOWN_STAGES:
        seconds = budget.seconds(stage)
        assert seconds >= 0, stage.name
        if not stage.fixed:
            # A shared stage leaves its reserve to the stages after it.
            assert budget.remaining() - seconds >= stage.reserve * total - 1e-9, stage.name
        now[0] += seconds  # the stage times out
    spent = now[0] - 100.0
    assert 0 < spent <= total + 1e-9
    budget.start()  # a second signal does not move the deadline
    assert budget.remaining() == pytest.approx(max(0.0, total - spent))


def test_data_dir_lock_is_exclusive(tmp_path: Path) -> None:
    first = DataDirLock(tmp_path)
    first.acquire()
    try:
        with pytest.raises(
            DataDirLockedError, match=rf"in use by another pluginmon \(pid {os.getpid()}\)"
        ):
            DataDirLock(tmp_path).acquire()
    finally:
        first.release()
    again = DataDirLock(tmp_path)
    again.acquire()  # released: free again
    again.release()


def generate_openmetrics(registry: CollectorRegistry) -> bytes:
    """prometheus-client's OpenMetrics exposition (its function is not typed)."""
    return bytes(openmetrics_exposition.generate_latest(registry))  # type: ignore[no-untyped-call]
