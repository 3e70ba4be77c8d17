"""What alerting reads besides samples (asyncpg): silences, runtime dependencies, plugin_metrics values."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

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


async def add_silence(
    conn: Connection,
    *,
    tenant_id: str,
    matchers: Mapping[str, str],
    ends_at: datetime,
    created_by: str,
    comment: str = "",
    starts_at: datetime | None = None,
) -> int:
    return int(
        await conn.fetchval(
            """INSERT INTO alert_silences (tenant_id, matchers, starts_at, ends_at, created_by, comment)
               VALUES ($1, $2::jsonb, coalesce($3, now()), $4, $5, $6) RETURNING id""",
            tenant_id,
            json.dumps(dict(matchers), sort_keys=True),
            starts_at,
            ends_at,
            created_by,
            comment,
            timeout=QUERY_TIMEOUT_SECONDS,
        )
    )


async def active_silences(conn: Connection, now: datetime) -> list[Silence]:
    rows = await conn.fetch(
        """SELECT id, tenant_id, matchers::text AS matchers, starts_at, ends_at, created_by, comment
             FROM alert_silences WHERE starts_at <= $1 AND ends_at > $1 ORDER BY id""",
        now,
        timeout=QUERY_TIMEOUT_SECONDS,
    )
    return [
        Silence(
            id=r["id"],
            tenant_id=r["tenant_id"],
            matchers={str(k): str(v) for k, v in json.loads(r["matchers"]).items()},
            starts_at=r["starts_at"],
            ends_at=r["ends_at"],
            created_by=r["created_by"],
            comment=r["comment"],
        )
        for r in rows
    ]


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
             JOIN plugins p ON p.id = x.plugin_id
             JOIN plugins d ON d.id = x.depends_on_plugin_id
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
