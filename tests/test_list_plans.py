"""The API's lists read the rows they return, not a tenant's whole history, under both plans.

asyncpg prepares its statements and PostgreSQL gives a prepared statement a generic plan after
five runs. Optional filters written "($1 IS NULL OR col = $1)" can use no index under that
plan: the audit entries of one target, the pending approvals, the open alerts were each found
by reading every row of the tenant newest first (storage.queries.where_given), and so were the
pending operations. Each test fills a tenant with a long history, then counts the rows the list
read from the table (pg_stat_xact_user_tables) with the plan forced each way.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import asyncpg
import pytest

from pluginmon.registry import alert_actions, approvals, audit, operations

PLANS = ["force_generic_plan", "force_custom_plan"]
HISTORY = 3000  # finished rows per tenant
T = TypeVar("T")


@pytest.fixture
async def conn(migrated_db: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(migrated_db)
    try:
        await connection.execute("INSERT INTO tenants (id, name) VALUES ('a', 'a'), ('b', 'b')")
        await connection.execute(
            """INSERT INTO plugins (tenant_id, name)
               SELECT t, 'p' || i FROM unnest(ARRAY['a', 'b']) AS t, generate_series(1, 20) AS i"""
        )
        yield connection
    finally:
        await connection.close()


async def read_as_tenant_a(
    conn: asyncpg.Connection, plan: str, table: str, listing: Callable[[], Awaitable[T]]
) -> tuple[T, int]:
    """``listing()`` as an API request of tenant a runs it, and the rows of ``table`` it read."""
    async with conn.transaction():
        await conn.execute(
            "SELECT set_config('plan_cache_mode', $1, true),"
            " set_config('role', 'pluginmon_api', true),"
            " set_config('pluginmon.tenant_id', 'a', true)",
            plan,
        )
        read = """SELECT coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0)
                    FROM pg_stat_xact_user_tables WHERE relname = $1"""
        before = await conn.fetchval(read, table)
        found = await listing()
        return found, await conn.fetchval(read, table) - before


async def audit_history(conn: asyncpg.Connection, tenant: str) -> None:
    """HISTORY entries of ``tenant``: actor ci updating plugins p1..p20 in turn."""
    await conn.execute(
        """INSERT INTO audit_log (tenant_id, actor, action, entity_type, entity_id)
           SELECT $1, 'ci', 'plugin.update', 'plugin', 'p' || (i % 20 + 1)
             FROM generate_series(1, $2) AS i""",
        tenant,
        HISTORY,
    )


@pytest.mark.parametrize("plan", PLANS)
async def test_the_audit_entries_of_one_target_are_read_through_the_target_index(
    conn: asyncpg.Connection, plan: str
) -> None:
    for tenant in ("a", "b"):
        await audit_history(conn, tenant)
        await conn.execute(
            """INSERT INTO audit_log (tenant_id, actor, action, entity_type, entity_id)
               VALUES ($1, 'alice', 'operation.approve', 'operation', '7')""",
            tenant,
        )
    await conn.execute("ANALYZE audit_log")

    async def listed(filters: audit.AuditQuery) -> tuple[list[Any], int]:
        return await read_as_tenant_a(conn, plan, "audit_log", lambda: audit.query(conn, filters))

    found, rows_read = await listed(audit.AuditQuery(target="operation/7"))
    assert [(e.tenant_id, e.actor, e.entity_id) for e in found] == [("a", "alice", "7")]
    assert rows_read < 50, rows_read
    # The other filters still filter: the newest first, a page of them.
    found, _ = await listed(audit.AuditQuery(target="plugin/p3", actor="ci", limit=10))
    assert len(found) == 10
    assert {(e.tenant_id, e.entity_id) for e in found} == {("a", "p3")}
    assert [e.id for e in found] == sorted((e.id for e in found), reverse=True)
    found, _ = await listed(audit.AuditQuery(target="plugin/p3", actor="alice"))
    assert found == []
    everything, _ = await listed(audit.AuditQuery(limit=5))
    assert [e.actor for e in everything] == ["alice", "ci", "ci", "ci", "ci"]


@pytest.mark.parametrize("plan", PLANS)
async def test_one_actors_or_one_actions_audit_entries_are_read_through_their_index(
    conn: asyncpg.Connection, plan: str
) -> None:
    """?actor= and ?action= (sql/131): a rare actor's entries among thousands of another's,
    a rare action's among thousands of another's, read without walking the log."""
    for tenant in ("a", "b"):
        await audit_history(conn, tenant)
        await conn.execute(
            """INSERT INTO audit_log (tenant_id, actor, action, entity_type, entity_id)
               VALUES ($1, 'alice', 'token.revoke', 'token', 'old-ci'),
                      ($1, 'alice', 'plugin.update', 'plugin', 'p3'),
                      ($1, 'bob', 'token.revoke', 'token', 'older-ci')""",
            tenant,
        )
    await conn.execute("ANALYZE audit_log")

    async def listed(filters: audit.AuditQuery) -> tuple[list[tuple[str, str, str, str]], int]:
        found, rows_read = await read_as_tenant_a(
            conn, plan, "audit_log", lambda: audit.query(conn, filters)
        )
        return [(e.tenant_id, e.actor, e.action, e.entity_id or "") for e in found], rows_read

    found, rows_read = await listed(audit.AuditQuery(actor="alice"))
    assert found == [
        ("a", "alice", "plugin.update", "p3"),
        ("a", "alice", "token.revoke", "old-ci"),
    ]
    assert rows_read < 50, rows_read
    found, rows_read = await listed(audit.AuditQuery(action="token.revoke"))
    assert found == [
        ("a", "bob", "token.revoke", "older-ci"),
        ("a", "alice", "token.revoke", "old-ci"),
    ]
    assert rows_read < 50, rows_read
    # both filters, and a page of the common actor, newest first
    found, _ = await listed(audit.AuditQuery(actor="alice", action="token.revoke"))
    assert found == [("a", "alice", "token.revoke", "old-ci")]
    found, _ = await listed(audit.AuditQuery(actor="ci", limit=5))
    assert [row[1] for row in found] == ["ci"] * 5


@pytest.mark.parametrize("plan", PLANS)
async def test_the_pending_approvals_are_read_without_the_decided_ones(
    conn: asyncpg.Connection, plan: str
) -> None:
    for tenant in ("a", "b"):
        await conn.execute(
            """INSERT INTO plugin_approvals (tenant_id, plugin_id, environment, request_type,
                                             status, requested_by)
               SELECT p.tenant_id, p.id, 'production', 'update', 'expired', 'ci'
                 FROM plugins p, generate_series(1, $2 / 20) WHERE p.tenant_id = $1""",
            tenant,
            HISTORY,
        )
    pending = await conn.fetch(
        """INSERT INTO plugin_approvals (tenant_id, plugin_id, environment, request_type,
                                         requested_by)
           SELECT p.tenant_id, p.id, 'production', 'update', 'ci'
             FROM plugins p WHERE p.name IN ('p3', 'p7') ORDER BY p.tenant_id, p.id
           RETURNING id, tenant_id"""
    )
    await conn.execute("ANALYZE plugin_approvals")

    found, rows_read = await read_as_tenant_a(
        conn,
        plan,
        "plugin_approvals",
        lambda: approvals.list_approvals(conn, status="pending"),
    )
    assert [a.id for a in found] == sorted(
        (r["id"] for r in pending if r["tenant_id"] == "a"), reverse=True
    )
    assert rows_read < 50, rows_read
    expired, _ = await read_as_tenant_a(
        conn,
        plan,
        "plugin_approvals",
        lambda: approvals.list_approvals(conn, status="expired", limit=7),
    )
    assert [a.status for a in expired] == ["expired"] * 7


@pytest.mark.parametrize("plan", PLANS)
async def test_the_open_alerts_are_read_without_the_resolved_ones(
    conn: asyncpg.Connection, plan: str
) -> None:
    for tenant in ("a", "b"):
        await conn.execute(
            """INSERT INTO plugin_alerts (tenant_id, plugin_id, environment, rule_name,
                                          fingerprint, severity, status, resolved_at)
               SELECT p.tenant_id, p.id, 'production', 'PluginHighCPU', md5(random()::text),
                      'warning', 'resolved', now()
                 FROM plugins p, generate_series(1, $2 / 20) WHERE p.tenant_id = $1""",
            tenant,
            HISTORY,
        )
        await conn.execute(
            """INSERT INTO plugin_alerts (tenant_id, plugin_id, environment, rule_name,
                                          fingerprint, severity, status)
               SELECT p.tenant_id, p.id, 'production', 'PluginDown', md5(random()::text),
                      CASE WHEN p.name = 'p3' THEN 'critical' ELSE 'warning' END,
                      CASE WHEN p.name = 'p3' THEN 'firing' ELSE 'pending' END
                 FROM plugins p WHERE p.tenant_id = $1 AND p.name IN ('p3', 'p7')""",
            tenant,
        )
    await conn.execute("ANALYZE plugin_alerts")

    async def listed(**filters: Any) -> tuple[list[tuple[str, str, str]], int]:
        found, rows_read = await read_as_tenant_a(
            conn, plan, "plugin_alerts", lambda: alert_actions.list_alerts(conn, **filters)
        )
        return sorted((a.plugin, a.status, a.severity) for a in found), rows_read

    found, rows_read = await listed(status="open")
    assert found == [("p3", "firing", "critical"), ("p7", "pending", "warning")]
    assert rows_read < 50, rows_read
    found, rows_read = await listed(status="firing")
    assert (found, rows_read < 50) == ([("p3", "firing", "critical")], True), rows_read
    found, rows_read = await listed(status="pending", severity="warning", plugin="p7")
    assert (found, rows_read < 50) == ([("p7", "pending", "warning")], True), rows_read
    resolved, _ = await listed(status="resolved", plugin="p7", limit=5)
    assert resolved == [("p7", "resolved", "warning")] * 5


@pytest.mark.parametrize("plan", PLANS)
async def test_the_open_operations_are_read_without_the_finished_ones(
    conn: asyncpg.Connection, plan: str
) -> None:
    """GET /operations?status=pending and the other open statuses read through
    idx_plugin_operations_open (sql/123, its predicate sent as constants)."""
    for tenant in ("a", "b"):
        await conn.execute(
            """INSERT INTO plugin_operations (tenant_id, plugin_id, environment,
                   operation_type, status, finished_at)
               SELECT p.tenant_id, p.id, 'production', 'update', 'succeeded', now()
                 FROM plugins p, generate_series(1, $2 / 40) WHERE p.tenant_id = $1""",
            tenant,
            HISTORY,
        )
    expected = {}
    for status in ("pending", "running", "awaiting_approval"):
        expected[status] = await conn.fetch(
            """INSERT INTO plugin_operations (tenant_id, plugin_id, environment,
                   operation_type, status)
               SELECT p.tenant_id, p.id, 'production', 'update', $1
                 FROM plugins p WHERE p.name IN ('p3', 'p7') ORDER BY p.tenant_id
               RETURNING id, tenant_id""",
            status,
        )
    await conn.execute("ANALYZE plugin_operations")

    async def listed(status: str, **filters: Any) -> tuple[list[int], int]:
        found, rows_read = await read_as_tenant_a(
            conn,
            plan,
            "plugin_operations",
            lambda: operations.list_operations(conn, status=status, **filters),
        )
        return [o.id for o in found], rows_read

    for status, rows in expected.items():
        ids, rows_read = await listed(status)
        assert ids == sorted((r["id"] for r in rows if r["tenant_id"] == "a"), reverse=True)
        assert rows_read < 50, (status, rows_read)
    ids, _ = await listed("pending", plugin="p3", environment="production", operation_type="update")
    assert len(ids) == 1
    finished, _ = await listed("succeeded", plugin="p3", operation_type="update")
    assert len(finished) == HISTORY // 40
