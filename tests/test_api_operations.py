"""Plugins and operations through /api/v1: the catalogue with every seed field, per-environment
state, the operation lifecycle with retries, backoff and the deadline, metrics, and one audit
entry per write."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import asyncpg
import pytest

from pluginmon.registry import maintenance
from pluginmon.registry.tokens import Role
from tests.api_helpers import ApiHarness, api_server

SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "properties": {"width": {"type": "integer", "minimum": 1}},
    "required": ["width"],
    "additionalProperties": False,
}


@pytest.fixture
async def api(migrated_db: str) -> AsyncIterator[ApiHarness]:
    async with api_server(migrated_db) as harness:
        await harness.token("ci", tenant="a", role=Role.WRITER)
        await harness.token("viewer", tenant="a", role=Role.READER)
        yield harness


async def _actions(api: ApiHarness) -> list[tuple[str, str]]:
    rows = await api.fetch(
        "SELECT action, actor FROM audit_log WHERE tenant_id = 'a' AND actor <> 'cli:test'"
        " ORDER BY seq"
    )
    return [(r["action"], r["actor"]) for r in rows]


async def test_catalogue_round_trip_with_every_seed_field(api: ApiHarness) -> None:
    body = {
        "name": "resizer",
        "version": "1.4.0",
        "description": "resizes images",
        "installed_from": "NPM_REGISTRY",
        "installed_at": "2026-02-01T08:00:00Z",
        "config_schema": SCHEMA,
        "status": "installing",
        "enabled": False,
        "dependencies": ["codec", "storage-s3"],
    }
    created = await api.call("POST", "/api/v1/plugins", token="ci", body=body)
    assert created.status == 201, created.body
    plugin = created.body
    for key, value in body.items():
        if key != "installed_at":
            assert plugin[key] == value, key
    assert plugin["installed_at"] == "2026-02-01T08:00:00Z"
    assert plugin["installed_by"] == "ci"  # the token's name
    for measured in ("health_score", "last_health_check", "cpu_usage", "memory_usage"):
        assert plugin[measured] is None

    read = await api.call("GET", "/api/v1/plugins/resizer", token="viewer")
    assert read.body == plugin
    listed = await api.call(
        "GET", "/api/v1/plugins?status=installing&enabled=false", token="viewer"
    )
    assert [p["name"] for p in listed.body["items"]] == ["resizer"]
    none = await api.call("GET", "/api/v1/plugins?status=installed", token="viewer")
    assert none.body["items"] == []

    patched = await api.call(
        "PATCH",
        "/api/v1/plugins/resizer",
        token="ci",
        body={"status": "installed", "enabled": True, "config_schema": None},
    )
    assert patched.status == 200
    assert (patched.body["status"], patched.body["enabled"], patched.body["config_schema"]) == (
        "installed",
        True,
        None,
    )
    assert patched.body["version"] == "1.4.0"  # untouched: not sent
    (row,) = await api.fetch(
        "SELECT before_state::text AS b, after_state::text AS a FROM audit_log"
        " WHERE action = 'plugin.update'"
    )
    assert json.loads(row["b"]) == {
        "status": "installing",
        "enabled": False,
        "config_schema": SCHEMA,
    }
    assert json.loads(row["a"]) == {"status": "installed", "enabled": True, "config_schema": None}
    assert await _actions(api) == [("plugin.create", "ci"), ("plugin.update", "ci")]


async def test_per_environment_state(api: ApiHarness) -> None:
    await api.call("POST", "/api/v1/plugins", token="ci", body={"name": "resizer"})
    staging = await api.call(
        "PUT",
        "/api/v1/plugins/resizer/environments/staging",
        token="ci",
        body={"version": "2.0.0"},
    )
    assert staging.status == 200, staging.body
    assert (staging.body["environment"], staging.body["version"], staging.body["status"]) == (
        "staging",
        "2.0.0",
        "installed",
    )
    await api.call(
        "PUT",
        "/api/v1/plugins/resizer/environments/production",
        token="ci",
        body={"version": "1.4.0", "enabled": False},
    )
    # An update operation that succeeds moves production to its version.
    op = await api.call(
        "POST",
        "/api/v1/plugins/resizer/operations",
        token="ci",
        body={"type": "update", "version": "1.5.0"},
    )
    oid = op.body["id"]
    await api.call("PATCH", f"/api/v1/operations/{oid}", token="ci", body={"status": "running"})
    done = await api.call(
        "PATCH", f"/api/v1/operations/{oid}", token="ci", body={"status": "succeeded"}
    )
    assert done.body["status"] == "succeeded"
    plugin = await api.call("GET", "/api/v1/plugins/resizer", token="viewer")
    environments = {e["environment"]: e for e in plugin.body["environments"]}
    assert {k: (v["version"], v["enabled"]) for k, v in environments.items()} == {
        "production": ("1.5.0", False),
        "staging": ("2.0.0", True),
    }
    actions = [a for a, _ in await _actions(api)]
    assert actions == [
        "plugin.create",
        "plugin.environment.update",
        "plugin.environment.update",
        "operation.create",
        "operation.transition",
        "operation.transition",
    ]


async def test_lifecycle_with_retries_backoff_and_metrics(api: ApiHarness) -> None:
    await api.call("POST", "/api/v1/plugins", token="ci", body={"name": "resizer"})
    op = await api.call(
        "POST",
        "/api/v1/plugins/resizer/operations",
        token="ci",
        body={"type": "update", "environment": "staging", "retry_limit": 2},
    )
    assert op.status == 201
    assert (op.body["status"], op.body["retry_count"], op.body["retry_limit"]) == ("pending", 0, 2)
    url = f"/api/v1/operations/{op.body['id']}"

    # Backoff ceilings 10 s, 20 s (default policy), jitter fixed at the middle: 7.5 s, 15 s.
    for attempt, backoff in ((0, 7.5), (1, 15.0)):
        running = await api.call("PATCH", url, token="ci", body={"status": "running"})
        assert running.body["status"] == "running", running.body
        api.clock.advance(3)
        failed = await api.call(
            "PATCH", url, token="ci", body={"status": "failed", "error": f"exit {attempt}"}
        )
        assert failed.status == 200
        body = failed.body
        assert (body["status"], body["retry_count"], body["error"], body["status_reason"]) == (
            "pending",
            attempt + 1,
            f"exit {attempt}",
            "retry_scheduled",
        )
        assert body["duration_ms"] == 3000
        early = await api.call("PATCH", url, token="ci", body={"status": "running"})
        assert (early.status, early.error["code"], early.error["field"]) == (
            409,
            "retry_backoff",
            "status",
        )
        api.clock.advance(backoff - 0.001)
        still = await api.call("PATCH", url, token="ci", body={"status": "running"})
        assert still.status == 409
        api.clock.advance(0.001)

    await api.call("PATCH", url, token="ci", body={"status": "running"})
    api.clock.advance(1.25)
    final = await api.call("PATCH", url, token="ci", body={"status": "failed", "error": "exit 2"})
    assert (final.body["status"], final.body["status_reason"], final.body["retry_count"]) == (
        "failed",
        "retries_exhausted",
        2,
    )
    assert final.body["duration_ms"] == 1250
    assert final.body["finished_at"] is not None
    illegal = await api.call("PATCH", url, token="ci", body={"status": "running"})
    assert (illegal.status, illegal.error["code"]) == (409, "illegal_transition")
    assert "from failed to running" in illegal.error["message"]

    sample = api.registry.get_sample_value
    labels = {"tenant": "a", "type": "update"}
    assert sample("pluginmon_operations_total", {**labels, "status": "failed"}) == 1
    assert sample("pluginmon_operations_total", {**labels, "status": "pending"}) == 3
    assert sample("pluginmon_operations_total", {**labels, "status": "running"}) == 3
    assert sample("pluginmon_operation_duration_seconds_count", {"type": "update"}) == 3
    assert sample("pluginmon_operation_duration_seconds_sum", {"type": "update"}) == 7.25

    transitions = [a for a, _ in await _actions(api) if a == "operation.transition"]
    assert len(transitions) == 6
    listed = await api.call(
        "GET", "/api/v1/plugins/resizer/operations?status=failed", token="viewer"
    )
    assert [o["id"] for o in listed.body["items"]] == [op.body["id"]]


async def test_cancel_from_pending_and_from_running(api: ApiHarness) -> None:
    await api.call("POST", "/api/v1/plugins", token="ci", body={"name": "resizer"})
    ids = []
    for _ in range(2):
        op = await api.call(
            "POST", "/api/v1/plugins/resizer/operations", token="ci", body={"type": "restore"}
        )
        ids.append(op.body["id"])
    cancelled = await api.call(
        "PATCH", f"/api/v1/operations/{ids[0]}", token="ci", body={"status": "cancelled"}
    )
    assert (cancelled.body["status"], cancelled.body["duration_ms"]) == ("cancelled", None)
    await api.call("PATCH", f"/api/v1/operations/{ids[1]}", token="ci", body={"status": "running"})
    api.clock.advance(2)
    stopped = await api.call(
        "PATCH", f"/api/v1/operations/{ids[1]}", token="ci", body={"status": "cancelled"}
    )
    assert (stopped.body["status"], stopped.body["duration_ms"]) == ("cancelled", 2000)


async def test_the_deadline_fails_a_running_operation_in_maintenance(api: ApiHarness) -> None:
    await api.call("POST", "/api/v1/plugins", token="ci", body={"name": "resizer"})
    op = await api.call(
        "POST",
        "/api/v1/plugins/resizer/operations",
        token="ci",
        body={"type": "install", "deadline_seconds": 60},
    )
    quiet = await api.call(
        "POST", "/api/v1/plugins/resizer/operations", token="ci", body={"type": "backup"}
    )
    url = f"/api/v1/operations/{op.body['id']}"
    started = await api.call("PATCH", url, token="ci", body={"status": "running"})
    assert started.body["deadline_at"] == "2026-03-01T12:01:00Z"

    async with api.pool.acquire() as conn:
        api.clock.advance(59)
        early = await maintenance.run(conn, now=api.clock())
        assert early.ran
        assert early.deadline_failed == ()
        api.clock.advance(2)
        # Another daemon holding the lock: this one does nothing.
        other = await asyncpg.connect(api.database_url)
        try:
            async with other.transaction():
                assert await other.fetchval(
                    "SELECT pg_try_advisory_xact_lock($1)", maintenance.REGISTRY_LOCK_KEY
                )
                skipped = await maintenance.run(conn, now=api.clock())
                assert not skipped.ran
        finally:
            await other.close()
        report = await maintenance.run(conn, now=api.clock())
    assert [o.id for o in report.deadline_failed] == [op.body["id"]]
    read = await api.call("GET", url, token="viewer")
    assert (read.body["status"], read.body["status_reason"], read.body["duration_ms"]) == (
        "failed",
        "deadline_exceeded",
        61_000,
    )
    # The pending one never started: no deadline runs against it.
    other_op = await api.call("GET", f"/api/v1/operations/{quiet.body['id']}", token="viewer")
    assert other_op.body["status"] == "pending"
    # Too late to report success.
    late = await api.call("PATCH", url, token="ci", body={"status": "succeeded"})
    assert late.status == 409
    assert (await _actions(api))[-1] == ("operation.deadline_exceeded", "daemon")
