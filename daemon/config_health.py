"""The config schema of ``[health]``: thresholds and weights of the health score, plugin_metrics
thresholds and per-plugin overrides, turned into ``alerts.health.HealthConfig``."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Annotated, ClassVar

from pydantic import BeforeValidator, Field, TypeAdapter, model_validator

from pluginmon.alerts.health import (
    HealthConfig,
    HealthOverride,
    HealthSettings,
    HealthWeights,
    MetricThreshold,
    apply_changes,
)
from pluginmon.alerts.matchers import PluginMatcher
from pluginmon.daemon.config_schema import (
    MAX_ATTEMPTS,
    MAX_BYTES,
    MAX_PERCENT,
    MAX_WEIGHT,
    YEAR,
    Expect,
    Finite,
    Glob,
    Location,
    Note,
    Table,
    problems_error,
    seconds,
    validate_section,
)


def _off_is_zero(value: object) -> object:
    """``memory_warn_bytes = false`` turns the component off, as 0 does."""
    return 0 if value is False else value


Ratio = Annotated[float | None, Field(ge=0, le=1000, allow_inf_nan=False)]
Window = Annotated[float | None, seconds(ge=0, le=YEAR)]
Bytes = Annotated[
    int | None,
    BeforeValidator(_off_is_zero),
    Field(ge=0, le=MAX_BYTES),
    Note("0 turns it off"),
]
Weight = Annotated[float | None, Field(ge=0, le=MAX_WEIGHT, allow_inf_nan=False)]
_MATCHER_KEYS = ("tenant", "plugin", "environment")


class WeightsTable(Table):
    """``[health.weights]``: relative weights of the averaged components."""

    unknown_key: ClassVar[str] = (
        f"unknown component (one of {', '.join(sorted(f.name for f in dataclasses.fields(HealthWeights)))})"
    )

    cpu: Weight = None
    memory: Weight = None
    memory_limit: Weight = None
    restarts: Weight = None
    leak: Weight = None


class MetricThresholdTable(Table):
    """One ``[[health.metrics]]`` table: a plugin_metrics series scored like cpu and memory."""

    unknown_key: ClassVar[str] = "unknown field (name, warn, critical, weight)"
    what: ClassVar[str] = "a table with name, warn, critical"

    name: Annotated[str, Expect("required: the plugin_metrics metric_name"), Field(min_length=1)]
    warn: Annotated[float, Expect("required number"), Finite]
    critical: Annotated[float, Expect("required number"), Finite]
    weight: Annotated[float, Field(ge=0, le=MAX_WEIGHT, allow_inf_nan=False)] = 1.0

    def to_threshold(self) -> MetricThreshold:
        return MetricThreshold(self.name, self.warn, self.critical, self.weight)


class HealthChanges(Table):
    """Health settings that a table changes; None (unset) keeps the default's value."""

    unknown_key: ClassVar[str] = "unknown setting"

    cpu_warn_percent: Annotated[float | None, Field(ge=0, le=MAX_PERCENT, allow_inf_nan=False)] = (
        None
    )
    cpu_critical_percent: Annotated[
        float | None, Field(ge=0, le=MAX_PERCENT, allow_inf_nan=False)
    ] = None
    memory_warn_bytes: Bytes = None
    memory_critical_bytes: Bytes = None
    memory_limit_bytes: Bytes = None
    memory_limit_warn_ratio: Ratio = None
    memory_limit_critical_ratio: Ratio = None
    restart_window_seconds: Window = None
    restarts_critical: Annotated[int | None, Field(ge=1, le=MAX_ATTEMPTS)] = None
    leak_window_seconds: Window = None
    leak_min_points: Annotated[int | None, Field(ge=1, le=10_000)] = None
    leak_warn_seconds: Window = None
    leak_critical_seconds: Window = None
    # The most an open critical vulnerability finding leaves of the score.
    vulnerability_critical_cap: Annotated[
        float | None, Field(ge=0, le=100, allow_inf_nan=False)
    ] = None
    weights: WeightsTable | None = None
    metrics: list[MetricThresholdTable] | None = None

    def changes(self) -> dict[str, object]:
        """What ``alerts.health.apply_changes`` takes: the set values (0 bytes = off)."""
        out: dict[str, object] = {}
        for name in self.model_fields_set & set(HealthChanges.model_fields):
            value = getattr(self, name)
            if name == "weights" and value is not None:
                value = value.model_dump(exclude_none=True)
            elif name == "metrics" and value is not None:
                value = tuple(m.to_threshold() for m in value)
            elif name.endswith("_bytes") and value == 0:
                value = None
            elif value is None:
                continue
            out[name] = value
        return out


