"""Alert rules and receivers: built-in defaults, templating, and the pure rule state machine.

Over 500 lines on purpose: the rule model, its templates and the pure state machine
(``step()``, ``RuleEvaluator``) are read together; the evaluator is the hot path measured by
bench/alerts.py.
"""

from __future__ import annotations

import hashlib
import math
import operator
import string
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final

from pluginmon.alerts.health import DEPENDENCIES_UNSATISFIED, MEMORY_LIMIT, HealthScore
from pluginmon.alerts.matchers import PluginMatcher
from pluginmon.collectors.models import SAMPLE_MEASUREMENTS, PluginKey, PluginSample

__all__ = [
    "AlertState",
    "AlertmanagerConfig",
    "Phase",
    "Rule",
    "Transition",
    "TransitionKind",
    "WebhookConfig",
    "alert_labels",
    "builtin_rules",
    "fingerprint",
    "merge_with_builtins",
    "render_annotations",
    "step",
    "template_problem",
]

OPS: Final[Mapping[str, Callable[[float, float], bool]]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
}
SEVERITIES: Final = ("info", "warning", "critical")

# Values a rule's `metric` can name besides plugin_metrics names.
SAMPLE_FIELDS: Final = frozenset(SAMPLE_MEASUREMENTS)
HEALTH_SCORE: Final = "health_score"
# Derived from the health score's components.
DERIVED_METRICS: Final = frozenset(
    {HEALTH_SCORE, "memory_leak_forecast_seconds", "restarts_in_window", "memory_limit_ratio"}
)
TEMPLATE_FIELDS: Final = frozenset(
    {"tenant", "plugin", "environment", "value", "threshold", "alertname", "severity"}
)
# Labels the engine sets itself; a rule may not override them.
RESERVED_LABELS: Final = frozenset({"alertname", "tenant", "plugin", "environment", "severity"})


@dataclass(frozen=True, slots=True)
class Rule:
    """One alerting rule, evaluated per plugin each cycle.

    Becomes active when ``value <op> threshold``; once active it stays active until
    ``value <op> clear_threshold`` is false (hysteresis; without a clear threshold, the
    threshold itself). Pending for ``for_seconds`` before firing; keeps firing for
    ``keep_firing_for_seconds`` after the condition clears.
    """

    name: str
    metric: str
    op: str
    threshold: float
    clear_threshold: float | None = None
    for_seconds: float = 0.0
    keep_firing_for_seconds: float = 0.0
    severity: str = "warning"
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    matchers: tuple[PluginMatcher, ...] = ()

    @property
    def compare(self) -> Callable[[float, float], bool]:
        return OPS[self.op]

    @property
    def hold_threshold(self) -> float:
        return self.threshold if self.clear_threshold is None else self.clear_threshold

    def applies_to(self, key: PluginKey) -> bool:
        return not self.matchers or any(m.matches(key) for m in self.matchers)


# --- the state machine ------------------------------------------------------------------------


class Phase(StrEnum):
    PENDING = "pending"
    FIRING = "firing"


class TransitionKind(StrEnum):
    PENDING = "pending"  # inactive -> pending
    FIRING = "firing"  # inactive/pending -> firing
    RESOLVED = "resolved"  # firing -> resolved (inactive)
    CANCELLED = "cancelled"  # pending -> inactive without ever firing


@dataclass(frozen=True, slots=True)
class AlertState:
    """An active alert instance of one rule for one plugin (inactive = no state)."""

    phase: Phase
    active_since: float  # unix seconds the condition first held (the instance's startsAt)
    last_active_at: float  # last evaluation at which the condition held
    value: float | None
    fired_at: float | None = None


@dataclass(frozen=True, slots=True)
class Transition:
    kind: TransitionKind
    at: float  # unix seconds
    value: float | None


