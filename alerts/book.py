"""The alert book: alert instances per (rule, plugin key), inhibition, silences and acknowledgements.

Pure: it takes samples, health scores, metric values and ``now`` (unix seconds) and keeps the
alerts in memory, keyed by :class:`~pluginmon.collectors.models.PluginKey`; it knows nothing
of the database. What changed since the last :meth:`AlertBook.take_changed` is what the
persistence part writes; the notification planner reads the notifiable alerts and the
resolutions to announce.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import compress
from operator import attrgetter, not_

from pluginmon.alerts.health import HealthScore
from pluginmon.alerts.matchers import _glob
from pluginmon.alerts.rules import (
    AlertState,
    Phase,
    Rule,
    RuleChange,
    RuleEvaluator,
    Transition,
    TransitionKind,
    alert_labels,
    fingerprint,
    render_annotations,
)
from pluginmon.collectors.models import PluginKey, PluginSample

logger = logging.getLogger(__name__)

_KEY = attrgetter("key")
_UP = attrgetter("up")


def _dt(t: float | None) -> datetime | None:
    return None if t is None else datetime.fromtimestamp(t, UTC)


@dataclass(slots=True, eq=False)
class AlertRecord:
    """One alert instance as the book keeps it (mutable; the pure part is rules.AlertState).

    ``seq`` numbers the instances of this process in creation order: persistence writes
    changes in that order and keys its database row ids by it.
    """

    rule: Rule
    key: PluginKey
    labels: dict[str, str]
    fingerprint: str
    seq: int
    started_at: float
    last_active_at: float
    value: float | None
    fired_at: float | None = None
    resolved_at: float | None = None
    annotations: dict[str, str] = field(default_factory=dict)
    inhibited: bool = False
    silenced_until: float | None = None
    acknowledged: bool = False
    notified: bool = False

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

    def view(self) -> AlertView:
        return AlertView(
            key=self.key,
            alertname=self.rule.name,
            severity=self.rule.severity,
            fingerprint=self.fingerprint,
            status=self.status,
            value=self.value,
            labels=dict(self.labels),
            annotations=dict(self.annotations),
            started_at=datetime.fromtimestamp(self.started_at, UTC),
            fired_at=_dt(self.fired_at),
            inhibited=self.inhibited,
            acknowledged=self.acknowledged,
            silenced_until=_dt(self.silenced_until),
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
class SilenceRule:
    """A silence as the book applies it: every glob in ``matchers`` must match a label."""

    tenant_id: str
    matchers: Mapping[str, str]
    ends_at: float  # unix seconds

    def matches(self, tenant: str, labels: Mapping[str, str]) -> bool:
        if tenant != self.tenant_id:
            return False
        return all(_glob(p, labels.get(name, "")) for name, p in self.matchers.items())


class AlertBook:
    """Alert instances of one daemon (``instance``) by (rule, plugin key).

    Each :meth:`evaluate` runs the rules, opens, fires and resolves instances, and applies
    inhibition (a runtime dependency of the plugin is down in the same environment),
    silences and acknowledgements. A plugin absent from the samples loses its pending
    alerts at once (they have announced nothing; a label-discovered plugin that went away
    would otherwise leave them pending) and its firing ones after ``stale_after_seconds``
    (their resolution is announced).
    """

    def __init__(
        self, rules: Sequence[Rule], *, instance: str, stale_after_seconds: float = 300.0
    ) -> None:
        self.instance = instance
        self._evaluator = RuleEvaluator(rules)
        self._stale_after = stale_after_seconds
        self._open: dict[tuple[str, PluginKey], AlertRecord] = {}
        self._seq = 0
        # Last time a plugin with open alerts was in the samples (only those plugins).
        self._last_seen: dict[PluginKey, float] = {}
        self._changed: dict[int, AlertRecord] = {}
        # Notified alerts that resolved and whose resolution is not announced yet.
        self._resolved_unsent: dict[PluginKey, list[AlertRecord]] = defaultdict(list)
        self._silences: list[SilenceRule] = []
        self._acked: set[str] = set()
        # (tenant, plugin) -> plugins it needs at run time, by name
        self._deps: Mapping[tuple[str, str], Sequence[str]] = {}

    @property
    def rules(self) -> tuple[Rule, ...]:
        return self._evaluator.rules

    def reconfigure(self, rules: Sequence[Rule], *, now: float) -> int:
        """Swap the rules (a configuration reload); returns how many open alerts it closed.

        An open alert keeps its state (pending since, firing since, acknowledged, notified)
        when its rule is still there with the same labels and severity (its identity) and
        still applies to its plugin; the new threshold decides at the next evaluation.
        Otherwise it closes, like an alert whose rule is gone at start: resolved (the
        resolution is announced) or, if it was pending, cancelled.
        """
        old = self._evaluator
        evaluator = RuleEvaluator(rules)
        closed = 0
        for (rule_name, key), alert in list(self._open.items()):
            rule = evaluator.rule(rule_name)
            if (
                rule is not None
                and rule.applies_to(key)
                and rule.severity == alert.rule.severity
                and dict(rule.labels) == dict(alert.rule.labels)
            ):
                alert.rule = rule
                state = old.state(rule_name, key)
                if state is not None:
                    evaluator.restore(rule_name, key, state)
                continue
            del self._open[(rule_name, key)]
            self._close(alert, now)
            closed += 1
            logger.info(
                "alert %s for %s/%s/%s %s: its rule was %s by a configuration reload",
                rule_name,
                key.tenant,
                key.plugin,
                key.environment,
                "resolved" if alert.fired_at is not None else "cancelled",
                "removed" if rule is None else "changed",
            )
        self._evaluator = evaluator
        return closed

    # --- inputs ---------------------------------------------------------------------------

    def set_silences(self, silences: Iterable[SilenceRule]) -> None:
        """The silences in force (replacing the previous ones)."""
        self._silences = list(silences)

    def add_silence(self, silence: SilenceRule) -> None:
        self._silences.append(silence)

    def set_acknowledged(self, fingerprints: Iterable[str]) -> None:
        """Fingerprints of the open alerts someone acknowledged (replacing the previous set)."""
        self._acked = set(fingerprints)

    def acknowledge(self, fingerprint_: str) -> bool:
        """Mark the open alerts with ``fingerprint_`` acknowledged now; False if there is none."""
        self._acked.add(fingerprint_)
        found = False
        for alert in self._open.values():
            if alert.fingerprint == fingerprint_:
                # not a change to write: whoever acknowledged wrote it to the database
                alert.acknowledged = True
                found = True
        return found

    def set_dependencies(self, dependencies: Mapping[tuple[str, str], Sequence[str]]) -> None:
        """(tenant, plugin) -> the plugins (names, same tenant) it needs at run time."""
        self._deps = dependencies

    # --- restoring ------------------------------------------------------------------------

    def restore(
        self,
        *,
        rule_name: str,
        key: PluginKey,
        labels: Mapping[str, str],
        fingerprint_: str,
        severity: str,
        started_at: float,
        last_active_at: float,
        fired_at: float | None,
        value: float | None,
        annotations: Mapping[str, str],
        inhibited: bool,
        silenced_until: float | None,
        acknowledged: bool,
        notified: bool,
        now: float,
    ) -> AlertRecord:
        """Take back an open alert a previous process left (unchanged, not to be written
        again), or resolve it at ``now`` if its rule is gone from the configuration."""
        rule = self._evaluator.rule(rule_name)
        self._seq += 1
        alert = AlertRecord(
            rule=rule or Rule(name=rule_name, metric="", op="==", threshold=0, severity=severity),
            key=key,
            labels=dict(labels),
            fingerprint=fingerprint_,
            seq=self._seq,
            started_at=started_at,
            last_active_at=last_active_at,
            value=value,
            fired_at=fired_at,
            annotations=dict(annotations),
            inhibited=inhibited,
            silenced_until=silenced_until,
            acknowledged=acknowledged,
            notified=notified,
        )
        if rule is None:
            # The rule was removed from the configuration: the alert cannot fire any more.
            self._close(alert, now)
            return alert
        self._open[(rule.name, key)] = alert
        self._evaluator.restore(
            rule.name,
            key,
            AlertState(
                Phase.FIRING if fired_at is not None else Phase.PENDING,
                started_at,
                last_active_at,
                value,
                fired_at,
            ),
        )
        return alert

    # --- one cycle ------------------------------------------------------------------------

    def evaluate(
        self,
        samples: Sequence[PluginSample],
        health: Sequence[HealthScore | None],
        metrics: Mapping[PluginKey, Mapping[str, float]],
        *,
        now: float,
    ) -> list[RuleChange]:
        """Evaluate every rule for every sample (``health`` aligned with ``samples``), then
        resolve the alerts of plugins gone from the samples and apply inhibition, silences
        and acknowledgements. Returns the transitions, in order."""
        changes = self._evaluator.evaluate(samples, now, health, metrics)
        # key -> position, cached by the evaluator while the plugins stay the same
        present: Mapping[PluginKey, int] = self._evaluator.index(samples) if self._open else {}
        changes += self._close_absent(present, now)
        self._apply(changes)
        self._refresh_open(present)
        # (tenant, plugin, environment) of the plugins that are down: a plugin down in
        # staging inhibits nothing in production
        down = set(compress(map(_KEY, samples), map(not_, map(_UP, samples))))
        self._apply_inhibition_silences_acks(down, now)
        return changes

    def _close_absent(self, present: Container[PluginKey], now: float) -> list[RuleChange]:
        changes: list[RuleChange] = []
        for (rule_name, key), alert in list(self._open.items()):
            if key in present:
                self._last_seen[key] = now
                continue
            seen = self._last_seen.get(key)
            if alert.fired_at is None:
                why = "plugin gone, it never fired"
            elif seen is None:
                # restored at start and not seen since: give it the grace period from now
                self._last_seen[key] = now
                continue
            elif now - seen >= self._stale_after:
                why = f"plugin not seen for {now - seen:.0f}s"
            else:
                continue
            self._evaluator.forget(rule_name, key)
            fired = alert.fired_at is not None
            kind = TransitionKind.RESOLVED if fired else TransitionKind.CANCELLED
            changes.append(RuleChange(alert.rule, key, Transition(kind, now, alert.value), None))
            logger.info(
                "alert %s for %s/%s/%s %s: %s",
                rule_name,
                key.tenant,
                key.plugin,
                key.environment,
                kind.value,
                why,
            )
        return changes

    def _apply(self, changes: Sequence[RuleChange]) -> None:
        for change in changes:
            skey = (change.rule.name, change.key)
            kind = change.transition.kind
            alert = self._open.get(skey)
            if kind in (TransitionKind.PENDING, TransitionKind.FIRING) and alert is None:
                state = change.state
                assert state is not None
                labels = alert_labels(change.rule, change.key, self.instance)
                self._seq += 1
                alert = AlertRecord(
                    rule=change.rule,
                    key=change.key,
                    labels=labels,
                    fingerprint=fingerprint(labels),
                    seq=self._seq,
                    started_at=state.active_since,
                    last_active_at=state.last_active_at,
                    value=state.value,
                )
                self._open[skey] = alert
                self._last_seen[change.key] = change.transition.at
            if alert is None:
                continue
            self._changed[alert.seq] = alert
            alert.value = change.transition.value
            if kind is TransitionKind.FIRING:
                alert.fired_at = change.transition.at
                alert.annotations = render_annotations(alert.rule, alert.key, alert.value)
            elif kind in (TransitionKind.RESOLVED, TransitionKind.CANCELLED):
                del self._open[skey]
                self._close(alert, change.transition.at)
            if alert.fired_at is None:
                alert.annotations = render_annotations(alert.rule, alert.key, alert.value)
        if len(self._last_seen) > len(self._open):
            open_keys = {k for _, k in self._open}
            self._last_seen = {k: t for k, t in self._last_seen.items() if k in open_keys}

    def _close(self, alert: AlertRecord, at: float) -> None:
        alert.resolved_at = at
        self._changed[alert.seq] = alert
        self._acked.discard(alert.fingerprint)
        if alert.notified:
            self._resolved_unsent[alert.key].append(alert)

    def _refresh_open(self, present: Container[PluginKey]) -> None:
        for skey, alert in self._open.items():
            if alert.key not in present:
                continue
            state = self._evaluator.state(*skey)
            if state is not None:
                alert.value = state.value
                alert.last_active_at = state.last_active_at

    def _apply_inhibition_silences_acks(self, down: set[PluginKey], now: float) -> None:
        self._silences = [s for s in self._silences if s.ends_at > now]
        for alert in self._open.values():
            key = alert.key
            inhibited = bool(down) and any(
                PluginKey(key.tenant, d, key.environment) in down
                for d in self._deps.get((key.tenant, key.plugin), ())
            )
            if inhibited != alert.inhibited:
                alert.inhibited = inhibited
                self._changed[alert.seq] = alert
                logger.info(
                    "alert %s for %s/%s %s",
                    alert.rule.name,
                    key.tenant,
                    key.plugin,
                    "inhibited: a plugin it depends on is down"
                    if inhibited
                    else "no longer inhibited",
                )
            until: float | None = None
            for s in self._silences:
                if s.matches(key.tenant, alert.labels):
                    until = s.ends_at if until is None else max(until, s.ends_at)
            if until != alert.silenced_until:
                alert.silenced_until = until
                self._changed[alert.seq] = alert
            if not alert.acknowledged and alert.fingerprint in self._acked:
                alert.acknowledged = True
                self._changed[alert.seq] = alert

    # --- what the planner and persistence read --------------------------------------------

    def open_alerts(self) -> Iterable[AlertRecord]:
        return self._open.values()

    def notifiable(self) -> list[AlertRecord]:
        """Firing alerts that are neither inhibited nor silenced."""
        return [a for a in self._open.values() if a.notifiable]

    def take_resolutions(self, now: float) -> dict[PluginKey, list[AlertRecord]]:
        """Notified alerts that resolved since the last call, by plugin, to announce; those
        a silence matches at ``now`` are left out (Alertmanager semantics: a silenced alert
        sends nothing, its resolution included)."""
        resolved = self._resolved_unsent
        self._resolved_unsent = defaultdict(list)
        out: dict[PluginKey, list[AlertRecord]] = {}
        for key, closed in resolved.items():
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
                out[key] = kept
        return out

    def _silenced_at(self, alert: AlertRecord, now: float) -> bool:
        """A silence matches the alert at ``now`` (checked against the current silences, so
        one added in this very cycle counts too)."""
        if alert.silenced_until is not None and alert.silenced_until > now:
            return True
        return any(
            s.ends_at > now and s.matches(alert.key.tenant, alert.labels) for s in self._silences
        )

    def mark_notified(self, alerts: Iterable[AlertRecord]) -> None:
        """These alerts went into a notification (or would have, with no receiver set):
        their annotations are rendered with the value that was sent."""
        for alert in alerts:
            if alert.resolved_at is None:
                alert.annotations = render_annotations(alert.rule, alert.key, alert.value)
            if not alert.notified:
                alert.notified = True
                self._changed[alert.seq] = alert

    def take_changed(self) -> list[AlertRecord]:
        """The alerts whose stored state changed since the last call, open or just
        resolved, in creation order."""
        changed = sorted(self._changed.values(), key=lambda a: a.seq)
        self._changed = {}
        return changed

    def firing(self) -> list[AlertView]:
        """Firing alerts that notify (not inhibited, not silenced): pluginmon_alerts_firing."""
        return [a.view() for a in self._open.values() if a.notifiable]

    def alerts(self) -> list[AlertView]:
        """Every open alert (pending, firing, acknowledged, silenced, inhibited)."""
        return [a.view() for a in self._open.values()]
