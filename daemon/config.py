"""The daemon's whole configuration: settings and their sections as the collaborators' dataclasses."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pluginmon.alerts.health import HealthConfig
from pluginmon.alerts.rules import AlertmanagerConfig, Rule, WebhookConfig
from pluginmon.collectors.models import PluginSpec
from pluginmon.daemon.settings import Settings, load_settings
from pluginmon.storage.backend import Retention


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    settings: Settings
    plugins: tuple[PluginSpec, ...]
    rules: tuple[Rule, ...]
    webhooks: tuple[WebhookConfig, ...]
    alertmanager: AlertmanagerConfig | None
    health: HealthConfig
    retention: Retention


def resolve(settings: Settings) -> DaemonConfig:
    """The validated settings' sections as plugins, rules, receivers, health and retention;
    ConfigError when the storage layer refuses the retention."""
    alerts = settings.alerts
    return DaemonConfig(
        settings=settings,
        plugins=tuple(p.to_spec() for p in settings.plugins),
        rules=alerts.to_rules(),
        webhooks=alerts.to_webhooks(),
        alertmanager=alerts.to_alertmanager(),
        health=settings.health.to_config(),
        retention=settings.retention.to_retention(),
    )


def load(config_path: Path | None) -> DaemonConfig:
    """Everything ``run`` needs; ConfigError lists every problem, each naming its field."""
    return resolve(load_settings(config_path))
