"""Alert rules and receivers: parsing, built-in defaults, templating, and the pure rule state machine."""

from __future__ import annotations

import hashlib
import math
import operator
import re
import string
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final, TypeGuard
from urllib.parse import urlsplit

from pluginmon.alerts.errors import RuleError
from pluginmon.alerts.health import MEMORY_LIMIT, HealthScore
from pluginmon.alerts.matchers import PluginMatcher, parse_matcher
from pluginmon.collectors.models import SAMPLE_MEASUREMENTS, PluginKey, PluginSample

__all__ = [
    "AlertState",
    "AlertmanagerConfig",
    "Phase",
    "Rule",
    "RuleError",
    "Transition",
    "TransitionKind",
    "WebhookConfig",
    "alert_labels",
    "builtin_rules",
    "fingerprint",
    "parse_alertmanager",
    "parse_rules",
    "parse_webhooks",
    "render_annotations",
    "step",
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

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_LABEL_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_METRIC_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:-]*$")


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
        metric_maps: list[Mapping[str, float] | None] | None = None
        index: dict[PluginKey, int] | None = None
        for rule in self.rules:
            name = rule.metric
            values: list[float | None]
            if name in SAMPLE_FIELDS:
                # bool `up` compares as 0/1; ints compare with float thresholds as they are
                values = list(map(operator.attrgetter(name), samples))
            elif name == HEALTH_SCORE:
                values = [None if h is None else h.score for h in healths]
            elif name == "memory_leak_forecast_seconds":
                values = [None if h is None else h.leak_forecast_seconds for h in healths]
            elif name == "restarts_in_window":
                values = [None if h is None else float(h.restarts_in_window) for h in healths]
            elif name == "memory_limit_ratio":
                values = []
                for h in healths:
                    c = None if h is None else h.component(MEMORY_LIMIT)
                    values.append(None if c is None else c.value)
            else:
                if metric_maps is None:
                    m = {} if metrics is None else metrics
                    metric_maps = [m.get(s.key) for s in samples]
                values = [None if mm is None else mm.get(name) for mm in metric_maps]

            states = self._states[rule.name]
            done: set[PluginKey] = set()
            if states:
                if index is None:
                    index = {s.key: i for i, s in enumerate(samples)}
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
            for i in _hits(rule.op, values, rule.threshold):
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


def _check_template(template: str) -> str | None:
    """Why ``template`` is not allowed, or None."""
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


# --- parsing ----------------------------------------------------------------------------------

_RULE_FIELDS: Final = frozenset(
    {
        "name",
        "metric",
        "op",
        "threshold",
        "clear_threshold",
        "for_seconds",
        "keep_firing_for_seconds",
        "severity",
        "labels",
        "annotations",
        "matchers",
    }
)


def parse_rules(
    raw: Sequence[Mapping[str, object]] | None, *, include_builtins: bool = True
) -> tuple[Rule, ...]:
    """``[[alerts.rules]]`` tables as Rules, merged over the built-in defaults.

    Raises RuleError listing every problem, located like ``alerts.rules[1] (PluginCpuHigh).op``
    (indexes count from 0, as in the TOML array).
    """
    problems: list[tuple[str, str]] = []
    rules: list[Rule] = []
    seen: dict[str, int] = {}
    entries: Sequence[object] = [] if raw is None else raw
    if isinstance(raw, str | bytes) or not isinstance(entries, Sequence):
        raise RuleError([("alerts.rules", "must be an array of tables")])
    for i, entry in enumerate(entries):
        name = entry.get("name") if isinstance(entry, Mapping) else None
        where = f"alerts.rules[{i}]" + (f" ({name})" if isinstance(name, str) and name else "")
        if not isinstance(entry, Mapping):
            problems.append((where, "must be a table"))
            continue
        rule = _parse_rule(entry, where, problems)
        if rule is None:
            continue
        if rule.name in seen:
            problems.append((f"{where}.name", f"duplicate of alerts.rules[{seen[rule.name]}]"))
            continue
        seen[rule.name] = i
        rules.append(rule)
    if problems:
        raise RuleError(problems)
    return merge_with_builtins(rules) if include_builtins else tuple(rules)


