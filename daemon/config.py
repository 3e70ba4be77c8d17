"""The daemon's whole configuration: settings, their sections as the collaborators' dataclasses,
the checks of the machine that ``run`` would otherwise fail on at start, and which settings a
reload (SIGHUP) applies."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final

from pydantic import BaseModel

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


# -- reload ---------------------------------------------------------------------------------------

# The settings a reload applies to the running daemon: the plugins to sample (and their
# metrics_* scrape settings), the alert rules and receivers ([alerts] as a whole), the health
# score's thresholds and weights, [plugin_metrics] (scrape defaults, limits, push TTLs) but
# for RESTART_ONLY. Every other setting is read once, by components built at start (the
# pool, the spools, the HTTP server, the scheduler's intervals): changing one needs a restart.
LIVE_SETTINGS: Final = frozenset({"plugins", "alerts", "health", "plugin_metrics"})
# Fields of live sections that components still read once at start: the scraper's connection
# pool is sized by max_concurrent_scrapes.
RESTART_ONLY: Final = (("plugin_metrics", "max_concurrent_scrapes"),)


def restart_needed(old: Settings, new: Settings) -> tuple[str, ...]:
    """The settings outside LIVE_SETTINGS whose value differs, one level deep
    (``retention.samples``), in declaration order. Only names: values may be secrets."""
    changed: list[str] = []
    for name in Settings.model_fields:
        if name in LIVE_SETTINGS:
            continue
        before, after = getattr(old, name), getattr(new, name)
        if before == after:
            continue
        if isinstance(before, BaseModel) and type(before) is type(after):
            changed += [
                f"{name}.{field}"
                for field in type(before).model_fields
                if getattr(before, field) != getattr(after, field)
            ]
        else:
            changed.append(name)
    for section, field in RESTART_ONLY:
        if getattr(getattr(old, section), field) != getattr(getattr(new, section), field):
            changed.append(f"{section}.{field}")
    return tuple(changed)


def with_live_sections(current: DaemonConfig, loaded: DaemonConfig) -> DaemonConfig:
    """What the daemon runs on after a reload: ``loaded``'s live sections (LIVE_SETTINGS),
    ``current``'s value for every other setting."""
    settings = current.settings.model_copy(
        update={name: getattr(loaded.settings, name) for name in LIVE_SETTINGS}
    )
    for section, field in RESTART_ONLY:
        kept = getattr(getattr(current.settings, section), field)
        updated = getattr(settings, section).model_copy(update={field: kept})
        settings = settings.model_copy(update={section: updated})
    return DaemonConfig(
        settings=settings,
        plugins=loaded.plugins,
        rules=loaded.rules,
        webhooks=loaded.webhooks,
        alertmanager=loaded.alertmanager,
        health=loaded.health,
        retention=current.retention,
        # Scrape targets from the reloaded plugins and [plugin_metrics], with the running
        # sample interval (their default interval) and scraper size.
        scrape=settings.plugin_metrics.to_scrape(
            settings.plugins, sample_interval_seconds=settings.sample_interval_seconds
        ),
        push=settings.plugin_metrics.to_push(),
    )
