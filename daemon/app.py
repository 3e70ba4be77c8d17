"""Composition root: builds every component on one AsyncExitStack, runs the jobs, shuts down."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack

import asyncpg
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector

from pluginmon.alerts.engine import AlertEngine
from pluginmon.alerts.outbox import OutboxDeliverer
from pluginmon.collectors.models import PluginKey, PluginSample, Snapshot
from pluginmon.collectors.sampler import DEFAULT_FIELDS, Sampler
from pluginmon.daemon.api_metrics import ApiMetrics
from pluginmon.daemon.api_wiring import api_subapps, registry_job
from pluginmon.daemon.config import DaemonConfig
from pluginmon.daemon.exporter import (
    DaemonMetrics,
    DaemonStats,
    ExporterState,
    FiringAlert,
    HealthView,
    MetricsRenderer,
    PluginCollector,
)
from pluginmon.daemon.http import BasicAuth, HttpServer, Readiness, tls_context
from pluginmon.daemon.logs import redact
from pluginmon.daemon.scheduling import Scheduler
from pluginmon.daemon.spools import (
    DROP_BUFFER_FULL,
    DROP_INVALID_PLUGIN,
    DROP_REJECTED,
    DROP_SPOOL_DISCARDED,
    CountingSpool,
    DataDirLock,
    DataDirLockedError,
    UnresolvedSpool,
    resolved_row,
    row_key,
    sample_values,
    unresolved_row,
)
from pluginmon.storage.backend import (
    Retention,
)
from pluginmon.storage.errors import TRANSIENT_ERRORS
from pluginmon.storage.queries import ensure_tenant_and_plugin
from pluginmon.storage.spool import SpoolCodecError, SpoolFullError, SpoolLockedError
from pluginmon.storage.writer import (
    PLUGIN_SAMPLES_COLUMNS,
    PLUGIN_SAMPLES_TABLE,
    BatchWriter,
    WriterClosedError,
    WriterFailedError,
)

logger = logging.getLogger(__name__)


class DaemonFailedError(RuntimeError):
    """A component the daemon cannot run without stopped; the cause is chained."""


# How long one sampling tick may wait for plugin ids (a slow or unreachable database must
# not stall sampling: the samples go to the unresolved spool instead).
RESOLVE_TIMEOUT_SECONDS = 3.0
# After a failed id lookup, how long new plugins' samples go straight to the spool.
RESOLVE_RETRY_SECONDS = 5.0


class ShutdownBudget:
    """One deadline shared by every shutdown stage, started by the first signal.

    Each stage asks for at most ``fraction`` of the whole deadline and leaves ``reserve``
    of it for the stages after it, so the stages together never exceed the deadline.
    """

    def __init__(
        self, total_seconds: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.total_seconds = total_seconds
        self._clock = clock
        self._deadline: float | None = None

    def start(self) -> None:
        if self._deadline is None:
            self._deadline = self._clock() + self.total_seconds

    def remaining(self) -> float:
        if self._deadline is None:
            return self.total_seconds
        return max(0.0, self._deadline - self._clock())

    def share(self, fraction: float, *, reserve: float = 0.0) -> float:
        return max(
            0.0,
            min(fraction * self.total_seconds, self.remaining() - reserve * self.total_seconds),
        )


def sample_row(sample: PluginSample, plugin_id: int, host: str) -> tuple[object, ...]:
    """One plugin_samples row, in the writer's PLUGIN_SAMPLES_COLUMNS order."""
    return sample_values(sample, plugin_id, host)