def step(
    rule: Rule, state: AlertState | None, value: float | None, now: float
) -> tuple[AlertState | None, Transition | None]:
    """Advance one alert instance by one evaluation. Pure: the same inputs give the same result.

    inactive -> pending (or straight to firing with for_seconds == 0) -> firing -> resolved.
    """
    if state is None:
        if value is None or not rule.compare(value, rule.threshold):
            return None, None
        if rule.for_seconds <= 0.0:
            return AlertState(Phase.FIRING, now, now, value, now), Transition(
                TransitionKind.FIRING, now, value
            )
        return AlertState(Phase.PENDING, now, now, value), Transition(
            TransitionKind.PENDING, now, value
        )
    holds = value is not None and rule.compare(value, rule.hold_threshold)
    if holds:
        if state.phase is Phase.PENDING and now - state.active_since >= rule.for_seconds:
            return AlertState(Phase.FIRING, state.active_since, now, value, now), Transition(
                TransitionKind.FIRING, now, value
            )
        # constructed directly: dataclasses.replace costs 3x more on this hot path
        return AlertState(state.phase, state.active_since, now, value, state.fired_at), None
    if state.phase is Phase.PENDING:
        return None, Transition(TransitionKind.CANCELLED, now, value)
    if (
        rule.keep_firing_for_seconds > 0
        and now - state.last_active_at < rule.keep_firing_for_seconds
    ):
        return state, None
    return None, Transition(TransitionKind.RESOLVED, now, value)


# --- evaluating many plugins -----------------------------------------------------------------


def uses_plugin_metrics(rule: Rule) -> bool:
    return rule.metric not in SAMPLE_FIELDS and rule.metric not in DERIVED_METRICS


@dataclass(frozen=True, slots=True)
class RuleChange:
    """A transition of the instance of ``rule`` for plugin ``key``; ``state`` is the new one."""

    rule: Rule
    key: PluginKey
    transition: Transition
    state: AlertState | None


_KEY = operator.attrgetter("key")
# HealthScore attributes a rule can name directly.
_HEALTH_FIELDS: Final = {
    HEALTH_SCORE: "score",
    "memory_leak_forecast_seconds": "leak_forecast_seconds",
    "restarts_in_window": "restarts_in_window",
}


def _health_values(healths: Sequence[HealthScore | None], name: str) -> list[float | None]:
    """One rule's values from the health scores: a C-level pass when every plugin has a
    score (the engine's case), else one by one."""
    get = operator.attrgetter(_HEALTH_FIELDS[name])
    # (restarts_in_window stays an int here: it compares as it is, and step() gets float())
    try:
        return list(map(get, healths))
    except AttributeError:  # a None among them
        return [None if h is None else get(h) for h in healths]


def _hits(op: str, values: list[float | None], threshold: float) -> list[int]:
    """Indexes whose value satisfies ``value <op> threshold`` (inline comparisons: this is
    the per-plugin hot loop, run once per rule and cycle)."""
    t = threshold
    if op == ">":
        return [i for i, v in enumerate(values) if v is not None and v > t]
    if op == ">=":
        return [i for i, v in enumerate(values) if v is not None and v >= t]
    if op == "<":
        return [i for i, v in enumerate(values) if v is not None and v < t]
    if op == "<=":
        return [i for i, v in enumerate(values) if v is not None and v <= t]
    if op == "==":
        return [i for i, v in enumerate(values) if v is not None and v == t]
    return [i for i, v in enumerate(values) if v is not None and v != t]


