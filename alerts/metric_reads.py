"""When the alert engine reads each plugin_metrics name: a plugin's own metrics every cycle, the registry's gauges at the rate the registry job writes them.

The registry job writes its gauges (alerts.health.REGISTRY_GAUGES: failed and stuck
operations, unsatisfied dependencies, backups, critical vulnerabilities) once per
``maintenance_interval_seconds`` for the whole database. Reading them every sample cycle on
every agent read the same rows again and again: in a fleet of agents it was the largest
statement the database ran (docs/BENCHMARKS.md, "Fleet"). They are read once per
``registry_interval_seconds`` instead, and sooner for a plugin whose values were never read
(a new plugin, or one whose id just resolved), so a value the registry job wrote is seen
within that interval plus one cycle. Between reads the engine uses the values read last.

Pure: the caller passes the time and runs the query.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass

from pluginmon.alerts.health import REGISTRY_GAUGES
from pluginmon.alerts.metric_values import parse_metric_ref

# (plugin id, environment, metric name as the rule or health threshold writes it) -> value
Values = dict[tuple[int, str, str], float]


def is_registry_gauge(name: str) -> bool:
    """Whether ``name`` (``name`` or ``name:pNN``) reads a gauge only the registry job writes."""
    try:
        return parse_metric_ref(name).name in REGISTRY_GAUGES
    except ValueError:
        return False  # not a valid reference: nothing is read for it anyway


@dataclass(frozen=True, slots=True)
class ReadPlan:
    """What to read this cycle."""

    names: tuple[str, ...]  # empty: no statement this cycle
    registry: tuple[str, ...]  # the registry gauges among ``names`` (their values replaced)
    cached: tuple[str, ...]  # registry gauges not read now: their values read last are used


class MetricReads:
    """The read schedule and the registry gauges' values read last (see the module
    docstring). ``registry_interval_seconds`` 0 reads them every cycle."""

    def __init__(self, *, registry_interval_seconds: float) -> None:
        if not registry_interval_seconds >= 0:
            raise ValueError(
                f"registry_interval_seconds must be >= 0, got {registry_interval_seconds!r}"
            )
        self._interval = registry_interval_seconds
        self._read_at: float | None = None
        self._read_names: frozenset[str] = frozenset()
        self._read_plugins: set[tuple[int, str]] = set()
        self._registry_values: Values = {}
        self.reads = 0
        """Plans taken that read something: statements run for plugin_metrics values."""

    def plan(self, names: Sequence[str], plugins: Set[tuple[int, str]], *, now: float) -> ReadPlan:
        """The names to read at ``now`` for ``plugins`` ((plugin id, environment) pairs)."""
        registry = tuple(n for n in names if is_registry_gauge(n))
        every_cycle = tuple(n for n in names if n not in registry)
        if registry and not self._registry_due(registry, plugins, now=now):
            return ReadPlan(names=every_cycle, registry=(), cached=registry)
        return ReadPlan(names=every_cycle + registry, registry=registry, cached=())

    def _registry_due(
        self, names: Sequence[str], plugins: Set[tuple[int, str]], *, now: float
    ) -> bool:
        read_at = self._read_at
        if read_at is None or self._interval <= 0:
            return True
        # A clock that stepped back does not hold the read back for longer than an interval.
        if not 0 <= now - read_at < self._interval:
            return True
        if not self._read_names.issuperset(names):
            return True  # a rule or threshold added by a reload
        return not self._read_plugins.issuperset(plugins)

    def take(
        self,
        plan: ReadPlan,
        values: Mapping[tuple[int, str, str], float],
        plugins: Set[tuple[int, str]],
        *,
        now: float,
    ) -> Values:
        """``values`` read for ``plan`` (nothing when it read nothing), with the registry
        gauges' values read last for ``plugins`` when this plan did not read them."""
        if plan.names:
            self.reads += 1
        if plan.registry:
            registry = set(plan.registry)
            self._registry_values = {k: v for k, v in values.items() if k[2] in registry}
            self._read_at = now
            self._read_names = frozenset(registry)
            self._read_plugins = set(plugins)
            return dict(values)
        out = dict(values)
        if plan.cached:
            cached = set(plan.cached)
            for key, value in self._registry_values.items():
                if key[2] in cached and (key[0], key[1]) in plugins:
                    out[key] = value
        return out