class Daemon:
    """One monitoring daemon: the jobs and the state they share.

    ``run(stop)`` builds everything on one AsyncExitStack, runs until ``stop`` is set and
    leaves in order: stop sampling, flush the writer and the outbox within the shutdown
    deadline, stop HTTP, close the pool, stop the embedded server.
    """

    def __init__(
        self,
        config: DaemonConfig,
        *,
        version: str,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.config = config
        self.settings = config.settings
        self.version = version
        self.registry = registry or CollectorRegistry()
        if registry is None:
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
            GCCollector(registry=self.registry)
        self.metrics = DaemonMetrics(self.registry, version=version)
        self.exporter = ExporterState(grace_seconds=self.settings.plugin_grace_seconds)
        self.plugins = PluginCollector(self.exporter)
        self.renderer = MetricsRenderer(self.registry, self.plugins)
        self.shutdown_budget = ShutdownBudget(self.settings.shutdown_deadline_seconds)
        self.scheduler = Scheduler(
            misfire_grace_seconds=self.settings.misfire_grace_seconds,
            drain_seconds=lambda: self.shutdown_budget.share(0.2, reserve=0.7),
        )
        self.database_url: str | None = None
        self.pool: asyncpg.Pool | None = None
        self.writer: BatchWriter | None = None
        self.spool: CountingSpool | None = None
        self.unresolved: UnresolvedSpool | None = None
        self.schema_ready = False
        self.sampler: Sampler | None = None
        self.engine: AlertEngine | None = None
        self.outbox: OutboxDeliverer | None = None
        self.maintenance: Callable[[], Awaitable[None]] | None = None
        self.http: HttpServer | None = None
        self._plugin_ids: dict[PluginKey, int] = {}
        self._invalid: set[PluginKey] = set()
        self._resolve_retry_at = 0.0
        self._unresolved_failing = False
        self._dropped: dict[str, int] = {DROP_INVALID_PLUGIN: 0}
        self._latest: Snapshot | None = None
        self._evaluated: Snapshot | None = None
        self._last_sample_monotonic: float | None = None
        self._database_up: bool | None = None
        self.samples_taken = 0
        self._stop: asyncio.Event | None = None
        self._failure: BaseException | None = None

    # -- database state -------------------------------------------------------------------

    def _database_state(self, up: bool, error: BaseException | None = None) -> None:
        """Log transitions only: "unreachable" once, "recovered" once."""
        if up == self._database_up:
            return
        previous, self._database_up = self._database_up, up
        if up and previous is False:
            logger.info("database recovered")
        elif not up:
            logger.warning(
                "database unreachable: %s; samples go to the disk spool until it returns",
                redact(str(error)) if error else "no answer",
            )

    async def probe_database(self) -> None:
        if self.pool is None:
            return
        try:
            async with asyncio.timeout(5):
                await self.pool.fetchval("SELECT 1")
        except TRANSIENT_ERRORS as exc:
            self._database_state(False, exc)
            return
        self._database_state(True)

    # -- jobs --------------------------------------------------------------------------------

    async def job_sample(self) -> None:
        sampler = self.sampler
        if sampler is None:
            return
        snapshot: Snapshot = await asyncio.to_thread(self._sample_and_export, sampler)
        self.samples_taken += len(snapshot.samples)
        self._last_sample_monotonic = time.monotonic()
        self._latest = snapshot
        self.metrics.observe_snapshot(snapshot)
        await self._write(snapshot)

    def _sample_and_export(self, sampler: Sampler) -> Snapshot:
        """Worker thread: one snapshot, folded into the exporter's view (tens of ms at
        10,000 plugins, kept off the event loop too)."""
        snapshot = sampler.sample()
        self.exporter.update_snapshot(snapshot)
        return snapshot

    async def _resolve_ids(self, keys: Sequence[PluginKey]) -> bool:
        """Learn the plugin ids of ``keys`` not known yet; False when the database did not
        answer within RESOLVE_TIMEOUT_SECONDS (the caller spools what is unresolved).

        Bounded, so a slow or unreachable database never stalls sampling; after a failure
        the database is not asked again for RESOLVE_RETRY_SECONDS.
        """
        missing = [
            k for k in dict.fromkeys(keys) if k not in self._plugin_ids and k not in self._invalid
        ]
        if not missing:
            return True
        pool = self.pool
        if pool is None or not self.schema_ready or time.monotonic() < self._resolve_retry_at:
            return False
        try:
            async with asyncio.timeout(RESOLVE_TIMEOUT_SECONDS), pool.acquire() as conn:
                for key in missing:
                    try:
                        self._plugin_ids[key] = await ensure_tenant_and_plugin(
                            conn, key.tenant, key.plugin, key.environment
                        )
                    except ValueError as exc:
                        # A label-discovered process with a tenant the schema refuses.
                        self._invalid.add(key)
                        logger.warning(
                            "plugin %s/%s (%s): not stored: %s",
                            key.tenant,
                            key.plugin,
                            key.environment,
                            exc,
                        )
        except (*TRANSIENT_ERRORS, asyncpg.PostgresError) as exc:
            self._resolve_retry_at = time.monotonic() + RESOLVE_RETRY_SECONDS
            self._database_state(False, exc)
            return False
        return True

    async def _write(self, snapshot: Snapshot) -> None:
        """Rows of known plugins to the writer; samples of plugins without an id yet (or
        with older samples still waiting) to the unresolved spool, on disk."""
        await self._drain_unresolved()
        unresolved = self.unresolved
        waiting_keys = unresolved.keys if unresolved is not None else set()
        await self._resolve_ids([s.key for s in snapshot.samples if s.key not in waiting_keys])
        rows: list[tuple[object, ...]] = []
        waiting: list[tuple[object, ...]] = []
        for sample in snapshot.samples:
            key = sample.key
            plugin_id = self._plugin_ids.get(key)
            if key in self._invalid:
                self._dropped[DROP_INVALID_PLUGIN] += 1
            elif plugin_id is None or key in waiting_keys:
                # Behind this plugin's older samples, which are still on disk.
                waiting.append(unresolved_row(sample, snapshot.host))
            else:
                rows.append(sample_row(sample, plugin_id, snapshot.host))
        self._put(rows)
        if waiting:
            await self._spool_unresolved(waiting)

    def _put(self, rows: list[tuple[object, ...]]) -> None:
        if rows and self.writer is not None:
            try:
                self.writer.put(rows)
            except (WriterFailedError, WriterClosedError) as exc:
                self._fail(exc)

    async def _spool_unresolved(self, rows: list[tuple[object, ...]]) -> None:
        unresolved = self.unresolved
        if unresolved is None:
            return
        try:
            await asyncio.to_thread(unresolved.append, rows)
        except (SpoolFullError, SpoolCodecError, OSError) as exc:
            # Counted by the spool under its own reason; logged once per episode.
            if not self._unresolved_failing:
                self._unresolved_failing = True
                logger.error(
                    "dropping %d samples of plugins without an id yet: %s (later drops are "
                    "counted, not logged)",
                    len(rows),
                    exc,
                )
            return
        self._unresolved_failing = False

    async def _drain_unresolved(self) -> None:
        """Replay the unresolved spool into the writer, oldest first, once ids resolve.

        Time-boxed (half a sample interval, at least 1 s) so sampling goes on; what is left
        is replayed at the next tick, still before that plugin's newer samples.
        """
        unresolved, writer = self.unresolved, self.writer
        if unresolved is None or writer is None or unresolved.rows == 0 or not self.schema_ready:
            return
        until = time.monotonic() + max(1.0, self.settings.sample_interval_seconds / 2)
        replayed = 0
        while time.monotonic() < until:
            try:
                pending = await asyncio.to_thread(unresolved.peek)
            except OSError:
                logger.exception("cannot read the unresolved spool; retrying at the next tick")
                return
            if pending is None:
                break
            if not await self._resolve_ids(list(pending.keys)):
                break
            rows: list[tuple[object, ...]] = []
            for row in pending.batch.rows:
                plugin_id = self._plugin_ids.get(row_key(row))
                if plugin_id is None:  # the schema refused this plugin
                    self._dropped[DROP_INVALID_PLUGIN] += 1
                else:
                    rows.append(resolved_row(row, plugin_id))
            self._put(rows)
            try:
                await asyncio.shield(asyncio.to_thread(unresolved.ack, pending))
            except OSError:
                logger.exception("cannot update the unresolved spool; retrying at the next tick")
                return
            replayed += len(rows)
        if replayed:
            logger.info(
                "replayed %d spooled samples of plugins whose id is now known (%d left)",
                replayed,
                unresolved.rows,
            )

    async def job_flush(self) -> None:
        """Nudge the writer to write partial batches now (it also flushes on its own)."""
        if self.writer is None:
            return
        # While a long spool replays, flush() waits for it; that is progress, not a failure.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(10.0, 5 * self.settings.flush_interval_seconds)):
                await self.writer.flush()

    async def job_evaluate(self) -> None:
        snapshot = self._latest
        if self.engine is None or snapshot is None or snapshot is self._evaluated:
            return
        self._evaluated = snapshot
        try:
            report = await self.engine.process(snapshot, dict(self._plugin_ids))
            if report.notifications_queued and self.outbox is not None:
                # Deliver now rather than at the next poll (which is for retries).
                self.scheduler.run_soon("outbox")
        finally:
            # Scores and alert states live in memory first: export them even when
            # persisting them failed this time.
            self._publish_alert_state()

    def _publish_alert_state(self) -> None:
        engine = self.engine
        if engine is None:
            return
        health: dict[PluginKey, HealthView] = {}
        for key, score in engine.latest_health().items():
            health[key] = HealthView(
                score=float(score.score),
                components=tuple((c.name, float(c.score)) for c in score.components),
            )
        self.exporter.update_health(health)
        self.exporter.update_alerts(
            [
                FiringAlert(key=a.key, alertname=a.alertname, severity=a.severity)
                for a in engine.firing()
            ]
        )

    async def job_outbox(self) -> None:
        if self.outbox is not None:
            await self.outbox.deliver_due()

    async def job_maintenance(self) -> None:
        if self.maintenance is not None and self.pool is not None:
            await self.maintenance()

    # -- readiness and stats -----------------------------------------------------------------

    async def readiness(self) -> Readiness:
        reasons: list[str] = []
        if self.pool is None:
            reasons.append("database not connected yet")
        else:
            await self.probe_database()
            if not self._database_up:
                reasons.append("database unreachable")
            elif not self.schema_ready:
                reasons.append("database schema not ready yet")
        limit = 3 * self.settings.sample_interval_seconds
        last = self._last_sample_monotonic
        if last is None:
            reasons.append("no sample taken yet")
        elif time.monotonic() - last > limit:
            reasons.append(f"last sample {time.monotonic() - last:.1f} s ago (> {limit:g} s)")
        return Readiness(ready=not reasons, reasons=tuple(reasons))

    def refresh_stats(self) -> None:
        """Copy collaborators' counters into the exporter (on the loop, before a scrape)."""
        dropped: dict[str, int] = {}
        rows_written: dict[str, int] = {}
        spool_rows = 0
        buckets: tuple[tuple[float, int], ...] = ()
        write_sum = 0.0
        database_up = bool(self._database_up)
        if self.writer is not None:
            ws = self.writer.stats()
            rows_written[PLUGIN_SAMPLES_TABLE] = ws.rows_written
            spool_rows = ws.spool_rows
            buckets = ws.flush_seconds_buckets
            write_sum = ws.flush_seconds_sum
            database_up = database_up and ws.database_available
            dropped.update(self._drop_reasons(ws.rows_dropped, ws.rows_rejected))
        if self.unresolved is not None:
            spool_rows += self.unresolved.rows
            for reason, count in self._unresolved_drops().items():
                dropped[reason] = dropped.get(reason, 0) + count
        dropped[DROP_INVALID_PLUGIN] = self._dropped[DROP_INVALID_PLUGIN]
        notifications: dict[tuple[str, str], int] = {}
        outbox_pending = 0
        if self.outbox is not None:
            delivery = self.outbox.stats()
            notifications, outbox_pending = dict(delivery.notifications), delivery.pending
        self.metrics.stats.update(
            DaemonStats(
                rows_written=rows_written,
                spool_samples=spool_rows,
                dropped=dropped,
                database_up=database_up,
                notifications=notifications,
                outbox_pending=outbox_pending,
                job_last_success=self.scheduler.last_success,
                job_failures=self.scheduler.failures,
                write_buckets=buckets,
                write_seconds_sum=write_sum,
            )
        )

    def _drop_reasons(self, rows_dropped: int, rows_rejected: int) -> dict[str, int]:
        """The writer's one ``rows_dropped`` split by cause: rows the database refused, spool
        appends that failed (counted by the spool, by exception), undecodable spooled batches
        discarded at replay, and the rest: the in-memory queue overflowing."""
        dropped = {DROP_REJECTED: rows_rejected}
        accounted = rows_rejected
        spool = self.spool
        if spool is not None:
            dropped[DROP_SPOOL_DISCARDED] = spool.discarded_rows
            accounted += spool.discarded_rows
            for reason, count in spool.failed_rows.items():
                dropped[reason] = count
                accounted += count
        dropped[DROP_BUFFER_FULL] = max(0, rows_dropped - accounted)
        return dropped

    def _unresolved_drops(self) -> dict[str, int]:
        if self.unresolved is None:
            return {}
        spool = self.unresolved.spool
        return {**spool.failed_rows, DROP_SPOOL_DISCARDED: spool.discarded_rows}

    # -- lifecycle ------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        self._stop = stop
        async with AsyncExitStack() as stack:
            try:
                # Returns early when stop is set while it waits for the database.
                await build(self, stack, stop)
                if not stop.is_set():
                    logger.info(
                        "pluginmon running: %d configured plugin(s)%s, sample every %g s",
                        len(self.config.plugins),
                        " + label discovery" if self.settings.label_discovery else "",
                        self.settings.sample_interval_seconds,
                    )
                    await stop.wait()
                logger.info(
                    "shutting down (deadline %g s)", self.settings.shutdown_deadline_seconds
                )
            finally:
                # One deadline for every stage from here; stop sampling first, the rest
                # unwinds in reverse order on the stack.
                self.shutdown_budget.start()
                self.scheduler.pause()
        self._log_final_counts()
        if self._failure is not None:
            raise DaemonFailedError("the batch writer stopped") from self._failure

    def _fail(self, exc: BaseException) -> None:
        """A component the daemon cannot run without died: shut down, exit 1, and let the
        service manager restart us (the spool is replayed on start)."""
        if self._failure is None:
            logger.error("%s; shutting down to restart clean", exc, exc_info=exc)
            self._failure = exc
        if self._stop is not None:
            self._stop.set()

    def _log_final_counts(self) -> None:
        """One line with what this run took and where it went (tests and operators read it)."""
        stats = self.writer.stats() if self.writer is not None else None
        unresolved = self.unresolved.rows if self.unresolved is not None else 0
        unresolved_dropped = sum(self._unresolved_drops().values())
        counts = {
            "samples_taken": self.samples_taken,
            "rows_written": stats.rows_written if stats else 0,
            # Both spools: rows with a plugin id, and samples still waiting for one.
            "rows_in_spool": (stats.spool_rows if stats else 0) + unresolved,
            "rows_dropped": (stats.rows_dropped if stats else 0)
            + sum(self._dropped.values())
            + unresolved_dropped,
            "samples_unresolved": unresolved,
        }
        logger.info(
            "final counts: %d plugin samples taken, %d rows written, %d rows left in the "
            "spool (replayed on the next start), %d dropped",
            counts["samples_taken"],
            counts["rows_written"],
            counts["rows_in_spool"],
            counts["rows_dropped"],
            extra=counts,
        )


async def build(daemon: Daemon, stack: AsyncExitStack, stop: asyncio.Event) -> None:
    """Start every component in dependency order, registering each one's cleanup.

    The data_dir lock comes first: a second daemon on the same data_dir leaves before it
    touches the embedded server or a spool. HTTP next, so /healthz answers (and /readyz
    says why not ready) while the database is awaited. Sampling starts before the database
    is reachable or migrated: rows wait in the disk spools until it is. The exit stack
    unwinds in reverse, every stage within one shared deadline (ShutdownBudget): jobs
    drained, final outbox delivery, alert engine, scheduler, final writer flush, writer
    close (the rest to the spool), spools, pool, HTTP; then the embedded server stops (its
    own bounded time, after the deadline) and the lock is released.
    """
    settings = daemon.settings
    budget = daemon.shutdown_budget
    deadline = settings.shutdown_deadline_seconds

    lock = DataDirLock(settings.data_dir)
    await asyncio.to_thread(lock.acquire)
    stack.callback(lock.release)
    # Registered before HTTP so that it runs after HTTP has stopped, outside the deadline.
    embedded: list[Callable[[], None]] = []

    async def stop_embedded() -> None:
        for stop_server in embedded:
            await asyncio.to_thread(stop_server)

    stack.push_async_callback(stop_embedded)

    auth = None
    if settings.http_auth_username:
        auth = BasicAuth(
            settings.http_auth_username,
            password=(
                settings.http_auth_password.get_secret_value()
                if settings.http_auth_password is not None
                else None
            ),
            password_sha256=settings.http_auth_password_sha256,
        )
    ssl_context = (
        tls_context(settings.http_tls_cert_file, settings.http_tls_key_file)
        if settings.http_tls_cert_file and settings.http_tls_key_file
        else None
    )
    # The management API (/api/v1) shares the port; it answers 503 until the pool is open
    # and the schema migrated.
    api_metrics = ApiMetrics(daemon.registry)

    def api_pool() -> asyncpg.Pool | None:
        return daemon.pool if daemon.schema_ready else None

    daemon.http = await stack.enter_async_context(
        HttpServer(
            host=settings.http_host,
            port=settings.http_port,
            metrics=daemon.renderer,
            readiness=daemon.readiness,
            before_render=daemon.refresh_stats,
            auth=auth,
            auth_probes=settings.http_auth_probes,
            ssl_context=ssl_context,
            shutdown_timeout_seconds=0.05 * deadline,
            subapps=api_subapps(settings, api_pool, version=daemon.version, metrics=api_metrics),
        )
    )

    url = await _database_url(daemon, embedded)
    daemon.database_url = url

    from pluginmon.storage.pool import close_pool, open_pool

    # min_size=0: the pool opens without a connection, so a database that is away (now or
    # later) never blocks start-up; the writer spools meanwhile.
    pool = daemon.pool = await open_pool(url, min_size=0, max_size=settings.database_pool_max_size)

    async def close_pool_in_budget() -> None:
        await close_pool(pool, timeout_seconds=budget.share(1.0, reserve=0.05))

    stack.push_async_callback(close_pool_in_budget)

    # Both spools replay whatever a crashed or killed predecessor left, before new rows.
    spool = daemon.spool = await asyncio.to_thread(
        CountingSpool, settings.spool_dir, max_bytes=settings.spool_max_bytes
    )
    stack.push_async_callback(asyncio.to_thread, spool.close)
    unresolved = daemon.unresolved = await asyncio.to_thread(
        UnresolvedSpool, settings.unresolved_spool_dir, max_bytes=settings.spool_max_bytes
    )
    stack.push_async_callback(asyncio.to_thread, unresolved.close)
    if spool.rows or unresolved.rows:
        logger.info(
            "disk spools hold %d sample rows and %d samples of plugins without an id yet "
            "from before; replaying",
            spool.rows,
            unresolved.rows,
        )
    writer = daemon.writer = await stack.enter_async_context(
        BatchWriter(
            pool,
            table=PLUGIN_SAMPLES_TABLE,
            columns=PLUGIN_SAMPLES_COLUMNS,
            max_rows=settings.flush_max_rows,
            max_delay_seconds=settings.flush_interval_seconds,
            max_queue_rows=max(settings.writer_queue_max_rows, 2 * settings.flush_max_rows),
            spool=spool,
            # Used only when the final flush below ran out of its share of the deadline.
            close_timeout_seconds=0.25 * deadline,
        )
    )

    async def final_flush() -> None:
        # Everything queued to the database, or to the spool while it is away; leaves a
        # quarter of the deadline for the writer's close and a little for the pool.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(budget.share(1.0, reserve=0.35)):
                await writer.flush()

    stack.push_async_callback(final_flush)

    daemon.sampler = Sampler(
        daemon.config.plugins,
        proc_root=str(settings.proc_root),
        label_discovery=settings.label_discovery,
        fields=_sample_fields(settings.collect_fields),
        host=settings.host,
    )

    scheduler = daemon.scheduler
    interval = settings.sample_interval_seconds
    scheduler.add_job("sample", daemon.job_sample, interval_seconds=interval)
    scheduler.add_job("flush", daemon.job_flush, interval_seconds=settings.flush_interval_seconds)
    # The writer notices an outage on its own at the next COPY; the probe is for /readyz and
    # the once-per-change log lines while nothing is written.
    scheduler.add_job("database_probe", daemon.probe_database, interval_seconds=5.0)
    await stack.enter_async_context(scheduler)

    # Sampling runs meanwhile; its rows spool until the schema is there.
    await _migrate_until_done(url, settings.backend, daemon.config.retention, stop)
    if stop.is_set():
        return
    daemon.schema_ready = True
    await daemon.probe_database()

    await _build_alerts(daemon, stack)
    daemon.maintenance = _maintenance_job(daemon)
    scheduler.add_job(
        "evaluate",
        daemon.job_evaluate,
        interval_seconds=settings.evaluate_every_seconds,
        first_run_in_seconds=min(1.0, interval / 2),
    )
    if daemon.config.webhooks or daemon.config.alertmanager is not None:
        # No receivers, no deliveries: no poll every second for nothing.
        scheduler.add_job(
            "outbox", daemon.job_outbox, interval_seconds=settings.outbox_interval_seconds
        )
    scheduler.add_job(
        "maintenance",
        daemon.job_maintenance,
        interval_seconds=settings.maintenance_interval_seconds,
        first_run_in_seconds=min(5.0, settings.maintenance_interval_seconds),
    )
    # Approvals expire, operations past their deadline fail, usage columns and operation
    # gauges refresh: once per database (advisory lock), whether or not this daemon serves
    # the API.
    scheduler.add_job(
        "registry",
        registry_job(api_pool, metrics=api_metrics, usage_window_seconds=max(30.0, 3 * interval)),
        interval_seconds=settings.maintenance_interval_seconds,
        first_run_in_seconds=min(5.0, settings.maintenance_interval_seconds),
    )
    # Running jobs finish (or are cancelled) before the alert components close.
    stack.push_async_callback(scheduler.aclose)


def _maintenance_job(daemon: Daemon) -> Callable[[], Awaitable[None]]:
    """Partitions, retention and rollups; storage takes the advisory lock, so one of many
    daemons sharing the database does the work and the others return at once."""
    from pluginmon.storage.backend import (
        Maintenance,
        admin_connection,
        detect_backend,
    )
    from pluginmon.storage.engines import (
        backfill_rollups,
        maintenance_for,
    )

    maintenance: Maintenance | None = None
    retention = daemon.config.retention

    async def backfill_after_replay(url: str) -> None:
        # Rows replayed from the spools after an outage may be older than the rollups'
        # regular refresh looks back: recompute the rollups from the oldest of them.
        spools = [daemon.spool, daemon.unresolved.spool if daemon.unresolved else None]
        # `is not None`: a Spool has a length, and an emptied one is falsy.
        taken = [(s, s.take_late_rows_since()) for s in spools if s is not None]
        since = min((t for _, t in taken if t is not None), default=None)
        if since is None:
            return
        try:
            refreshed = await backfill_rollups(url, since, retention)
        except BaseException:
            for spool, when in taken:
                if when is not None:
                    spool.note_late_rows(when)  # try again on the next run
            raise
        logger.info(
            "rollups back-filled from %s after a spool replay (%d refresh(es))",
            since.isoformat(),
            len(refreshed),
        )

    async def run() -> None:
        nonlocal maintenance
        url = daemon.database_url
        if url is None:
            return
        # Admin plane: its own psycopg connection (connect_timeout 10 s), not one of the pool's.
        async with admin_connection(url) as conn:
            if maintenance is None:
                maintenance = maintenance_for(await detect_backend(conn))
            report = await maintenance.run(conn, retention)
        await backfill_after_replay(url)
        if report.ran:
            logger.info(
                "maintenance: %d partition(s) created, %d dropped, %d row(s) removed%s",
                len(report.partitions_created),
                len(report.partitions_dropped),
                sum(rows for _, rows in report.rows_removed),
                "; failed steps: " + ", ".join(f"{s} ({why})" for s, why in report.failed_steps)
                if report.failed_steps
                else "",
            )

    return run


def _sample_fields(optional: Sequence[str]) -> frozenset[str]:
    return DEFAULT_FIELDS | frozenset(optional)


async def _database_url(daemon: Daemon, embedded: list[Callable[[], None]]) -> str:
    settings = daemon.settings
    if settings.database_url is not None:
        return settings.database_url.get_secret_value()
    from pluginmon.storage.embedded import EmbeddedPostgres

    server = EmbeddedPostgres(settings.data_dir)
    logger.info("no database_url: using the embedded PostgreSQL under %s", settings.data_dir)
    url = await asyncio.to_thread(server.start)
    # The daemon owns the embedded server: stop it on exit even if an earlier daemon that
    # was killed had started it (the data_dir lock says no live daemon uses it).
    embedded.append(server.stop)
    return url


async def _migrate_until_done(
    url: str, backend: str, retention: Retention, stop: asyncio.Event
) -> None:
    """Apply migrations and policies (admin plane, in a thread); retry while the database is away."""
    import psycopg

    from pluginmon.storage.engines import (
        prepare_database,
    )
    from pluginmon.storage.migrate import Backend

    wanted = None if backend == "auto" else Backend(backend)
    delay = 0.5
    logged = False
    while not stop.is_set():
        try:
            prepared = await asyncio.to_thread(prepare_database, url, retention, backend=wanted)
        except (OSError, psycopg.OperationalError) as exc:
            if not logged:
                logger.warning("database unreachable at start-up (%s); retrying", redact(str(exc)))
                logged = True
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await stop.wait()
            delay = min(delay * 2, 30.0)
            continue
        logger.info(
            "schema ready (backend %s, %d migration(s) applied now%s)",
            prepared.backend.value,
            len(prepared.migrations.applied),
            f", policies: {', '.join(prepared.policy_changes)}" if prepared.policy_changes else "",
        )
        return


async def _build_alerts(daemon: Daemon, stack: AsyncExitStack) -> None:
    """The alert engine (state from the database) and the outbox deliverer."""
    settings = daemon.settings
    config = daemon.config
    daemon.engine = AlertEngine(
        daemon.pool,
        config.rules,
        health_config=config.health,
        external_url=settings.alerts.external_url or "",
        webhooks=config.webhooks,
        alertmanager=config.alertmanager,
        spool_dir=settings.data_dir / "alert-spool",
        instance=settings.host,
    )
    stack.push_async_callback(daemon.engine.aclose)
    try:
        await daemon.engine.start()
    except TRANSIENT_ERRORS as exc:
        # Evaluation works in memory meanwhile; state is loaded and persisted once it is back.
        logger.warning("alert state not loaded yet: %s", redact(str(exc)))
    outbox = daemon.outbox = await stack.enter_async_context(
        OutboxDeliverer(daemon.pool, config.webhooks, config.alertmanager, instance=settings.host)
    )

    async def final_delivery() -> None:
        # Last chance for notifications queued just before the signal; bounded.
        with contextlib.suppress(TimeoutError, *TRANSIENT_ERRORS):
            async with asyncio.timeout(daemon.shutdown_budget.share(0.15, reserve=0.55)):
                await outbox.deliver_due()

    stack.push_async_callback(final_delivery)


# -- process entry point -------------------------------------------------------------------------


def install_signal_handlers(
    loop: asyncio.AbstractEventLoop, stop: asyncio.Event, *, on_second: Callable[[int], None]
) -> None:
    """First SIGTERM/SIGINT: graceful stop (exit 0). Second: ``on_second(signum)``, which
    exits at once with status 1 (DESIGN allows 0, 1 and 2 only)."""

    def handle(signum: int) -> None:
        if stop.is_set():
            logger.warning("second %s: exiting now", signal.Signals(signum).name)
            on_second(signum)
            return
        logger.info("%s received: stopping", signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, handle, signum)


EXIT_FORCED = 1  # a forced stop is a runtime failure: what was in memory may be lost


def _exit_now(signum: int) -> None:
    logging.shutdown()
    # Whatever the spools hold is replayed on the next start; memory is not.
    os._exit(EXIT_FORCED)


async def _main(config: DaemonConfig, version: str) -> None:
    stop = asyncio.Event()
    install_signal_handlers(asyncio.get_running_loop(), stop, on_second=_exit_now)
    await Daemon(config, version=version).run(stop)


def run_daemon(config: DaemonConfig, *, version: str) -> int:
    """Run until SIGTERM/SIGINT; 0 after a clean shutdown, 1 on a runtime failure."""
    from pluginmon.storage.embedded import EmbeddedPostgresError
    from pluginmon.storage.migrate import MigrationError

    try:
        asyncio.run(_main(config, version))
    except KeyboardInterrupt:
        # Only a SIGINT before the handlers are installed (or one the loop could not route
        # to them) gets here: not a graceful stop.
        logger.error("pluginmon interrupted before it could shut down gracefully")
        return EXIT_FORCED
    except (MigrationError, EmbeddedPostgresError, SpoolLockedError, DataDirLockedError) as exc:
        logger.error("pluginmon cannot start: %s", redact(str(exc)))
        return 1
    except Exception:
        logger.exception("pluginmon stopped by an error")
        return 1
    logger.info("pluginmon stopped")
    return 0
