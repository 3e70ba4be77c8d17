"""The config schema of ``[[plugins]]`` and ``[alerts]`` (rules, webhooks, Alertmanager):
pydantic models that turn into the frozen dataclasses of ``collectors`` and ``alerts``, which
stay free of pydantic. ``[health]`` has its own module, config_health.

Over 500 lines on purpose: each model carries the exact wording of its problems (the messages
check-config prints and its tests pin), which is most of its length.

``parse_plugin_specs``, ``parse_rules``, ``parse_webhooks`` and ``parse_alertmanager`` validate
one section on its own (tests, benchmarks, tools); the daemon validates every section at once
as part of ``Settings``. Either way ``ConfigError`` lists every problem, each at its field:
``alerts.rules[2] (Bad).clear_threshold: must be <= threshold (80) for op >``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Annotated, ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    SecretStr,
    TypeAdapter,
    ValidationInfo,
    field_validator,
    model_validator,
)

from pluginmon.alerts.matchers import PluginMatcher
from pluginmon.alerts.metric_values import metric_ref_problem
from pluginmon.alerts.rules import (
    OPS,
    RESERVED_LABELS,
    AlertmanagerConfig,
    Rule,
    WebhookConfig,
    merge_with_builtins,
    template_problem,
)
from pluginmon.collectors.exposition import ExpositionLimits
from pluginmon.collectors.labels import escaped_preview
from pluginmon.collectors.models import Match, PluginKey, PluginSpec
from pluginmon.collectors.scrape import ScrapeConfig, ScrapeTarget
from pluginmon.collectors.specs import (
    DEFAULT_ENVIRONMENT,
    MATCH_KEYS,
    TENANT_SLUG,
    cmdline_pattern_problem,
)
from pluginmon.daemon.config_plugin_metrics import (
    METRICS_URL_PROBLEM,
    AllowList,
    ScrapeBodyBytes,
    ScrapeInterval,
    ScrapeSeries,
    is_loopback,
)
from pluginmon.daemon.config_schema import (
    DAY,
    HOUR,
    MAX_ATTEMPTS,
    YEAR,
    Expect,
    Finite,
    Glob,
    Location,
    Note,
    Table,
    entries,
    problems_error,
    seconds,
    validate_section,
)

# -- plugins -----------------------------------------------------------------------------------


Criterion = Annotated[str | None, Expect("must be a string")]


def _shown(value: str) -> str:
    """``value`` for an error's location: as is when printable, else escaped (a newline in a
    name must not start a line of its own in the message)."""
    return value if value.isprintable() else ascii(value)[1:-1]


class MatchTable(Table):
    """``match = {...}`` of a plugin: any of the criteria, all of which must match (AND)."""

    unknown_key: ClassVar[str] = f"unknown match key; expected one of {', '.join(MATCH_KEYS)}"

    name: Criterion = None
    exe: Criterion = None
    cmdline: Criterion = None
    pidfile: Criterion = None
    cgroup: Criterion = None
    env: Criterion = None
    systemd_unit: Criterion = None

    @field_validator("*")
    @classmethod
    def _criterion(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        problem = _criterion_problem(str(info.field_name), value)
        if problem is not None:
            raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _not_empty(self) -> MatchTable:
        if all(getattr(self, key) is None for key in MATCH_KEYS):
            raise ValueError(f"empty: give at least one of {', '.join(MATCH_KEYS)}")
        return self

    def to_match(self) -> Match:
        return Match(**self.model_dump(exclude_none=True))


def _criterion_problem(key: str, value: str) -> str | None:
    if not value.strip():
        return "must not be empty"
    if key == "cmdline":
        return cmdline_pattern_problem(value)
    if key == "env":
        env_key, sep, _ = value.partition("=")
        if not sep or not env_key:
            return 'must be "KEY=VALUE"'
    elif key == "pidfile" and not os.path.isabs(value):
        return "must be an absolute path"
    elif key == "exe" and not os.path.isabs(value):
        return "must be an absolute path (the process's /proc/PID/exe target)"
    elif key == "systemd_unit" and "/" in value:
        return 'must be a unit name such as "resizer.service", not a path'
    return None


class PluginTable(Table):
    """One ``[[plugins]]`` table."""

    unknown_key: ClassVar[str] = (
        "unknown key; expected one of tenant, name, environment, match, metrics_url, "
        "metrics_allow_remote, metrics_interval_seconds, metrics_timeout_seconds, "
        "metrics_max_body_bytes, metrics_max_series, metrics_allow"
    )

    tenant: Annotated[str, Expect("required, a string")]
    name: Annotated[str, Expect("required, a non-empty string")]
    environment: Annotated[str, Expect("must be a non-empty string")] = DEFAULT_ENVIRONMENT
    match: Annotated[MatchTable, Expect(f"required, with any of: {', '.join(MATCH_KEYS)}")]
    # The plugin's own metrics endpoint; unset limits take [plugin_metrics]'s.
    metrics_url: Annotated[str | None, Expect(METRICS_URL_PROBLEM)] = None
    metrics_allow_remote: bool = False
    metrics_interval_seconds: ScrapeInterval | None = None
    metrics_timeout_seconds: ScrapeInterval | None = None
    metrics_max_body_bytes: ScrapeBodyBytes | None = None
    metrics_max_series: ScrapeSeries | None = None
    metrics_allow: AllowList | None = None

    @classmethod
    def label(cls, raw: object) -> str | None:
        if isinstance(raw, Mapping):
            tenant, name = raw.get("tenant"), raw.get("name")
            if isinstance(tenant, str) and isinstance(name, str):
                return f"{_shown(tenant)}/{_shown(name)}"
        return None

    @field_validator("tenant")
    @classmethod
    def _slug(cls, value: str) -> str:
        if not TENANT_SLUG.fullmatch(value):
            raise ValueError(f"{value!r} is not a tenant slug ({TENANT_SLUG.pattern})")
        return value

    @field_validator("name", "environment")
    @classmethod
    def _name(cls, value: str) -> str:
        # Printable text: the database refuses a NUL (a TOML "\u0000" escape), and a control
        # character would forge lines in logs. Names outside the label rule (NAME_RULE)
        # stay valid here, as before, though /api/v1/plugins/{name} cannot address them.
        if not value.strip():
            raise ValueError("required, a non-empty string")
        if not value.isprintable():
            raise ValueError(
                f"{escaped_preview(value)} has a control character; names must be printable"
            )
        return value

    @field_validator("metrics_url")
    @classmethod
    def _metrics_url(cls, value: str | None) -> str | None:
        if value is not None:
            _http_url(value)
        return value

    @model_validator(mode="after")
    def _metrics(self) -> PluginTable:
        problems: list[tuple[Location, str]] = []
        if self.metrics_url is None:
            problems += [
                ((name,), "needs metrics_url")
                for name in type(self).model_fields
                if name.startswith("metrics_")
                and name != "metrics_url"
                and getattr(self, name) not in (None, False)
            ]
        elif not self.metrics_allow_remote and not is_loopback(
            urlsplit(self.metrics_url).hostname or ""
        ):
            problems.append(
                (
                    ("metrics_url",),
                    "must be on loopback (localhost, 127.0.0.1, ::1); set "
                    "metrics_allow_remote = true to scrape another host",
                )
            )
        if problems:
            raise problems_error(problems)
        return self

    @property
    def key(self) -> PluginKey:
        return PluginKey(tenant=self.tenant, plugin=self.name, environment=self.environment)

    def to_spec(self) -> PluginSpec:
        return PluginSpec(key=self.key, match=self.match.to_match(), origin="config")

    def to_target(self, defaults: ScrapeConfig) -> ScrapeTarget | None:
        """The plugin's scrape target, its unset limits from ``defaults``; None without a
        metrics_url."""
        if self.metrics_url is None:
            return None
        interval = self.metrics_interval_seconds or defaults.interval_seconds
        limits = defaults.limits
        return ScrapeTarget(
            key=self.key,
            url=self.metrics_url,
            interval_seconds=interval,
            # Like Prometheus's scrape_timeout, never longer than the interval.
            timeout_seconds=min(self.metrics_timeout_seconds or defaults.timeout_seconds, interval),
            limits=ExpositionLimits(
                max_body_bytes=self.metrics_max_body_bytes or limits.max_body_bytes,
                max_series=self.metrics_max_series or limits.max_series,
                max_labels_per_series=limits.max_labels_per_series,
                max_name_chars=limits.max_name_chars,
                max_label_value_chars=limits.max_label_value_chars,
                allow=tuple(self.metrics_allow) if self.metrics_allow else limits.allow,
            ),
        )


# Order matters: a process matched by several specs belongs to the first.
PluginTables = Annotated[
    tuple[PluginTable, ...],
    entries(
        PluginTable,
        key=lambda _, p: p.key,
        duplicate=lambda first, p: (
            None,
            f"duplicate of plugins[{first}]: tenant/name/environment "
            f"{p.tenant}/{p.name}/{p.environment} must be unique",
        ),
    ),
]


# -- alert rules -------------------------------------------------------------------------------

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_LABEL_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_METRIC_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:-]*$")
_RULE_NAME = "required: letters, digits and _, not starting with a digit"
_RULE_METRIC = (
    "required: a sample field (e.g. cpu_percent, rss_bytes, up), health_score, "
    "or a plugin_metrics metric_name"
)
_RULE_OP = "must be one of " + " ".join(OPS)


class MatcherTable(Table):
    """Shell-style globs over a plugin's identity."""

    unknown_key: ClassVar[str] = "unknown field (tenant, plugin, environment)"
    what: ClassVar[str] = "a table with tenant, plugin and/or environment globs"

    tenant: Glob = "*"
    plugin: Glob = "*"
    environment: Glob = "*"

    def to_matcher(self) -> PluginMatcher:
        return PluginMatcher(tenant=self.tenant, plugin=self.plugin, environment=self.environment)


