"""Alert actions through /api/v1: listing with filters, acknowledgement by fingerprint, silences
created, listed and expired; each change audited."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from pluginmon.registry.tokens import Role
from tests.api_helpers import ApiHarness, api_server


@pytest.fixture
async def api(migrated_db: str) -> AsyncIterator[ApiHarness]:
    async with api_server(migrated_db) as harness:
        await harness.token("oncall", tenant="a", role=Role.WRITER)
        await harness.token("viewer", tenant="a", role=Role.READER)
        for name in ("resizer", "codec"):
            await harness.call("POST", "/api/v1/plugins", token="oncall", body={"name": name})
        plugins = {r["name"]: r["id"] for r in await harness.fetch("SELECT id, name FROM plugins")}
        async with harness.pool.acquire() as conn:
            for plugin, rule, fingerprint, severity, status in (
                ("resizer", "PluginCpuHigh", "fp1", "warning", "firing"),
                ("resizer", "PluginDown", "fp2", "critical", "firing"),
                ("codec", "PluginCpuHigh", "fp3", "warning", "pending"),
                ("codec", "PluginMemoryHigh", "fp4", "warning", "resolved"),
            ):
                await conn.execute(
                    "INSERT INTO plugin_alerts (tenant_id, plugin_id, environment, rule_name,"
                    " fingerprint, severity, status, labels, resolved_at)"
                    " VALUES ('a', $1, 'production', $2, $3, $4, $5, $6::jsonb,"
                    " CASE WHEN $5 = 'resolved' THEN now() END)",
                    plugins[plugin],
                    rule,
                    fingerprint,
                    severity,
                    status,
                    json.dumps({"alertname": rule, "plugin": plugin}),
                )
        yield harness


async def _fingerprints(api: ApiHarness, query: str) -> list[str]:
    reply = await api.call("GET", "/api/v1/alerts" + query, token="viewer")
    assert reply.status == 200, reply.body
    return sorted(a["fingerprint"] for a in reply.body["items"])


async def test_list_filters(api: ApiHarness) -> None:
    assert await _fingerprints(api, "") == ["fp1", "fp2", "fp3", "fp4"]
    assert await _fingerprints(api, "?status=firing") == ["fp1", "fp2"]
    assert await _fingerprints(api, "?status=open") == ["fp1", "fp2", "fp3"]
    assert await _fingerprints(api, "?severity=critical") == ["fp2"]
    assert await _fingerprints(api, "?plugin=codec") == ["fp3", "fp4"]
    assert await _fingerprints(api, "?plugin=codec&status=resolved") == ["fp4"]
    reply = await api.call("GET", "/api/v1/alerts?plugin=resizer&severity=warning", token="viewer")
    (alert,) = reply.body["items"]
    assert (alert["rule"], alert["labels"]["plugin"], alert["environment"]) == (
        "PluginCpuHigh",
        "resizer",
        "production",
    )


async def test_acknowledge_by_fingerprint(api: ApiHarness) -> None:
    reader = await api.call("POST", "/api/v1/alerts/fp1/ack", token="viewer")
    assert reader.status == 403
    reply = await api.call("POST", "/api/v1/alerts/fp1/ack", token="oncall")
    assert reply.status == 200, reply.body
    assert (reply.body["status"], reply.body["acknowledged_by"]) == ("acknowledged", "oncall")
    assert reply.body["acknowledged_at"] == "2026-03-01T12:00:00Z"
    again = await api.call("POST", "/api/v1/alerts/fp1/ack", token="oncall")
    assert (again.status, again.body["status"]) == (200, "acknowledged")
    resolved = await api.call("POST", "/api/v1/alerts/fp4/ack", token="oncall")
    assert (resolved.status, resolved.error["code"]) == (404, "not_found")
    # A pending alert keeps its status, but is acknowledged (no notification will repeat).
    pending = await api.call("POST", "/api/v1/alerts/fp3/ack", token="oncall")
    assert (pending.body["status"], pending.body["acknowledged_by"]) == ("pending", "oncall")
    rows = await api.fetch(
        "SELECT entity_id, actor FROM audit_log WHERE action = 'alert.acknowledge' ORDER BY seq"
    )
    # One entry per change: the repeated acknowledgement changed nothing.
    assert [(r["entity_id"], r["actor"]) for r in rows] == [("fp1", "oncall"), ("fp3", "oncall")]
    (stored,) = await api.fetch(
        "SELECT acknowledged_by FROM plugin_alerts WHERE fingerprint = 'fp1'"
    )
    assert stored["acknowledged_by"] == "oncall"


async def test_silences_create_list_expire(api: ApiHarness) -> None:
    created = await api.call(
        "POST",
        "/api/v1/silences",
        token="oncall",
        body={
            "matchers": {"plugin": "resizer", "alertname": "PluginCpu*"},
            "ends_at": "2026-03-01T14:00:00Z",
            "comment": "deploy window",
        },
    )
    assert created.status == 201, created.body
    silence = created.body
    assert (silence["active"], silence["created_by"], silence["starts_at"]) == (
        True,
        "oncall",
        "2026-03-01T12:00:00Z",
    )
    future = await api.call(
        "POST",
        "/api/v1/silences",
        token="oncall",
        body={
            "matchers": {"plugin": "codec"},
            "starts_at": "2026-03-02T00:00:00Z",
            "ends_at": "2026-03-02T02:00:00Z",
        },
    )
    assert future.body["active"] is False
    active = await api.call("GET", "/api/v1/silences?active=true", token="viewer")
    assert [s["id"] for s in active.body["items"]] == [silence["id"]]
    every = await api.call("GET", "/api/v1/silences", token="viewer")
    assert len(every.body["items"]) == 2

    api.clock.advance(60)
    expired = await api.call("POST", f"/api/v1/silences/{silence['id']}/expire", token="oncall")
    assert expired.status == 200
    assert (expired.body["ends_at"], expired.body["active"]) == ("2026-03-01T12:01:00Z", False)
    again = await api.call("POST", f"/api/v1/silences/{silence['id']}/expire", token="oncall")
    assert (again.status, again.error["code"]) == (409, "already_expired")
    # A silence that has not started yet ends before it begins.
    ended = await api.call("POST", f"/api/v1/silences/{future.body['id']}/expire", token="oncall")
    assert ended.body["active"] is False
    active = await api.call("GET", "/api/v1/silences?active=true", token="viewer")
    assert active.body["items"] == []
    rows = await api.fetch(
        "SELECT action, entity_id FROM audit_log WHERE action LIKE 'silence.%' ORDER BY seq"
    )
    assert [(r["action"], r["entity_id"]) for r in rows] == [
        ("silence.create", str(silence["id"])),
        ("silence.create", str(future.body["id"])),
        ("silence.expire", str(silence["id"])),
        ("silence.expire", str(future.body["id"])),
    ]
    # What the alert engine reads back: the stored matchers and window.
    (stored,) = await api.fetch(
        "SELECT matchers::text AS m, ends_at FROM alert_silences WHERE id = $1", silence["id"]
    )
    assert stored["m"] == '{"plugin": "resizer", "alertname": "PluginCpu*"}'
