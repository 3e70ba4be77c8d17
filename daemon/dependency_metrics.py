"""``pluginmon_plugin_dependencies_unsatisfied{tenant,plugin,environment}``: the runtime
dependencies of each plugin that are unsatisfied or conflicting, from the registry job's
latest recompute (registry/dependencies.py), built at scrape time."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

METRIC_NAME = "pluginmon_plugin_dependencies_unsatisfied"


class DependencyGauge(Collector):
    """Holds the latest counts; a plugin whose dependencies are gone loses its series."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._counts: Mapping[tuple[str, str, str], int] = {}
        registry.register(self)

    def update(self, counts: Mapping[tuple[str, str, str], int]) -> None:
        """Replace the counts: (tenant, plugin, environment) -> unsatisfied runtime edges."""
        self._counts = dict(counts)

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            METRIC_NAME,
            "Runtime dependencies of the plugin that are not satisfied in the environment "
            "(missing, disabled, out of range, conflicting or on a cycle); dev ones never count.",
            labels=["tenant", "plugin", "environment"],
        )
        for (tenant, plugin, environment), count in sorted(self._counts.items()):
            family.add_metric([tenant, plugin, environment], float(count))
        yield family