class RuleEvaluator:
    """Runs ``step`` for every (rule, plugin) and keeps the active states.

    Inactive instances have no state. Per rule and cycle, the values of all plugins are read
    in one pass and compared against the threshold in another; only plugins that cross it or
    already have a state go through ``step``. So a healthy fleet costs two list passes per
    rule, not a function call per plugin and rule.
    """

    def __init__(self, rules: Sequence[Rule]) -> None:
        self.rules = tuple(rules)
        self._by_name = {r.name: r for r in self.rules}
        self._states: dict[str, dict[PluginKey, AlertState]] = {r.name: {} for r in self.rules}
        self._applies: dict[tuple[str, PluginKey], bool] = {}
        # The position of each plugin in the samples, rebuilt only when the plugins change
        # (hashing 10,000 keys every cycle costs more than comparing the lists).
        self._index_keys: list[PluginKey] = []
        self._index: dict[PluginKey, int] = {}

    def index(self, samples: Sequence[PluginSample]) -> Mapping[PluginKey, int]:
        """Plugin key -> its position in ``samples`` (the last one, should a key repeat)."""
        keys = list(map(_KEY, samples))
        if keys != self._index_keys:
            self._index = {k: i for i, k in enumerate(keys)}
            self._index_keys = keys
        return self._index

    def rule(self, name: str) -> Rule | None:
        return self._by_name.get(name)

    def state(self, rule_name: str, key: PluginKey) -> AlertState | None:
        states = self._states.get(rule_name)
        return None if states is None else states.get(key)

    def restore(self, rule_name: str, key: PluginKey, state: AlertState) -> None:
        self._states[rule_name][key] = state

    def forget(self, rule_name: str, key: PluginKey) -> None:
        self._states.get(rule_name, {}).pop(key, None)

    @property
    def active(self) -> int:
        return sum(len(s) for s in self._states.values())

    def _applies_to(self, rule: Rule, key: PluginKey) -> bool:
        cached = self._applies.get((rule.name, key))
        if cached is None:
            cached = self._applies[(rule.name, key)] = rule.applies_to(key)
        return cached

    def evaluate(
        self,
        samples: Sequence[PluginSample],
        now: float,
        health: Mapping[PluginKey, HealthScore] | Sequence[HealthScore | None] | None = None,
        metrics: Mapping[PluginKey, Mapping[str, float]] | None = None,
    ) -> list[RuleChange]:
        """Evaluate every rule for every sample. ``health`` may be a mapping by plugin or a
        sequence aligned with ``samples`` (cheaper); plugins absent from ``samples`` keep
        their state untouched."""
        changes: list[RuleChange] = []
        if isinstance(health, Mapping):
            healths: Sequence[HealthScore | None] = [health.get(s.key) for s in samples]
        elif health is None:
            healths = [None] * len(samples)
        else:
            healths = health
        with_metrics: list[tuple[int, Mapping[str, float]]] | None = None
        index: Mapping[PluginKey, int] | None = None
        for rule in self.rules:
            name = rule.metric
            values: list[float | None]
            hits: list[int] | None = None  # None: every plugin's value compared below
            if name in SAMPLE_FIELDS:
                # bool `up` compares as 0/1; ints compare with float thresholds as they are
                values = list(map(operator.attrgetter(name), samples))
            elif name in _HEALTH_FIELDS:
                values = _health_values(healths, name)
            elif name == "memory_limit_ratio":
                values = []
                for h in healths:
                    c = None if h is None else h.component(MEMORY_LIMIT)
                    values.append(None if c is None else c.value)
            else:
                if with_metrics is None:
                    # The positions and plugin_metrics values of the plugins that have any:
                    # most have none, so a rule on a plugin_metrics name reads these only.
                    m = metrics or {}
                    with_metrics = (
                        [(i, mm) for i, s in enumerate(samples) if (mm := m.get(s.key))]
                        if m
                        else []
                    )
                values = [None] * len(samples)
                sparse = [mm.get(name) for _, mm in with_metrics]
                for (at, _), value in zip(with_metrics, sparse, strict=True):
                    values[at] = value
                hits = [with_metrics[j][0] for j in _hits(rule.op, sparse, rule.threshold)]

            states = self._states[rule.name]
            done: set[PluginKey] = set()
            if states:
                if index is None:
                    index = self.index(samples)
                for key, state in list(states.items()):
                    i = index.get(key)
                    if i is None:
                        continue
                    done.add(key)
                    value = values[i]
                    new, transition = step(
                        rule, state, None if value is None else float(value), now
                    )
                    if new is None:
                        del states[key]
                    elif new is not state:
                        states[key] = new
                    if transition is not None:
                        changes.append(RuleChange(rule, key, transition, new))
            if hits is None:
                hits = _hits(rule.op, values, rule.threshold)
            for i in hits:
                key = samples[i].key
                if key in done or (rule.matchers and not self._applies_to(rule, key)):
                    continue
                value = values[i]
                new, transition = step(rule, None, None if value is None else float(value), now)
                if new is not None:
                    states[key] = new
                if transition is not None:
                    changes.append(RuleChange(rule, key, transition, new))
        return changes


# --- labels, fingerprints and templates -------------------------------------------------------


def alert_labels(rule: Rule, key: PluginKey, instance: str | None = None) -> dict[str, str]:
    """The alert's identity labels. ``instance`` (the daemon's host) keeps one plugin running
    on several hosts, each watched by its own daemon, as separate alerts, as Prometheus does."""
    labels = dict(rule.labels)
    labels.update(
        alertname=rule.name,
        tenant=key.tenant,
        plugin=key.plugin,
        environment=key.environment,
        severity=rule.severity,
    )
    if instance:
        labels["instance"] = instance
    return dict(sorted(labels.items()))


