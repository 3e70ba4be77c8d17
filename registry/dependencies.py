"""Plugin dependencies in the database: declare and remove edges (audited), recompute a
tenant's per-environment results (registry.dependency_graph) into plugin_dependency_states
and the edges' summary columns, keep ``plugins.dependencies`` in step with the table, and
read the results back (the API, ``pluginmon deps``, the health gauge).

When it runs: in the transaction of every API change that can move a result (an edge, a
plugin, an environment, an operation; daemon/api_dependencies.py wraps those routes), and in
the registry's maintenance job for every tenant (which also repairs rows written by anyone
who bypassed the API, and writes the ``dependencies_unsatisfied`` gauge to plugin_metrics:
the API role may not write that table, so health and alerts follow within a maintenance
interval).

``plugins.dependencies`` (the seed's array of names) is kept a superset of the table: every
edge's dependency is named in it (added when an edge is declared, repaired by maintenance),
and removing the last edge to a plugin removes the name. Names of plugins that are not
registered (a catalogue entry may name them before they exist) stay, as they were written.

Over 500 lines on purpose: its eight SQL statements are written out beside the code that runs
them; the pure evaluation lives in registry.dependency_graph.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

import asyncpg

from pluginmon.alerts.health import DEPENDENCIES_UNSATISFIED
from pluginmon.registry import audit, plugins
from pluginmon.registry.actor import DAEMON, Actor
from pluginmon.registry.dependency_graph import (
    KINDS,
    RUNTIME,
    Deployment,
    Edge,
    EdgeState,
    Evaluation,
    Problem,
    evaluate,
)
from pluginmon.registry.errors import InvalidError, NotFoundError
from pluginmon.registry.semver import check_range

# The plugin_metrics gauge the health component and PluginDependencyUnsatisfied read.
GAUGE_NAME: Final = DEPENDENCIES_UNSATISFIED
NOT_DEPLOYED_PROBLEM: Final = "dependent_not_deployed"


@dataclass(frozen=True, slots=True)
class DependencyItem:
    """An edge as the API and the CLI show it, in one environment."""

    plugin: str
    dependency: str
    version_range: str
    kind: str
    environment: str
    satisfied: bool
    conflict: bool
    reason: str
    problem: str | None
    installed_version: str | None
    changed_at: datetime | None

    @property
    def gating(self) -> bool:
        return self.kind == RUNTIME and not self.satisfied


@dataclass(frozen=True, slots=True)
class Refresh:
    """What a recompute did: result rows written or removed, edges whose summary changed,
    and the unsatisfied runtime edges per (tenant, plugin, environment), zeros included."""

    states_written: int = 0
    states_removed: int = 0
    edges_changed: int = 0
    names_repaired: int = 0
    unsatisfied: Mapping[tuple[str, str, str], int] = field(default_factory=dict)


# --- declaring ------------------------------------------------------------------------------


async def set_dependency(
    conn: asyncpg.Connection,
    plugin_name: str,
    dependency_name: str,
    *,
    version_range: str,
    kind: str,
    tenant_id: str,
    actor: Actor,
    now: datetime,
) -> DependencyItem:
    """Declare (or change) that ``plugin_name`` needs ``dependency_name`` in ``version_range``
    (npm semver); one edge per pair (a new kind replaces the old one). Audited; the tenant's
    results are recomputed before returning the edge's result in the default environment."""
    version_range = check_range(version_range)
    if kind not in KINDS:
        raise InvalidError(f"kind must be one of {', '.join(KINDS)}", field="kind")
    if plugin_name == dependency_name:
        raise InvalidError("a plugin cannot depend on itself", field="dependency")
    plugin = await plugins.get_plugin(conn, plugin_name, for_update=True, tenant_id=tenant_id)
    target = await conn.fetchval("SELECT id FROM plugins WHERE name = $1", dependency_name)
    if target is None:
        raise NotFoundError(f"no plugin named {dependency_name!r}", field="dependency")
    before = await conn.fetchrow(
        """SELECT version_range, kind FROM plugin_dependencies
            WHERE plugin_id = $1 AND depends_on_plugin_id = $2 ORDER BY kind LIMIT 1""",
        plugin.id,
        target,
    )
    await conn.execute(
        "DELETE FROM plugin_dependencies WHERE plugin_id = $1 AND depends_on_plugin_id = $2 "
        "AND kind <> $3",
        plugin.id,
        target,
        kind,
    )
    await conn.execute(
        """INSERT INTO plugin_dependencies (tenant_id, plugin_id, depends_on_plugin_id,
                                            version_range, kind, created_at, updated_at)
           VALUES ($1, $2, $3, $4, $5, $6, $6)
           ON CONFLICT (tenant_id, plugin_id, depends_on_plugin_id, kind) DO UPDATE
              SET version_range = EXCLUDED.version_range, updated_at = EXCLUDED.updated_at""",
        tenant_id,
        plugin.id,
        target,
        version_range,
        kind,
        now,
    )
    # The seed's name list, in the same audited change (sorted, each name once).
    await conn.execute(
        """UPDATE plugins
              SET dependencies = (SELECT array_agg(DISTINCT n ORDER BY n)
                                    FROM unnest(dependencies || $2::text) n),
                  updated_at = $3
            WHERE id = $1 AND NOT ($2 = ANY (dependencies))""",
        plugin.id,
        dependency_name,
        now,
    )
    await audit.append(
        conn,
        tenant_id=tenant_id,
        actor=actor,
        action="plugin.dependency.set",
        entity_type="plugin_dependency",
        entity_id=f"{plugin_name}->{dependency_name}",
        plugin_id=plugin.id,
        plugin_name=plugin_name,
        occurred_at=now,
        before=None if before is None else dict(before),
        after={"version_range": version_range, "kind": kind},
    )
    await refresh(conn, now=now, tenant_id=tenant_id, actor=actor)
    [item] = [
        i
        for i in await list_dependencies(conn, plugin_name, environment=plugins.DEFAULT_ENVIRONMENT)
        if i.dependency == dependency_name
    ]
    return item


