"""The alert engine: scores health, evaluates rules, keeps alert state and queues notifications."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

from pluginmon.alerts.health import (
    HealthConfig,
    HealthScore,
    HealthSettings,
    PluginHistory,
    score_health,
)
from pluginmon.alerts.matchers import _glob
from pluginmon.alerts.metric_values import plugin_metric_values
from pluginmon.alerts.notifiers import NotifiedAlert, alertmanager_body, group_key, webhook_body
from pluginmon.alerts.rules import (
    AlertmanagerConfig,
    AlertState,
    Phase,
    Rule,
    RuleChange,
    RuleEvaluator,
    Transition,
    TransitionKind,
    WebhookConfig,
    alert_labels,
    fingerprint,
    render_annotations,
    uses_plugin_metrics,
)
from pluginmon.collectors.models import PluginKey, Snapshot
from pluginmon.storage import alert_store
from pluginmon.storage.alert_store import (
    AlertJournal,
    AlertWrite,
    HealthWrite,
    OutboxWrite,
)
from pluginmon.storage.errors import TRANSIENT_ERRORS
from pluginmon.storage.spool import SpoolError

logger = logging.getLogger(__name__)

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


def _dt(t: float | None) -> datetime | None:
    return None if t is None else datetime.fromtimestamp(t, UTC)


@dataclass(slots=True, eq=False)
class _Alert:
    """Engine-owned record of one alert instance (mutable; the pure part is AlertState)."""

    rule: Rule
    key: PluginKey
    plugin_id: int
    labels: dict[str, str]
    fingerprint: str
    seq: int
    started_at: float
    last_active_at: float
    value: float | None
    fired_at: float | None = None
    resolved_at: float | None = None
    annotations: dict[str, str] = field(default_factory=dict)
    db_id: int | None = None
    inhibited: bool = False
    silenced_until: float | None = None
    acknowledged: bool = False
    notified: bool = False
    dirty: bool = True
    # What the journal holds for this alert (see _signature), None = nothing since the last ack.
    journaled: tuple[object, ...] | None = None

    @property
    def status(self) -> str:
        if self.resolved_at is not None:
            return "resolved"
        if self.fired_at is None:
            return "pending"
        if self.silenced_until is not None:
            return "silenced"
        if self.acknowledged:
            return "acknowledged"
        return "firing"

    @property
    def notifiable(self) -> bool:
        return (
            self.fired_at is not None
            and self.resolved_at is None
            and not self.inhibited
            and self.silenced_until is None
        )


@dataclass(frozen=True, slots=True)
class AlertView:
    """An open alert as the exporter and status views see it."""

    key: PluginKey
    alertname: str
    severity: str
    fingerprint: str
    status: str  # pending | firing | acknowledged | silenced
    value: float | None
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    started_at: datetime
    fired_at: datetime | None
    inhibited: bool
    acknowledged: bool
    silenced_until: datetime | None


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


@dataclass(frozen=True, slots=True)
class _Silence:
    tenant_id: str
    matchers: Mapping[str, str]
    ends_at: float

    def matches(self, tenant: str, labels: Mapping[str, str]) -> bool:
        if tenant != self.tenant_id:
            return False
        return all(_glob(p, labels.get(name, "")) for name, p in self.matchers.items())


class AlertEngine:
    """Owns alert state in memory, mirrored to plugin_alerts; see docs/alerts.md.

    While the database is away, evaluation goes on in memory: changed alerts stay marked
    dirty and queued notifications stay in a bounded backlog, and the next cycle that
    reaches the database writes all of it in one transaction. With ``spool_dir`` set, what
    could not be written is also appended to a disk journal (fsync'ed) after each cycle, and
    ``start()`` replays a journal left by a process that died during an outage.

    ``instance`` names this daemon (its ``host`` setting; default the hostname). Several
    daemons can share one database: each one's alerts and notifications are recorded with
    its instance, and an engine loads, resolves and queues only its own.
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
        stale_after_seconds: float = 300.0,
        plugin_health_update_seconds: float = 60.0,
        dependencies_refresh_seconds: float = 30.0,
        database_timeout_seconds: float = 10.0,
        max_backlog_notifications: int = 10_000,
        spool_dir: Path | None = None,
        journal_max_bytes: int = alert_store.JOURNAL_MAX_BYTES,
        instance: str | None = None,
    ) -> None:
        self.instance = instance or socket.gethostname()
        self._pool = pool
        self._evaluator = RuleEvaluator(rules)
        self._health_config = health_config or HealthConfig()
        self._clock = clock
        self._external_url = external_url
        self._webhooks = tuple(webhooks)
        self._alertmanager = alertmanager
        self._metrics_max_age = metrics_max_age_seconds
        self._stale_after = stale_after_seconds
        self._plugin_update_every = plugin_health_update_seconds
        # (score, unix seconds) last written to plugins.health_score, per plugin
        self._plugin_written: dict[PluginKey, tuple[float, float]] = {}
        self._last_seen: dict[PluginKey, float] = {}
        self._deps_refresh = dependencies_refresh_seconds
        self._db_timeout = database_timeout_seconds
        self._max_backlog = max_backlog_notifications

        self._open: dict[tuple[str, PluginKey], _Alert] = {}
        self._closing: list[_Alert] = []  # resolved, not yet persisted
        self._resolved_unsent: dict[PluginKey, list[_Alert]] = defaultdict(list)
        self._backlog: list[OutboxWrite] = []
        self._last_sent: dict[tuple[str, str], float] = {}
        self._seq = 0

        self._history: dict[PluginKey, PluginHistory] = {}
        self._settings: dict[PluginKey, HealthSettings] = {}
        self._health: dict[PluginKey, HealthScore] = {}
        self._metrics: dict[PluginKey, dict[str, float]] = {}
        self._silences: list[_Silence] = []
        self._acked: set[str] = set()
        self._deps: dict[int, tuple[int, ...]] = {}  # plugin id -> plugin ids it needs
        self._deps_loaded_at: float | None = None
        self._db_ok = True

        self._spool_dir = spool_dir
        self._journal_max_bytes = journal_max_bytes
        self._journal: AlertJournal | None = None
        self._journal_ok = True
        # Batches a previous process left in the journal, not yet replayed into the database.
        self._journal_inherited = 0
        self._journaled_keys: set[str] = set()  # outbox idempotency keys in the journal

        names = {r.metric for r in self._evaluator.rules if uses_plugin_metrics(r)}
        names |= {m.name for m in self._health_config.defaults.metrics}
        for override in self._health_config.overrides:
            for m in override.changes.get("metrics", ()) or ():  # type: ignore[attr-defined]
                names.add(m.name)
        self._metric_names = tuple(sorted(names))

    # --- public API ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Replay the journal a previous process left (if any), then load this instance's
        open alerts and last notification times from the database (adopting rows that have
        no owner yet: written before owners were recorded)."""
        now = self._clock().timestamp()
        await self._open_journal()
        async with asyncio.timeout(self._db_timeout), self._pool.acquire() as conn:
            await self._replay_inherited(conn)
            adopted = await alert_store.adopt_unowned(conn, self.instance)
            if any(adopted):
                logger.info(
                    "instance %s adopted %d open alert(s) and %d pending notification(s) "
                    "that had no owner",
                    self.instance,
                    *adopted,
                )
            stored = await alert_store.load_open_alerts(conn, self.instance)
            last = await alert_store.last_notified(conn, self.instance)
        self._last_sent = {k: v.timestamp() for k, v in last.items()}
        for row in stored:
            self._restore(row, now)
        logger.info("alert engine started with %d open alert(s)", len(self._open))

    async def process(
        self,
        snapshot: Snapshot,
        plugin_ids: Mapping[PluginKey, int],
        *,
        metrics: Mapping[PluginKey, Mapping[str, float]] | None = None,
    ) -> EvaluationReport:
        """One cycle: score health, evaluate rules, persist transitions with their outbox rows.

        ``metrics`` overrides the plugin_metrics values otherwise read from the database.
        """
        started = time.perf_counter()
        now_dt = self._clock()
        now = now_dt.timestamp()
        samples = [s for s in snapshot.samples if s.key in plugin_ids]

        synced_error = await self._sync(now_dt, plugin_ids, metrics is None)
        metric_values = self._metrics if metrics is None else metrics

        healths: list[HealthScore | None] = []
        for sample in samples:
            key = sample.key
            settings = self._settings.get(key)
            if settings is None:
                settings = self._settings[key] = self._health_config.settings_for(key)
            history = self._history.get(key)
            if history is None:
                history = self._history[key] = PluginHistory(
                    window_seconds=settings.leak_window_seconds,
                    min_points=settings.leak_min_points,
                )
            history.add(sample, restart_window_seconds=settings.restart_window_seconds)
            score = score_health(
                sample,
                settings=settings,
                now=now_dt,
                restart_events=history.restart_events,
                metrics=metric_values.get(key),
                leak_slope=history.leak_slope,
            )
            self._health[key] = score
            healths.append(score)

        changes = self._evaluator.evaluate(samples, now, healths, metric_values)
        touched = {s.key for s in samples}
        for key in touched:
            self._last_seen[key] = now
        changes += self._resolve_stale(now)
        self._apply(changes, plugin_ids, now)
        self._refresh_open(touched, now)
        # (plugin id, environment): one plugins row serves every environment of a plugin,
        # and a plugin down in staging inhibits nothing in production
        down = {(plugin_ids[s.key], s.key.environment) for s in samples if not s.up}
        self._apply_inhibition_and_silences(down, now)
        queued = self._queue_notifications(now)

        database_error = synced_error
        persisted = False
        if synced_error is None:
            database_error = await self._persist(now_dt, samples, plugin_ids)
            persisted = database_error is None
        self._note_database(database_error)
        if persisted:
            await self._ack_journal()
        else:
            await self._journal_unpersisted(now_dt)
        return EvaluationReport(
            timestamp=now_dt,
            plugins_scored=len(samples),
            transitions=tuple((c.rule.name, c.key, c.transition.kind.value) for c in changes),
            notifications_queued=queued,
            persisted=persisted,
            unpersisted_alerts=sum(1 for a in self._open.values() if a.dirty) + len(self._closing),
            unpersisted_notifications=len(self._backlog),
            duration_seconds=time.perf_counter() - started,
            database_error=database_error,
            journal_batches=0 if self._journal is None else self._journal.batches,
        )

    def firing(self) -> list[AlertView]:
        """Firing alerts that notify (not inhibited, not silenced): pluginmon_alerts_firing."""
        return [self._view(a) for a in self._open.values() if a.notifiable]

    def alerts(self) -> list[AlertView]:
        """Every open alert (pending, firing, acknowledged, silenced, inhibited)."""
        return [self._view(a) for a in self._open.values()]

    def latest_health(self) -> Mapping[PluginKey, HealthScore]:
        return dict(self._health)

    async def aclose(self) -> None:
        """Release the journal (its directory lock). Writes nothing: every journal append
        is already on disk, and in-memory state is persisted by the cycles, not here."""
        journal, self._journal = self._journal, None
        if journal is not None:
            await asyncio.to_thread(journal.close)

    async def acknowledge(self, fingerprint_: str, by: str) -> bool:
        """Acknowledge an open alert: no repeat notifications; its resolution is still sent."""
        async with asyncio.timeout(self._db_timeout), self._pool.acquire() as conn:
            found = await alert_store.acknowledge(conn, fingerprint_, by, self._clock())
        if found:
            self._acked.add(fingerprint_)
            for a in self._open.values():
                if a.fingerprint == fingerprint_:
                    a.acknowledged = True
        return bool(found)

    async def silence(
        self,
        *,
        tenant: str,
        matchers: Mapping[str, str],
        ends_at: datetime,
        created_by: str,
        comment: str = "",
    ) -> int:
        """Mute a tenant's alerts whose labels match every glob in ``matchers`` until ``ends_at``."""
        async with asyncio.timeout(self._db_timeout), self._pool.acquire() as conn:
            silence_id = await alert_store.add_silence(
                conn,
                tenant_id=tenant,
                matchers=matchers,
                ends_at=ends_at,
                created_by=created_by,
                comment=comment,
                starts_at=self._clock(),
            )
        self._silences.append(_Silence(tenant, dict(matchers), ends_at.timestamp()))
        return silence_id

    # --- evaluation bookkeeping ---------------------------------------------------------------

    def _restore(self, row: alert_store.StoredAlert, now: float) -> None:
        key = PluginKey(row.tenant_id, row.labels.get("plugin", ""), row.environment)
        rule = self._evaluator.rule(row.rule_name)
        started = row.started_at.timestamp()
        fired = None if row.fired_at is None else row.fired_at.timestamp()
        last_active = (row.last_active_at or row.started_at).timestamp()
        self._seq += 1
        alert = _Alert(
            rule=rule
            or Rule(name=row.rule_name, metric="", op="==", threshold=0, severity=row.severity),
            key=key,
            plugin_id=row.plugin_id,
            labels=dict(row.labels),
            fingerprint=row.fingerprint,
            seq=self._seq,
            started_at=started,
            last_active_at=last_active,
            value=row.value,
            fired_at=fired,
            annotations=dict(row.annotations),
            db_id=row.id,
            inhibited=row.inhibited,
            silenced_until=None if row.silenced_until is None else row.silenced_until.timestamp(),
            acknowledged=row.acknowledged_at is not None,
            notified=row.notified_at is not None,
            dirty=False,
        )
        if rule is None:
            # The rule was removed from the configuration: the alert cannot fire any more.
            alert.resolved_at = now
            alert.dirty = True
            self._closing.append(alert)
            if alert.notified:
                self._resolved_unsent[key].append(alert)
            return
        self._open[(rule.name, key)] = alert
        self._evaluator.restore(
            rule.name,
            key,
            AlertState(
                Phase.FIRING if fired is not None else Phase.PENDING,
                started,
                last_active,
                row.value,
                fired,
            ),
        )

    def _resolve_stale(self, now: float) -> list[RuleChange]:
        """Resolve the alerts of plugins no snapshot has shown for ``stale_after_seconds``
        (a label-discovered plugin that went away, a [[plugins]] entry removed): nothing
        will ever evaluate them again."""
        changes: list[RuleChange] = []
        for (rule_name, key), alert in list(self._open.items()):
            seen = self._last_seen.get(key)
            if seen is None:
                # restored at start and not seen since: give it the grace period from now
                self._last_seen[key] = now
                continue
            if now - seen >= self._stale_after:
                self._evaluator.forget(rule_name, key)
                kind = TransitionKind.RESOLVED if alert.fired_at else TransitionKind.CANCELLED
                changes.append(
                    RuleChange(alert.rule, key, Transition(kind, now, alert.value), None)
                )
                logger.info(
                    "alert %s for %s/%s/%s resolved: plugin not seen for %.0fs",
                    rule_name,
                    key.tenant,
                    key.plugin,
                    key.environment,
                    now - seen,
                )
        return changes

    def _apply(
        self, changes: Sequence[RuleChange], plugin_ids: Mapping[PluginKey, int], now: float
    ) -> None:
        for change in changes:
            skey = (change.rule.name, change.key)
            kind = change.transition.kind
            alert = self._open.get(skey)
            if kind in (TransitionKind.PENDING, TransitionKind.FIRING) and alert is None:
                state = change.state
                assert state is not None
                labels = alert_labels(change.rule, change.key, self.instance)
                self._seq += 1
                alert = _Alert(
                    rule=change.rule,
                    key=change.key,
                    plugin_id=plugin_ids[change.key],
                    labels=labels,
                    fingerprint=fingerprint(labels),
                    seq=self._seq,
                    started_at=state.active_since,
                    last_active_at=state.last_active_at,
                    value=state.value,
                    acknowledged=False,
                )
                self._open[skey] = alert
            if alert is None:
                continue
            alert.dirty = True
            alert.value = change.transition.value
            if kind is TransitionKind.FIRING:
                alert.fired_at = change.transition.at
                alert.annotations = render_annotations(alert.rule, alert.key, alert.value)
            elif kind in (TransitionKind.RESOLVED, TransitionKind.CANCELLED):
                alert.resolved_at = change.transition.at
                del self._open[skey]
                self._acked.discard(alert.fingerprint)
                self._closing.append(alert)
                if alert.notified:
                    self._resolved_unsent[alert.key].append(alert)
            if alert.fired_at is None:
                alert.annotations = render_annotations(alert.rule, alert.key, alert.value)

    def _refresh_open(self, touched: set[PluginKey], now: float) -> None:
        for skey, alert in self._open.items():
            if alert.key not in touched:
                continue
            state = self._evaluator.state(*skey)
            if state is not None:
                alert.value = state.value
                alert.last_active_at = state.last_active_at

    def _apply_inhibition_and_silences(self, down: set[tuple[int, str]], now: float) -> None:
        self._silences = [s for s in self._silences if s.ends_at > now]
        for alert in self._open.values():
            env = alert.key.environment
            inhibited = any((d, env) in down for d in self._deps.get(alert.plugin_id, ()))
            if inhibited != alert.inhibited:
                alert.inhibited = inhibited
                alert.dirty = True
                logger.info(
                    "alert %s for %s/%s %s",
                    alert.rule.name,
                    alert.key.tenant,
                    alert.key.plugin,
                    "inhibited: a plugin it depends on is down"
                    if inhibited
                    else "no longer inhibited",
                )
            until: float | None = None
            for s in self._silences:
                if s.matches(alert.key.tenant, alert.labels):
                    until = s.ends_at if until is None else max(until, s.ends_at)
            if until != alert.silenced_until:
                alert.silenced_until = until
                alert.dirty = True
            acked = alert.fingerprint in self._acked
            if acked and not alert.acknowledged:
                alert.acknowledged = True
                alert.dirty = True

    def _silenced_at(self, alert: _Alert, now: float) -> bool:
        """A silence matches the alert at ``now`` (checked against the current silences, so
        one added in this very cycle counts too)."""
        if alert.silenced_until is not None and alert.silenced_until > now:
            return True
        return any(
            s.ends_at > now and s.matches(alert.key.tenant, alert.labels) for s in self._silences
        )

    # --- notifications ------------------------------------------------------------------------

    def _queue_notifications(self, now: float) -> int:
        if not self._webhooks and self._alertmanager is None:
            for alert in self._open.values():
                if alert.notifiable and not alert.notified:
                    alert.notified = True
                    alert.dirty = True
            self._resolved_unsent.clear()
            return 0
        by_key: dict[PluginKey, list[_Alert]] = defaultdict(list)
        for alert in self._open.values():
            if alert.notifiable:
                by_key[alert.key].append(alert)
        resolved = self._resolved_unsent
        for key, closed in list(resolved.items()):
            # Alertmanager semantics: a silenced alert sends nothing, its resolution included.
            kept = [a for a in closed if not self._silenced_at(a, now)]
            if len(kept) < len(closed):
                logger.info(
                    "resolution of %d silenced alert(s) for %s/%s/%s not sent",
                    len(closed) - len(kept),
                    key.tenant,
                    key.plugin,
                    key.environment,
                )
            if kept:
                resolved[key] = kept
            else:
                del resolved[key]
        queued = 0
        for key in set(by_key) | set(resolved):
            firing = sorted(by_key.get(key, ()), key=lambda a: a.seq)
            just_resolved = sorted(resolved.get(key, ()), key=lambda a: a.seq)
            queued += self._queue_group(key, firing, just_resolved, now)
            for alert in firing:
                if not alert.notified:
                    alert.notified = True
                    alert.dirty = True
        resolved.clear()
        if len(self._backlog) > self._max_backlog:
            dropped = len(self._backlog) - self._max_backlog
            del self._backlog[:dropped]
            logger.warning(
                "dropped %d queued notification(s): the database has been unreachable too long",
                dropped,
            )
        return queued

    def _queue_group(
        self, key: PluginKey, firing: list[_Alert], just_resolved: list[_Alert], now: float
    ) -> int:
        if not firing and not just_resolved:
            return 0
        group_labels = {"tenant": key.tenant, "plugin": key.plugin, "environment": key.environment}
        gkey = group_key(group_labels)
        new = any(not a.notified for a in firing)
        wants_repeat = any(not a.acknowledged for a in firing)
        plugin_id = (firing or just_resolved)[0].plugin_id
        now_dt = datetime.fromtimestamp(now, UTC)
        queued = 0
        for hook in self._webhooks:
            last = self._last_sent.get((hook.name, gkey))
            repeat_due = (
                wants_repeat and last is not None and now - last >= hook.repeat_interval_seconds
            )
            resolved = just_resolved if hook.send_resolved else []
            if not (new or resolved or repeat_due):
                continue
            alerts = [self._notified(a, now) for a in (*firing, *resolved)]
            body = webhook_body(
                receiver=hook.name,
                group_labels=group_labels,
                alerts=alerts,
                external_url=self._external_url,
            )
            self._enqueue(key, plugin_id, hook.name, "webhook", gkey, body, alerts, now_dt)
            queued += 1
        am = self._alertmanager
        if am is not None:
            last = self._last_sent.get((am.name, gkey))
            resend_due = bool(firing) and (last is None or now - last >= am.resend_interval_seconds)
            if new or just_resolved or resend_due:
                alerts = [self._notified(a, now) for a in (*firing, *just_resolved)]
                # Firing alerts get their endsAt when the deliverer sends them (send time +
                # 4 resend intervals): a push retried after an outage must not arrive expired.
                body = alertmanager_body(alerts, generator_url=self._external_url)
                self._enqueue(key, plugin_id, am.name, "alertmanager", gkey, body, alerts, now_dt)
                queued += 1
        return queued

    def _notified(self, alert: _Alert, now: float) -> NotifiedAlert:
        if alert.resolved_at is None:
            alert.annotations = render_annotations(alert.rule, alert.key, alert.value)
        started = datetime.fromtimestamp(alert.started_at, UTC)
        return NotifiedAlert(
            status="resolved" if alert.resolved_at is not None else "firing",
            labels=alert.labels,
            annotations=alert.annotations,
            starts_at=started,
            ends_at=_dt(alert.resolved_at),
            fingerprint=alert.fingerprint,
        )

    def _enqueue(
        self,
        key: PluginKey,
        plugin_id: int,
        receiver: str,
        kind: str,
        gkey: str,
        body: str,
        alerts: Sequence[NotifiedAlert],
        now_dt: datetime,
    ) -> None:
        self._backlog.append(
            OutboxWrite(
                tenant_id=key.tenant,
                plugin_id=plugin_id,
                environment=key.environment,
                receiver=receiver,
                receiver_kind=kind,
                group_key=gkey,
                idempotency_key=uuid.uuid4().hex,
                body=body,
                fingerprints=tuple(a.fingerprint for a in alerts),
                created_at=now_dt,
                instance=self.instance,
            )
        )
        self._last_sent[(receiver, gkey)] = now_dt.timestamp()

    # --- database -----------------------------------------------------------------------------

    async def _sync(
        self, now: datetime, plugin_ids: Mapping[PluginKey, int], want_metrics: bool
    ) -> str | None:
        """Refresh silences, acknowledgements, dependencies and plugin_metrics values."""
        try:
            async with asyncio.timeout(self._db_timeout), self._pool.acquire() as conn:
                silences = await alert_store.active_silences(conn, now)
                acked = await alert_store.acknowledged(conn)
                ts = now.timestamp()
                if self._deps_loaded_at is None or ts - self._deps_loaded_at >= self._deps_refresh:
                    self._deps = await alert_store.runtime_dependencies(conn)
                    self._deps_loaded_at = ts
                if want_metrics and self._metric_names:
                    # (plugin id, environment): the same plugin in two environments shares
                    # one plugins.id, and each environment has its own series
                    by_id = {(v, k.environment): k for k, v in plugin_ids.items()}
                    # Gauges as their value, counters as rates, name:pNN as quantiles.
                    values = await plugin_metric_values(
                        conn,
                        list(by_id),
                        self._metric_names,
                        now - timedelta(seconds=self._metrics_max_age),
                        now=now,
                    )
                    metrics: dict[PluginKey, dict[str, float]] = defaultdict(dict)
                    for (pid, env, name), value in values.items():
                        metrics[by_id[(pid, env)]][name] = value
                    self._metrics = dict(metrics)
        except TRANSIENT_ERRORS as exc:
            return f"{type(exc).__name__}: {exc}"
        self._silences = [
            _Silence(s.tenant_id, s.matchers, s.ends_at.timestamp()) for s in silences
        ]
        self._acked = set(acked)
        return None

    async def _persist(
        self, now: datetime, samples: Sequence[Any], plugin_ids: Mapping[PluginKey, int]
    ) -> str | None:
        dirty = sorted(
            [a for a in self._open.values() if a.dirty] + self._closing, key=lambda a: a.seq
        )
        clean = [a for a in self._open.values() if not a.dirty and a.db_id is not None]
        backlog = list(self._backlog)
        try:
            async with asyncio.timeout(self._db_timeout), self._pool.acquire() as conn:
                # A journal this process could not replay at start goes in first, in order.
                await self._replay_inherited(conn)
                ids: list[int | None]
                try:
                    async with conn.transaction():
                        ids = [
                            await alert_store.save_alert(conn, self._write(a, now)) for a in dirty
                        ]
                        await alert_store.insert_outbox(conn, backlog)
                        await alert_store.touch_alerts(
                            conn, [a.db_id for a in clean if a.db_id], [a.value for a in clean], now
                        )
                except TRANSIENT_ERRORS:
                    raise
                except asyncpg.PostgresError:
                    # One bad row (say, its plugin was deleted) must not block every other
                    # alert forever: save item by item, dropping what the database refuses.
                    logger.exception("alert state refused as a whole; saving it item by item")
                    ids = await self._persist_item_by_item(conn, dirty, backlog, now)
                for alert, db_id in zip(dirty, ids, strict=True):
                    alert.db_id = db_id if db_id is not None else alert.db_id
                    alert.dirty = False
                written = {id(a) for a in dirty}
                self._closing = [a for a in self._closing if id(a) not in written]
                del self._backlog[: len(backlog)]
                ts = now.timestamp()
                health: list[HealthWrite] = []
                health_keys: list[PluginKey] = []
                for s in samples:
                    score = self._health.get(s.key)
                    if score is None:
                        continue
                    last = self._plugin_written.get(s.key)
                    update = (
                        last is None
                        or abs(last[0] - score.score) >= 0.5
                        or ts - last[1] >= self._plugin_update_every
                    )
                    health.append(self._health_write(plugin_ids[s.key], score, update))
                    health_keys.append(s.key)
                try:
                    await alert_store.write_health(conn, health, now)
                    for key, w in zip(health_keys, health, strict=True):
                        if w.update_plugin:
                            self._plugin_written[key] = (w.score, ts)
                except TRANSIENT_ERRORS:
                    raise
                except Exception:
                    # Health rows are derived data: never let them block alert persistence.
                    logger.exception("could not write health scores")
        except TRANSIENT_ERRORS as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    async def _persist_item_by_item(
        self, conn: Any, dirty: Sequence[_Alert], backlog: Sequence[OutboxWrite], now: datetime
    ) -> list[int | None]:
        ids: list[int | None] = []
        async with conn.transaction():
            for alert in dirty:
                try:
                    async with conn.transaction():  # a savepoint
                        ids.append(await alert_store.save_alert(conn, self._write(alert, now)))
                except TRANSIENT_ERRORS:
                    raise
                except asyncpg.PostgresError as exc:
                    logger.error(
                        "dropping state of alert %s for %s/%s: %s",
                        alert.rule.name,
                        alert.key.tenant,
                        alert.key.plugin,
                        exc,
                    )
                    ids.append(None)
            for row in backlog:
                try:
                    async with conn.transaction():
                        await alert_store.insert_outbox(conn, [row])
                except TRANSIENT_ERRORS:
                    raise
                except asyncpg.PostgresError as exc:
                    logger.error(
                        "dropping notification to %s about %s/%s: %s",
                        row.receiver,
                        row.tenant_id,
                        row.group_key,
                        exc,
                    )
        return ids

    def _write(self, a: _Alert, now: datetime) -> AlertWrite:
        return AlertWrite(
            id=a.db_id,
            tenant_id=a.key.tenant,
            plugin_id=a.plugin_id,
            environment=a.key.environment,
            rule_name=a.rule.name,
            fingerprint=a.fingerprint,
            severity=a.rule.severity,
            status=a.status,
            inhibited=a.inhibited,
            value=a.value,
            labels=a.labels,
            annotations=a.annotations,
            started_at=datetime.fromtimestamp(a.started_at, UTC),
            fired_at=_dt(a.fired_at),
            resolved_at=_dt(a.resolved_at),
            silenced_until=_dt(a.silenced_until),
            last_active_at=_dt(a.last_active_at),
            last_evaluated_at=now,
            notified_at=now if a.notified else None,
            instance=self.instance,
        )

    @staticmethod
    def _health_write(plugin_id: int, score: HealthScore, update_plugin: bool) -> HealthWrite:
        weakest = score.weakest
        # Built by hand: json.dumps per row was a third of a 10k-plugin cycle. Component
        # names are fixed identifiers or metric names; the detail text goes through json.
        components = ",".join(f"{json.dumps(c.name)}:{round(c.score, 2)}" for c in score.components)
        if weakest is None:
            labels = f'{{"components":{{{components}}}}}'
        else:
            labels = (
                f'{{"components":{{{components}}},"weakest":{json.dumps(weakest.name)},'
                f'"weakest_detail":{json.dumps(weakest.detail)},'
                f'"weakest_score":{round(weakest.score, 2)}}}'
            )
        return HealthWrite(
            tenant_id=score.key.tenant,
            plugin_id=plugin_id,
            environment=score.key.environment,
            score=score.score,
            labels_json=labels,
            update_plugin=update_plugin,
        )

    # --- journal ------------------------------------------------------------------------------

    async def _open_journal(self) -> bool:
        """Open the journal once (spool_dir set); a failure is logged and leaves the engine
        on in-memory state only, trying again at the next cycle that needs it."""
        if self._spool_dir is None:
            return False
        if self._journal is not None:
            return True
        try:
            journal = await asyncio.to_thread(
                AlertJournal, self._spool_dir, max_bytes=self._journal_max_bytes
            )
        except (OSError, SpoolError) as exc:
            self._note_journal(f"cannot open alert journal {self._spool_dir}: {exc}")
            return False
        self._journal = journal
        self._journal_inherited = journal.batches
        if journal.batches:
            logger.info(
                "alert journal %s: %d entries in %d batch(es) left by a previous run",
                journal.directory,
                journal.entries,
                journal.batches,
            )
        return True

    async def _replay_inherited(self, conn: Any) -> None:
        """Write the batches a previous process journaled, then ack them. Idempotent, so a
        crash between the commit and the ack only replays them again."""
        journal = self._journal
        if journal is None or not self._journal_inherited:
            return
        batches = await asyncio.to_thread(journal.read, self._journal_inherited)
        result = await alert_store.replay_journal(conn, batches, instance=self.instance)
        await asyncio.to_thread(journal.ack, batches)
        self._journal_inherited = 0
        logger.info(
            "alert journal replayed: %d alert write(s), %d notification(s), %d older than "
            "the database, %d refused",
            result.alerts,
            result.notifications,
            result.skipped,
            result.refused,
        )

    @staticmethod
    def _signature(a: _Alert) -> tuple[object, ...]:
        # The fields whose change makes an alert dirty; value and last_active_at move every
        # cycle and are written with whatever they are when the alert is journaled.
        return (
            a.status,
            a.inhibited,
            a.fired_at,
            a.resolved_at,
            a.silenced_until,
            a.acknowledged,
            a.notified,
            a.db_id,
        )

    async def _journal_unpersisted(self, now: datetime) -> None:
        """Append what this cycle could not persist and the journal does not hold yet."""
        if self._spool_dir is None:
            return
        dirty = sorted(
            [a for a in self._open.values() if a.dirty] + self._closing, key=lambda a: a.seq
        )
        alerts = [a for a in dirty if a.journaled != self._signature(a)]
        outbox = [o for o in self._backlog if o.idempotency_key not in self._journaled_keys]
        if not alerts and not outbox:
            return
        if not await self._open_journal():
            return
        journal = self._journal
        assert journal is not None
        try:
            await asyncio.to_thread(journal.append, [self._write(a, now) for a in alerts], outbox)
        except (OSError, SpoolError) as exc:
            self._note_journal(f"alert journal append failed: {exc}")
            return
        for a in alerts:
            a.journaled = self._signature(a)
        self._journaled_keys.update(o.idempotency_key for o in outbox)
        self._note_journal(None)

    async def _ack_journal(self) -> None:
        """Everything in memory reached the database: the journal's copy can go."""
        journal = self._journal
        if journal is None or not journal.batches or self._journal_inherited:
            return
        try:
            count = await asyncio.to_thread(journal.ack_all)
        except (OSError, SpoolError) as exc:
            self._note_journal(f"alert journal ack failed: {exc}")
            return
        self._journaled_keys.clear()
        for a in self._open.values():
            a.journaled = None
        logger.info("alert journal: %d batch(es) acked, their state is in the database", count)

    def _note_journal(self, error: str | None) -> None:
        if error is None:
            if not self._journal_ok:
                self._journal_ok = True
                logger.info("alert journal writable again")
        elif self._journal_ok:
            self._journal_ok = False
            logger.error("%s; unpersisted alert state is only in memory", error)

    def _note_database(self, error: str | None) -> None:
        if error is None and not self._db_ok:
            self._db_ok = True
            logger.info("alert state persisted again: database reachable")
        elif error is not None and self._db_ok:
            self._db_ok = False
            logger.warning(
                "alert state kept in memory, database unreachable (%s); will persist when it is back",
                error,
            )

    @staticmethod
    def _view(a: _Alert) -> AlertView:
        return AlertView(
            key=a.key,
            alertname=a.rule.name,
            severity=a.rule.severity,
            fingerprint=a.fingerprint,
            status=a.status,
            value=a.value,
            labels=dict(a.labels),
            annotations=dict(a.annotations),
            started_at=datetime.fromtimestamp(a.started_at, UTC),
            fired_at=_dt(a.fired_at),
            inhibited=a.inhibited,
            acknowledged=a.acknowledged,
            silenced_until=_dt(a.silenced_until),
        )