class HealthOverrideTable(HealthChanges):
    """One ``[[health.plugins]]`` table: matcher globs and the settings they change."""

    tenant: Glob | None = None
    plugin: Glob | None = None
    environment: Glob | None = None

    @classmethod
    def table_problems(cls, raw: object) -> list[str]:
        # Said even when a setting in the same table is wrong: a catch-all override is
        # the other, global, table written in the wrong place.
        if isinstance(raw, Mapping) and all(raw.get(k, "*") == "*" for k in _MATCHER_KEYS):
            return ["needs at least one of tenant, plugin, environment"]
        return []

    def to_override(self) -> HealthOverride:
        globs = {k: v for k in _MATCHER_KEYS if (v := getattr(self, k)) is not None}
        return HealthOverride(PluginMatcher(**globs), self.changes())


class HealthTable(HealthChanges):
    """``[health]``: thresholds and weights of the health score, and per-plugin overrides."""

    plugins: list[HealthOverrideTable] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> HealthTable:
        defaults = apply_changes(HealthSettings(), self.changes())
        problems: list[tuple[Location, str]] = [
            ((name,), why) for name, why in _inconsistencies(defaults)
        ]
        for index, override in enumerate(self.plugins):
            merged = apply_changes(defaults, override.changes())
            problems += [(("plugins", index, name), why) for name, why in _inconsistencies(merged)]
        if problems:
            raise problems_error(problems)
        return self

    def to_config(self) -> HealthConfig:
        defaults = apply_changes(HealthSettings(), self.changes())
        return HealthConfig(defaults, tuple(o.to_override() for o in self.plugins))


def _inconsistencies(s: HealthSettings) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    if s.cpu_critical_percent < s.cpu_warn_percent:
        out.append(("cpu_critical_percent", "must be >= cpu_warn_percent"))
    if (s.memory_warn_bytes is None) != (s.memory_critical_bytes is None):
        out.append(
            ("memory_critical_bytes", "memory_warn_bytes and memory_critical_bytes go together")
        )
    elif (
        s.memory_warn_bytes is not None
        and s.memory_critical_bytes is not None
        and s.memory_critical_bytes < s.memory_warn_bytes
    ):
        out.append(("memory_critical_bytes", "must be >= memory_warn_bytes"))
    if s.memory_limit_critical_ratio < s.memory_limit_warn_ratio:
        out.append(("memory_limit_critical_ratio", "must be >= memory_limit_warn_ratio"))
    if s.leak_critical_seconds > s.leak_warn_seconds:
        out.append(("leak_critical_seconds", "must be <= leak_warn_seconds"))
    if s.leak_window_seconds <= 0:
        out.append(("leak_window_seconds", "must be > 0"))
    return out


_HEALTH: TypeAdapter[HealthTable] = TypeAdapter(HealthTable)


def parse_health_config(raw: object) -> HealthConfig:
    """The ``[health]`` table on its own; ConfigError lists every problem."""
    if raw is None:
        return HealthConfig()
    health = validate_section(_HEALTH, raw, ("health",))
    assert isinstance(health, HealthTable)
    return health.to_config()
