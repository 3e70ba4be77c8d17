"""The plugin responses not built by the response models are exactly the models' JSON: one
plugin serialized from the registry's dataclass (daemon.api_models.Encoded), and a list
written by the database (registry.plugins.list_plugins_json). Same keys, same order, same
values, for every kind of value a field can hold (None, a schema, dependencies, several
environments, fractions, whole-second times)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import asyncpg
import pytest

from pluginmon.daemon.api_models import Items, PluginOut, plugin_json
from pluginmon.registry import plugins
from pluginmon.registry.errors import InvalidError
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
    installed_from="GIT_REPOSITORY",
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


def model_json(found: list[Plugin]) -> bytes:
    return Items[PluginOut](items=[PluginOut.of(p) for p in found]).model_dump_json().encode()


def keys_in_order(value: Any) -> Any:
    """``value`` with every object turned into its list of (key, value) pairs: comparing
    these compares key order too."""
    if isinstance(value, dict):
        return [(k, keys_in_order(v)) for k, v in value.items()]
    if isinstance(value, list):
        return [keys_in_order(v) for v in value]
    return value


@pytest.fixture
async def tenant_conn(migrated_db: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection in a transaction as the API's role for tenant ``a``, which has plugins
    holding every kind of value (tenant ``b`` has one too, which must not show)."""
    conn = await asyncpg.connect(migrated_db)
    try:
        await conn.execute("INSERT INTO tenants (id, name) VALUES ('a', 'a'), ('b', 'b')")
        rows = [
            # name, description, installed_from, installed_at, config_schema, status,
            # enabled, dependencies, health_score, last_health_check, cpu_usage,
            # memory_usage, created_at
            (
                "billing-sync",
                'quotes " and \\ and \u00fcn\u00efc\u00f6d\u00e9\n\t\x01',
                "GIT_REPOSITORY",
                T0,
                '{"type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}}',
                "installed",
                False,
                ["auth", "db"],
                66.665,
                T0,
                12.75,
                123_456_789,
                T0 - timedelta(days=3),
            ),
            (
                "bare",
                None,
                None,
                None,
                None,
                "discovered",
                True,
                [],
                None,
                None,
                None,
                None,
                T0.replace(microsecond=0),
            ),
            (
                "whole",
                "",
                "MARKETPLACE",
                T0.replace(microsecond=0),
                "{}",
                "failed",
                True,
                ["bare"],
                70.0,
                T0.replace(microsecond=0),
                1e-7,
                0,
                T0 + timedelta(microseconds=1),
            ),
            (
                "tiny",
                "x",
                "LOCAL_FILE",
                T0,
                None,
                "installed",
                True,
                [],
                0.0,
                T0,
                float("inf"),
                2**62,
                T0,
            ),
        ]
        for row in rows:
            await conn.execute(
                """INSERT INTO plugins (tenant_id, name, version, description, installed_from,
                                        installed_by, installed_at, config_schema, status,
                                        enabled, dependencies, health_score, last_health_check,
                                        cpu_usage, memory_usage, created_at, updated_at)
                   VALUES ('a', $1, '1.4.0', $2, $3::plugin_source, 'ci@example', $4,
                           $5::jsonb, $6, $7, $8, $9, $10, $11, $12, $13, $13)""",
                *row,
            )
        await conn.execute(
            """INSERT INTO plugins (tenant_id, name, created_at, updated_at)
               VALUES ('b', 'other-tenant', $1, $1)""",
            T0,
        )
        await conn.execute(
            """INSERT INTO plugin_environments (tenant_id, plugin_id, environment, version,
                                                status, enabled, health_score,
                                                last_health_check, cpu_usage, memory_usage,
                                                updated_at)
               SELECT 'a', id, e.name, e.version, 'installed', e.enabled, e.score, e.checked,
                      e.cpu, e.memory, e.updated
                 FROM plugins,
                      (VALUES ('staging', NULL, true, NULL::real, NULL::timestamptz,
                               NULL::float8, NULL::bigint, $1::timestamptz),
                              ('production', '2.0.0-rc.1', false, 66.67, $2, 0.125, 2^40,
                               $2)) AS e(name, version, enabled, score, checked, cpu, memory,
                                         updated)
                WHERE tenant_id = 'a' AND plugins.name IN ('billing-sync', 'whole')""",
            T0.replace(microsecond=0),
            T0,
        )
        async with conn.transaction():
            await conn.execute("SET LOCAL ROLE pluginmon_api")
            await conn.execute("SELECT set_config('pluginmon.tenant_id', 'a', true)")
            yield conn
    finally:
        await conn.close()


async def test_a_list_written_by_the_database_is_the_models_json(
    tenant_conn: asyncpg.Connection,
) -> None:
    cases: list[dict[str, Any]] = [
        {},
        {"limit": 2},
        {"status": "installed"},
        {"enabled": False},
        {"status": "failed", "enabled": False},
    ]
    for filters in cases:
        found = await plugins.list_plugins(tenant_conn, **filters)
        written = await plugins.list_plugins_json(tenant_conn, **filters)
        expected = model_json(found)
        assert keys_in_order(json.loads(written)) == keys_in_order(json.loads(expected)), filters
    everything = json.loads(await plugins.list_plugins_json(tenant_conn))["items"]
    assert [item["name"] for item in everything] == ["bare", "billing-sync", "tiny", "whole"]
    by_name = {item["name"]: item for item in everything}
    # Times are byte for byte the models' (pydantic's form), whole seconds included.
    assert by_name["whole"]["installed_at"] == "2026-12-01T18:00:00Z"
    assert by_name["whole"]["created_at"] == "2026-12-01T18:00:00.123457Z"
    assert by_name["tiny"]["installed_at"] == "2026-12-01T18:00:00.123456Z"
    assert by_name["billing-sync"]["environments"][1]["updated_at"] == "2026-12-01T18:00:00Z"
    # A real's two decimals, as the dataclass path rounds it.
    assert by_name["billing-sync"]["health_score"] == 66.67
    assert by_name["whole"]["health_score"] == 70.0
    # JSON has no Infinity: null, as pydantic writes it (the column's check lets it in).
    assert by_name["tiny"]["cpu_usage"] is None
    nothing = await plugins.list_plugins_json(tenant_conn, status="uninstalled")
    assert nothing == b'{"items":[]}'
    assert model_json([]) == nothing


async def test_a_list_refuses_an_unknown_status(tenant_conn: asyncpg.Connection) -> None:
    with pytest.raises(InvalidError) as caught:
        await plugins.list_plugins_json(tenant_conn, status="sideways")
    assert caught.value.field == "status"