def _one_or_many(value: object) -> object:
    """``matchers = {tenant = "acme"}`` is a one-entry array."""
    return [value] if isinstance(value, Mapping) else value


def _check_names(value: dict[str, str], *, reserved: frozenset[str]) -> dict[str, str]:
    problems: list[tuple[Location, str]] = []
    for name in value:
        if not _LABEL_RE.fullmatch(name):
            problems.append(((name,), "name must be letters, digits and _"))
        elif name in reserved:
            problems.append(((name,), "is set by pluginmon and cannot be overridden"))
    if problems:
        raise problems_error(problems)
    return value


class RuleTable(Table):
    """One ``[[alerts.rules]]`` table."""

    name: Annotated[str, Expect(_RULE_NAME)]
    metric: Annotated[str, Expect(_RULE_METRIC)]
    op: Annotated[str, Expect(_RULE_OP)]
    threshold: Annotated[float, Expect("required number"), Finite]
    clear_threshold: Annotated[float | None, Finite] = None
    for_seconds: Annotated[float, seconds(ge=0, le=YEAR)] = 0.0
    keep_firing_for_seconds: Annotated[float, seconds(ge=0, le=YEAR)] = 0.0
    severity: Literal["info", "warning", "critical"] = "warning"
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    matchers: Annotated[list[MatcherTable], BeforeValidator(_one_or_many)] = Field(
        default_factory=list
    )

    @classmethod
    def label(cls, raw: object) -> str | None:
        name = raw.get("name") if isinstance(raw, Mapping) else None
        return name if isinstance(name, str) and name else None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME_RE.fullmatch(value):
            raise ValueError(_RULE_NAME)
        return value

    @field_validator("metric")
    @classmethod
    def _metric(cls, value: str) -> str:
        if not _METRIC_RE.fullmatch(value):
            raise ValueError(_RULE_METRIC)
        problem = metric_ref_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value

    @field_validator("op")
    @classmethod
    def _op(cls, value: str) -> str:
        if value not in OPS:
            raise ValueError(_RULE_OP)
        return value

    @field_validator("clear_threshold")
    @classmethod
    def _hysteresis(cls, clear: float | None, info: ValidationInfo) -> float | None:
        # op and threshold come first: info.data holds them when they are valid.
        op, threshold = info.data.get("op"), info.data.get("threshold")
        if clear is None or op is None or threshold is None:
            return clear
        if op in ("==", "!="):
            raise ValueError(f"not meaningful with op {op}")
        if op in (">", ">=") and clear > threshold:
            raise ValueError(f"must be <= threshold ({threshold:g}) for op {op}")
        if op in ("<", "<=") and clear < threshold:
            raise ValueError(f"must be >= threshold ({threshold:g}) for op {op}")
        return clear

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: dict[str, str]) -> dict[str, str]:
        return _check_names(value, reserved=RESERVED_LABELS)

    @field_validator("annotations")
    @classmethod
    def _annotations(cls, value: dict[str, str]) -> dict[str, str]:
        _check_names(value, reserved=frozenset())
        problems = [((name,), template_problem(text)) for name, text in value.items()]
        worded = [(loc, why) for loc, why in problems if why is not None]
        if worded:
            raise problems_error(worded)
        return value

    def to_rule(self) -> Rule:
        return Rule(
            name=self.name,
            metric=self.metric,
            op=self.op,
            threshold=self.threshold,
            clear_threshold=self.clear_threshold,
            for_seconds=self.for_seconds,
            keep_firing_for_seconds=self.keep_firing_for_seconds,
            severity=self.severity,
            labels=dict(self.labels),
            annotations=dict(self.annotations),
            matchers=tuple(m.to_matcher() for m in self.matchers),
        )