async def remove_dependency(
    conn: asyncpg.Connection,
    plugin_name: str,
    dependency_name: str,
    *,
    tenant_id: str,
    actor: Actor,
    now: datetime,
) -> None:
    """Remove the edge (either kind) and the name from ``plugins.dependencies``; audited."""
    plugin = await plugins.get_plugin(conn, plugin_name, for_update=True, tenant_id=tenant_id)
    removed = await conn.fetch(
        """DELETE FROM plugin_dependencies x USING plugins d
            WHERE x.plugin_id = $1 AND d.id = x.depends_on_plugin_id AND d.tenant_id = x.tenant_id
              AND d.name = $2
           RETURNING x.version_range, x.kind""",
        plugin.id,
        dependency_name,
    )
    if not removed:
        raise NotFoundError(
            f"plugin {plugin_name!r} declares no dependency on {dependency_name!r}",
            field="dependency",
        )
    await conn.execute(
        "UPDATE plugins SET dependencies = array_remove(dependencies, $2), updated_at = $3 "
        "WHERE id = $1",
        plugin.id,
        dependency_name,
        now,
    )
    await audit.append(
        conn,
        tenant_id=tenant_id,
        actor=actor,
        action="plugin.dependency.remove",
        entity_type="plugin_dependency",
        entity_id=f"{plugin_name}->{dependency_name}",
        plugin_id=plugin.id,
        plugin_name=plugin_name,
        occurred_at=now,
        before={"version_range": removed[0]["version_range"], "kind": removed[0]["kind"]},
    )
    await refresh(conn, now=now, tenant_id=tenant_id, actor=actor)


# --- reading --------------------------------------------------------------------------------

_ITEMS_SQL = """
SELECT p.name AS plugin, d.name AS dependency, x.version_range, x.kind,
       s.satisfied, s.conflict, s.reason, s.problem, s.installed_version, s.changed_at,
       $2::text AS environment
  FROM plugin_dependencies x
  JOIN plugins p ON p.id = x.plugin_id AND p.tenant_id = x.tenant_id
  JOIN plugins d ON d.id = x.depends_on_plugin_id AND d.tenant_id = x.tenant_id
  LEFT JOIN plugin_dependency_states s
         ON s.dependency_id = x.id AND s.tenant_id = x.tenant_id AND s.environment = $2
"""


def _item(row: asyncpg.Record) -> DependencyItem:
    if row["satisfied"] is None:
        # no result: the dependent is not deployed in this environment
        return DependencyItem(
            plugin=row["plugin"],
            dependency=row["dependency"],
            version_range=row["version_range"],
            kind=row["kind"],
            environment=row["environment"],
            satisfied=False,
            conflict=False,
            reason=f"{row['plugin']} is not deployed in {row['environment']}; nothing to check",
            problem=NOT_DEPLOYED_PROBLEM,
            installed_version=None,
            changed_at=None,
        )
    return DependencyItem(**dict(row))


