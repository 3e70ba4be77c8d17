"""Tenant isolation through /api/v1 with two tenants' tokens, for every resource, and the proof
that isolation is the database's: a handler that forgets its WHERE clause still cannot leak."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from pydantic import BaseModel

from pluginmon.daemon.api_http import Call, Dispatcher, Route, json_errors
from pluginmon.registry.policies import ApprovalPolicy
from pluginmon.registry.tokens import Role
from pluginmon.storage.queries import detect_tenant_scope
from tests.api_helpers import ApiHarness, api_server

INSTALL_NEEDS_APPROVAL = ApprovalPolicy(operation_types=frozenset({"install"}))


@dataclass(frozen=True)
class Seeded:
    plugin_only: str  # a plugin name only this tenant has
    operation: int
    approval: int
    fingerprint: str
    silence: int


async def _seed(api: ApiHarness, tenant: str) -> Seeded:
    writer, admin = f"writer-{tenant}", f"admin-{tenant}"
    for name in ("resizer", f"only-{tenant}"):
        reply = await api.call(
            "POST", "/api/v1/plugins", token=writer, body={"name": name, "version": tenant}
        )
        assert reply.status == 201, reply.body
    op = await api.call(
        "POST", "/api/v1/plugins/resizer/operations", token=writer, body={"type": "update"}
    )
    gated = await api.call(
        "POST", "/api/v1/plugins/resizer/operations", token=writer, body={"type": "install"}
    )
    assert gated.body["status"] == "awaiting_approval"
    (plugin,) = await api.fetch(
        "SELECT id FROM plugins WHERE tenant_id = $1 AND name = 'resizer'", tenant
    )
    fingerprint = f"fp-{tenant}"
    async with api.pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO plugin_alerts (tenant_id, plugin_id, environment, rule_name, fingerprint,"
            " severity, status, fired_at) VALUES ($1, $2, 'production', 'PluginCpuHigh', $3,"
            " 'warning', 'firing', now())",
            tenant,
            plugin["id"],
            fingerprint,
        )
    silence = await api.call(
        "POST",
        "/api/v1/silences",
        token=admin,
        body={"matchers": {"plugin": "resizer"}, "ends_at": "2030-01-01T00:00:00Z"},
    )
    assert silence.status == 201, silence.body
    return Seeded(
        plugin_only=f"only-{tenant}",
        operation=op.body["id"],
        approval=gated.body["approval_id"],
        fingerprint=fingerprint,
        silence=silence.body["id"],
    )


@pytest.fixture
async def two(migrated_db: str) -> AsyncIterator[tuple[ApiHarness, Seeded, Seeded]]:
    async with api_server(migrated_db, policies=[INSTALL_NEEDS_APPROVAL]) as api:
        for tenant in ("a", "b"):
            await api.token(f"writer-{tenant}", tenant=tenant, role=Role.WRITER)
            await api.token(f"admin-{tenant}", tenant=tenant, role=Role.ADMIN)
        yield api, await _seed(api, "a"), await _seed(api, "b")


async def _snapshot(api: ApiHarness, tenant: str) -> str:
    parts = []
    for table in (
        "plugins",
        "plugin_operations",
        "plugin_approvals",
        "plugin_alerts",
        "alert_silences",
        "audit_log",
    ):
        rows = await api.fetch(
            f"SELECT t::text AS r FROM {table} t WHERE tenant_id = $1 ORDER BY id",  # noqa: S608
            tenant,
        )
        parts.append(json.dumps([r["r"] for r in rows]))
    return "\n".join(parts)


async def test_another_tenants_objects_are_not_found_for_every_resource(
    two: tuple[ApiHarness, Seeded, Seeded],
) -> None:
    api, a, b = two
    b_before = await _snapshot(api, "b")
    attempts: list[tuple[str, str, Any]] = [
        ("GET", f"/plugins/{b.plugin_only}", None),
        ("PATCH", f"/plugins/{b.plugin_only}", {"version": "hijacked"}),
        ("PUT", f"/plugins/{b.plugin_only}/environments/production", {"version": "x"}),
        ("GET", f"/plugins/{b.plugin_only}/operations", None),
        ("POST", f"/plugins/{b.plugin_only}/operations", {"type": "update"}),
        ("GET", f"/operations/{b.operation}", None),
        ("PATCH", f"/operations/{b.operation}", {"status": "running"}),
        ("GET", f"/approvals/{b.approval}", None),
        ("POST", f"/approvals/{b.approval}/decision", {"decision": "approved"}),
        ("POST", f"/alerts/{b.fingerprint}/ack", None),
        ("POST", f"/silences/{b.silence}/expire", None),
    ]
    for method, path, body in attempts:
        reply = await api.call(method, "/api/v1" + path, token="admin-a", body=body)
        assert reply.status == 404, (method, path, reply.body)
        assert reply.error["code"] == "not_found"
    assert await _snapshot(api, "b") == b_before

    # Lists show the caller's own objects only.
    plugins = await api.call("GET", "/api/v1/plugins", token="admin-a")
    assert sorted((p["name"], p["version"]) for p in plugins.body["items"]) == [
        ("only-a", "a"),
        ("resizer", "a"),
    ]
    same_name = await api.call("GET", "/api/v1/plugins/resizer", token="admin-b")
    assert same_name.body["version"] == "b"
    operations = await api.call("GET", "/api/v1/operations", token="admin-a")
    a_ops = {
        r["id"] for r in await api.fetch("SELECT id FROM plugin_operations WHERE tenant_id = 'a'")
    }
    assert {o["id"] for o in operations.body["items"]} == a_ops
    approvals = await api.call("GET", "/api/v1/approvals", token="admin-a")
    assert [x["id"] for x in approvals.body["items"]] == [a.approval]
    alerts = await api.call("GET", "/api/v1/alerts", token="admin-a")
    assert [x["fingerprint"] for x in alerts.body["items"]] == [a.fingerprint]
    silences = await api.call("GET", "/api/v1/silences", token="admin-a")
    assert [x["id"] for x in silences.body["items"]] == [a.silence]
    entries = await api.call("GET", "/api/v1/audit?limit=1000", token="admin-a")
    ids = [e["id"] for e in entries.body["items"]]
    tenants = await api.fetch("SELECT DISTINCT tenant_id FROM audit_log WHERE id = ANY($1)", ids)
    assert [r["tenant_id"] for r in tenants] == ["a"]
    a_entries = await api.fetch("SELECT count(*) AS n FROM audit_log WHERE tenant_id = 'a'")
    assert len(ids) == a_entries[0]["n"]


class LeakOut(BaseModel):
    seen: dict[str, list[str]]
    updated: int
    insert_error: str


# Tenant tables as the API role may read them, with the query that names b's row directly.
_BY_ID = {
    "tenants": "SELECT id AS tenant_id FROM tenants",
    "plugins": "SELECT tenant_id FROM plugins WHERE id = ANY($1::bigint[])",
    "plugin_environments": "SELECT tenant_id FROM plugin_environments",
    "plugin_operations": "SELECT tenant_id FROM plugin_operations WHERE id = ANY($1::bigint[])",
    "plugin_approvals": "SELECT tenant_id FROM plugin_approvals WHERE id = ANY($1::bigint[])",
    "plugin_approval_decisions": "SELECT tenant_id FROM plugin_approval_decisions",
    "plugin_alerts": "SELECT tenant_id FROM plugin_alerts",
    "alert_silences": "SELECT tenant_id FROM alert_silences",
    "audit_log": "SELECT tenant_id FROM audit_log",
}


async def test_a_handler_that_forgets_the_where_clause_still_cannot_leak(
    two: tuple[ApiHarness, Seeded, Seeded],
) -> None:
    """A deliberately buggy handler on the real request path: no tenant filter anywhere."""
    api, _a, b = two
    b_ids = [
        r["id"]
        for r in await api.fetch(
            "SELECT id FROM plugins WHERE tenant_id = 'b'"
            " UNION ALL SELECT id FROM plugin_operations WHERE tenant_id = 'b'"
            " UNION ALL SELECT id FROM plugin_approvals WHERE tenant_id = 'b'"
        )
    ]
    (b_plugin,) = await api.fetch(
        "SELECT id FROM plugins WHERE tenant_id = 'b' AND name = $1", b.plugin_only
    )

    async def leaky(call: Call) -> LeakOut:
        seen: dict[str, list[str]] = {}
        for table, query in _BY_ID.items():
            args = [b_ids] if "$1" in query else []
            rows = await call.conn.fetch(query, *args)
            seen[table] = sorted({r["tenant_id"] for r in rows})
        status = await call.conn.execute(
            "UPDATE plugins SET enabled = false WHERE id = $1", b_plugin["id"]
        )
        try:
            async with call.conn.transaction():  # a savepoint: the request goes on
                await call.conn.execute(
                    "INSERT INTO plugins (tenant_id, name) VALUES ('b', 'planted')"
                )
            error = ""
        except Exception as exc:
            error = type(exc).__name__
        return LeakOut(seen=seen, updated=int(status.split()[-1]), insert_error=error)

    dispatcher = Dispatcher(api.pool, clock=api.clock)
    app = web.Application(middlewares=[json_errors])
    route = Route("GET", "/leak", "a bug", LeakOut, leaky, role=Role.READER)
    app.router.add_get("/leak", dispatcher.handler(route))
    root = web.Application()
    root.add_subapp("/api/v1", app)
    runner = web.AppRunner(root, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/api/v1/leak"
        async with (
            aiohttp.ClientSession() as session,
            session.get(
                url, headers={"Authorization": "Bearer " + api.issued["writer-a"]}
            ) as response,
        ):
            assert response.status == 200, await response.text()
            out = LeakOut.model_validate(await response.json())
    finally:
        await runner.cleanup()
    # Every table answered, and only with tenant a's rows (or nothing).
    assert set(out.seen) == set(_BY_ID)
    for table, tenants_seen in out.seen.items():
        assert tenants_seen in ([], ["a"]), (table, tenants_seen)
    assert out.seen["tenants"] == ["a"]
    assert out.updated == 0
    assert out.insert_error == "InsufficientPrivilegeError"  # new row violates row-level security
    rows = await api.fetch("SELECT enabled FROM plugins WHERE id = $1", b_plugin["id"])
    assert rows[0]["enabled"] is True
    assert await api.fetch("SELECT 1 FROM plugins WHERE name = 'planted'") == []


async def test_a_statement_prepared_as_the_owner_is_replanned_under_the_api_role(
    two: tuple[ApiHarness, Seeded, Seeded],
) -> None:
    """asyncpg caches prepared statements per connection, and the daemon's own jobs use the
    same pool as the API: a plan made as the owner (no row security) must not serve a request."""
    api, _a, _b = two
    query = "SELECT DISTINCT tenant_id FROM plugin_operations ORDER BY 1"
    async with api.pool.acquire() as conn:
        as_owner = [r["tenant_id"] for r in await conn.fetch(query)]
        assert as_owner == ["a", "b"]
        async with conn.transaction():
            # As the API enters a tenant (on Citus the tenant must also reach the workers).
            await (await detect_tenant_scope(conn)).enter(conn, "b", role="pluginmon_api")
            assert [r["tenant_id"] for r in await conn.fetch(query)] == ["b"]
        # And back: the transaction's role ended with it.
        assert [r["tenant_id"] for r in await conn.fetch(query)] == ["a", "b"]
