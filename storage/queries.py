"""Data-plane helpers (asyncpg): tenant and plugin rows, the session's tenant.

How a transaction enters a tenant's row-level security scope is decided here, once per
backend (:class:`TenantScope`). On PostgreSQL and TimescaleDB a transaction names its tenant
with ``set_config('pluginmon.tenant_id', $1, true)``. On Citus the policies of a distributed
table run on the workers, in Citus's own connections, and ``set_config()`` never reaches them:
only a ``SET LOCAL`` issued under ``citus.propagate_set_commands = 'local'`` is replayed on
every worker connection of the transaction. ``SET`` takes no parameters, so there the tenant
is checked against the slug pattern and then quoted as a literal.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import asyncpg

# The same rule as the tenants_id_slug CHECK constraint.
TENANT_SLUG_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


def check_tenant_slug(tenant: str) -> str:
    if not TENANT_SLUG_RE.fullmatch(tenant):
        raise ValueError(
            f"tenant {tenant!r} is not a valid slug (lower-case letters, digits, '_' and '-', "
            "starting with a letter or digit, at most 63 characters)"
        )
    return tenant


# Plugins by (tenant, name) (ensure_plugins): the ids that exist, then the missing ones
# created. Plain statements, not one CTE: they also run on Citus, where plugins is
# distributed, and a lookup that finds every plugin (a restart) is one statement.
_EXISTING_PLUGINS_SQL = """
SELECT p.tenant_id, p.name, p.id
  FROM plugins p
  JOIN unnest($1::text[], $2::text[]) AS k(tenant_id, name)
    ON p.tenant_id = k.tenant_id AND p.name = k.name
"""
_ENSURE_TENANTS_SQL = """
INSERT INTO tenants (id, name)
SELECT t, t FROM unnest($1::text[]) AS t ORDER BY t
ON CONFLICT (id) DO NOTHING
RETURNING id
"""
# In key order, so two sessions creating overlapping sets wait for each other instead of
# deadlocking; a plugin another session created meanwhile is skipped (read back after).
_CREATE_PLUGINS_SQL = """
INSERT INTO plugins (tenant_id, name, environment, status, enabled)
SELECT k.tenant_id, k.name, k.environment, 'installed', true
  FROM unnest($1::text[], $2::text[], $3::text[]) AS k(tenant_id, name, environment)
 ORDER BY k.tenant_id, k.name
ON CONFLICT (tenant_id, name) DO NOTHING
RETURNING tenant_id, name, id
"""


# What the daemon creates on first sight of a plugin (its samples, scraped metrics or
# journaled alerts) is audited like a write through the API or the CLI (registry.audit;
# sql/030's trigger chains each entry): one entry per tenant and per plugin created, actor
# "daemon", in the transaction that creates them, in tenant order (each tenant's chain head
# is locked until commit: one order, no deadlock between two agents). Callers run it in a
# transaction of its own, not inside a longer one that would hold those heads.
_AUDIT_CREATED_SQL = """
INSERT INTO audit_log (tenant_id, occurred_at, actor, action, entity_type, entity_id,
                       plugin_id, plugin_name, environment, details)
SELECT e.tenant_id, now(), 'daemon', e.action, e.entity_type, e.entity_id, e.plugin_id,
       e.plugin_name, e.environment, '{"source": "discovered"}'::jsonb
  FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::text[],
              $7::text[]) WITH ORDINALITY
       AS e(tenant_id, action, entity_type, entity_id, plugin_id, plugin_name, environment, n)
 ORDER BY e.tenant_id, e.n