def _parse_rule(
    entry: Mapping[str, object], where: str, problems: list[tuple[str, str]]
) -> Rule | None:
    before = len(problems)
    for key in entry:
        if key not in _RULE_FIELDS:
            problems.append((f"{where}.{key}", "unknown field"))
    name = entry.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        problems.append(
            (f"{where}.name", "required: letters, digits and _, not starting with a digit")
        )
    metric = entry.get("metric")
    if not isinstance(metric, str) or not _METRIC_RE.match(metric):
        problems.append(
            (
                f"{where}.metric",
                "required: a sample field (e.g. cpu_percent, rss_bytes, up), health_score, "
                "or a plugin_metrics metric_name",
            )
        )
    op = entry.get("op")
    if op not in OPS:
        problems.append((f"{where}.op", "must be one of " + " ".join(OPS)))
    threshold = entry.get("threshold")
    if not _is_number(threshold):
        problems.append((f"{where}.threshold", "required number"))
    clear = entry.get("clear_threshold")
    if clear is not None:
        if not _is_number(clear):
            problems.append((f"{where}.clear_threshold", "must be a number"))
        elif _is_number(threshold) and op in OPS:
            if op in ("==", "!="):
                problems.append((f"{where}.clear_threshold", f"not meaningful with op {op}"))
            elif op in (">", ">=") and clear > threshold:
                problems.append(
                    (
                        f"{where}.clear_threshold",
                        f"must be <= threshold ({threshold:g}) for op {op}",
                    )
                )
            elif op in ("<", "<=") and clear < threshold:
                problems.append(
                    (
                        f"{where}.clear_threshold",
                        f"must be >= threshold ({threshold:g}) for op {op}",
                    )
                )
    durations: dict[str, float] = {}
    for key in ("for_seconds", "keep_firing_for_seconds"):
        value = entry.get(key, 0)
        if not _is_number(value) or value < 0:
            problems.append((f"{where}.{key}", "must be a number of seconds >= 0"))
        else:
            durations[key] = float(value)
    severity = entry.get("severity", "warning")
    if severity not in SEVERITIES:
        problems.append((f"{where}.severity", "must be one of " + ", ".join(SEVERITIES)))
    labels = _parse_str_table(entry.get("labels", {}), f"{where}.labels", problems, labels=True)
    annotations = _parse_str_table(
        entry.get("annotations", {}), f"{where}.annotations", problems, labels=False
    )
    for aname, template in annotations.items():
        why = _check_template(template)
        if why is not None:
            problems.append((f"{where}.annotations.{aname}", why))
    matchers: list[PluginMatcher] = []
    raw_matchers = entry.get("matchers", [])
    if isinstance(raw_matchers, Mapping):
        raw_matchers = [raw_matchers]
    if not isinstance(raw_matchers, Sequence) or isinstance(raw_matchers, str):
        problems.append(
            (f"{where}.matchers", "must be an array of {tenant, plugin, environment} globs")
        )
    else:
        for j, m in enumerate(raw_matchers):
            matchers.append(parse_matcher(m, f"{where}.matchers[{j}]", problems))
    if len(problems) > before:
        return None
    assert isinstance(name, str)
    assert isinstance(metric, str)
    assert isinstance(op, str)
    assert _is_number(threshold)
    assert isinstance(severity, str)
    return Rule(
        name=name,
        metric=metric,
        op=op,
        threshold=float(threshold),
        clear_threshold=None if clear is None else float(clear),  # type: ignore[arg-type]
        for_seconds=durations["for_seconds"],
        keep_firing_for_seconds=durations["keep_firing_for_seconds"],
        severity=severity,
        labels=labels,
        annotations=annotations,
        matchers=tuple(matchers),
    )


def _parse_str_table(
    value: object, where: str, problems: list[tuple[str, str]], *, labels: bool
) -> dict[str, str]:
    if not isinstance(value, Mapping):
        problems.append((where, 'must be a table of name = "string"'))
        return {}
    out: dict[str, str] = {}
    for k, v in value.items():
        if not isinstance(k, str) or not _LABEL_RE.match(k):
            problems.append((f"{where}.{k}", "name must be letters, digits and _"))
        elif labels and k in RESERVED_LABELS:
            problems.append((f"{where}.{k}", "is set by pluginmon and cannot be overridden"))
        elif not isinstance(v, str):
            problems.append((f"{where}.{k}", "must be a string"))
        else:
            out[k] = v
    return out


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


_WEBHOOK_FLOATS: Final = (
    "timeout_seconds",
    "repeat_interval_seconds",
    "backoff_initial_seconds",
    "backoff_max_seconds",
)


