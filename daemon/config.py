"""The daemon's whole configuration: settings, their sections as the collaborators' dataclasses,
and the checks of the machine that ``run`` would otherwise fail on at start."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pluginmon.alerts.health import HealthConfig
from pluginmon.alerts.rules import AlertmanagerConfig, Rule, WebhookConfig
from pluginmon.collectors.models import PluginSpec
from pluginmon.collectors.push import PushConfig
from pluginmon.collectors.scrape import ScrapeConfig
from pluginmon.daemon.config_schema import ConfigError
from pluginmon.daemon.preflight import preflight
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
    scrape: ScrapeConfig
    push: PushConfig


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
        scrape=settings.plugin_metrics.to_scrape(
            settings.plugins, sample_interval_seconds=settings.sample_interval_seconds
        ),
        push=settings.plugin_metrics.to_push(),
    )


def load(config_path: Path | None) -> DaemonConfig:
    """Everything ``run`` needs, checked as ``run`` would: ConfigError lists every problem,
    each naming its field; ``check-config`` and ``run`` share this one function."""
    settings = load_settings(config_path)
    problems = preflight(settings)
    try:
        config = resolve(settings)
    except ConfigError as exc:
        problems = [*exc.located, *problems]
    if problems:
        raise ConfigError(problems)
    return config