RuleTables = Annotated[
    tuple[RuleTable, ...],
    entries(
        RuleTable,
        key=lambda _, r: r.name,
        duplicate=lambda first, _: ("name", f"duplicate of alerts.rules[{first}]"),
    ),
]


# -- receivers ---------------------------------------------------------------------------------

_URL = "required: an http:// or https:// URL"


def _http_url(value: str) -> str:
    try:
        parts = urlsplit(value)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:  # an invalid port or IPv6 literal
        ok = False
    if not ok:
        raise ValueError("must be an http:// or https:// URL")
    return value


Url = Annotated[str, Expect(_URL), AfterValidator(_http_url)]
ReceiverName = Annotated[str, Expect("must be a non-empty string"), Field(min_length=1)]
GiveUp = Annotated[float, seconds(ge=0, le=YEAR), Note("0 = never")]
MaxAttempts = Annotated[int | None, Field(ge=1, le=MAX_ATTEMPTS)]


class WebhookTable(Table):
    """One ``[[alerts.webhooks]]`` receiver; the secret is never printed."""

    name: ReceiverName | None = None  # default webhook-<index>
    url: Url
    secret: SecretStr | None = None
    timeout_seconds: Annotated[float, seconds(gt=0, le=HOUR)] = 10.0
    send_resolved: bool = True
    give_up_after_seconds: GiveUp = 86400.0
    max_attempts: MaxAttempts = None
    repeat_interval_seconds: Annotated[float, seconds(gt=0, le=YEAR)] = 4 * HOUR
    backoff_initial_seconds: Annotated[float, seconds(gt=0, le=DAY)] = 1.0
    backoff_max_seconds: Annotated[float, seconds(gt=0, le=DAY)] = 300.0

    def to_config(self, index: int) -> WebhookConfig:
        return WebhookConfig(
            name=self.name or f"webhook-{index}",
            url=self.url,
            secret=(self.secret.get_secret_value() or None) if self.secret is not None else None,
            timeout_seconds=self.timeout_seconds,
            send_resolved=self.send_resolved,
            give_up_after_seconds=self.give_up_after_seconds,
            max_attempts=self.max_attempts,
            repeat_interval_seconds=self.repeat_interval_seconds,
            backoff_initial_seconds=self.backoff_initial_seconds,
            backoff_max_seconds=self.backoff_max_seconds,
        )


