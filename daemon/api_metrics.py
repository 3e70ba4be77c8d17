"""Prometheus metrics of the management API: requests, and operations by tenant, type and status."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

from pluginmon.daemon.backup_metrics import BackupMetrics
from pluginmon.daemon.dependency_metrics import DependencyGauge
from pluginmon.registry.lifecycle import REASON_RETRY_SCHEDULED
from pluginmon.registry.operations import Operation
from pluginmon.registry.vulnerabilities import OpenCount


class VulnerabilityGauges:
    """``pluginmon_plugin_vulnerabilities``: open findings per plugin and severity, as the
    registry job last counted them; a plugin with none left has no series."""

    def __init__(self) -> None:
        self._counts: tuple[OpenCount, ...] = ()

    def set(self, counts: Sequence[OpenCount]) -> None:
        self._counts = tuple(counts)

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "pluginmon_plugin_vulnerabilities",
            "Open vulnerability findings (distinct vulnerability and package) by severity.",
            labels=["tenant", "plugin", "environment", "severity"],
        )
        for c in self._counts:
            family.add_metric([c.tenant_id, c.plugin, c.environment, c.severity], float(c.count))
        yield family


# Operations run from seconds (a restart) to hours (a large install).
OPERATION_BUCKETS_SECONDS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600)
REQUEST_BUCKETS_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class ApiMetrics:
    """Registered on the registry passed in (the daemon's, or a test's own)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "pluginmon_api_requests",
            "Requests to /api/v1 by route template, method and status code.",
            ["method", "route", "code"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "pluginmon_api_request_duration_seconds",
            "Time to answer a request to /api/v1.",
            ["method", "route"],
            buckets=REQUEST_BUCKETS_SECONDS,
            registry=registry,
        )
        self.operations = Counter(
            "pluginmon_operations",
            "Operations that entered a status (created ones count as pending or "
            "awaiting_approval; a retry counts as pending again).",
            ["tenant", "type", "status"],
            registry=registry,
        )
        self.operation_duration = Histogram(
            "pluginmon_operation_duration_seconds",
            "How long an operation's attempt ran, observed when it ends.",
            ["type"],
            buckets=OPERATION_BUCKETS_SECONDS,
            registry=registry,
        )
        # Set by the registry job after each dependency recompute (daemon/api_wiring.py).
        self.dependencies = DependencyGauge(registry)
        self.backups = BackupMetrics(registry)
        self.vulnerabilities = VulnerabilityGauges()
        registry.register(self.vulnerabilities)

    def operation(self, op: Operation) -> None:
        """Count ``op`` in the status it has now; observe its duration when an attempt ended."""
        self.operations.labels(op.tenant_id, op.type, op.status.value).inc()
        attempt_ended = op.status.terminal or op.state.status_reason == REASON_RETRY_SCHEDULED
        if op.state.duration_ms is not None and attempt_ended:
            self.operation_duration.labels(op.type).observe(op.state.duration_ms / 1000.0)
