"""Prometheus metrics of backup verification: results by name, and each plugin's newest
verified backup (from state the registry job refreshes)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from pluginmon.registry import backups
from pluginmon.registry.backup_readers import ReadResult
from pluginmon.registry.backup_schedule import LastVerified


class BackupMetrics:
    """``pluginmon_backup_verifications_total{result}`` and, from state the registry job
    refreshes, ``pluginmon_plugin_backup_last_verified_timestamp_seconds`` per plugin (a plugin
    whose backups are all gone drops out of the scrape)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.verifications = Counter(
            "pluginmon_backup_verifications",
            "Backup verifications by named result (verified, checksum_mismatch, not_found, "
            "unreachable, ...).",
            ["result"],
            registry=registry,
        )
        for result in ReadResult:
            self.verifications.labels(result.value)
        self._last: tuple[LastVerified, ...] = ()
        registry.register(_LastVerifiedCollector(self))

    def verified(self, verification: backups.Verification) -> None:
        self.verifications.labels(verification.result).inc()

    def set_last_verified(self, found: Sequence[LastVerified]) -> None:
        self._last = tuple(found)

    def last_verified(self) -> tuple[LastVerified, ...]:
        return self._last


class _LastVerifiedCollector(Collector):
    def __init__(self, metrics: BackupMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "pluginmon_plugin_backup_last_verified_timestamp_seconds",
            "When the newest backup of the plugin that passed verification was verified "
            "(Unix time; 0: none ever did).",
            labels=["tenant", "plugin", "environment"],
        )
        for last in self._metrics.last_verified():
            family.add_metric(
                [last.tenant_id, last.plugin, last.environment],
                0.0 if last.verified_at is None else last.verified_at.timestamp(),
            )
        yield family
