"""Turns validated settings into the collaborators' typed configs, gathering every problem."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pluginmon.alerts.errors import RuleError
from pluginmon.alerts.health import HealthConfig, parse_health_config
from pluginmon.alerts.rules import (
    AlertmanagerConfig,
    Rule,
    WebhookConfig,
    parse_alertmanager,
    parse_rules,
    parse_webhooks,
)
from pluginmon.collectors.models import PluginSpec
from pluginmon.collectors.specs import SpecError, parse_plugin_specs
from pluginmon.daemon.settings import ConfigError, Settings, load_settings, read_config_file
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


def _collect(problems: list[str], parse: Callable[[], Any]) -> Any:
    try:
        return parse()
    except (SpecError, RuleError) as exc:
        problems.extend(f"{where}: {what}" for where, what in exc.problems)
        return None


def _parse_sections(
    plugins: Any, alerts: Mapping[str, Any], health: Any, problems: list[str]
) -> tuple[Any, Any, Any, Any, Any]:
    specs = _collect(problems, lambda: parse_plugin_specs(plugins or []))
    rules = _collect(
        problems,
        lambda: parse_rules(
            alerts.get("rules") or [], include_builtins=bool(alerts.get("builtin_rules", True))
        ),
    )
    webhooks = _collect(problems, lambda: parse_webhooks(alerts.get("webhooks") or []))
    alertmanager = _collect(problems, lambda: parse_alertmanager(alerts.get("alertmanager")))
    health_config = _collect(problems, lambda: parse_health_config(health or None))
    return specs, rules, webhooks, alertmanager, health_config


def resolve(settings: Settings) -> DaemonConfig:
    """Parse plugins, rules, receivers and health settings; ConfigError lists every problem."""
    problems: list[str] = []
    alerts = {
        "rules": settings.alerts.rules,
        "builtin_rules": settings.alerts.builtin_rules,
        "webhooks": [w.as_table() for w in settings.alerts.webhooks],
        "alertmanager": settings.alerts.alertmanager,
    }
    specs, rules, webhooks, alertmanager, health = _parse_sections(
        settings.plugins, alerts, settings.health, problems
    )
    retention = None
    try:
        retention = Retention(**dict(settings.retention))
    except ValueError as exc:
        message = re.sub(r"^(retention\.\w+) ", r"\1: ", str(exc))
        problems.append(message if message.startswith("retention.") else f"retention: {message}")
    if problems or retention is None:
        raise ConfigError(problems)
    return DaemonConfig(
        settings=settings,
        plugins=specs,
        rules=rules,
        webhooks=webhooks,
        alertmanager=alertmanager,
        health=health,
        retention=retention,
    )


def load(config_path: Path | None) -> DaemonConfig:
    """Settings and every parsed section; ConfigError lists all problems, each naming its field.

    When the settings themselves are invalid, the file's plugin, alert and health sections are
    still checked, so one run of ``check-config`` reports everything.
    """
    try:
        settings = load_settings(config_path)
    except ConfigError as exc:
        problems = list(exc.problems)
        raw: dict[str, Any] = {}
        if config_path is not None and not any(p.startswith("--config") for p in problems):
            raw = read_config_file(config_path)
        alerts = raw.get("alerts")
        sections_ok = isinstance(alerts, Mapping) or alerts is None
        if sections_ok:
            # A section pydantic refused already has its problem: the parsers' view of
            # the same section would only repeat it in other words.
            refused = {_section(p) for p in problems}
            extra: list[str] = []
            # Best effort on a file whose shape pydantic already refused: those problems
            # are reported above; anything the parsers trip over here adds nothing.
            with contextlib.suppress(TypeError, AttributeError, ValueError):
                _parse_sections(raw.get("plugins"), alerts or {}, raw.get("health"), extra)
            problems += [p for p in extra if _section(p) not in refused]
        raise ConfigError(problems) from None
    return resolve(settings)


def _section(problem: str) -> str:
    """The top-level setting a problem is about: "plugins" for "plugins[1].match: ..."."""
    return re.split(r"[\[.:\s]", problem, maxsplit=1)[0]