async def list_dependencies(
    conn: asyncpg.Connection, plugin_name: str, *, environment: str
) -> list[DependencyItem]:
    """The plugin's edges with their results in ``environment`` (by dependency name)."""
    plugins.check_environment(environment)
    plugin_id = await plugins.plugin_id(conn, plugin_name)
    rows = await conn.fetch(
        _ITEMS_SQL + " WHERE x.plugin_id = $1 ORDER BY d.name", plugin_id, environment
    )
    return [_item(r) for r in rows]


async def list_problems(
    conn: asyncpg.Connection, *, environment: str | None = None, tenant_id: str | None = None
) -> list[tuple[str, DependencyItem]]:
    """(tenant, item) for every edge that is not satisfied, in ``environment`` or in every
    environment; ``tenant_id`` narrows a connection that sees every tenant (the CLI's)."""
    if environment is not None:
        plugins.check_environment(environment)
    rows = await conn.fetch(
        """SELECT x.tenant_id, p.name AS plugin, d.name AS dependency, x.version_range, x.kind,
                  s.satisfied, s.conflict, s.reason, s.problem, s.installed_version,
                  s.changed_at, s.environment
             FROM plugin_dependency_states s
             JOIN plugin_dependencies x ON x.id = s.dependency_id AND x.tenant_id = s.tenant_id
             JOIN plugins p ON p.id = x.plugin_id AND p.tenant_id = x.tenant_id
             JOIN plugins d ON d.id = x.depends_on_plugin_id AND d.tenant_id = x.tenant_id
            WHERE NOT s.satisfied
              AND ($1::text IS NULL OR s.environment = $1)
              AND ($2::text IS NULL OR s.tenant_id = $2)
            ORDER BY x.tenant_id, s.environment, d.name, p.name""",
        environment,
        tenant_id,
    )
    out = []
    for r in rows:
        values = dict(r)
        tenant = values.pop("tenant_id")
        out.append((tenant, DependencyItem(**values)))
    return out


# --- recomputing ----------------------------------------------------------------------------

_EDGES_SQL = """
SELECT x.tenant_id, x.id, p.name AS dependent, d.name AS dependency, x.version_range, x.kind,
       x.satisfied, x.conflict, x.conflict_reason, x.resolved_version, x.in_cycle
  FROM plugin_dependencies x
  JOIN plugins p ON p.id = x.plugin_id AND p.tenant_id = x.tenant_id
  JOIN plugins d ON d.id = x.depends_on_plugin_id AND d.tenant_id = x.tenant_id
 WHERE ($1::text IS NULL OR x.tenant_id = $1)
"""

# Per environment where there is a row; a plugin without any, in its catalogue environment.
_DEPLOYMENTS_SQL = """
SELECT p.tenant_id, p.id, p.name, e.environment, e.version, e.status, e.enabled
  FROM plugins p JOIN plugin_environments e ON e.plugin_id = p.id AND e.tenant_id = p.tenant_id
 WHERE ($1::text IS NULL OR p.tenant_id = $1)
UNION ALL
SELECT p.tenant_id, p.id, p.name, p.environment, p.version, p.status, p.enabled
  FROM plugins p
 WHERE ($1::text IS NULL OR p.tenant_id = $1)
   AND NOT EXISTS (SELECT 1 FROM plugin_environments e
                     WHERE e.plugin_id = p.id AND e.tenant_id = p.tenant_id)
"""

_STATES_SQL = """
SELECT dependency_id, environment, satisfied, conflict, problem, reason, installed_version
  FROM plugin_dependency_states
 WHERE ($1::text IS NULL OR tenant_id = $1)
"""

# Only changed results are written (compared in Python against _STATES_SQL): a maintenance
# run over an unchanged graph writes nothing.
_UPSERT_SQL = """
INSERT INTO plugin_dependency_states (dependency_id, tenant_id, environment, satisfied, conflict,
                                      problem, reason, installed_version, changed_at)
SELECT n.*, $9 FROM unnest($1::bigint[], $2::text[], $3::text[], $4::boolean[], $5::boolean[],
                           $6::text[], $7::text[], $8::text[]) AS n
ON CONFLICT (tenant_id, dependency_id, environment) DO UPDATE
   SET satisfied = EXCLUDED.satisfied, conflict = EXCLUDED.conflict, problem = EXCLUDED.problem,
       reason = EXCLUDED.reason, installed_version = EXCLUDED.installed_version,
       changed_at = EXCLUDED.changed_at
"""