def fingerprint(labels: Mapping[str, str]) -> str:
    """Stable 16-hex-digit identity of an alert's label set, Alertmanager style."""
    digest = hashlib.sha256()
    for name, value in sorted(labels.items()):
        digest.update(name.encode())
        digest.update(b"\xff")
        digest.update(value.encode())
        digest.update(b"\xff")
    return digest.hexdigest()[:16]


class _TemplateValues(dict[str, object]):
    """format_map values; an unknown name renders as itself instead of raising."""

    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


def render_annotations(rule: Rule, key: PluginKey, value: float | None) -> dict[str, str]:
    """The rule's annotations with {tenant} {plugin} {environment} {value} {threshold} filled in.

    Field names were checked at parse time to be plain names (no attribute or index access),
    and the values are plain strings and floats, so a template cannot reach into objects.
    """
    values = _TemplateValues(
        tenant=key.tenant,
        plugin=key.plugin,
        environment=key.environment,
        value=math.nan if value is None else float(value),
        threshold=float(rule.threshold),
        alertname=rule.name,
        severity=rule.severity,
    )
    out: dict[str, str] = {}
    for name, template in rule.annotations.items():
        try:
            out[name] = template.format_map(values)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            out[name] = template
    return out


def template_problem(template: str) -> str | None:
    """Why ``template`` cannot be an annotation, or None (render_annotations must not fail)."""
    try:
        fields = list(string.Formatter().parse(template))
    except ValueError as exc:
        return f"bad template: {exc}"
    for _literal, name, spec, _conv in fields:
        if name is None:
            continue
        if name not in TEMPLATE_FIELDS:
            return f"unknown placeholder {{{name}}} (allowed: {', '.join(sorted(TEMPLATE_FIELDS))})"
        if spec and ("{" in spec):
            return "nested placeholders are not allowed"
    try:
        template.format_map(
            _TemplateValues(
                tenant="t",
                plugin="p",
                environment="e",
                value=1.0,
                threshold=1.0,
                alertname="a",
                severity="s",
            )
        )
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        return f"bad template: {exc}"
    return None


# --- built-in rules ---------------------------------------------------------------------------


