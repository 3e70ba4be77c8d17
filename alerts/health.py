"""Health score 0..100 per plugin from weighted components, as a pure function of data and time."""

from __future__ import annotations

import dataclasses
import math
from array import array
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pluginmon.alerts.matchers import PluginMatcher
from pluginmon.collectors.models import PluginKey, PluginSample

# Component names, also the `component` label of pluginmon_plugin_health_component_score.
UP = "up"
CPU = "cpu"
MEMORY = "memory"
MEMORY_LIMIT = "memory_limit"
RESTARTS = "restarts"
LEAK = "leak"
METRIC_PREFIX = "metric:"
# The plugin_metrics gauge the registry writes per (plugin, environment) (registry/usage.py).
OPERATIONS_FAILED = "operations_failed"
# The registry's gauge of runtime dependencies that are unsatisfied or conflicting, per
# (plugin, environment) (registry/dependencies.py); dev dependencies never count.
DEPENDENCIES_UNSATISFIED = "dependencies_unsatisfied"
# The registry's backup gauges (registry/backup_schedule.py): 1 when no backup of the plugin
# verified within its limit; the number of live backups whose latest verification failed.
BACKUP_STALE = "backup_stale"
BACKUP_VERIFICATION_FAILED = "backup_verification_failed"
# Open critical vulnerability findings (registry/vulnerabilities.py writes the gauge).
VULNERABILITIES_CRITICAL = "vulnerabilities_critical"
# Operations running, or due to run, for over 30 minutes (registry/usage.py).
OPERATIONS_STUCK = "operations_stuck"
# Seconds since the plugin's last verified backup (registry/backup_schedule.py).
BACKUP_VERIFIED_AGE_SECONDS = "backup_verified_age_seconds"
# The gauges only the registry job writes, once per maintenance_interval_seconds for the
# database: the alert engine reads them at that rate, not every cycle (alerts/persistence.py).
REGISTRY_GAUGES = frozenset(
    {
        OPERATIONS_FAILED,
        OPERATIONS_STUCK,
        DEPENDENCIES_UNSATISFIED,
        BACKUP_STALE,
        BACKUP_VERIFICATION_FAILED,
        BACKUP_VERIFIED_AGE_SECONDS,
        VULNERABILITIES_CRITICAL,
    }
)


@dataclass(frozen=True, slots=True)
class HealthWeights:
    """Relative weights of the averaged components (``up`` is a gate, not a weight)."""

    cpu: float = 1.0
    memory: float = 1.0
    memory_limit: float = 1.0
    restarts: float = 1.0
    leak: float = 1.0


@dataclass(frozen=True, slots=True)
class MetricThreshold:
    """A plugin_metrics value scored 100 on the good side of ``warn``, 0 beyond ``critical``.

    ``critical > warn`` means higher is worse; ``critical < warn`` means lower is worse.
    """

    name: str
    warn: float
    critical: float
    weight: float = 1.0


@dataclass(frozen=True, slots=True)
class HealthSettings:
    """Thresholds and weights for one plugin (the global defaults, or merged overrides)."""

    cpu_warn_percent: float = 80.0
    cpu_critical_percent: float = 100.0
    memory_warn_bytes: int | None = 1 << 30
    memory_critical_bytes: int | None = 2 << 30
    # A known hard limit (e.g. the plugin's cgroup memory.max); enables memory_limit.
    memory_limit_bytes: int | None = None
    memory_limit_warn_ratio: float = 0.8
    memory_limit_critical_ratio: float = 0.95
    restart_window_seconds: float = 3600.0
    restarts_critical: int = 5
    leak_window_seconds: float = 1800.0
    leak_min_points: int = 6
    leak_warn_seconds: float = 24 * 3600.0
    leak_critical_seconds: float = 3600.0
    weights: HealthWeights = field(default_factory=HealthWeights)
    # Built in: operations that failed in the last hour (the registry's plugin_metrics gauge)
    # cost health, all of it at three. Configured [health] metrics replace this default.
    metrics: tuple[MetricThreshold, ...] = (
        MetricThreshold(OPERATIONS_FAILED, warn=0.0, critical=3.0),
        # One runtime dependency missing, out of range, conflicting or on a cycle costs the
        # whole component, weighted double: a plugin without what it needs is not healthy.
        MetricThreshold(DEPENDENCIES_UNSATISFIED, warn=0.0, critical=1.0, weight=2.0),
        # Backups: a failed verification costs all of the component, a stale one half.
        MetricThreshold(BACKUP_VERIFICATION_FAILED, warn=0.0, critical=1.0),
        MetricThreshold(BACKUP_STALE, warn=0.0, critical=2.0),
        MetricThreshold(VULNERABILITIES_CRITICAL, warn=0.0, critical=1.0),
    )
    # An open critical vulnerability caps the score here, however well the plugin runs
    # (applies whatever the configured metrics are).
    vulnerability_critical_cap: float = 40.0

    @property
    def leak_limit_bytes(self) -> int | None:
        """What a leak is forecast to hit: the hard limit when known, else memory critical."""
        return self.memory_limit_bytes or self.memory_critical_bytes