_DELETE_SQL = """
DELETE FROM plugin_dependency_states s
 USING unnest($1::bigint[], $2::text[]) AS g(dependency_id, environment)
 WHERE s.dependency_id = g.dependency_id AND s.environment = g.environment
"""

_SUMMARY_SQL = """
UPDATE plugin_dependencies x
   SET satisfied = n.satisfied, conflict = n.conflict, conflict_reason = n.reason,
       resolved_version = n.resolved, in_cycle = n.in_cycle, checked_at = $7
  FROM unnest($1::bigint[], $2::boolean[], $3::boolean[], $4::text[], $5::text[], $6::boolean[])
       AS n(id, satisfied, conflict, reason, resolved, in_cycle)
 WHERE x.id = n.id
"""

# Every edge's dependency is named in plugins.dependencies (sorted, each once).
_NAMES_SQL = """
UPDATE plugins p
   SET dependencies = (SELECT array_agg(DISTINCT n ORDER BY n) FROM unnest(p.dependencies || e.names) n),
       updated_at = $2
  FROM (SELECT x.tenant_id, x.plugin_id, array_agg(d.name) AS names
          FROM plugin_dependencies x
          JOIN plugins d ON d.id = x.depends_on_plugin_id AND d.tenant_id = x.tenant_id
         WHERE ($1::text IS NULL OR x.tenant_id = $1)
         GROUP BY x.tenant_id, x.plugin_id) e
 WHERE p.id = e.plugin_id AND p.tenant_id = e.tenant_id AND NOT (e.names <@ p.dependencies)
RETURNING p.tenant_id, p.id, p.name, p.dependencies
"""

_GAUGE_SQL = """
INSERT INTO plugin_metrics ("timestamp", tenant_id, plugin_id, environment, metric_name,
                            metric_kind, value, labels)
SELECT $1, g.tenant_id, g.plugin_id, g.environment, $2, 'gauge', g.value, '{}'
  FROM unnest($3::text[], $4::bigint[], $5::text[], $6::double precision[])
       AS g(tenant_id, plugin_id, environment, value)
"""


