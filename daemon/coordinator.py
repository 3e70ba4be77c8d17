"""The daemon's jobs: one snapshot per tick, handed to each consumer (exporter, sink, alert engine)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime

from pluginmon.alerts.engine import AlertEngine
from pluginmon.alerts.journal_delivery import JournalDeliverer
from pluginmon.alerts.outbox import OutboxDeliverer
from pluginmon.collectors.models import Snapshot
from pluginmon.collectors.sampler import Sampler
from pluginmon.daemon.exporter import DaemonMetrics, ExporterState, FiringAlert, HealthView
from pluginmon.daemon.logs import redact
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

    # -- jobs -------------------------------------------------------------------------------

    async def job_sample(self) -> None:
        await self.consume(await asyncio.to_thread(self._sample_and_export))

    def _sample_and_export(self) -> Snapshot:
        """Worker thread: one snapshot, folded into the exporter's view."""
        snapshot = self._sampler.sample()
        self._exporter.update_snapshot(snapshot)
        return snapshot

    async def consume(self, snapshot: Snapshot) -> None:
        """The loop-side consumers of a fresh snapshot: counters, readiness, the sink (the
        alert engine takes it at its own pace, in ``job_evaluate``)."""
        self.samples_taken += len(snapshot.samples)
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
        self._exporter.update_health(
            {
                key: HealthView(
                    score=float(score.score),
                    components=tuple((c.name, float(c.score)) for c in score.components),
                )
                for key, score in self._engine.latest_health().items()
            }
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
        try:
            await self._engine.start()
        except TRANSIENT_ERRORS as exc:
            logger.warning("alert state not loaded yet: %s", redact(str(exc)))

    async def deliver_now(self) -> None:
        """Last chance for notifications queued just before the signal (caller bounds it)."""
        await self._outbox.deliver_due()

    def _fail(self, exc: BaseException) -> None:
        if self.failure is None:
            logger.error("%s; shutting down to restart clean", exc, exc_info=exc)
            self.failure = exc
        self._stop.set()

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