@dataclass(frozen=True, slots=True)
class HealthOverride:
    """Settings for the plugins a matcher selects; later overrides win."""

    matcher: PluginMatcher
    changes: Mapping[str, object]


@dataclass(frozen=True, slots=True)
class HealthConfig:
    defaults: HealthSettings = field(default_factory=HealthSettings)
    overrides: tuple[HealthOverride, ...] = ()

    def settings_for(self, key: PluginKey) -> HealthSettings:
        settings = self.defaults
        for override in self.overrides:
            if override.matcher.matches(key):
                settings = apply_changes(settings, override.changes)
        return settings


def apply_changes(settings: HealthSettings, changes: Mapping[str, object]) -> HealthSettings:
    """``settings`` with parsed ``changes`` applied (``weights`` merges component by component)."""
    merged: dict[str, Any] = dict(changes)
    weights = merged.pop("weights", None)
    if isinstance(weights, Mapping):
        merged["weights"] = dataclasses.replace(settings.weights, **dict(weights))
    return dataclasses.replace(settings, **merged)


@dataclass(frozen=True, slots=True)
class HealthComponent:
    """One component: its 0..100 score, weight, the measured value and what it was held to.

    ``warn``/``critical`` are the thresholds the value was scored against; ``extra`` is the
    leak slope (bytes/s) for ``leak`` and the window (s) for ``restarts``. The human-readable
    ``detail`` is built from these only when asked for (scoring 10k plugins stays cheap).
    """

    name: str
    score: float
    weight: float
    value: float | None
    warn: float | None = None
    critical: float | None = None
    extra: float | None = None

    @property
    def detail(self) -> str:
        v, w, c = self.value, self.warn, self.critical
        if self.name == UP:
            return "up" if v else "no process running"
        if self.name == CPU:
            return f"cpu {v or 0:.1f}% (warn {w or 0:g}%, critical {c or 0:g}%)"
        if self.name == MEMORY:
            return f"rss {_mib(v or 0)} (warn {_mib(w or 0)}, critical {_mib(c or 0)})"
        if self.name == MEMORY_LIMIT:
            return f"rss at {v or 0:.0%} of the limit (warn {w or 0:.0%}, critical {c or 0:.0%})"
        if self.name == RESTARTS:
            return f"{v or 0:.0f} restart(s) in the last {self.extra or 0:g}s"
        if self.name == LEAK:
            slope = self.extra or 0.0
            if v is None:
                return f"rss not growing ({_mib(slope * 3600)}/h)"
            return f"rss growing {_mib(slope * 3600)}/h, reaches the limit in {_duration(v)}"
        if self.name == METRIC_PREFIX + DEPENDENCIES_UNSATISFIED:
            return f"{v or 0:.0f} runtime dependenc{'y' if v == 1 else 'ies'} unsatisfied or conflicting"
        return f"{self.name.removeprefix(METRIC_PREFIX)} = {v or 0:g} (warn {w or 0:g}, critical {c or 0:g})"


@dataclass(frozen=True, slots=True)
class HealthScore:
    key: PluginKey
    timestamp: datetime
    score: float
    components: tuple[HealthComponent, ...]
    # Least-squares RSS growth over the leak window, and when it reaches the limit.
    leak_slope_bytes_per_second: float | None = None
    leak_forecast_seconds: float | None = None
    restarts_in_window: int = 0

    @property
    def weakest(self) -> HealthComponent | None:
        """The component that costs the most: lowest score, ties broken by weight."""
        # The first of the lowest scores, the heavier one on a tie: min() with a key
        # tuple, spelled out (it runs for every health row and every changed plugin).
        best: HealthComponent | None = None
        for c in self.components:
            if (
                best is None
                or c.score < best.score
                or (c.score == best.score and c.weight > best.weight)
            ):
                best = c
        return best

    def component(self, name: str) -> HealthComponent | None:
        for c in self.components:
            if c.name == name:
                return c
        return None