WebhookTables = Annotated[
    tuple[WebhookTable, ...],
    entries(
        WebhookTable,
        key=lambda i, w: w.name or f"webhook-{i}",
        duplicate=lambda _, w: ("name", f"duplicate receiver name {w.name!r}"),
    ),
]


class AlertmanagerTable(Table):
    """``[alerts.alertmanager]``: push to a real Alertmanager's ``POST /api/v2/alerts``."""

    what: ClassVar[str] = "a table with url"

    url: Url
    name: ReceiverName = "alertmanager"
    timeout_seconds: Annotated[float, seconds(gt=0, le=HOUR)] = 10.0
    resend_interval_seconds: Annotated[float, seconds(gt=0, le=DAY)] = 60.0
    give_up_after_seconds: GiveUp = 86400.0
    max_attempts: MaxAttempts = None
    backoff_initial_seconds: Annotated[float, seconds(gt=0, le=DAY)] = 1.0
    backoff_max_seconds: Annotated[float, seconds(gt=0, le=DAY)] = 60.0

    def to_config(self) -> AlertmanagerConfig:
        return AlertmanagerConfig(url=self.url.rstrip("/"), **self.model_dump(exclude={"url"}))


def _empty_is_none(value: object) -> object:
    """An empty ``[alerts.alertmanager]`` table means no Alertmanager push."""
    return None if isinstance(value, Mapping) and not value else value


