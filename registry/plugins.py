"""The plugin catalogue: create, read, list and update plugins and their per-environment state.

Every query runs on a connection already scoped to one tenant (row-level security with
``pluginmon.tenant_id`` set, see daemon/api.py); none filters by tenant itself, so a missing
WHERE clause can never widen what a caller sees. Inserts name the tenant explicitly, and the
policies' WITH CHECK refuses any other.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, NamedTuple

import asyncpg
import jsonschema
import jsonschema.exceptions
import jsonschema.validators

from pluginmon.registry import audit
from pluginmon.registry.actor import Actor
from pluginmon.registry.errors import ConflictError, ForbiddenError, InvalidError, NotFoundError
from pluginmon.registry.plugin_sql import LIST_JSON, PAGE, SELECT, SELECT_OF_TENANT
from pluginmon.registry.schema_regex import unsafe_patterns

# The seed's Prisma enum (sql/001_core.sql plugin_source).
PLUGIN_SOURCES: Final = (
    "MARKETPLACE",
    "GIT_REPOSITORY",
    "NPM_REGISTRY",
    "LOCAL_FILE",
    "DOCKER_REGISTRY",
    "INTERNAL",
    "CUSTOM",
)
PLUGIN_STATUSES: Final = (
    "discovered",
    "installing",
    "installed",
    "updating",
    "failed",
    "uninstalling",
    "uninstalled",
)
DEFAULT_ENVIRONMENT = "production"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
ENVIRONMENT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")

# What PATCH may change. installed_by only from an operator token.
UPDATABLE: Final = frozenset(
    {
        "version",
        "description",
        "installed_from",
        "installed_by",
        "config_schema",
        "status",
        "enabled",
        "dependencies",
    }
)
ENVIRONMENT_UPDATABLE: Final = frozenset({"version", "status", "enabled"})
# What a dependency result reads of a plugin row (registry.dependencies: versions, statuses,
# enabled flags, and the names it keeps in ``dependencies``): an update that changes none of
# these moves no result.
DEPENDENCY_INPUTS: Final = frozenset({"version", "status", "enabled", "dependencies"})


@dataclass(frozen=True, slots=True)
class EnvironmentState:
    environment: str
    version: str | None
    status: str
    enabled: bool
    health_score: float | None
    last_health_check: datetime | None
    cpu_usage: float | None
    memory_usage: int | None
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class Plugin:
    id: int
    name: str
    version: str | None
    description: str | None
    installed_from: str | None
    installed_by: str | None
    installed_at: datetime | None
    config_schema: dict[str, Any] | None
    status: str
    enabled: bool
    dependencies: tuple[str, ...]
    health_score: float | None
    last_health_check: datetime | None
    cpu_usage: float | None
    memory_usage: int | None
    created_at: datetime
    updated_at: datetime
    environments: tuple[EnvironmentState, ...] = field(default=())

    def snapshot(self) -> dict[str, Any]:
        """The catalogue fields a change is audited with (no measurements)."""
        return {
            "version": self.version,
            "description": self.description,
            "installed_from": self.installed_from,
            "installed_by": self.installed_by,
            "config_schema": self.config_schema,
            "status": self.status,
            "enabled": self.enabled,
            "dependencies": list(self.dependencies),
        }


def check_name(name: str, *, field: str = "name") -> str:
    if not NAME_RE.fullmatch(name):
        raise InvalidError(
            f"{field} {name!r} must be 1-128 letters, digits, '.', '_' or '-' "
            "(starting with a letter or digit)",
            field=field,
        )
    return name


def check_environment(environment: str, *, field: str = "environment") -> str:
    if not ENVIRONMENT_RE.fullmatch(environment):
        raise InvalidError(
            f"environment {environment!r} must be 1-63 letters, digits, '.', '_' or '-' "
            "(starting with a letter or digit)",
            field=field,
        )
    return environment


def check_config_schema(schema: dict[str, Any]) -> None:
    """``schema`` must be a valid JSON Schema (its own ``$schema`` draft, else 2020-12) whose
    regexes RE2 compiles (config values are matched in linear time: registry.schema_regex)."""
    validator = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        validator.check_schema(schema)
    except jsonschema.exceptions.SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path)
        raise InvalidError(
            f"config_schema is not a valid JSON Schema"
            f"{' at ' + where if where else ''}: {exc.message}",
            field="config_schema",
            code="invalid_json_schema",
        ) from None
    unsafe = unsafe_patterns(schema)
    if unsafe:
        raise InvalidError("; ".join(unsafe), field="config_schema", code="invalid_json_schema")


def _check_values(values: Mapping[str, Any]) -> None:
    source = values.get("installed_from")
    if source is not None and source not in PLUGIN_SOURCES:
        raise InvalidError(
            f"installed_from must be one of {', '.join(PLUGIN_SOURCES)}", field="installed_from"
        )
    status = values.get("status")
    if status is not None and status not in PLUGIN_STATUSES:
        raise InvalidError(f"status must be one of {', '.join(PLUGIN_STATUSES)}", field="status")
    schema = values.get("config_schema")
    if schema is not None:
        check_config_schema(schema)
    for i, dependency in enumerate(values.get("dependencies") or ()):
        check_name(dependency, field=f"dependencies[{i}]")


def _ts(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def _environment(item: Mapping[str, Any]) -> EnvironmentState:
    updated = _ts(item["updated_at"])
    assert updated is not None
    return EnvironmentState(
        environment=item["environment"],
        version=item["version"],
        status=item["status"],
        enabled=item["enabled"],
        health_score=item["health_score"],
        last_health_check=_ts(item["last_health_check"]),
        cpu_usage=item["cpu_usage"],
        memory_usage=item["memory_usage"],
        updated_at=updated,
    )


def _plugin(row: asyncpg.Record) -> Plugin:
    schema = row["config_schema"]
    return Plugin(
        id=row["id"],
        name=row["name"],
        version=row["version"],
        description=row["description"],
        installed_from=row["installed_from"],
        installed_by=row["installed_by"],
        installed_at=row["installed_at"],
        config_schema=None if schema is None else json.loads(schema),
        status=row["status"],
        enabled=row["enabled"],
        dependencies=tuple(row["dependencies"]),
        health_score=row["health_score"],
        last_health_check=row["last_health_check"],
        cpu_usage=row["cpu_usage"],
        memory_usage=row["memory_usage"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        environments=tuple(_environment(e) for e in json.loads(row["environments"])),
    )


async def get_plugin(
    conn: asyncpg.Connection, name: str, *, for_update: bool = False, tenant_id: str | None = None
) -> Plugin:
    """The plugin ``name`` of the transaction's tenant. ``tenant_id`` (that same tenant) adds
    an explicit filter: row-level security gives the same rows, but Citus locks rows
    (``for_update``) only in a query it can route to one shard group by it."""
    if tenant_id is None:
        row = await conn.fetchrow(
            SELECT + " WHERE p.name = $1" + (" FOR UPDATE OF p" if for_update else ""), name
        )
    else:
        row = await conn.fetchrow(
            SELECT_OF_TENANT
            + " WHERE p.name = $1 AND p.tenant_id = $2"
            + (" FOR UPDATE OF p" if for_update else ""),
            name,
            tenant_id,
        )
    if row is None:
        raise NotFoundError(f"no plugin named {name!r}", field="name")
    return _plugin(row)


async def plugin_id(conn: asyncpg.Connection, name: str) -> int:
    """The id of the plugin ``name`` (NotFoundError when this tenant has none)."""
    found = await conn.fetchval("SELECT id FROM plugins WHERE name = $1", name)
    if found is None:
        raise NotFoundError(f"no plugin named {name!r}", field="name")
    return int(found)


async def get_plugin_by_id(conn: asyncpg.Connection, plugin_id: int) -> Plugin:
    row = await conn.fetchrow(SELECT + " WHERE p.id = $1", plugin_id)
    if row is None:
        raise NotFoundError(f"no plugin with id {plugin_id}", field="id")
    return _plugin(row)


def _check_status_filter(status: str | None) -> None:
    if status is not None and status not in PLUGIN_STATUSES:
        raise InvalidError(f"status must be one of {', '.join(PLUGIN_STATUSES)}", field="status")


async def list_plugins(
    conn: asyncpg.Connection,
    *,
    status: str | None = None,
    enabled: bool | None = None,
    limit: int = 500,
) -> list[Plugin]:
    _check_status_filter(status)
    rows = await conn.fetch(
        SELECT + PAGE,
        status,
        enabled,
        limit,
    )
    return [_plugin(r) for r in rows]


async def list_plugins_json(
    conn: asyncpg.Connection,
    *,
    status: str | None = None,
    enabled: bool | None = None,
    limit: int = 500,
) -> bytes:
    """:func:`list_plugins` as the API's JSON document ``{"items": [...]}``: each item is the
    Plugin without its id, field for field, with times in pydantic's form (see
    registry.plugin_sql.LIST_JSON)."""
    _check_status_filter(status)
    rows = await conn.fetch(LIST_JSON, status, enabled, limit)
    return ('{"items":[' + ",".join([row["item"] for row in rows]) + "]}").encode()


async def create_plugin(
    conn: asyncpg.Connection,
    *,
    tenant_id: str,
    actor: Actor,
    now: datetime,
    values: Mapping[str, Any],
) -> Plugin:
    """Register a plugin. ``values`` holds ``name`` and any of :data:`UPDATABLE`."""
    name = check_name(str(values["name"]))
    unknown = sorted(set(values) - UPDATABLE - {"name", "installed_at"})
    if unknown:
        raise InvalidError(f"unknown field {unknown[0]!r}", field=unknown[0], code="unknown_field")
    if values.get("installed_by") is not None and not actor.operator:
        raise ForbiddenError(
            "only an operator token may set installed_by (it defaults to the token's name)",
            field="installed_by",
        )
    _check_values(values)
    schema = values.get("config_schema")
    try:
        plugin_id = await conn.fetchval(
            """INSERT INTO plugins (tenant_id, name, version, description, status, enabled,
                                    installed_from, installed_by, installed_at, config_schema,
                                    dependencies, created_at, updated_at)
               VALUES ($1, $2, $3, $4, coalesce($5, 'installed'), coalesce($6, true),
                       $7::plugin_source, $8, coalesce($9::timestamptz, $12::timestamptz), $10::jsonb,
                       coalesce($11::text[], '{}'), $12, $12)
               RETURNING id""",
            tenant_id,
            name,
            values.get("version"),
            values.get("description"),
            values.get("status"),
            values.get("enabled"),
            values.get("installed_from"),
            values.get("installed_by") or actor.name,
            values.get("installed_at"),
            None if schema is None else json.dumps(schema),
            values.get("dependencies"),
            now,
        )
    except asyncpg.UniqueViolationError:
        raise ConflictError(
            f"a plugin named {name!r} exists already", field="name", code="already_exists"
        ) from None
    plugin = await get_plugin(conn, name)
    await audit.append(
        conn,
        tenant_id=tenant_id,
        actor=actor,
        action="plugin.create",
        entity_type="plugin",
        entity_id=name,
        plugin_id=plugin_id,
        plugin_name=name,
        occurred_at=now,
        after=plugin.snapshot(),
    )
    return plugin


class PluginUpdate(NamedTuple):
    plugin: Plugin
    # Whether a field of DEPENDENCY_INPUTS has a new value (the results need a recompute).
    dependency_inputs_changed: bool


async def update_plugin(
    conn: asyncpg.Connection,
    name: str,
    *,
    tenant_id: str,
    actor: Actor,
    now: datetime,
    changes: Mapping[str, Any],
) -> PluginUpdate:
    """Change the fields in ``changes`` (a subset of :data:`UPDATABLE`); audited with before
    and after. Setting ``config_schema`` to None removes the schema."""
    unknown = sorted(set(changes) - UPDATABLE)
    if unknown:
        raise InvalidError(f"unknown field {unknown[0]!r}", field=unknown[0], code="unknown_field")
    if "installed_by" in changes and not actor.operator:
        raise ForbiddenError("only an operator token may set installed_by", field="installed_by")
    for required in ("status", "enabled", "dependencies"):
        if required in changes and changes[required] is None:
            raise InvalidError(f"{required} cannot be null", field=required)
    _check_values(changes)
    before = await get_plugin(conn, name, for_update=True, tenant_id=tenant_id)
    if not changes:
        return PluginUpdate(before, dependency_inputs_changed=False)
    snapshot = before.snapshot()
    merged = {**snapshot, **changes}
    schema = merged["config_schema"]
    update = audit.Write(
        """UPDATE plugins SET version = $2, description = $3, installed_from = $4::plugin_source,
                  installed_by = $5, config_schema = $6::jsonb, status = $7, enabled = $8,
                  dependencies = $9::text[], updated_at = $10
            WHERE id = $1""",
        (
            before.id,
            merged["version"],
            merged["description"],
            merged["installed_from"],
            merged["installed_by"],
            None if schema is None else json.dumps(schema),
            merged["status"],
            merged["enabled"],
            list(merged["dependencies"]),
            now,
        ),
    )
    merged["dependencies"] = tuple(merged["dependencies"])
    after = dataclasses.replace(before, updated_at=now, **merged)
    after_snapshot = after.snapshot()
    # The update and its entry in one statement (one round trip).
    await audit.append(
        conn,
        write=update,
        tenant_id=tenant_id,
        actor=actor,
        action="plugin.update",
        entity_type="plugin",
        entity_id=name,
        plugin_id=before.id,
        plugin_name=name,
        occurred_at=now,
        before={k: snapshot[k] for k in changes},
        after={k: after_snapshot[k] for k in changes},
    )
    return PluginUpdate(
        after,
        dependency_inputs_changed=any(
            getattr(before, f) != getattr(after, f) for f in DEPENDENCY_INPUTS
        ),
    )


async def upsert_environment(
    conn: asyncpg.Connection,
    plugin: Plugin,
    environment: str,
    *,
    tenant_id: str,
    now: datetime,
    changes: Mapping[str, Any],
) -> tuple[EnvironmentState | None, EnvironmentState]:
    """Create or change the plugin's state in ``environment``; (before, after). Not audited:
    callers audit it as part of the change that moved it (an operation, a PUT)."""
    check_environment(environment)
    unknown = sorted(set(changes) - ENVIRONMENT_UPDATABLE)
    if unknown:
        raise InvalidError(f"unknown field {unknown[0]!r}", field=unknown[0], code="unknown_field")
    _check_values({"status": changes.get("status")})
    before = next((e for e in plugin.environments if e.environment == environment), None)
    row = await conn.fetchrow(
        """INSERT INTO plugin_environments (tenant_id, plugin_id, environment, version, status,
                                            enabled, created_at, updated_at)
           VALUES ($1, $2, $3, $4, coalesce($5, 'installed'), coalesce($6, true), $7, $7)
           ON CONFLICT (tenant_id, plugin_id, environment) DO UPDATE
              SET version = CASE WHEN $8 THEN EXCLUDED.version ELSE plugin_environments.version END,
                  status = coalesce($5, plugin_environments.status),
                  enabled = coalesce($6, plugin_environments.enabled),
                  updated_at = $7
           RETURNING environment, version, status, enabled, health_score, last_health_check,
                     cpu_usage, memory_usage, updated_at""",
        tenant_id,
        plugin.id,
        environment,
        changes.get("version"),
        changes.get("status"),
        changes.get("enabled"),
        now,
        "version" in changes,
    )
    assert row is not None
    return before, EnvironmentState(**dict(row))


def environment_snapshot(state: EnvironmentState | None) -> dict[str, Any] | None:
    if state is None:
        return None
    return {"version": state.version, "status": state.status, "enabled": state.enabled}


async def set_environment(
    conn: asyncpg.Connection,
    name: str,
    environment: str,
    *,
    tenant_id: str,
    actor: Actor,
    now: datetime,
    changes: Mapping[str, Any],
) -> EnvironmentState:
    """PUT one environment's state of a plugin (version, status, enabled); audited."""
    plugin = await get_plugin(conn, name, for_update=True, tenant_id=tenant_id)
    before, after = await upsert_environment(
        conn, plugin, environment, tenant_id=tenant_id, now=now, changes=changes
    )
    await audit.append(
        conn,
        tenant_id=tenant_id,
        actor=actor,
        action="plugin.environment.update",
        entity_type="plugin",
        entity_id=name,
        plugin_id=plugin.id,
        plugin_name=name,
        environment=environment,
        occurred_at=now,
        before=environment_snapshot(before),
        after=environment_snapshot(after),
    )
    return after