def linear_score(value: float, warn: float, critical: float) -> float:
    """100 on the good side of ``warn``, 0 at or beyond ``critical``, linear between."""
    if warn == critical:
        return 0.0 if (value >= critical) else 100.0
    position = (value - warn) / (critical - warn)  # <= 0 good, >= 1 critical, either direction
    if position <= 0.0:
        return 100.0
    if position >= 1.0:
        return 0.0
    return 100.0 * (1.0 - position)


def least_squares_slope(points: Sequence[tuple[float, float]]) -> float | None:
    """Slope of the least-squares line through (x, y) points, or None if x does not vary."""
    n = len(points)
    if n < 2:
        return None
    mean_x = sum(p[0] for p in points) / n
    mean_y = sum(p[1] for p in points) / n
    sxx = 0.0
    sxy = 0.0
    for x, y in points:
        dx = x - mean_x
        sxx += dx * dx
        sxy += dx * (y - mean_y)
    if sxx <= 0.0:
        return None
    return sxy / sxx


def score_health(
    sample: PluginSample,
    *,
    settings: HealthSettings,
    now: datetime,
    rss_points: Sequence[tuple[float, float]] = (),
    restart_events: Sequence[tuple[float, int]] = (),
    metrics: Mapping[str, float] | None = None,
    leak_slope: float | None = None,
) -> HealthScore:
    """Score one plugin.

    ``rss_points`` are (unix seconds, rss bytes) over at least the leak window (or pass the
    ``leak_slope`` already fitted to them, bytes/s); ``restart_events`` are (unix seconds,
    restarts counted in that sample); ``metrics`` are the plugin's latest plugin_metrics
    values. A down plugin scores 0 (``up`` is a gate); otherwise the score is the weighted
    mean of the components that apply.
    """
    now_s = now.timestamp()
    weights = settings.weights
    up = sample.up
    components: list[HealthComponent] = [
        HealthComponent(UP, 100.0 if up else 0.0, 0.0, 1.0 if up else 0.0)
    ]
    append = components.append
    cpu = sample.cpu_percent
    warn, critical = settings.cpu_warn_percent, settings.cpu_critical_percent
    append(
        HealthComponent(CPU, linear_score(cpu, warn, critical), weights.cpu, cpu, warn, critical)
    )
    rss = float(sample.rss_bytes)
    mem_warn, mem_critical = settings.memory_warn_bytes, settings.memory_critical_bytes
    if mem_warn is not None and mem_critical is not None:
        append(
            HealthComponent(
                MEMORY,
                linear_score(rss, mem_warn, mem_critical),
                weights.memory,
                rss,
                float(mem_warn),
                float(mem_critical),
            )
        )
    if settings.memory_limit_bytes:
        ratio = rss / settings.memory_limit_bytes
        warn, critical = settings.memory_limit_warn_ratio, settings.memory_limit_critical_ratio
        append(
            HealthComponent(
                MEMORY_LIMIT,
                linear_score(ratio, warn, critical),
                weights.memory_limit,
                ratio,
                warn,
                critical,
            )
        )

    window_start = now_s - settings.restart_window_seconds
    restarts = (
        sum(count for t, count in restart_events if t > window_start) if restart_events else 0
    )
    restarts_critical = float(max(settings.restarts_critical, 1))
    append(
        HealthComponent(
            RESTARTS,
            linear_score(float(restarts), 0.0, restarts_critical),
            weights.restarts,
            float(restarts),
            0.0,
            restarts_critical,
            settings.restart_window_seconds,
        )
    )

    slope: float | None = None
    forecast: float | None = None
    limit = settings.leak_limit_bytes
    if limit is not None and up:
        if leak_slope is not None:
            slope = leak_slope
        elif len(rss_points) >= settings.leak_min_points:
            leak_start = now_s - settings.leak_window_seconds
            window = [p for p in rss_points if p[0] >= leak_start]
            if len(window) >= settings.leak_min_points:
                slope = least_squares_slope(window)
        if slope is not None:
            leak_score = 100.0
            if slope > 0.0:
                forecast = max(0.0, (limit - rss) / slope)
                leak_score = linear_score(
                    forecast, settings.leak_warn_seconds, settings.leak_critical_seconds
                )
            append(
                HealthComponent(
                    LEAK,
                    leak_score,
                    weights.leak,
                    forecast,
                    settings.leak_warn_seconds,
                    settings.leak_critical_seconds,
                    slope,
                )
            )

    if metrics:
        for threshold in settings.metrics:
            value = metrics.get(threshold.name)
            if value is None:
                continue
            append(
                HealthComponent(
                    METRIC_PREFIX + threshold.name,
                    linear_score(value, threshold.warn, threshold.critical),
                    threshold.weight,
                    value,
                    threshold.warn,
                    threshold.critical,
                )
            )

    if not up:
        total = 0.0
    else:
        weight_sum = 0.0
        weighted = 0.0
        for c in components:
            weight_sum += c.weight
            weighted += c.score * c.weight
        total = 100.0 if weight_sum <= 0.0 else weighted / weight_sum
        if metrics and metrics.get(VULNERABILITIES_CRITICAL, 0.0) > 0.0:
            total = min(total, settings.vulnerability_critical_cap)
    return HealthScore(
        key=sample.key,
        timestamp=now,
        score=round(min(100.0, max(0.0, total)), 2),
        components=tuple(components),
        leak_slope_bytes_per_second=slope,
        leak_forecast_seconds=forecast,
        restarts_in_window=restarts,
    )


