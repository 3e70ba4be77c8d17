"""Approvals through /api/v1: policies gate operations; four eyes (the requester's token never
decides), distinct identities, one rejection rejects, expiry cancels with approval_expired."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from pluginmon.registry import maintenance
from pluginmon.registry.policies import ApprovalPolicy
from pluginmon.registry.tokens import Role
from tests.api_helpers import ApiHarness, api_server
from tests.dbutil import is_citus

POLICIES = [
    ApprovalPolicy(
        operation_types=frozenset({"install", "update"}),
        environments=frozenset({"production"}),
        required_approvals=1,
        expires_after_seconds=3600,
    ),
    ApprovalPolicy(
        operation_types=frozenset({"uninstall"}),
        required_approvals=2,
        expires_after_seconds=600,
    ),
]


@pytest.fixture
async def api(migrated_db: str) -> AsyncIterator[ApiHarness]:
    async with api_server(migrated_db, policies=POLICIES) as harness:
        for name in ("ann", "bob", "cat"):
            await harness.token(name, tenant="a", role=Role.ADMIN)
        await harness.token("ci", tenant="a", role=Role.WRITER)
        await harness.token("ops", tenant=None, role=Role.ADMIN)
        created = await harness.call(
            "POST", "/api/v1/plugins", token="ci", body={"name": "resizer"}
        )
        assert created.status == 201
        yield harness


async def _request(
    api: ApiHarness, token: str, op_type: str, environment: str = "production"
) -> dict[str, Any]:
    reply = await api.call(
        "POST",
        "/api/v1/plugins/resizer/operations",
        token=token,
        body={"type": op_type, "environment": environment, "version": "2.0.0"},
    )
    assert reply.status == 201, reply.body
    body: dict[str, Any] = reply.body
    return body


async def _decide(
    api: ApiHarness, token: str, approval: int, decision: str, comment: str = ""
) -> Any:
    return await api.call(
        "POST",
        f"/api/v1/approvals/{approval}/decision",
        token=token,
        body={"decision": decision, "comment": comment},
    )


async def test_policy_gates_only_what_it_names(api: ApiHarness) -> None:
    gated = await _request(api, "ci", "update")
    assert (gated["status"], gated["approval_id"] is not None) == ("awaiting_approval", True)
    free = await _request(api, "ci", "update", environment="staging")
    assert (free["status"], free["approval_id"]) == ("pending", None)
    free = await _request(api, "ci", "restore")
    assert free["status"] == "pending"
    # Waiting for approval: it cannot run.
    reply = await api.call(
        "PATCH", f"/api/v1/operations/{gated['id']}", token="ci", body={"status": "running"}
    )
    assert (reply.status, reply.error["code"]) == (409, "illegal_transition")
    assert "awaiting_approval" in reply.error["message"]
    pending = await api.call("GET", "/api/v1/approvals?status=pending", token="ci")
    (approval,) = pending.body["items"]
    assert (approval["id"], approval["operation_id"], approval["status"]) == (
        gated["approval_id"],
        gated["id"],
        "pending",
    )
    assert (approval["requested_by"], approval["type"], approval["version"]) == (
        "ci",
        "update",
        "2.0.0",
    )
    assert approval["expires_at"] == "2026-03-01T13:00:00Z"


async def test_four_eyes_the_requester_never_approves(api: ApiHarness) -> None:
    op = await _request(api, "ann", "install")
    approval = op["approval_id"]
    own = await _decide(api, "ann", approval, "approved")
    assert (own.status, own.error["code"]) == (403, "self_approval")
    assert await api.fetch("SELECT 1 FROM plugin_approval_decisions") == []
    # A writer token is too weak to decide at all.
    weak = await _decide(api, "ci", approval, "approved")
    assert weak.status == 403

    reply = await _decide(api, "bob", approval, "approved", "looks fine")
    assert reply.status == 200, reply.body
    body = reply.body
    assert (body["status"], body["approvals"], body["decided_by"]) == ("approved", 1, "bob")
    assert [(d["decided_by"], d["decision"], d["comment"]) for d in body["decisions"]] == [
        ("bob", "approved", "looks fine")
    ]
    operation = await api.call("GET", f"/api/v1/operations/{op['id']}", token="ci")
    assert (operation.body["status"], operation.body["status_reason"]) == ("pending", "approved")
    again = await _decide(api, "cat", approval, "approved")
    assert (again.status, again.error["code"]) == (409, "not_pending")
    running = await api.call(
        "PATCH", f"/api/v1/operations/{op['id']}", token="ci", body={"status": "running"}
    )
    assert running.body["status"] == "running"
    entries = await api.fetch(
        "SELECT action, actor, details->>'decision' AS d FROM audit_log"
        " WHERE action LIKE 'approval.%' ORDER BY seq"
    )
    assert [(e["action"], e["actor"], e["d"]) for e in entries] == [
        ("approval.decide", "bob", "approved")
    ]


async def test_distinct_identities_are_counted(api: ApiHarness) -> None:
    op = await _request(api, "ci", "uninstall")  # 2 approvals
    approval = op["approval_id"]
    first = await _decide(api, "ann", approval, "approved")
    assert (first.body["status"], first.body["approvals"]) == ("pending", 1)
    twice = await _decide(api, "ann", approval, "approved")
    assert (twice.status, twice.error["code"]) == (409, "already_decided")
    # The same person through an operator token is still another token: identity is the token.
    second = await api.call(
        "POST",
        f"/api/v1/approvals/{approval}/decision",
        token="ops",
        headers={"X-Pluginmon-Tenant": "a"},
        body={"decision": "approved"},
    )
    assert (second.body["status"], second.body["approvals"]) == ("approved", 2)
    operation = await api.call("GET", f"/api/v1/operations/{op['id']}", token="ci")
    assert operation.body["status"] == "pending"


async def test_one_rejection_rejects_and_cancels(api: ApiHarness) -> None:
    op = await _request(api, "ci", "uninstall")
    approval = op["approval_id"]
    await _decide(api, "ann", approval, "approved")
    rejected = await _decide(api, "bob", approval, "rejected", "not during the sale")
    assert (rejected.body["status"], rejected.body["reason"]) == ("rejected", "not during the sale")
    operation = await api.call("GET", f"/api/v1/operations/{op['id']}", token="ci")
    assert (operation.body["status"], operation.body["status_reason"]) == (
        "cancelled",
        "approval_rejected",
    )
    late = await _decide(api, "cat", approval, "approved")
    assert late.status == 409


async def test_pending_approvals_expire_and_cancel_their_operation(api: ApiHarness) -> None:
    first = await _request(api, "ci", "uninstall")  # expires after 600 s
    second = await _request(api, "ci", "uninstall")
    api.clock.advance(600)
    late = await _decide(api, "ann", first["approval_id"], "approved")
    assert (late.status, late.error["code"]) == (409, "approval_expired")
    # Listing applies the rule of time first.
    pending = await api.call("GET", "/api/v1/approvals?status=pending", token="ci")
    assert pending.body["items"] == []
    expired = await api.call("GET", "/api/v1/approvals?status=expired", token="ci")
    assert sorted(a["id"] for a in expired.body["items"]) == sorted(
        [first["approval_id"], second["approval_id"]]
    )
    for op in (first, second):
        read = await api.call("GET", f"/api/v1/operations/{op['id']}", token="ci")
        assert (read.body["status"], read.body["status_reason"]) == (
            "cancelled",
            "approval_expired",
        )
    entries = await api.fetch(
        "SELECT actor FROM audit_log WHERE action = 'approval.expire' ORDER BY seq"
    )
    assert [e["actor"] for e in entries] == ["daemon", "daemon"]


async def test_the_daemon_expires_approvals_of_every_tenant(api: ApiHarness) -> None:
    await api.token("ci-b", tenant="b", role=Role.WRITER)
    await api.call("POST", "/api/v1/plugins", token="ci-b", body={"name": "resizer"})
    op_a = await _request(api, "ci", "uninstall")
    op_b = await _request(api, "ci-b", "uninstall")
    api.clock.advance(601)
    async with api.pool.acquire() as conn:
        report = await maintenance.run(conn, now=api.clock())
    assert sorted(a.tenant_id for a in report.approvals_expired) == ["a", "b"]
    rows = await api.fetch(
        "SELECT id, status, status_reason FROM plugin_operations WHERE id = ANY($1) ORDER BY id",
        [op_a["id"], op_b["id"]],
    )
    assert [(r["status"], r["status_reason"]) for r in rows] == [
        ("cancelled", "approval_expired"),
        ("cancelled", "approval_expired"),
    ]


async def test_withdrawing_a_gated_operation_cancels_its_approval(api: ApiHarness) -> None:
    op = await _request(api, "ci", "install")
    reply = await api.call(
        "PATCH", f"/api/v1/operations/{op['id']}", token="ci", body={"status": "cancelled"}
    )
    assert reply.body["status"] == "cancelled"
    approval = await api.call("GET", f"/api/v1/approvals/{op['approval_id']}", token="ci")
    assert approval.body["status"] == "cancelled"
    decided = await _decide(api, "bob", op["approval_id"], "approved")
    assert (decided.status, decided.error["code"]) == (409, "not_pending")


async def test_the_database_refuses_a_self_decision_too(api: ApiHarness) -> None:
    op = await _request(api, "ann", "install")
    (approval,) = await api.fetch(
        "SELECT id, requested_by_token_id FROM plugin_approvals WHERE id = $1", op["approval_id"]
    )
    async with api.pool.acquire() as conn:
        if is_citus(api.database_url):
            # Citus refuses triggers on distributed tables: the decision trigger is dropped
            # there (sql/100) and the CHECK on the approval itself is the backstop.
            with pytest.raises(
                asyncpg.CheckViolationError, match="plugin_approvals_not_self_approved"
            ):
                await conn.execute(
                    "UPDATE plugin_approvals SET status = 'approved', decided_by = requested_by,"
                    " decided_at = requested_at WHERE id = $1 AND tenant_id = 'a'",
                    approval["id"],
                )
            return
        with pytest.raises(asyncpg.CheckViolationError, match="requester cannot decide"):
            await conn.execute(
                "INSERT INTO plugin_approval_decisions (tenant_id, approval_id, decision,"
                " decided_by, decided_by_token_id) VALUES ('a', $1, 'approved', 'someone', $2)",
                approval["id"],
                approval["requested_by_token_id"],
            )