def builtin_rules() -> tuple[Rule, ...]:
    """The defaults every deployment gets; a user rule with the same name replaces one."""
    return (
        Rule(
            name="PluginDown",
            metric="up",
            op="==",
            threshold=0,
            for_seconds=30,
            severity="critical",
            annotations={
                "summary": "Plugin {plugin} ({tenant}/{environment}) is down",
                "description": "No process of plugin {plugin} is running.",
            },
        ),
        Rule(
            name="PluginCpuHigh",
            metric="cpu_percent",
            op=">",
            threshold=90,
            clear_threshold=75,
            for_seconds=300,
            severity="warning",
            annotations={
                "summary": "Plugin {plugin} CPU at {value:.0f}% (threshold {threshold:.0f}%)",
                "description": "Plugin {plugin} ({tenant}/{environment}) has used more than "
                "{threshold:.0f}% of a core for 5 minutes.",
            },
        ),
        Rule(
            name="PluginMemoryHigh",
            metric="rss_bytes",
            op=">",
            threshold=2 << 30,
            clear_threshold=(2 << 30) * 0.9,
            for_seconds=300,
            severity="warning",
            annotations={
                "summary": "Plugin {plugin} RSS {value:.0f} bytes over {threshold:.0f}",
            },
        ),
        Rule(
            name="PluginHealthLow",
            metric=HEALTH_SCORE,
            op="<",
            threshold=50,
            clear_threshold=60,
            for_seconds=300,
            severity="warning",
            annotations={
                "summary": "Plugin {plugin} health score {value:.0f} below {threshold:.0f}",
                "description": "Run `pluginmon status` to see the weakest component.",
            },
        ),
        # The registry's operation gauges (plugin_metrics, written by the daemon's registry job).
        Rule(
            name="PluginOperationFailed",
            metric="operations_failed",
            op=">",
            threshold=0,
            severity="warning",
            annotations={
                "summary": "{value:.0f} operation(s) of plugin {plugin} ({tenant}/{environment}) "
                "failed in the last hour",
                "description": "Retries exhausted or deadline exceeded; see "
                "GET /api/v1/plugins/{plugin}/operations?status=failed",
            },
        ),
        Rule(
            name="PluginOperationStuck",
            metric="operations_stuck",
            op=">",
            threshold=0,
            for_seconds=300,
            severity="warning",
            annotations={
                "summary": "{value:.0f} operation(s) of plugin {plugin} ({tenant}/{environment}) "
                "stuck: running, or due to run, for over 30 minutes",
            },
        ),
        # The registry's dependency gauge (registry/dependencies.py, runtime edges only).
        Rule(
            name="PluginDependencyUnsatisfied",
            metric=DEPENDENCIES_UNSATISFIED,
            op=">",
            threshold=0,
            severity="warning",
            annotations={
                "summary": "{value:.0f} runtime dependenc(ies) of plugin {plugin} "
                "({tenant}/{environment}) unsatisfied or conflicting",
                "description": "See `pluginmon deps check --tenant {tenant} --environment "
                "{environment}` or GET /api/v1/plugins/{plugin}/dependencies?environment="
                "{environment}",
            },
        ),
        # The registry's backup gauges (plugin_metrics, written by the registry job).
        Rule(
            name="PluginBackupStale",
            metric="backup_stale",
            op=">",
            threshold=0,
            severity="warning",
            annotations={
                "summary": "Plugin {plugin} ({tenant}/{environment}) has no verified backup "
                "within its limit",
                "description": "See GET /api/v1/plugins/{plugin}/backups and the "
                "verification results.",
            },
        ),
        Rule(
            name="PluginBackupVerificationFailed",
            metric="backup_verification_failed",
            op=">",
            threshold=0,
            severity="critical",
            annotations={
                "summary": "{value:.0f} backup(s) of plugin {plugin} ({tenant}/{environment}) "
                "failed verification (missing, truncated or corrupted)",
            },
        ),
        # The registry's vulnerability gauge (open critical findings per plugin/environment).
        Rule(
            name="PluginVulnerabilityCritical",
            metric="vulnerabilities_critical",
            op=">",
            threshold=0,
            severity="critical",
            annotations={
                "summary": "Plugin {plugin} ({tenant}/{environment}) has {value:.0f} open "
                "critical vulnerability finding(s)",
                "description": "See GET /api/v1/plugins/{plugin}/vulnerabilities?status=open"
                "&severity=critical; fix, or accept with a reason and an expiry.",
            },
        ),
        Rule(
            name="PluginMemoryLeakForecast",
            metric="memory_leak_forecast_seconds",
            op="<",
            threshold=4 * 3600,
            clear_threshold=6 * 3600,
            for_seconds=600,
            severity="warning",
            annotations={
                "summary": "Plugin {plugin} memory grows steadily; limit reached in {value:.0f}s",
            },
        ),
    )


def merge_with_builtins(rules: Iterable[Rule]) -> tuple[Rule, ...]:
    user = list(rules)
    names = {r.name for r in user}
    return tuple(r for r in builtin_rules() if r.name not in names) + tuple(user)


# --- receivers --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WebhookConfig:
    """One ``[[alerts.webhooks]]`` receiver. ``secret`` never appears in repr or logs."""

    name: str
    url: str
    secret: str | None = field(default=None, repr=False)
    timeout_seconds: float = 10.0
    send_resolved: bool = True
    # Retryable failures (connection errors, timeouts, 429, 5xx) are retried until the
    # notification is this old (0 = never give up); max_attempts, when set, also caps them.
    give_up_after_seconds: float = 86400.0
    max_attempts: int | None = None
    repeat_interval_seconds: float = 4 * 3600.0
    backoff_initial_seconds: float = 1.0
    backoff_max_seconds: float = 300.0


@dataclass(frozen=True, slots=True)
class AlertmanagerConfig:
    """``[alerts.alertmanager]``: push to a real Alertmanager's ``POST /api/v2/alerts``.

    Firing alerts are re-sent every ``resend_interval_seconds`` with ``endsAt`` four intervals
    ahead (as Prometheus does), so Alertmanager keeps them only while pluginmon does.
    """

    url: str
    name: str = "alertmanager"
    timeout_seconds: float = 10.0
    resend_interval_seconds: float = 60.0
    give_up_after_seconds: float = 86400.0  # as for webhooks; 0 = never
    max_attempts: int | None = None
    backoff_initial_seconds: float = 1.0
    backoff_max_seconds: float = 60.0