class AlertsTable(Table):
    """``[alerts]``: rules (over the built-in ones), receivers, and the daemon's alert keys."""

    unknown_key: ClassVar[str] = "unknown setting"

    rules: RuleTables = ()
    builtin_rules: bool = True
    webhooks: WebhookTables = ()
    alertmanager: Annotated[AlertmanagerTable | None, BeforeValidator(_empty_is_none)] = None
    external_url: str | None = None

    def to_rules(self) -> tuple[Rule, ...]:
        rules = [r.to_rule() for r in self.rules]
        return merge_with_builtins(rules) if self.builtin_rules else tuple(rules)

    def to_webhooks(self) -> tuple[WebhookConfig, ...]:
        return tuple(w.to_config(i) for i, w in enumerate(self.webhooks))

    def to_alertmanager(self) -> AlertmanagerConfig | None:
        return None if self.alertmanager is None else self.alertmanager.to_config()


# -- one section at a time -----------------------------------------------------------------------


_PLUGINS: TypeAdapter[tuple[PluginTable, ...]] = TypeAdapter(PluginTables)
_RULES: TypeAdapter[tuple[RuleTable, ...]] = TypeAdapter(RuleTables)
_WEBHOOKS: TypeAdapter[tuple[WebhookTable, ...]] = TypeAdapter(WebhookTables)
_ALERTS: TypeAdapter[AlertsTable] = TypeAdapter(AlertsTable)


def parse_plugin_specs(raw: object) -> tuple[PluginSpec, ...]:
    """``[[plugins]]`` tables as specs, in config order; ConfigError lists every problem."""
    return tuple(p.to_spec() for p in validate_section(_PLUGINS, raw, ("plugins",)))


def parse_rules(raw: object, *, include_builtins: bool = True) -> tuple[Rule, ...]:
    """``[[alerts.rules]]`` tables as rules, merged over the built-in ones unless told not to."""
    rules = [t.to_rule() for t in validate_section(_RULES, raw, ("alerts", "rules"))]
    return merge_with_builtins(rules) if include_builtins else tuple(rules)


def parse_webhooks(raw: object) -> tuple[WebhookConfig, ...]:
    """``[[alerts.webhooks]]`` tables; the secrets never appear in a problem."""
    tables = validate_section(_WEBHOOKS, raw, ("alerts", "webhooks"))
    return tuple(w.to_config(i) for i, w in enumerate(tables))


def parse_alertmanager(raw: object) -> AlertmanagerConfig | None:
    """``[alerts.alertmanager]``; None (or an empty table) is no Alertmanager push."""
    alerts = validate_section(_ALERTS, {"alertmanager": raw}, ("alerts",))
    assert isinstance(alerts, AlertsTable)
    return alerts.to_alertmanager()
