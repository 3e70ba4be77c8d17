"""Composition root: builds every component on one AsyncExitStack, starts the jobs, shuts down in order.

Over 500 lines on purpose: it is the one place that states the start-up order (what runs
before migrations, what waits for them) and its mirror, the shutdown order; the parts it
wires are built elsewhere (coordinator, ingest, upkeep, plugin_metrics, api_wiring).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import asyncpg
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector

from pluginmon.alerts.engine import AlertEngine
from pluginmon.alerts.journal_delivery import JournalDeliverer
from pluginmon.alerts.outbox import OutboxDeliverer
from pluginmon.collectors.push import PushStore
from pluginmon.collectors.sampler import DEFAULT_FIELDS, Sampler
from pluginmon.daemon.api_metrics import ApiMetrics
from pluginmon.daemon.api_wiring import api_subapps, backups_duty, registry_job
from pluginmon.daemon.config import DaemonConfig
from pluginmon.daemon.coordinator import Coordinator, Heartbeat
from pluginmon.daemon.exporter import DaemonMetrics, ExporterState, MetricsRenderer, PluginCollector
from pluginmon.daemon.http import BasicAuth, HttpServer, ListenError, Readiness, tls_context
from pluginmon.daemon.lifecycle import (
    DRAIN_JOBS,
    FINAL_DELIVERY,
    FINAL_FLUSH,
    HTTP_STOP,
    POOL_CLOSE,
    WRITER_CLOSE,
    DataDirLock,
    DataDirLockedError,
    ShutdownBudget,
    run_until_signalled,
)
from pluginmon.daemon.plugin_metrics import PluginMetricsService, open_plugin_metrics
from pluginmon.daemon.reload import ConfigChanges, ConfigReloader
from pluginmon.daemon.runtime import tune_process_memory
from pluginmon.daemon.scheduling import Scheduler
from pluginmon.daemon.signal_guard import SignalGuard
from pluginmon.storage.drops import SpoolLosses
from pluginmon.storage.dsn import SecretScrubber, dsn_secrets
from pluginmon.storage.errors import TRANSIENT_ERRORS
from pluginmon.storage.ingest import SampleSink, SampleSpool, UnresolvedSpool
from pluginmon.storage.migrate import Backend
from pluginmon.storage.reachability import DatabaseWatch
from pluginmon.storage.spool import SpoolLockedError
from pluginmon.storage.upkeep import Maintainer, migrate_until_ready
from pluginmon.storage.writer import PLUGIN_SAMPLES_COLUMNS, PLUGIN_SAMPLES_TABLE, BatchWriter

if TYPE_CHECKING:
    from pluginmon.storage.embedded import EmbeddedPostgres

logger = logging.getLogger(__name__)


# A forced stop (second signal) during the embedded server's start waits this long for the
# start to finish, then stops the server: initdb and pg_ctl's start take seconds, not more.
EMBEDDED_START_WAIT_SECONDS = 20.0


class DaemonFailedError(RuntimeError):
    """A component the daemon cannot run without stopped; the cause is chained."""


async def _database_not_connected() -> list[str]:
    return ["database not connected yet"]


class Daemon:
    """One monitoring daemon: what lives in memory from the start, and ``run(stop)``.

    ``run`` builds the components that need the database (or the disk) on one
    AsyncExitStack, hands them to a Coordinator, runs until ``stop`` is set and leaves in
    order: stop sampling, flush the writer and the outbox within the shutdown deadline, stop
    HTTP, close the pool, stop the embedded server. A stop during start-up skips what is not
    built yet. The other signals (daemon.lifecycle.Signalled): ``reload`` (SIGHUP) re-reads
    ``config_path`` and applies what can change while running, ``log_summary`` (SIGUSR1) logs
    the state.
    """

    def __init__(
        self,
        config: DaemonConfig,
        *,
        version: str,
        config_path: Path | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.config = config
        self.settings = settings = config.settings
        self.version = version
        self.registry = registry or CollectorRegistry()
        if registry is None:
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
            GCCollector(registry=self.registry)
        self.metrics = DaemonMetrics(self.registry, version=version)
        self.exporter = ExporterState(grace_seconds=settings.plugin_grace_seconds)
        self.renderer = MetricsRenderer(self.registry, PluginCollector(self.exporter))
        self.shutdown_budget = budget = ShutdownBudget(settings.shutdown_deadline_seconds)
        self.scheduler = Scheduler(
            misfire_grace_seconds=settings.misfire_grace_seconds,
            drain_seconds=lambda: budget.seconds(DRAIN_JOBS),
        )
        self.registry.register(self.scheduler)
        self.heartbeat = Heartbeat(stale_after_seconds=3 * settings.sample_interval_seconds)
        # The management API (/api/v1) shares the port; it answers 503 until the pool is
        # open and the schema migrated (then _ready_pool is set).
        self.api_metrics = ApiMetrics(self.registry)
        self._open_pool: asyncpg.Pool | None = None
        self._ready_pool: asyncpg.Pool | None = None
        # Until the pool is open there is nothing to probe; then the DatabaseWatch answers.
        self._database_reasons: Callable[[], Awaitable[list[str]]] = _database_not_connected
        # The live set of pushed plugin metrics: the API's push route records into it from
        # the start, the plugin-metrics service (built later) re-emits it.
        self.pushes = PushStore(config.push)
        self.reloader = ConfigReloader(config_path=config_path, running=config)
        self.registry.register(self.reloader)
        # Set while run() builds and runs: what the signals act on.
        self._stop: asyncio.Event | None = None
        self._coordinator: Coordinator | None = None
        self._plugin_metrics: PluginMetricsService | None = None
        self._embedded: EmbeddedPostgres | None = None  # this daemon runs it
        self._embedded_start_done = threading.Event()

    # -- signals (daemon.lifecycle.Signalled) -------------------------------------------------

    def reload(self) -> None:
        if self._stop is not None and self._stop.is_set():
            logger.info("SIGHUP received while stopping: not reloading")
            return
        logger.info("SIGHUP received: reloading the configuration")
        self.reloader.request()

    def log_summary(self) -> None:
        coordinator = self._coordinator
        if coordinator is None:
            logger.info("state (SIGUSR1): starting up, not sampling yet")
            return
        coordinator.log_summary(
            config_reload="last reload ok"
            if self.reloader.last_reload_successful
            else "last reload refused, running on the previous configuration"
        )

    def before_forced_exit(self) -> None:
        """A forced stop leaves no embedded server behind: stopped in immediate mode (a
        crash to PostgreSQL, recovered from its WAL at the next start). One that is still
        starting is waited for first: pg_ctl, left alone, would start it after we are gone."""
        server = self._embedded
        if server is None:
            return
        if not self._embedded_start_done.is_set():
            logger.warning(
                "waiting for the embedded PostgreSQL to finish starting, to stop it (at most %g s)",
                EMBEDDED_START_WAIT_SECONDS,
            )
            self._embedded_start_done.wait(EMBEDDED_START_WAIT_SECONDS)
        server.stop(mode="immediate", timeout_seconds=5)

    async def readiness(self) -> Readiness:
        try:
            database = await self._database_reasons()
        except Exception as exc:  # /readyz says why; it never answers 500
            logger.exception("readiness check failed")
            database = [f"readiness check failed: {type(exc).__name__}"]
        reasons = [*database, *self.heartbeat.reasons()]
        return Readiness(ready=not reasons, reasons=tuple(reasons))

    async def run(self, stop: asyncio.Event) -> None:
        self._stop = stop
        built: tuple[Coordinator, str] | None = None
        async with AsyncExitStack() as stack:
            try:
                built = await self._build(stack, stop)
                if built is not None:
                    coordinator, url = built
                    self._coordinator = coordinator
                    stack.push_async_callback(self.reloader.aclose)
                    self.reloader.attach(self._reconfigure)
                    # Returns early when stop is set while it waits for the database.
                    await self._when_schema_ready(stack, coordinator, url, stop)
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
        if built is None:
            logger.info("stopped during start-up, before sampling began: nothing to flush")
            return
        coordinator = built[0]
        coordinator.log_final_counts()
        if coordinator.failure is not None:
            raise DaemonFailedError("the batch writer stopped") from coordinator.failure

    async def _reconfigure(self, config: DaemonConfig, changes: ConfigChanges) -> None:
        coordinator = self._coordinator
        assert coordinator is not None  # attached only once it is built
        await coordinator.reconfigure(config, changes)
        if self._plugin_metrics is not None:
            self._plugin_metrics.reconfigure(scrape=config.scrape, push=config.push)
        self.config = config

    async def _build(
        self, stack: AsyncExitStack, stop: asyncio.Event
    ) -> tuple[Coordinator, str] | None:
        """Start every component in dependency order, registering each one's cleanup, and
        start sampling; the coordinator and the database URL, or None when ``stop`` was set
        before sampling could start (a SIGTERM during start-up: nothing is left running).

        The data_dir lock comes first: a second daemon on the same data_dir leaves before it
        touches the embedded server or a spool. HTTP next, so /healthz answers (and /readyz
        says why not ready) while the database is awaited. Sampling starts before the
        database is reachable or migrated: rows wait in the disk spools until it is. The
        exit stack unwinds in reverse, every stage within one shared deadline
        (daemon.lifecycle.SHUTDOWN_STAGES): jobs drained, final outbox delivery, alert
        engine, scheduler, final writer flush, writer close (the rest to the spool), spools,
        pool, HTTP; then the embedded server stops (its own bounded time, after the
        deadline) and the lock is released.
        """
        settings = self.settings
        budget = self.shutdown_budget
        if stop.is_set():
            return None

        lock = DataDirLock(settings.data_dir)
        await asyncio.to_thread(lock.acquire)
        stack.callback(lock.release)
        # Registered before HTTP so that it runs after HTTP has stopped, outside the deadline.
        embedded: list[Callable[[], None]] = []

        async def stop_embedded() -> None:
            for stop_server in embedded:
                await asyncio.to_thread(stop_server)

        stack.push_async_callback(stop_embedded)
        await stack.enter_async_context(self._http_server())

        url = await self._database_url(embedded)
        if stop.is_set():
            return None  # the embedded server, if it was started, stops as the stack unwinds
        from pluginmon.storage.pool import close_pool, open_pool

        # min_size=0: the pool opens without a connection, so a database that is away (now or
        # later) never blocks start-up; the writer spools meanwhile.
        pool = await open_pool(url, min_size=0, max_size=settings.database_pool_max_size)
        self._open_pool = pool  # handed to the API once the schema is ready

        async def close_pool_in_budget() -> None:
            await close_pool(pool, timeout_seconds=budget.seconds(POOL_CLOSE))

        stack.push_async_callback(close_pool_in_budget)

        # Both spools replay whatever a crashed or killed predecessor left, before new rows.
        spool = await asyncio.to_thread(
            SampleSpool, settings.spool_dir, max_bytes=settings.spool_max_bytes
        )
        stack.push_async_callback(asyncio.to_thread, spool.close)
        unresolved = await asyncio.to_thread(
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
        writer = await stack.enter_async_context(
            BatchWriter(
                pool,
                table=PLUGIN_SAMPLES_TABLE,
                columns=PLUGIN_SAMPLES_COLUMNS,
                max_rows=settings.flush_max_rows,
                max_delay_seconds=settings.flush_interval_seconds,
                max_queue_rows=max(settings.writer_queue_max_rows, 2 * settings.flush_max_rows),
                spool=spool,
                # Used only when the final flush below ran out of its share of the deadline.
                close_timeout_seconds=budget.seconds(WRITER_CLOSE),
            )
        )
        database = DatabaseWatch(
            pool,
            writer=writer,
            log_interval_seconds=2 * settings.database_retry_max_seconds,
            scrubber=SecretScrubber(dsn_secrets(url)),
        )
        self._database_reasons = database.readiness_reasons
        sink = SampleSink(
            pool=pool,
            writer=writer,
            unresolved=unresolved,
            database=database,
            replay_seconds=max(1.0, settings.sample_interval_seconds / 2),
        )

        async def final_flush() -> None:
            # Everything queued to the database, or to the spool while it is away.
            await sink.flush(timeout_seconds=budget.seconds(FINAL_FLUSH))

        stack.push_async_callback(final_flush)

        config = self.config
        engine = AlertEngine(
            pool,
            config.rules,
            health_config=config.health,
            external_url=settings.alerts.external_url or "",
            webhooks=config.webhooks,
            alertmanager=config.alertmanager,
            spool_dir=settings.data_dir / "alert-spool",
            instance=settings.host,
            health_write_interval_seconds=settings.health_write_interval_seconds,
            # The registry job writes its gauges at this interval (the "registry" job below).
            registry_metrics_interval_seconds=settings.maintenance_interval_seconds,
        )
        stack.push_async_callback(engine.aclose)
        outbox = await stack.enter_async_context(
            OutboxDeliverer(pool, config.webhooks, config.alertmanager, instance=settings.host)
        )
        # What the outbox table cannot take (no database yet) is sent from the journal;
        # closed before the engine, which owns the journal its delivery marks go to.
        assert engine.journal_outbox is not None  # spool_dir is set
        journal_delivery = await stack.enter_async_context(
            JournalDeliverer(
                engine.journal_outbox,
                config.webhooks,
                config.alertmanager,
                # one pluginmon_notifications_total, whichever path sent it
                attempts=outbox.attempts,
            )
        )
        sampler = Sampler(
            config.plugins,
            proc_root=str(settings.proc_root),
            label_discovery=settings.label_discovery,
            fields=DEFAULT_FIELDS | frozenset(settings.collect_fields),
            host=settings.host,
        )
        coordinator = Coordinator(
            sampler=sampler,
            exporter=self.exporter,
            metrics=self.metrics,
            sink=sink,
            engine=engine,
            outbox=outbox,
            journal_delivery=journal_delivery,
            database=database,
            maintainer=Maintainer(
                url,
                retention=config.retention,
                spools=[spool, unresolved.spool],
                ledger_retention=timedelta(hours=settings.ingest_ledger_retention_hours),
                interval_seconds=settings.maintenance_interval_seconds,
                instance=settings.host,
            ),
            scheduler=self.scheduler,
            heartbeat=self.heartbeat,
            flush_timeout_seconds=max(10.0, 5 * settings.flush_interval_seconds),
            stop=stop,
            outbox_interval_seconds=settings.outbox_interval_seconds,
        )
        metrics_spool, metric_sink, plugin_metrics = await open_plugin_metrics(
            stack,
            self.config,
            pool=pool,
            database=database,
            discovered=lambda: sampler.metrics_endpoints,
            writer_close_seconds=self.shutdown_budget.seconds(WRITER_CLOSE),
            pushes=self.pushes,
        )
        self._plugin_metrics = plugin_metrics
        spool_losses = SpoolLosses(
            {"samples": spool, "unresolved": unresolved.spool, "plugin_metrics": metrics_spool}
        )
        for component in (
            writer,
            sink,
            database,
            outbox,
            journal_delivery,
            sampler.stats,
            spool_losses,
            metric_sink,
            plugin_metrics,
        ):
            self.registry.register(component)

        scheduler = self.scheduler
        scheduler.add_job(
            "sample", coordinator.job_sample, interval_seconds=settings.sample_interval_seconds
        )
        scheduler.add_job(
            "flush", coordinator.job_flush, interval_seconds=settings.flush_interval_seconds
        )
        scheduler.add_job("database_probe", coordinator.job_probe, interval_seconds=5.0)
        # Alerting needs no database: evaluation runs from the first sample (the engine
        # journals until it is started on a migrated schema), and what cannot reach the
        # outbox table is delivered from the journal.
        scheduler.add_job(
            "evaluate",
            coordinator.job_evaluate,
            interval_seconds=settings.evaluate_every_seconds,
            first_run_in_seconds=min(1.0, settings.sample_interval_seconds / 2),
        )
        coordinator.schedule_journal_delivery()
        await stack.enter_async_context(scheduler)
        return coordinator, url

    async def _when_schema_ready(
        self, stack: AsyncExitStack, coordinator: Coordinator, url: str, stop: asyncio.Event
    ) -> None:
        """Migrate (sampling runs meanwhile; its rows spool until the schema is there), then
        load the alert state and start the jobs that need the schema."""
        settings = self.settings
        ready = await migrate_until_ready(
            url,
            backend=None if settings.backend == "auto" else Backend(settings.backend),
            retention=self.config.retention,
            stop=stop,
            report=coordinator.database,
            retry_max_seconds=settings.database_retry_max_seconds,
        )
        if not ready:
            return
        coordinator.database.mark_schema_ready()
        self._ready_pool = self._open_pool
        await coordinator.database.probe()
        # Also starts polling the outbox, if a receiver is configured (now or by a reload).
        await coordinator.start_alerts()
        budget = self.shutdown_budget

        async def final_delivery() -> None:
            with contextlib.suppress(TimeoutError, *TRANSIENT_ERRORS):
                async with asyncio.timeout(budget.seconds(FINAL_DELIVERY)):
                    await coordinator.deliver_now()

        stack.push_async_callback(final_delivery)
        scheduler = self.scheduler
        scheduler.add_job(
            "maintenance",
            coordinator.job_maintenance,
            interval_seconds=settings.maintenance_interval_seconds,
            first_run_in_seconds=min(5.0, settings.maintenance_interval_seconds),
        )
        # Approvals expire, operations past their deadline fail, the operation gauges and
        # the plugins' usage columns refresh: once per database (advisory lock), whether or
        # not this daemon serves the API.
        scheduler.add_job(
            "registry",
            registry_job(
                self._api_pool,
                metrics=self.api_metrics,
                usage_window_seconds=max(30.0, 3 * settings.sample_interval_seconds),
                backups=backups_duty(settings, self.api_metrics),
                vulnerability_db=settings.vulnerability_db,
                interval_seconds=settings.maintenance_interval_seconds,
                instance=settings.host,
            ),
            interval_seconds=settings.maintenance_interval_seconds,
            first_run_in_seconds=min(5.0, settings.maintenance_interval_seconds),
        )
        # Running jobs finish (or are cancelled) before the alert components close.
        stack.push_async_callback(scheduler.aclose)

    def _api_pool(self) -> asyncpg.Pool | None:
        return self._ready_pool

    def _http_server(self) -> HttpServer:
        settings = self.settings
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
        return HttpServer(
            host=settings.http_host,
            port=settings.http_port,
            metrics=self.renderer,
            readiness=self.readiness,
            auth=auth,
            auth_probes=settings.http_auth_probes,
            ssl_context=ssl_context,
            shutdown_timeout_seconds=self.shutdown_budget.seconds(HTTP_STOP),
            registry=self.registry,
            subapps=api_subapps(
                settings,
                self._api_pool,
                version=self.version,
                metrics=self.api_metrics,
                pushes=self.pushes,
            ),
        )

    async def _database_url(self, embedded: list[Callable[[], None]]) -> str:
        settings = self.settings
        if settings.database_url is not None:
            return settings.database_url.get_secret_value()
        from pluginmon.storage.embedded import EmbeddedPostgres

        server = EmbeddedPostgres(settings.data_dir)
        logger.info("no database_url: using the embedded PostgreSQL under %s", settings.data_dir)
        # The daemon owns the embedded server: stop it on exit even if an earlier daemon that
        # was killed had started it (the data_dir lock says no live daemon uses it). Owned
        # from before it starts, so that a forced stop during its start stops it too.
        self._embedded = server

        def start() -> str:
            try:
                server.start()
                # Through its Unix socket (when it has one): the daemon is on the same host.
                return server.local_url()
            finally:
                self._embedded_start_done.set()

        url = await asyncio.to_thread(start)
        embedded.append(server.stop)
        return url


def run_daemon(
    config: DaemonConfig,
    *,
    version: str,
    config_path: Path | None = None,
    guard: SignalGuard | None = None,
) -> int:
    """Run until SIGTERM/SIGINT; 0 after a clean shutdown, 1 on a runtime failure.

    ``config_path`` is what SIGHUP reloads; ``guard`` holds the signals that arrived before
    (see daemon.signal_guard)."""
    from pluginmon.storage.embedded import EmbeddedPostgresError
    from pluginmon.storage.migrate import MigrationError

    tune_process_memory()  # daemon.runtime: why
    return run_until_signalled(
        # Built inside the event loop run_until_signalled starts (the scheduler binds to it).
        lambda: Daemon(config, version=version, config_path=config_path),
        guard=guard,
        event_loop=config.settings.event_loop,
        cannot_start=(
            MigrationError,
            EmbeddedPostgresError,
            SpoolLockedError,
            DataDirLockedError,
            ListenError,
        ),
    )