"""


def check_plugin_key(tenant: str, plugin: str) -> None:
    """ValueError naming the field when (tenant, plugin) cannot be a plugins row."""
    check_tenant_slug(tenant)
    if not plugin:
        raise ValueError("plugin name must not be empty")


async def ensure_plugins(
    conn: asyncpg.Connection, keys: Sequence[tuple[str, str, str]]
) -> dict[tuple[str, str], int]:
    """``plugins.id`` by (tenant, name) of each (tenant, plugin, environment) in ``keys``,
    creating the tenants and plugins that are missing (a new plugin gets the environment
    of its first key): what :func:`ensure_tenant_and_plugin` does for one, in one to four
    statements for all (an agent's first lookup of a thousand plugins was a thousand round
    trips, each its own commit).

    Every key must pass :func:`check_plugin_key` (ValueError otherwise, nothing written).
    Safe under concurrency: a plugin another session creates meanwhile is read back.
    """
    first: dict[tuple[str, str], str] = {}
    for tenant, plugin, environment in keys:
        check_plugin_key(tenant, plugin)
        first.setdefault((tenant, plugin), environment)
    if not first:
        return {}
    tenants = [t for t, _ in first]
    names = [n for _, n in first]
    found = {
        (r["tenant_id"], r["name"]): int(r["id"])
        for r in await conn.fetch(_EXISTING_PLUGINS_SQL, tenants, names)
    }
    missing = [k for k in first if k not in found]
    if not missing:
        return found
    async with conn.transaction():
        new_tenants = await conn.fetch(_ENSURE_TENANTS_SQL, sorted({t for t, _ in missing}))
        created = await conn.fetch(
            _CREATE_PLUGINS_SQL,
            [t for t, _ in missing],
            [n for _, n in missing],
            [first[k] for k in missing],
        )
        await _audit_created(conn, [str(r["id"]) for r in new_tenants], created, first)
    found.update(((r["tenant_id"], r["name"]), int(r["id"])) for r in created)
    raced = [k for k in missing if k not in found]
    if raced:
        # Created by another session after our lookup: committed by now (ON CONFLICT waited).
        rows = await conn.fetch(_EXISTING_PLUGINS_SQL, [t for t, _ in raced], [n for _, n in raced])
        found.update(((r["tenant_id"], r["name"]), int(r["id"])) for r in rows)
    lost = [k for k in missing if k not in found]
    if lost:
        tenant, plugin = lost[0]
        raise LookupError(
            f"plugin {plugin!r} of tenant {tenant!r} vanished while being created"
            f"{f' (and {len(lost) - 1} more)' if len(lost) > 1 else ''}"
        )
    return found


def refused_value(exc: BaseException) -> bool:
    """Whether the database (or the driver, encoding a parameter) refused a value itself: a
    data exception (SQLSTATE class 22, e.g. a NUL in a text value), a NOT NULL or a CHECK
    violation (23502, 23514). The same input fails again however often it is sent; other
    input in the same statement may pass. (Not the other integrity errors: a foreign key
    whose row another session just removed may hold on the next try.)"""
    if isinstance(exc, asyncpg.PostgresError):
        state = str(exc.sqlstate or "")
        return state[:2] == "22" or state in ("23502", "23514")
    # asyncpg's own DataError ("invalid input for query argument") is both of these
    return isinstance(exc, asyncpg.InterfaceError) and isinstance(exc, ValueError)


async def ensure_plugins_each(
    conn: asyncpg.Connection,
    keys: Sequence[tuple[str, str, str]],
    *,
    refused: Callable[[BaseException], bool] = refused_value,
) -> tuple[dict[tuple[str, str], int], dict[tuple[str, str], str]]:
    """:func:`ensure_plugins`, and when it fails with an error ``refused`` says one of the
    keys caused, each key alone, so that only the plugins the database refuses are left out
    (one NUL in a name held back the ids of a whole chunk, retried for ever).

    Returns the ids by (tenant, name) and, for each refused plugin, the database's reason.
    Any other error is raised.
    """
    try:
        return await ensure_plugins(conn, keys), {}
    except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        if not refused(exc):
            raise
    ids: dict[tuple[str, str], int] = {}
    reasons: dict[tuple[str, str], str] = {}
    for key in keys:
        try:
            ids.update(await ensure_plugins(conn, [key]))
        except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            if not refused(exc):
                raise
            reasons[(key[0], key[1])] = str(exc)
    return ids, reasons


async def _audit_created(
    conn: asyncpg.Connection,
    tenants: list[str],
    plugins: list[asyncpg.Record],
    environments: dict[tuple[str, str], str],
) -> None:
    entries = [(t, "tenant.create", "tenant", t, None, None, None) for t in tenants] + [
        (
            r["tenant_id"],
            "plugin.create",
            "plugin",
            r["name"],
            int(r["id"]),
            r["name"],
            environments[(r["tenant_id"], r["name"])],
        )
        for r in plugins
    ]
    if entries:
        await conn.execute(
            _AUDIT_CREATED_SQL, *(list(column) for column in zip(*entries, strict=True))
        )


async def ensure_tenant_and_plugin(
    conn: asyncpg.Connection, tenant: str, plugin: str, environment: str
) -> int:
    """``plugins.id`` of (tenant, plugin), creating the tenant and the plugin when missing.

    Safe under concurrency: when another session creates the same plugin at the same time,
    the insert yields to it and the committed row's id is returned.
    """
    return (await ensure_plugins(conn, [(tenant, plugin, environment)]))[(tenant, plugin)]


def where_given(
    filters: Iterable[tuple[str, object]], *, also: Iterable[str] = (), args: Sequence[object] = ()
) -> tuple[str, list[object]]:
    """`` WHERE ...`` of the ``filters`` whose value is not None and the conditions ``also``
    ("" when there are none), and the statement's arguments: ``args`` first (``$1``...),
    then each given filter's value, its ``$n`` put where its condition says ``{}``.

    A list's optional filters are sent this way rather than as "($1 IS NULL OR col = $1)":
    asyncpg prepares its statements, a prepared statement gets a generic plan after five
    runs, and in a generic plan that form can use no index on the column. Listing the few
    pending operations then read the tenant's whole history (registry.operations).
    """
    out = list(args)
    conditions: list[str] = []
    for condition, value in filters:
        if value is not None:
            out.append(value)
            conditions.append(condition.format(f"${len(out)}"))
    conditions.extend(also)
    return (f" WHERE {' AND '.join(conditions)}" if conditions else ""), out


def quote_literal(value: str) -> str:
    """``value`` as an SQL string literal under standard_conforming_strings (PostgreSQL's
    default since 9.1); refuses what that rule would read differently when it is off."""
    if "\\" in value or "\x00" in value:
        raise ValueError(f"{value!r} cannot be sent as an SQL literal (backslash or NUL)")
    return "'" + value.replace("'", "''") + "'"


def set_local_tenant_sql(tenant_id: str | None) -> str:
    """The statements that set ``pluginmon.tenant_id`` until the end of the transaction on
    every Citus node the transaction reaches (None: no tenant, so no rows)."""
    value = "" if tenant_id is None else check_tenant_slug(tenant_id)
    return (
        "SET LOCAL citus.propagate_set_commands = 'local'; "
        f"SET LOCAL pluginmon.tenant_id = {quote_literal(value)}"
    )


# Whether the database distributes queries: the extension installed in it, not merely loaded
# by the server (a database without it runs every query locally).
_DETECT_CITUS_SQL = "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus')"


@dataclass(frozen=True, slots=True)
class TenantScope:
    """How this database's backend scopes a transaction to a tenant.

    ``propagate_to_workers`` is true on Citus: the tenant is then also sent with ``SET LOCAL``
    (one more round trip per transaction), which Citus replays on the workers. Off Citus
    nothing changes: one ``set_config`` statement, parameterised.
    """

    propagate_to_workers: bool

    async def enter(
        self, conn: asyncpg.Connection, tenant_id: str | None, *, role: str | None = None
    ) -> None:
        """Inside the caller's transaction: row-level security for ``tenant_id`` (None: no
        tenant) from here on, as ``role`` when given."""
        if role is None:
            await conn.execute(
                "SELECT set_config('pluginmon.tenant_id', $1, true)", tenant_id or ""
            )
        else:
            await conn.execute(
                "SELECT set_config('role', $1, true), set_config('pluginmon.tenant_id', $2, true)",
                role,
                tenant_id or "",
            )
        await self.propagate(conn, tenant_id)

    async def propagate(self, conn: asyncpg.Connection, tenant_id: str | None) -> None:
        """After the caller's own ``set_config('pluginmon.tenant_id', ...)`` in this
        transaction: send the tenant to the workers too (nothing to do off Citus)."""
        if self.propagate_to_workers:
            await conn.execute(set_local_tenant_sql(tenant_id))


PLAIN_SCOPE = TenantScope(propagate_to_workers=False)
CITUS_SCOPE = TenantScope(propagate_to_workers=True)


async def detect_tenant_scope(conn: asyncpg.Connection) -> TenantScope:
    """The scope for ``conn``'s database: Citus's when the extension is installed in it."""
    return CITUS_SCOPE if await conn.fetchval(_DETECT_CITUS_SQL) else PLAIN_SCOPE


async def set_tenant(
    conn: asyncpg.Connection, tenant_id: str | None, *, local: bool = False
) -> None:
    """Scope row-level security on ``conn`` to ``tenant_id`` (None: no tenant, no rows).

    ``local=True`` lasts until the end of the current transaction, which is what a pooled
    connection wants; otherwise it lasts for the session. Roles bound to a tenant in
    tenant_role_bindings ignore this setting.
    """
    if tenant_id is not None:
        check_tenant_slug(tenant_id)
    if local:
        await (await detect_tenant_scope(conn)).enter(conn, tenant_id)
        return
    if await detect_tenant_scope(conn) is CITUS_SCOPE:
        # A session-wide SET is not replayed on the workers (Citus propagates SET LOCAL only).
        raise ValueError(
            "on Citus the tenant can only be set for a transaction (local=True), "
            "or by a login role bound to the tenant"
        )
    await conn.execute("SELECT set_config('pluginmon.tenant_id', $1, false)", tenant_id or "")