def parse_webhooks(raw: Sequence[Mapping[str, object]] | None) -> tuple[WebhookConfig, ...]:
    """``[[alerts.webhooks]]`` tables. ``secret`` may be a str or a pydantic SecretStr.

    Raises RuleError listing every problem (the secret's value is never included).
    """
    problems: list[tuple[str, str]] = []
    out: list[WebhookConfig] = []
    names: set[str] = set()
    for i, entry in enumerate(raw or ()):
        where = f"alerts.webhooks[{i}]"
        if not isinstance(entry, Mapping):
            problems.append((where, "must be a table"))
            continue
        before = len(problems)
        allowed = {
            "name",
            "url",
            "secret",
            "send_resolved",
            "max_attempts",
            "give_up_after_seconds",
            *_WEBHOOK_FLOATS,
        }
        for key in entry:
            if key not in allowed:
                problems.append((f"{where}.{key}", "unknown field"))
        url = entry.get("url")
        _check_url(url, f"{where}.url", problems)
        name = entry.get("name", f"webhook-{i}")
        if not isinstance(name, str) or not name:
            problems.append((f"{where}.name", "must be a non-empty string"))
        elif name in names:
            problems.append((f"{where}.name", f"duplicate receiver name {name!r}"))
        secret = _secret_value(entry.get("secret"))
        if secret is False:
            problems.append((f"{where}.secret", "must be a string"))
        floats = _parse_positive_floats(entry, _WEBHOOK_FLOATS, where, problems)
        send_resolved = entry.get("send_resolved", True)
        if not isinstance(send_resolved, bool):
            problems.append((f"{where}.send_resolved", "must be true or false"))
        max_attempts = _parse_max_attempts(entry, where, problems)
        give_up = _parse_give_up(entry, where, problems)
        if len(problems) > before:
            continue
        assert isinstance(name, str)
        assert isinstance(url, str)
        names.add(name)
        out.append(
            WebhookConfig(
                name=name,
                url=url,
                secret=secret or None,  # type: ignore[arg-type]
                send_resolved=bool(send_resolved),
                max_attempts=max_attempts,
                give_up_after_seconds=give_up,
                **floats,
            )
        )
    if problems:
        raise RuleError(problems)
    return tuple(out)


def parse_alertmanager(raw: Mapping[str, object] | None) -> AlertmanagerConfig | None:
    """``[alerts.alertmanager]`` (None or a table without url = no Alertmanager push)."""
    if raw is None or (isinstance(raw, Mapping) and not raw):
        return None
    where = "alerts.alertmanager"
    if not isinstance(raw, Mapping):
        raise RuleError([(where, "must be a table with url")])
    problems: list[tuple[str, str]] = []
    floats_names = (
        "timeout_seconds",
        "resend_interval_seconds",
        "backoff_initial_seconds",
        "backoff_max_seconds",
    )
    for key in raw:
        if key not in {"url", "name", "max_attempts", "give_up_after_seconds", *floats_names}:
            problems.append((f"{where}.{key}", "unknown field"))
    url = raw.get("url")
    _check_url(url, f"{where}.url", problems)
    name = raw.get("name", "alertmanager")
    if not isinstance(name, str) or not name:
        problems.append((f"{where}.name", "must be a non-empty string"))
    max_attempts = _parse_max_attempts(raw, where, problems)
    give_up = _parse_give_up(raw, where, problems)
    floats = _parse_positive_floats(raw, floats_names, where, problems)
    if problems:
        raise RuleError(problems)
    assert isinstance(url, str)
    assert isinstance(name, str)
    return AlertmanagerConfig(
        url=url.rstrip("/"),
        name=name,
        max_attempts=max_attempts,
        give_up_after_seconds=give_up,
        **floats,
    )


def _parse_max_attempts(
    entry: Mapping[str, object], where: str, problems: list[tuple[str, str]]
) -> int | None:
    """Optional cap on attempts (absent = unlimited: give_up_after_seconds decides)."""
    value = entry.get("max_attempts")
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        problems.append((f"{where}.max_attempts", "must be an integer >= 1"))
        return None
    return value


def _parse_give_up(
    entry: Mapping[str, object], where: str, problems: list[tuple[str, str]]
) -> float:
    value = entry.get("give_up_after_seconds", 86400.0)
    if not _is_number(value) or value < 0:
        problems.append((f"{where}.give_up_after_seconds", "must be a number >= 0 (0 = never)"))
        return 86400.0
    return float(value)


def _check_url(url: object, where: str, problems: list[tuple[str, str]]) -> None:
    if not isinstance(url, str) or not url:
        problems.append((where, "required: an http:// or https:// URL"))
        return
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        problems.append((where, "must be an http:// or https:// URL"))


def _parse_positive_floats(
    entry: Mapping[str, object],
    names: Iterable[str],
    where: str,
    problems: list[tuple[str, str]],
) -> dict[str, float]:
    out: dict[str, float] = {}
    for key in names:
        if key not in entry:
            continue
        value = entry[key]
        if not _is_number(value) or value <= 0:
            problems.append((f"{where}.{key}", "must be a number > 0"))
        else:
            out[key] = float(value)
    return out


def _secret_value(value: object) -> str | bool | None:
    """The secret as str, None when unset, False when it has the wrong type."""
    if value is None:
        return None
    getter = getattr(value, "get_secret_value", None)
    if callable(getter):
        value = getter()
    return value if isinstance(value, str) else False


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