class PluginHistory:
    """What scoring needs from the past of one plugin, bounded in size.

    RSS points are kept at least ``leak_window / (max_points - 1)`` apart, so there are at
    most ``max_points`` of them however short the sample interval is, and the least-squares
    slope is refitted only when a point is added, not on every sample. The points are two
    arrays of doubles (a deque of tuples cost ~7 KB per plugin at 60 points: 70 MB at
    10,000 plugins; these cost ~1 KB).
    """

    __slots__ = (
        "_max_points",
        "_min_points",
        "_restarts",
        "_rss",
        "_slope",
        "_times",
        "_window_seconds",
    )

    def __init__(self, *, window_seconds: float, max_points: int = 60, min_points: int = 6) -> None:
        self._window_seconds = window_seconds
        self._max_points = max(2, max_points)
        self._min_points = max(2, min_points)
        self._times = array("d")  # unix seconds of the RSS points
        self._rss = array("d")  # bytes, aligned with _times
        # Made at the first restart: an empty deque costs ~700 bytes, 7 MB at 10,000 plugins.
        self._restarts: deque[tuple[float, int]] | None = None
        self._slope: float | None = None

    def add(self, sample: PluginSample, *, restart_window_seconds: float) -> None:
        t = sample.timestamp.timestamp()
        restarts = self._restarts
        if sample.restarts:
            if restarts is None:
                restarts = self._restarts = deque()
            restarts.append((t, sample.restarts))
        if restarts:
            while restarts and restarts[0][0] <= t - restart_window_seconds:
                restarts.popleft()
        times, rss = self._times, self._rss
        if not sample.up:
            # A dead plugin's RSS is 0: it says nothing about a leak; start over when back.
            del times[:], rss[:]
            self._slope = None
            return
        if times and t - times[-1] < self._window_seconds / (self._max_points - 1):
            return
        times.append(t)
        rss.append(float(sample.rss_bytes))
        cutoff = t - self._window_seconds
        old = 0
        while old < len(times) and times[old] < cutoff:
            old += 1
        if old:
            del times[:old], rss[:old]
        self._slope = _slope(times, rss) if len(times) >= self._min_points else None

    @property
    def rss_points(self) -> Sequence[tuple[float, float]]:
        return list(zip(self._times, self._rss, strict=True))

    @property
    def restart_events(self) -> Sequence[tuple[float, int]]:
        return self._restarts or ()

    @property
    def leak_slope(self) -> float | None:
        """Least-squares RSS slope (bytes/s) over the window, once there are enough points."""
        return self._slope

    @property
    def next_point_at(self) -> float:
        """Unix seconds from which :meth:`add` takes its next RSS point (-inf: the next one).

        Until then an unchanged sample of a running plugin changes nothing here, which is
        what lets the tracker skip it (alerts.scoring)."""
        times = self._times
        if not times:
            return -math.inf
        return times[-1] + self._window_seconds / (self._max_points - 1)


def _slope(xs: array[float], ys: array[float]) -> float | None:
    """:func:`least_squares_slope` over two aligned arrays, with the same arithmetic in the
    same order (so the same result to the last bit)."""
    n = len(xs)
    if n < 2:
        return None
    mean_x = sum(xs) / n
    mean_y = sum(ys) / n
    sxx = 0.0
    sxy = 0.0
    for x, y in zip(xs, ys, strict=True):
        dx = x - mean_x
        sxx += dx * dx
        sxy += dx * (y - mean_y)
    if sxx <= 0.0:
        return None
    return sxy / sxx


def _mib(value: float) -> str:
    return f"{value / (1 << 20):.1f} MiB"


def _duration(seconds: float) -> str:
    if seconds >= 86400:
        return f"{seconds / 86400:.1f}d"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f}h"
    if seconds >= 60:
        return f"{seconds / 60:.0f}m"
    return f"{seconds:.0f}s"
