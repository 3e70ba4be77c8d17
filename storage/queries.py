"""Data-plane helpers (asyncpg): tenant and plugin rows, the session's tenant."""

from __future__ import annotations

import re

import asyncpg

# The same rule as the tenants_id_slug CHECK constraint.
TENANT_SLUG_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")

_ENSURE_PLUGIN_SQL = """
WITH tenant AS (
    INSERT INTO tenants (id, name) VALUES ($1, $1) ON CONFLICT (id) DO NOTHING
),
existing AS (
    SELECT id FROM plugins WHERE tenant_id = $1 AND name = $2
),
created AS (
    INSERT INTO plugins (tenant_id, name, environment, status, enabled)
    SELECT $1, $2, $3, 'installed', true
     WHERE NOT EXISTS (SELECT 1 FROM existing)
    ON CONFLICT (tenant_id, name) DO NOTHING
    RETURNING id
)
SELECT id FROM existing UNION ALL SELECT id FROM created
"""


def check_tenant_slug(tenant: str) -> str:
    if not TENANT_SLUG_RE.fullmatch(tenant):
        raise ValueError(
            f"tenant {tenant!r} is not a valid slug (lower-case letters, digits, '_' and '-', "
            "starting with a letter or digit, at most 63 characters)"
        )
    return tenant


async def ensure_tenant_and_plugin(
    conn: asyncpg.Connection, tenant: str, plugin: str, environment: str
) -> int:
    """``plugins.id`` of (tenant, plugin), creating the tenant and the plugin when missing.

    Safe under concurrency: when another session creates the same plugin at the same time,
    the insert yields to it and the committed row's id is returned.
    """
    check_tenant_slug(tenant)
    if not plugin:
        raise ValueError("plugin name must not be empty")
    plugin_id = await conn.fetchval(_ENSURE_PLUGIN_SQL, tenant, plugin, environment)
    if plugin_id is None:
        # Lost a race: the other session's row is committed by now (ON CONFLICT waited).
        plugin_id = await conn.fetchval(
            "SELECT id FROM plugins WHERE tenant_id = $1 AND name = $2", tenant, plugin
        )
    if plugin_id is None:
        raise LookupError(f"plugin {plugin!r} of tenant {tenant!r} vanished while being created")
    return int(plugin_id)


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
    await conn.execute("SELECT set_config('pluginmon.tenant_id', $1, $2)", tenant_id or "", local)