async def refresh(
    conn: asyncpg.Connection,
    *,
    now: datetime,
    tenant_id: str | None = None,
    write_gauge: bool = False,
    actor: Actor = DAEMON,
) -> Refresh:
    """Recompute one tenant's results (``tenant_id``; on an API connection, its own) or every
    tenant's (the maintenance job's connection), storing only what changed; with
    ``write_gauge``, also the ``dependencies_unsatisfied`` gauge per (plugin, environment)."""
    repaired = await conn.fetch(_NAMES_SQL, tenant_id, now)
    for r in repaired:
        await audit.append(
            conn,
            tenant_id=r["tenant_id"],
            actor=actor,
            action="plugin.dependencies.sync",
            entity_type="plugin",
            entity_id=r["name"],
            plugin_id=r["id"],
            plugin_name=r["name"],
            occurred_at=now,
            after={"dependencies": list(r["dependencies"])},
        )
    edges_by_tenant: dict[str, list[Edge]] = defaultdict(list)
    summary_before: dict[int, tuple[Any, ...]] = {}
    for r in await conn.fetch(_EDGES_SQL, tenant_id):
        summary_before[r["id"]] = (
            r["satisfied"],
            r["conflict"],
            r["conflict_reason"],
            r["resolved_version"],
            r["in_cycle"],
        )
        edges_by_tenant[r["tenant_id"]].append(
            Edge(r["id"], r["dependent"], r["dependency"], r["version_range"], r["kind"])
        )
    if not edges_by_tenant and tenant_id is None:
        return Refresh(names_repaired=len(repaired))
    deployments: dict[str, list[Deployment]] = defaultdict(list)
    plugin_ids: dict[tuple[str, str], int] = {}
    for r in await conn.fetch(_DEPLOYMENTS_SQL, tenant_id):
        if r["tenant_id"] not in edges_by_tenant:
            continue
        plugin_ids[(r["tenant_id"], r["name"])] = r["id"]
        deployments[r["tenant_id"]].append(
            Deployment(r["name"], r["environment"], r["version"], r["status"], r["enabled"])
        )
    tenants = sorted(set(edges_by_tenant) | ({tenant_id} if tenant_id else set()))
    # Pure CPU (about a second at 50,000 edges): off the event loop, which serves /metrics
    # and the API meanwhile.
    rows, summaries, unsatisfied = await asyncio.to_thread(
        _evaluate_tenants, tenants, edges_by_tenant, deployments
    )
    current = {
        (r["dependency_id"], r["environment"]): tuple(r)[2:]
        for r in await conn.fetch(_STATES_SQL, tenant_id)
    }
    changed_rows = []
    for row in rows:
        key = (row[0], row[2])
        if current.pop(key, None) != row[3:]:
            changed_rows.append(row)
    if changed_rows:
        columns = list(zip(*changed_rows, strict=True))
        await conn.execute(_UPSERT_SQL, *(list(c) for c in columns), now)
    if current:  # results of environments (or edges) that are gone
        gone = sorted(current)
        await conn.execute(_DELETE_SQL, [g[0] for g in gone], [g[1] for g in gone])
    changed_summaries = [t for t in summaries if summary_before.get(t[0]) != t[1:]]
    if changed_summaries:
        summary_columns = list(zip(*changed_summaries, strict=True))
        await conn.execute(_SUMMARY_SQL, *(list(c) for c in summary_columns), now)
    if write_gauge and unsatisfied:
        keys = sorted(unsatisfied)
        await conn.execute(
            _GAUGE_SQL,
            now,
            GAUGE_NAME,
            [k[0] for k in keys],
            [plugin_ids[(k[0], k[1])] for k in keys],
            [k[2] for k in keys],
            [float(unsatisfied[k]) for k in keys],
        )
    return Refresh(
        states_written=len(changed_rows),
        states_removed=len(current),
        edges_changed=len(changed_summaries),
        names_repaired=len(repaired),
        unsatisfied=unsatisfied,
    )


def _evaluate_tenants(
    tenants: Sequence[str],
    edges_by_tenant: Mapping[str, Sequence[Edge]],
    deployments: Mapping[str, Sequence[Deployment]],
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], dict[tuple[str, str, str], int]]:
    """Result rows, edge summaries and unsatisfied counts of ``tenants``."""
    rows: list[tuple[Any, ...]] = []
    summaries: list[tuple[Any, ...]] = []
    unsatisfied: dict[tuple[str, str, str], int] = {}
    for tenant in tenants:
        edges = edges_by_tenant.get(tenant, [])
        result = evaluate(edges, deployments.get(tenant, ()))
        for s in result.states:
            rows.append(
                (
                    s.edge.id,
                    tenant,
                    s.environment,
                    s.satisfied,
                    s.conflict,
                    None if s.problem is None else s.problem.value,
                    s.reason,
                    None if s.found is None else s.found.version,
                )
            )
        summaries.extend(_summaries(edges, result))
        for (plugin, environment), count in result.unsatisfied.items():
            unsatisfied[(tenant, plugin, environment)] = count
    return rows, summaries, unsatisfied


def _summaries(edges: Sequence[Edge], result: Evaluation) -> list[tuple[Any, ...]]:
    """Per edge: satisfied everywhere its dependent is deployed (and deployed somewhere),
    conflict anywhere, the first problem's reason (production's first), the version that
    satisfies it (production's first), on a cycle anywhere."""
    by_edge: dict[int, list[EdgeState]] = defaultdict(list)
    for s in result.states:
        by_edge[s.edge.id].append(s)
    out = []
    for e in edges:
        states = sorted(
            by_edge.get(e.id, ()),
            key=lambda s: (s.environment != plugins.DEFAULT_ENVIRONMENT, s.environment),
        )
        problems = [s for s in states if not s.satisfied]
        satisfied = bool(states) and not problems
        conflict = any(s.conflict for s in states)
        if problems:
            reason: str | None = f"{problems[0].environment}: {problems[0].reason}"
        elif not states:
            reason = f"{e.dependent} is not deployed in any environment; nothing to check"
        else:
            reason = None
        resolved = next((s.found.version for s in states if s.satisfied and s.found), None)
        in_cycle = any(s.problem == Problem.CYCLE for s in states)
        out.append((e.id, satisfied, conflict, reason, resolved, in_cycle))
    return out
