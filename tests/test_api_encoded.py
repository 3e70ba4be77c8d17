"""The plugin responses serialized from the registry's dataclasses (daemon.api_models.Encoded)
are exactly the response models' JSON: same keys, same order, same values, for every kind of
value a field can hold (None, a schema, dependencies, several environments, fractions)."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime, timedelta, timezone

from pluginmon.daemon.api_models import Items, PluginOut, plugin_json, plugins_json
from pluginmon.registry.plugins import EnvironmentState, Plugin

T0 = datetime(2026, 12, 1, 18, 0, 0, 123456, tzinfo=UTC)


def environment(name: str, **changes: object) -> EnvironmentState:
    state = EnvironmentState(
        environment=name,
        version="2.0.0-rc.1",
        status="installed",
        enabled=True,
        health_score=66.67,
        last_health_check=T0,
        cpu_usage=0.125,
        memory_usage=2**40,
        updated_at=T0 + timedelta(seconds=1),
    )
    return dataclasses.replace(state, **changes)  # type: ignore[arg-type]


FULL = Plugin(
    id=42,
    name="billing-sync",
    version="1.4.0",
    description='quotes " and \\ and ünïcödé\n',
    installed_from="git",
    installed_by="ci@example",
    installed_at=T0.astimezone(timezone(timedelta(hours=-5))),
    config_schema={"type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}},
    status="installed",
    enabled=False,
    dependencies=("auth", "db"),
    health_score=99.5,
    last_health_check=T0,
    cpu_usage=12.75,
    memory_usage=123_456_789,
    created_at=T0 - timedelta(days=3),
    updated_at=T0,
    environments=(
        environment("production"),
        environment("staging", version=None, health_score=None, last_health_check=None),
    ),
)
EMPTY = Plugin(
    id=1,
    name="bare",
    version=None,
    description=None,
    installed_from=None,
    installed_by=None,
    installed_at=None,
    config_schema=None,
    status="unknown",
    enabled=True,
    dependencies=(),
    health_score=None,
    last_health_check=None,
    cpu_usage=None,
    memory_usage=None,
    created_at=T0,
    updated_at=T0,
)


def test_one_plugin_is_the_models_json() -> None:
    for plugin in (FULL, EMPTY):
        encoded = plugin_json(plugin).body
        assert encoded == PluginOut.of(plugin).model_dump_json().encode()
        assert "id" not in json.loads(encoded)


def test_a_list_is_the_models_json() -> None:
    for found in ([], [FULL], [FULL, EMPTY, FULL]):
        model = Items[PluginOut](items=[PluginOut.of(p) for p in found])
        assert plugins_json(found).body == model.model_dump_json().encode()
