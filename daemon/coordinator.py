"""The daemon's jobs: one snapshot per tick, handed to each consumer (exporter, sink, alert engine)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

from pluginmon.alerts.engine import AlertEngine
from pluginmon.alerts.journal_delivery import JournalDeliverer
from pluginmon.alerts.outbox import OutboxDeliverer
from pluginmon.collectors.models import PluginKey, PluginSpec, Snapshot
from pluginmon.collectors.sampler import Sampler
from pluginmon.daemon.config import DaemonConfig
from pluginmon.daemon.exporter import DaemonMetrics, ExporterState, FiringAlert, HealthView
from pluginmon.daemon.logs import redact
from pluginmon.daemon.reload import ConfigChanges
from pluginmon.daemon.runtime import HeapTrimmer
from pluginmon.daemon.scheduling import Scheduler
from pluginmon.storage.errors import TRANSIENT_ERRORS
from pluginmon.storage.ingest import SampleSink
from pluginmon.storage.reachability import DatabaseWatch
from pluginmon.storage.upkeep import Maintainer
from pluginmon.storage.writer import WriterClosedError, WriterFailedError

logger = logging.getLogger(__name__)


class Heartbeat:
    """When the last snapshot was taken, for /readyz: stale after ``stale_after_seconds``."""

    def __init__(
        self, *, stale_after_seconds: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._stale_after = stale_after_seconds
        self._clock = clock
        self._last: float | None = None  # no sample yet

    def beat(self) -> None:
        self._last = self._clock()

    def reasons(self) -> list[str]:
        """Why sampling is not ready (empty when it is)."""
        if self._last is None:
            return ["no sample taken yet"]
        age = self._clock() - self._last
        if age > self._stale_after:
            return [f"last sample {age:.1f} s ago (> {self._stale_after:g} s)"]
        return []


class Coordinator:
    """One fetch serves every consumer, like Home Assistant's DataUpdateCoordinator.

    ``job_sample`` takes one snapshot in a worker thread (and folds it into the exporter's
    view there: tens of ms at 10,000 plugins, kept off the event loop too), then hands it to
    the sink, which stores it. ``job_evaluate`` hands the latest snapshot, once, to the alert
    engine and publishes scores and firing alerts to the exporter. The other jobs drive one
    component each. Every component is built and handed in complete; the coordinator owns
    none of their resources.

    A component the daemon cannot run without (the writer) dying sets ``stop`` and keeps
    the cause in ``failure``: the daemon shuts down and exits 1, and the service manager
    restarts it (the spools are replayed on start).

    ``reconfigure`` hands a reloaded configuration to the same components: the plugin specs
    to the sampler at its next cycle, rules, receivers and thresholds to the alert engine
    between two evaluations, receivers to both deliverers. Nothing sampled or evaluated is lost
    on the way.
    """

    def __init__(
        self,
        *,
        sampler: Sampler,
        exporter: ExporterState,
        metrics: DaemonMetrics,
        sink: SampleSink,
        engine: AlertEngine,
        outbox: OutboxDeliverer,
        database: DatabaseWatch,
        maintainer: Maintainer,
        scheduler: Scheduler,
        heartbeat: Heartbeat,
        flush_timeout_seconds: float,
        stop: asyncio.Event,
        outbox_interval_seconds: float = 5.0,
        journal_delivery: JournalDeliverer | None = None,  # None: the engine has no journal
    ) -> None:
        self._sampler = sampler
        self._exporter = exporter
        self._metrics = metrics
        self.sink = sink
        self._engine = engine
        self._outbox = outbox
        self._journal_delivery = journal_delivery
        self.database = database
        self._maintainer = maintainer
        self._scheduler = scheduler
        self._heartbeat = heartbeat
        self._flush_timeout = flush_timeout_seconds
        self._stop = stop
        # Nothing sampled yet: the latest snapshot is empty and counts as evaluated.
        self._latest = Snapshot(
            timestamp=datetime.now(UTC), host="", samples=(), duration_seconds=0.0
        )
        self._evaluated = self._latest
        self.samples_taken = 0
        self.failure: BaseException | None = None
        self._outbox_interval = outbox_interval_seconds
        self._alerts_started = False
        self._outbox_scheduled = False
        self._journal_delivery_scheduled = False
        self._journal_delivery_interval = min(1.0, outbox_interval_seconds)
        # The engine is evaluated and reconfigured one at a time (process() awaits the
        # database half-way through a cycle).
        self._alerts_lock = asyncio.Lock()
        # Reloaded plugin specs, and the configured plugins they drop, for the sampling
        # thread to apply right before its next cycle (both at once, see _sample_and_export).
        self._plugins_lock = threading.Lock()
        self._pending_plugins: tuple[tuple[PluginSpec, ...], frozenset[PluginKey]] | None = None
        self._heap = HeapTrimmer()

    # -- jobs -------------------------------------------------------------------------------

    async def job_sample(self) -> None:
        await self.consume(await asyncio.to_thread(self._sample_and_export))

    def _sample_and_export(self) -> Snapshot:
        """Worker thread: one snapshot, folded into the exporter's view (and, once a
        minute, freed heap handed back to the system: daemon.runtime)."""
        with self._plugins_lock:
            pending, self._pending_plugins = self._pending_plugins, None
        if pending is not None:
            self._sampler.update_specs(pending[0])  # applied as this cycle starts
        snapshot = self._sampler.sample()
        if pending is not None and pending[1]:
            # A plugin dropped from the configuration leaves /metrics now, not after a
            # grace period as "down" (unless its processes' labels still name it).
            self._exporter.forget(pending[1] - {s.key for s in snapshot.samples})
        self._exporter.update_snapshot(snapshot)
        self._heap.maybe_trim()
        return snapshot

    async def consume(self, snapshot: Snapshot) -> None:
        """The loop-side consumers of a fresh snapshot: counters, readiness, the sink (the
        alert engine takes it at its own pace, in ``job_evaluate``)."""
        self.samples_taken += len(snapshot.samples)
        # One line per cycle (at debug level): what was taken, to compare with what is
        # stored (the crash tests do; a SIGKILL may lose at most the cycle in flight).
        logger.debug(
            "sampled %d plugins at %s",
            len(snapshot.samples),
            snapshot.timestamp,
            extra={"cycle_samples": len(snapshot.samples), "cycle_timestamp": snapshot.timestamp},
        )
        self._heartbeat.beat()
        self._latest = snapshot
        self._metrics.observe_snapshot(snapshot)
        try:
            await self.sink.put(snapshot)
        except (WriterFailedError, WriterClosedError) as exc:
            self._fail(exc)

    async def job_flush(self) -> None:
        await self.sink.flush(timeout_seconds=self._flush_timeout)

    async def job_probe(self) -> None:
        # The writer notices an outage on its own at its next COPY; the probe is for /readyz
        # and the once-per-change log lines while nothing is written.
        await self.database.probe()

    async def job_evaluate(self) -> None:
        snapshot = self._latest
        if snapshot is self._evaluated:
            return
        self._evaluated = snapshot
        async with self._alerts_lock:
            try:
                report = await self._engine.process(snapshot, self.sink.plugin_ids)
                if report.notifications_queued:
                    # Deliver now rather than at the next poll (which is for retries).
                    self._scheduler.run_soon("outbox")
                if report.notifications_journaled:
                    self._scheduler.run_soon("journal_delivery")
            finally:
                # Scores and alert states live in memory first: export them even when
                # persisting them failed this time.
                self._publish_alert_state()

    def _publish_alert_state(self) -> None:
        # Only the scores computed anew since the last cycle: most plugins' do not move.
        changed, forgotten = self._engine.take_health_changes()
        self._exporter.update_health_changes(
            {
                key: HealthView(
                    score=float(score.score),
                    components=tuple((c.name, float(c.score)) for c in score.components),
                )
                for key, score in changed.items()
            },
            forgotten,
        )
        self._exporter.update_alerts(
            [
                FiringAlert(key=a.key, alertname=a.alertname, severity=a.severity)
                for a in self._engine.firing()
            ]
        )

    async def job_outbox(self) -> None:
        await self._outbox.deliver_due()

    async def job_journal_delivery(self) -> None:
        # Starts the due POSTs and returns: each runs (and times out) on its own.
        if self._journal_delivery is not None:
            await self._journal_delivery.deliver_due()

    async def job_maintenance(self) -> None:
        await self._maintainer.run()

    # -- start and stop -------------------------------------------------------------------------

    async def start_alerts(self) -> None:
        """Load alert state once the schema is there; evaluation runs from the first sample
        (in memory and in the journal) and the state is merged with the database's and
        persisted once the database answers (the engine retries every cycle)."""
        async with self._alerts_lock:
            try:
                await self._engine.start()
            except TRANSIENT_ERRORS as exc:
                logger.warning("alert state not loaded yet: %s", redact(str(exc)))
        self._alerts_started = True
        self.schedule_outbox()

    def schedule_journal_delivery(self) -> None:
        """Poll the journal's notifications from the start (no database needed) once a
        receiver is configured (at start, or by a reload that adds the first one)."""
        journal = self._journal_delivery
        if self._journal_delivery_scheduled or journal is None or not journal.receivers:
            return
        self._scheduler.add_job(
            "journal_delivery",
            self.job_journal_delivery,
            interval_seconds=self._journal_delivery_interval,
        )
        self._journal_delivery_scheduled = True

    def schedule_outbox(self) -> None:
        """Poll the outbox for due deliveries (retries) once alerts run and a receiver is
        configured: without a receiver there is nothing to deliver, so no poll for nothing."""
        if self._outbox_scheduled or not self._alerts_started or not self._outbox.receivers:
            return
        self._scheduler.add_job("outbox", self.job_outbox, interval_seconds=self._outbox_interval)
        self._outbox_scheduled = True

    async def reconfigure(self, config: DaemonConfig, changes: ConfigChanges) -> None:
        """Hand a reloaded configuration to the components it changed (see the class doc)."""
        if changes.plugins:
            with self._plugins_lock:
                dropped = changes.removed_plugins
                if self._pending_plugins is not None:  # two reloads before one cycle
                    dropped |= self._pending_plugins[1]
                configured = {spec.key for spec in config.plugins}
                self._pending_plugins = (config.plugins, frozenset(dropped - configured))
        if changes.alerting:
            async with self._alerts_lock:
                self._engine.reconfigure(
                    config.rules,
                    health_config=config.health,
                    webhooks=config.webhooks,
                    alertmanager=config.alertmanager,
                    external_url=config.settings.alerts.external_url or "",
                )
                self._publish_alert_state()
        if changes.receivers:
            self._outbox.set_receivers(config.webhooks, config.alertmanager)
            self.schedule_outbox()
            if self._journal_delivery is not None:
                self._journal_delivery.set_receivers(config.webhooks, config.alertmanager)
                self.schedule_journal_delivery()

    async def deliver_now(self) -> None:
        """Last chance for notifications queued just before the signal (caller bounds it)."""
        await self._outbox.deliver_due()

    def _fail(self, exc: BaseException) -> None:
        if self.failure is None:
            logger.error("%s; shutting down to restart clean", exc, exc_info=exc)
            self.failure = exc
        self._stop.set()

    def log_summary(self, *, config_reload: str) -> None:
        """SIGUSR1: one INFO line with the daemon's state, read from memory (nothing is
        probed, flushed or sampled for it); the same values as fields in JSON logs."""
        latest = self._latest
        stats = self.sink.stats()
        database = self.database
        state = {None: "not answered yet", True: "up", False: "down"}[database.up]
        if database.up and not database.schema_ready:
            state = "up, schema not ready yet"
        now = time.time()  # the scheduler records last successes in Unix time
        ages = self._scheduler.last_success
        failures = self._scheduler.failures
        jobs = ", ".join(
            f"{name} {'never' if name not in ages else f'{now - ages[name]:.1f} s ago'}"
            + (f" ({failures[name]} failed)" if failures.get(name) else "")
            for name in sorted(set(ages) | set(failures))
        )
        fields: dict[str, object] = {
            "plugins_sampled": len(latest.samples),
            "plugins_up": sum(1 for s in latest.samples if s.up),
            "samples_so_far": self.samples_taken,
            "database": state,
            "spool_rows": stats.rows_in_spool,
            "rows_written": stats.rows_written,
            "rows_dropped": stats.rows_dropped,
            "alerts_firing": len(self._engine.firing()),
            "alerts_open": len(self._engine.alerts()),
            "jobs_failed": ",".join(sorted(n for n, c in failures.items() if c)),
            "config_reload": config_reload,
        }
        logger.info(
            "state (SIGUSR1): %d plugin(s) in the last sample, %d up, %d samples taken; "
            "database %s; %d rows written, %d in the disk spools, %d dropped; %d alert(s) "
            "firing, %d open; jobs' last success: %s; configuration: %s",
            fields["plugins_sampled"],
            fields["plugins_up"],
            self.samples_taken,
            state,
            stats.rows_written,
            stats.rows_in_spool,
            stats.rows_dropped,
            fields["alerts_firing"],
            fields["alerts_open"],
            jobs or "none yet",
            config_reload,
            extra=fields,
        )

    def log_final_counts(self) -> None:
        """One line with what this run took and where it went (tests and operators read it)."""
        stats = self.sink.stats()
        counts = {
            "samples_taken": self.samples_taken,
            "rows_written": stats.rows_written,
            "rows_in_spool": stats.rows_in_spool,
            "rows_dropped": stats.rows_dropped,
            "samples_unresolved": stats.samples_unresolved,
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
