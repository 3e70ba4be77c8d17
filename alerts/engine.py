"""The alert engine: one cycle of scoring, rule evaluation, notification planning and persistence.

A thin facade over four parts (docs/alerts.md, "Where the code lives"):

- :class:`~pluginmon.alerts.scoring.HealthTracker`: per-plugin history and health scores;
- :class:`~pluginmon.alerts.book.AlertBook`: alert states, inhibition, silences,
  acknowledgements;
- :class:`~pluginmon.alerts.planner.NotificationPlanner`: grouping, repeat timers, bodies;
- :class:`~pluginmon.alerts.persistence.AlertPersistence`: the database and the journal.

The first three are pure and keyed by plugin key; only persistence needs database ids.
Acknowledgements and silences come in one way only, registry.alert_actions (the API), which
audits them; the engine reads them back from the database at every cycle.

Evaluation does not need the database at all: before ``start()`` (the daemon calls it once
the schema is migrated) and while the database is away, every cycle is evaluated in memory,
journaled, and its notifications are delivered from the journal
(:mod:`pluginmon.alerts.journal_delivery`); the database gets it all when it is back.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pluginmon.alerts.book import AlertBook, AlertRecord, AlertView, SilenceRule
from pluginmon.alerts.health import HealthConfig, HealthScore
from pluginmon.alerts.journal_outbox import JournalOutbox
from pluginmon.alerts.persistence import NOT_STARTED, AlertPersistence, Inputs, PluginIds
from pluginmon.alerts.planner import NotificationPlanner
from pluginmon.alerts.rules import (
    AlertmanagerConfig,
    Rule,
    WebhookConfig,
    uses_plugin_metrics,
)
from pluginmon.alerts.scoring import HealthTracker
from pluginmon.collectors.models import PluginKey, Snapshot
from pluginmon.storage.alert_journal import JOURNAL_MAX_BYTES, entry_plugin
from pluginmon.storage.alert_state import AlertWrite, StoredAlert
from pluginmon.storage.errors import TRANSIENT_ERRORS

__all__ = ["AlertEngine", "AlertView", "Clock", "EvaluationReport", "PluginIds", "utc_now"]

logger = logging.getLogger(__name__)

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class EvaluationReport:
    timestamp: datetime
    plugins_scored: int
    transitions: tuple[tuple[str, PluginKey, str], ...]  # (rule, plugin, transition kind)
    notifications_queued: int
    persisted: bool  # state and outbox are in the database
    unpersisted_alerts: int  # changes held in memory until the database is back
    unpersisted_notifications: int
    duration_seconds: float
    database_error: str | None = None
    journal_batches: int = 0  # unpersisted changes on disk in the journal (spool_dir set)
    # handed to the journal's outbox this cycle (the outbox table could not take them)
    notifications_journaled: int = 0


class AlertEngine:
    """Owns alert state in memory, mirrored to plugin_alerts; see docs/alerts.md.

    While the database is away, evaluation goes on in memory: changed alerts and queued
    notifications are held (the notifications in a bounded backlog), and the next cycle
    that reaches the database writes all of it in one transaction. With ``spool_dir`` set,
    what could not be written is also appended to a disk journal (fsync'ed) after each
    cycle, and ``start()`` replays a journal left by a process that died during an outage.

    ``instance`` names this daemon (its ``host`` setting; default the hostname). Several
    daemons can share one database: each one's alerts and notifications are recorded with
    its instance, and an engine loads, resolves and queues only its own.

    Rules and health thresholds over plugin_metrics read their values every cycle, except
    the registry's gauges (alerts.health.REGISTRY_GAUGES), written by the registry job once
    per its interval: with ``registry_metrics_interval_seconds`` (the daemon passes its
    ``maintenance_interval_seconds``) those are read once per that interval and for plugins
    not read yet (alerts.metric_reads); 0 reads them every cycle.

    Every sample is scored and evaluated, keyed by its plugin key. Database plugin ids come
    from ``process(snapshot, plugin_ids)`` or from the ``plugin_ids`` source given here; an
    alert or notification of a plugin without one waits in memory (and in the journal) until
    it has one.

    Until ``start()`` is called the engine never touches the database (its schema may not
    exist yet): ``process()`` reads a journal a previous process left into memory (its open
    alerts restored, its notifications delivered from the journal) and journals every
    cycle. ``start()`` loads this instance's state from the database and merges it with
    what is in memory; when the database does not answer it raises, and every later
    ``process()`` tries again first.
    """

    def __init__(
        self,
        pool: Any,
        rules: Sequence[Rule],
        *,
        health_config: HealthConfig | None = None,
        clock: Clock = utc_now,
        external_url: str = "",
        webhooks: Sequence[WebhookConfig] = (),
        alertmanager: AlertmanagerConfig | None = None,
        metrics_max_age_seconds: float = 600.0,
        registry_metrics_interval_seconds: float = 0.0,
        stale_after_seconds: float = 300.0,
        plugin_health_update_seconds: float = 60.0,
        health_write_interval_seconds: float = 0.0,
        dependencies_refresh_seconds: float = 30.0,
        database_timeout_seconds: float = 10.0,
        max_backlog_notifications: int = 10_000,
        spool_dir: Path | None = None,
        journal_max_bytes: int = JOURNAL_MAX_BYTES,
        instance: str | None = None,
        plugin_ids: PluginIds | None = None,
    ) -> None:
        self.instance = instance or socket.gethostname()
        self._clock = clock
        self._scores = HealthTracker(
            health_config or HealthConfig(), forget_after_seconds=stale_after_seconds
        )
        self._book = AlertBook(
            rules, instance=self.instance, stale_after_seconds=stale_after_seconds
        )
        self._planner = NotificationPlanner(
            webhooks=webhooks, alertmanager=alertmanager, external_url=external_url
        )
        self._persistence = AlertPersistence(
            pool,
            instance=self.instance,
            plugin_ids=plugin_ids,
            database_timeout_seconds=database_timeout_seconds,
            max_backlog_notifications=max_backlog_notifications,
            plugin_health_update_seconds=plugin_health_update_seconds,
            health_write_interval_seconds=health_write_interval_seconds,
            dependencies_refresh_seconds=dependencies_refresh_seconds,
            metrics_max_age_seconds=metrics_max_age_seconds,
            registry_metrics_interval_seconds=registry_metrics_interval_seconds,
            spool_dir=spool_dir,
            journal_max_bytes=journal_max_bytes,
        )
        self._metric_names = self._plugin_metric_names()
        # The latest plugin_metrics values read; kept while the database is away.
        self._metrics: Mapping[PluginKey, Mapping[str, float]] = {}
        self._start_requested = False  # start() was called: the schema is there
        self._loaded = False  # this instance's database state is merged into the book
        self._absorbed = False  # a journal left by a previous process was read
        # One cycle or one start at a time: both change the book and persistence's ids.
        self._lock = asyncio.Lock()

    @property
    def journal_outbox(self) -> JournalOutbox | None:
        """Notifications the outbox table could not take, for a
        :class:`~pluginmon.alerts.journal_delivery.JournalDeliverer` (None without
        ``spool_dir``)."""
        return self._persistence.journal_outbox

    # --- public API ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Replay the journal a previous process left (if any), then load this instance's
        open alerts and last notification times from the database (adopting rows that have
        no owner yet: written before owners were recorded), merged with what is in memory.

        Transient database errors propagate, after a journal a previous process left is
        read into memory instead; every later ``process()`` tries to load again."""
        async with self._lock:
            self._start_requested = True
            await self._load()

    async def _load(self) -> None:
        try:
            state = await self._persistence.start()
        except TRANSIENT_ERRORS:
            await self._absorb()
            raise
        now = self._clock().timestamp()
        self._planner.restore_last_sent(state.last_sent)
        in_memory = {a.fingerprint: a for a in self._book.open_alerts()}
        held = {(a.rule.name, a.key) for a in self._book.open_alerts()}
        restored = 0
        for row in state.open_alerts:
            key = PluginKey(row.tenant_id, row.labels.get("plugin", ""), row.environment)
            alert = in_memory.get(row.fingerprint)
            if alert is not None:
                # Evaluated (or read from the journal) before the database answered: the same
                # alert; its row is the one to update.
                self._persistence.adopt(alert, row)
                if row.acknowledged_at is not None:
                    self._book.acknowledge(row.fingerprint)
                continue
            if (row.rule_name, key) in held:
                logger.warning(
                    "alert %s for %s/%s: the stored instance %s has other labels than the "
                    "one evaluated meanwhile; keeping the evaluated one",
                    row.rule_name,
                    key.tenant,
                    key.plugin,
                    row.fingerprint,
                )
                continue
            self._persistence.adopt(self._restore_row(row, key, now), row)
            restored += 1
        self._loaded = True
        logger.info(
            "alert engine started with %d open alert(s) (%d loaded from the database)",
            len(self._book.alerts()),
            restored,
        )

    def _restore_row(self, row: StoredAlert, key: PluginKey, now: float) -> AlertRecord:
        return self._book.restore(
            rule_name=row.rule_name,
            key=key,
            labels=row.labels,
            fingerprint_=row.fingerprint,
            severity=row.severity,
            started_at=row.started_at.timestamp(),
            last_active_at=(row.last_active_at or row.started_at).timestamp(),
            fired_at=None if row.fired_at is None else row.fired_at.timestamp(),
            value=row.value,
            annotations=row.annotations,
            inhibited=row.inhibited,
            silenced_until=None if row.silenced_until is None else row.silenced_until.timestamp(),
            acknowledged=row.acknowledged_at is not None,
            notified=row.notified_at is not None,
            now=now,
        )

    async def _absorb(self) -> None:
        """Once: the state a previous process journaled, into memory (no database)."""
        if self._absorbed:
            return
        self._absorbed = True
        absorbed = await self._persistence.absorb_journal()
        if absorbed is None:
            return
        now = self._clock().timestamp()
        self._planner.restore_last_sent(absorbed.last_sent)
        for write in absorbed.open_alerts:
            self._persistence.adopt_absorbed(self._restore_write(write, now), write)
        logger.info(
            "alert engine restored %d open alert(s) from the journal", len(absorbed.open_alerts)
        )

    def _restore_write(self, write: AlertWrite, now: float) -> AlertRecord:
        return self._book.restore(
            rule_name=write.rule_name,
            key=PluginKey(write.tenant_id, entry_plugin(write), write.environment),
            labels=write.labels,
            fingerprint_=write.fingerprint,
            severity=write.severity,
            started_at=write.started_at.timestamp(),
            last_active_at=(write.last_active_at or write.started_at).timestamp(),
            fired_at=None if write.fired_at is None else write.fired_at.timestamp(),
            value=write.value,
            annotations=write.annotations,
            inhibited=write.inhibited,
            silenced_until=None
            if write.silenced_until is None
            else write.silenced_until.timestamp(),
            acknowledged=False,
            notified=write.notified_at is not None,
            now=now,
        )

    async def process(
        self,
        snapshot: Snapshot,
        plugin_ids: PluginIds | None = None,
        *,
        metrics: Mapping[PluginKey, Mapping[str, float]] | None = None,
    ) -> EvaluationReport:
        """One cycle: score health, evaluate rules, persist transitions with their outbox rows.

        ``plugin_ids`` are the database ids the caller knows (a mapping will do); ``metrics``
        overrides the plugin_metrics values otherwise read from the database.
        """
        async with self._lock:
            return await self._process(snapshot, plugin_ids, metrics)

    async def _process(
        self,
        snapshot: Snapshot,
        plugin_ids: PluginIds | None,
        metrics: Mapping[PluginKey, Mapping[str, float]] | None,
    ) -> EvaluationReport:
        started = time.perf_counter()
        now_dt = self._clock()
        now = now_dt.timestamp()
        samples = snapshot.samples
        persistence = self._persistence
        persistence.use_ids(plugin_ids)

        offline: str | None = None
        if not self._loaded:
            if self._start_requested:
                try:
                    await self._load()
                except TRANSIENT_ERRORS as exc:
                    offline = f"{type(exc).__name__}: {exc}"
            else:
                await self._absorb()
                offline = NOT_STARTED
        names = self._metric_names if metrics is None else ()
        inputs: Inputs | str
        if offline is None:
            inputs = await persistence.read_inputs(now_dt, (s.key for s in samples), names)
        else:
            inputs = offline
        if isinstance(inputs, Inputs):
            self._take_inputs(inputs)
        metric_values = self._metrics if metrics is None else metrics

        healths = self._scores.score(samples, now=now_dt, metrics=metric_values)
        book = self._book
        changes = book.evaluate(samples, healths, metric_values, now=now)
        plan = self._planner.plan(book.notifiable(), book.take_resolutions(now), now=now)
        book.mark_notified(plan.announced)
        persistence.queue(plan.notifications)
        persistence.track(book.take_changed())

        database_error, journaled = await persistence.save(
            now_dt,
            book.open_alerts(),
            healths,
            database_error=inputs if isinstance(inputs, str) else None,
        )
        return EvaluationReport(
            timestamp=now_dt,
            plugins_scored=len(samples),
            transitions=tuple((c.rule.name, c.key, c.transition.kind.value) for c in changes),
            notifications_queued=len(plan.notifications),
            persisted=database_error is None,
            unpersisted_alerts=persistence.unpersisted_alerts,
            unpersisted_notifications=persistence.unpersisted_notifications,
            duration_seconds=time.perf_counter() - started,
            database_error=database_error,
            journal_batches=persistence.journal_batches,
            notifications_journaled=journaled,
        )

    def reconfigure(
        self,
        rules: Sequence[Rule],
        *,
        health_config: HealthConfig,
        webhooks: Sequence[WebhookConfig],
        alertmanager: AlertmanagerConfig | None,
        external_url: str,
    ) -> int:
        """Swap the rules, receivers and health thresholds (a configuration reload); returns
        how many open alerts it closed (see :meth:`AlertBook.reconfigure`). Call it between
        ``process()`` cycles, never during one."""
        closed = self._book.reconfigure(rules, now=self._clock().timestamp())
        self._scores.reconfigure(health_config)
        self._planner.reconfigure(
            webhooks=webhooks, alertmanager=alertmanager, external_url=external_url
        )
        self._metric_names = self._plugin_metric_names()
        return closed

    def _plugin_metric_names(self) -> tuple[str, ...]:
        names = {r.metric for r in self._book.rules if uses_plugin_metrics(r)}
        return tuple(sorted(names | set(self._scores.metric_names)))

    def _take_inputs(self, inputs: Inputs) -> None:
        self._book.set_silences(
            SilenceRule(s.tenant_id, s.matchers, s.ends_at.timestamp()) for s in inputs.silences
        )
        self._book.set_acknowledged(inputs.acknowledged)
        if inputs.dependencies is not None:
            self._book.set_dependencies(inputs.dependencies)
        if inputs.metrics is not None:
            self._metrics = inputs.metrics

    @property
    def plugin_metrics_reads(self) -> int:
        """Statements run so far to read plugin_metrics values for rules and health."""
        return self._persistence.metric_reads.reads

    def firing(self) -> list[AlertView]:
        """Firing alerts that notify (not inhibited, not silenced): pluginmon_alerts_firing."""
        return self._book.firing()

    def alerts(self) -> list[AlertView]:
        """Every open alert (pending, firing, acknowledged, silenced, inhibited)."""
        return self._book.alerts()

    def latest_health(self) -> Mapping[PluginKey, HealthScore]:
        return self._scores.latest()

    def take_health_changes(self) -> tuple[dict[PluginKey, HealthScore], set[PluginKey]]:
        """(plugins scored anew since the last call, plugins forgotten since): how a mirror
        of :meth:`latest_health` (the exporter) follows it without a pass over every plugin."""
        return self._scores.take_changed()

    async def aclose(self) -> None:
        """Release the journal (its directory lock). Writes nothing: every journal append
        is already on disk, and in-memory state is persisted by the cycles, not here."""
        await self._persistence.aclose()
