"""What alerting reads besides samples (asyncpg): silences, runtime dependencies, plugin_metrics values."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pluginmon.storage.alert_state import QUERY_TIMEOUT_SECONDS, Connection


@dataclass(frozen=True, slots=True)
class Silence:
    id: int
    tenant_id: str
    matchers: dict[str, str]  # alert label name -> shell glob
    starts_at: datetime
    ends_at: datetime
    created_by: str
    comment: str
    created_at: datetime


SILENCE_COLUMNS = (
    "id, tenant_id, matchers::text AS matchers, starts_at, ends_at, created_by, comment, created_at"
)


def silence_of(row: Mapping[str, Any]) -> Silence:
    """A row selected (or returned) with ``SILENCE_COLUMNS``."""
    return Silence(
        id=row["id"],
        tenant_id=row["tenant_id"],
        matchers={str(k): str(v) for k, v in json.loads(row["matchers"]).items()},
        starts_at=row["starts_at"],
        ends_at=row["ends_at"],
        created_by=row["created_by"],
        comment=row["comment"],
        created_at=row["created_at"],
    )


async def add_silence(
    conn: Connection,
    *,
    tenant_id: str,
    matchers: Mapping[str, str],
    ends_at: datetime,
    created_by: str,
    comment: str = "",
    starts_at: datetime | None = None,
    created_at: datetime | None = None,
) -> Silence:
    """The one write of a new silence (registry.alert_actions validates and audits it)."""
    row = await conn.fetchrow(
        f"""INSERT INTO alert_silences (tenant_id, matchers, starts_at, ends_at, created_by,
                                        comment, created_at)
            VALUES ($1, $2::jsonb, coalesce($3, now()), $4, $5, $6, coalesce($7, now()))
            RETURNING {SILENCE_COLUMNS}""",  # noqa: S608 - a constant column list
        tenant_id,
        json.dumps(dict(matchers), sort_keys=True),
        starts_at,
        ends_at,
        created_by,
        comment,
        created_at,
        timeout=QUERY_TIMEOUT_SECONDS,
    )
    assert row is not None
    return silence_of(row)


async def active_silences(conn: Connection, now: datetime) -> list[Silence]:
    rows = await conn.fetch(
        f"SELECT {SILENCE_COLUMNS} FROM alert_silences"  # noqa: S608 - a constant column list
        " WHERE starts_at <= $1 AND ends_at > $1 ORDER BY id",
        now,
        timeout=QUERY_TIMEOUT_SECONDS,
    )
    return [silence_of(r) for r in rows]


async def runtime_dependencies(conn: Connection) -> dict[tuple[str, str], tuple[str, ...]]:
    """(tenant, plugin name) -> the names of the plugins it needs at run time
    (plugin_dependencies, kind 'runtime'; both ends are in the same tenant by 001's keys).

    By name, not by id: alerting is keyed by (tenant, plugin, environment), and a plugin's
    name is unique in its tenant. Edges the dependency evaluation found on a cycle
    (``in_cycle``, sql/075) are left out: along a cycle, plugins that are all down would
    inhibit each other and nobody would be told.
    """
    rows = await conn.fetch(
        """SELECT p.tenant_id, p.name, array_agg(d.name ORDER BY d.name) AS deps
             FROM plugin_dependencies x
             -- (with tenant_id: the same rows, and on Citus joins inside a shard group)
             JOIN plugins p ON p.id = x.plugin_id AND p.tenant_id = x.tenant_id
             JOIN plugins d ON d.id = x.depends_on_plugin_id AND d.tenant_id = x.tenant_id
            WHERE x.kind = 'runtime' AND NOT x.in_cycle
            GROUP BY p.tenant_id, p.name""",
        timeout=QUERY_TIMEOUT_SECONDS,
    )
    return {(r["tenant_id"], r["name"]): tuple(r["deps"]) for r in rows}


async def latest_metric_values(
    conn: Connection,
    plugins: Sequence[tuple[int, str]],
    names: Sequence[str],
    since: datetime,
) -> dict[tuple[int, str, str], float]:
    """The newest plugin_metrics value per (plugin id, environment, metric name) since
    ``since``, for the given (plugin id, environment) pairs. The environment matters: one
    plugins row (tenant, name) serves every environment the plugin runs in."""
    if not plugins or not names:
        return {}
    rows = await conn.fetch(
        """SELECT DISTINCT ON (m.plugin_id, m.environment, m.metric_name)
                  m.plugin_id, m.environment, m.metric_name, m.value
             FROM plugin_metrics m
             JOIN unnest($1::bigint[], $2::text[]) AS w(plugin_id, environment)
               ON m.plugin_id = w.plugin_id AND m.environment = w.environment
            WHERE m.metric_name = ANY($3::text[]) AND m."timestamp" >= $4
            ORDER BY m.plugin_id, m.environment, m.metric_name, m."timestamp" DESC""",
        [p[0] for p in plugins],
        [p[1] for p in plugins],
        list(names),
        since,
        timeout=QUERY_TIMEOUT_SECONDS,
    )
    return {(r["plugin_id"], r["environment"], r["metric_name"]): r["value"] for r in rows}
