"""/api/v1 over real HTTP: authentication, roles, operator tokens, the OpenAPI document, body
limits, and bad input of every kind getting its named error while changing nothing."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from openapi_spec_validator import validate

from pluginmon.registry import audit, tokens
from pluginmon.registry.actor import Actor
from pluginmon.registry.tokens import Role
from pluginmon.storage.errors import refused_where
from tests.api_helpers import ApiHarness, api_server


@pytest.fixture
async def api(migrated_db: str) -> AsyncIterator[ApiHarness]:
    async with api_server(migrated_db, max_body_bytes=64 * 1024) as harness:
        await harness.token("reader-a", tenant="a", role=Role.READER)
        await harness.token("writer-a", tenant="a", role=Role.WRITER)
        await harness.token("admin-a", tenant="a", role=Role.ADMIN)
        await harness.token("writer-b", tenant="b", role=Role.WRITER)
        await harness.token("ops", tenant=None, role=Role.ADMIN)
        created = await harness.call(
            "POST", "/api/v1/plugins", token="writer-a", body={"name": "resizer"}
        )
        assert created.status == 201, created.body
        yield harness


async def test_openapi_document_is_valid_openapi_3_1(api: ApiHarness) -> None:
    reply = await api.call("GET", "/api/v1/openapi.json")  # no token needed
    assert reply.status == 200
    document = reply.body
    validate(document)  # raises on an invalid document
    assert document["openapi"] == "3.1.0"
    paths = document["paths"]
    for path, method in (
        ("/api/v1/plugins", "post"),
        ("/api/v1/plugins", "get"),
        ("/api/v1/plugins/{name}", "patch"),
        ("/api/v1/plugins/{name}/operations", "post"),
        ("/api/v1/operations/{id}", "patch"),
        ("/api/v1/approvals", "get"),
        ("/api/v1/approvals/{id}/decision", "post"),
        ("/api/v1/alerts", "get"),
        ("/api/v1/alerts/{fingerprint}/ack", "post"),
        ("/api/v1/silences", "post"),
        ("/api/v1/audit", "get"),
    ):
        assert method in paths[path], (path, method)
    schemas = document["components"]["schemas"]
    # Unknown fields are refused, and the derived duration is not a request field.
    assert schemas["PluginCreate"]["additionalProperties"] is False
    assert "duration_ms" not in schemas["OperationUpdate"]["properties"]
    assert "duration_ms" in schemas["OperationOut"]["properties"]
    decision = paths["/api/v1/approvals/{id}/decision"]["post"]
    assert decision["x-pluginmon-role"] == "admin"
    assert {"401", "403", "404", "409", "422"} <= set(decision["responses"])
    status_param = next(
        p for p in paths["/api/v1/approvals"]["get"]["parameters"] if p["name"] == "status"
    )
    assert "pending" in json.dumps(status_param["schema"])


async def test_no_bad_or_revoked_token_gets_401(api: ApiHarness) -> None:
    good = api.issued["reader-a"]
    assert (await api.call("GET", "/api/v1/plugins", token="reader-a")).status == 200
    last = good[-1]
    wrong_secret = good[:-1] + ("A" if last != "A" else "B")
    unknown_key = tokens.TOKEN_PREFIX + "0" * 16 + good[len(tokens.TOKEN_PREFIX) + 16 :]
    for headers in (
        {},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer not-a-token"},
        {"Authorization": "Bearer " + wrong_secret},
        {"Authorization": "Bearer " + unknown_key},
    ):
        reply = await api.call("GET", "/api/v1/plugins", headers=headers)
        assert reply.status == 401, headers
        assert reply.error["code"] == "unauthorized"
        assert reply.headers["WWW-Authenticate"].startswith("Bearer")
        assert good[20:] not in json.dumps(reply.body)

    async with api.pool.acquire() as conn:
        info, revoked_now = await tokens.revoke_token(
            conn, "reader-a", actor=Actor(name="cli:test"), now=api.clock()
        )
    assert revoked_now
    assert info.revoked_at is not None
    reply = await api.call("GET", "/api/v1/plugins", token="reader-a")
    assert (reply.status, reply.error["message"]) == (401, "invalid or revoked token")
    # Other tokens are untouched.
    assert (await api.call("GET", "/api/v1/plugins", token="writer-a")).status == 200


async def test_a_role_too_weak_gets_403(api: ApiHarness) -> None:
    reply = await api.call("POST", "/api/v1/plugins", token="reader-a", body={"name": "x"})
    assert (reply.status, reply.error["code"]) == (403, "forbidden")
    assert "writer" in reply.error["message"]
    reply = await api.call(
        "POST", "/api/v1/approvals/1/decision", token="writer-a", body={"decision": "approved"}
    )
    assert reply.status == 403
    assert (await api.call("GET", "/api/v1/plugins/resizer", token="reader-a")).status == 200
    rows = await api.fetch("SELECT name FROM plugins ORDER BY name")
    assert [r["name"] for r in rows] == ["resizer"]


async def test_operator_token_names_its_tenant(api: ApiHarness) -> None:
    reply = await api.call("GET", "/api/v1/plugins", token="ops")
    assert (reply.status, reply.error["code"], reply.error["field"]) == (
        400,
        "tenant_required",
        "X-Pluginmon-Tenant",
    )
    reply = await api.call(
        "GET", "/api/v1/plugins", token="ops", headers={"X-Pluginmon-Tenant": "nobody"}
    )
    assert (reply.status, reply.error["code"]) == (404, "tenant_not_found")
    reply = await api.call(
        "GET", "/api/v1/plugins", token="ops", headers={"X-Pluginmon-Tenant": "Bad Slug"}
    )
    assert (reply.status, reply.error["code"]) == (400, "invalid_tenant")

    as_b = {"X-Pluginmon-Tenant": "b"}
    reply = await api.call(
        "POST",
        "/api/v1/plugins",
        token="ops",
        headers=as_b,
        body={"name": "codec", "installed_by": "installer-bot"},
    )
    assert reply.status == 201, reply.body
    assert reply.body["installed_by"] == "installer-bot"
    reply = await api.call("GET", "/api/v1/plugins", token="ops", headers=as_b)
    assert [p["name"] for p in reply.body["items"]] == ["codec"]
    reply = await api.call(
        "GET", "/api/v1/plugins", token="ops", headers={"X-Pluginmon-Tenant": "a"}
    )
    assert [p["name"] for p in reply.body["items"]] == ["resizer"]
    rows = await api.fetch("SELECT tenant_id, actor FROM audit_log WHERE action = 'plugin.create'")
    assert sorted((r["tenant_id"], r["actor"]) for r in rows) == [("a", "writer-a"), ("b", "ops")]

    # A tenant token may not set installed_by, nor name another tenant.
    reply = await api.call(
        "POST", "/api/v1/plugins", token="writer-a", body={"name": "x", "installed_by": "me"}
    )
    assert (reply.status, reply.error["field"]) == (403, "installed_by")
    reply = await api.call(
        "GET", "/api/v1/plugins", token="writer-a", headers={"X-Pluginmon-Tenant": "b"}
    )
    assert (reply.status, reply.error["code"]) == (403, "tenant_mismatch")


async def test_operator_writes_are_audited_in_the_tenants_chain_marked_as_operator(
    api: ApiHarness,
) -> None:
    as_b = {"X-Pluginmon-Tenant": "b"}
    reply = await api.call(
        "POST", "/api/v1/plugins", token="ops", headers=as_b, body={"name": "codec"}
    )
    assert reply.status == 201, reply.body
    reply = await api.call(
        "PATCH", "/api/v1/plugins/codec", token="writer-b", body={"version": "1.2.0"}
    )
    assert reply.status == 200, reply.body

    # In tenant b's chain (not _system), the operator marked, the tenant's own token not.
    rows = await api.fetch(
        "SELECT tenant_id, actor, action, details->'actor_operator' AS mark FROM audit_log"
        " WHERE entity_type = 'plugin' ORDER BY id"
    )
    assert [(r["tenant_id"], r["actor"], r["action"], r["mark"]) for r in rows] == [
        ("a", "writer-a", "plugin.create", None),
        ("b", "ops", "plugin.create", "true"),
        ("b", "writer-b", "plugin.update", None),
    ]
    for token, headers in (("ops", as_b), ("writer-b", {})):
        reply = await api.call("GET", "/api/v1/audit?target=plugin", token=token, headers=headers)
        assert reply.status == 200, reply.body
        assert [(e["actor"], e["actor_operator"]) for e in reply.body["items"]] == [
            ("writer-b", False),
            ("ops", True),
        ]
    # Only the operator token's own creation is in _system.
    system = await api.fetch(
        "SELECT actor, action, entity_id FROM audit_log WHERE tenant_id = '_system'"
    )
    assert [(r["action"], r["entity_id"]) for r in system] == [("token.create", "ops")]

    # The mark is hashed with the entry: the chains verify, and removing it is caught.
    async with api.pool.acquire() as conn:
        verdicts = {v.tenant_id: v for v in await audit.verify(conn)}
        assert all(v.intact for v in verdicts.values()), verdicts
        assert {"a", "b", "_system"} <= set(verdicts)
        async with conn.transaction():
            await conn.execute("ALTER TABLE audit_log DISABLE TRIGGER audit_log_append_only")
            await conn.execute(
                "UPDATE audit_log SET details = details - 'actor_operator'"
                " WHERE tenant_id = 'b' AND actor = 'ops'"
            )
            await conn.execute("ALTER TABLE audit_log ENABLE TRIGGER audit_log_append_only")
        (verdict,) = await audit.verify(conn, tenant_id="b")
    assert verdict.problem is not None
    assert verdict.problem.kind is audit.Breach.CHANGED


async def test_bodies_over_the_limit_get_413_and_change_nothing(api: ApiHarness) -> None:
    big = {"name": "huge", "description": "x" * (70 * 1024)}
    reply = await api.call("POST", "/api/v1/plugins", token="writer-a", body=big)
    assert (reply.status, reply.error["code"]) == (413, "body_too_large")

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: chunked
        yield b'{"name": "huge", "description": "'
        for _ in range(80):
            yield b"y" * 1024
        yield b'"}'

    async with api.session.post(
        api.base_url + "/api/v1/plugins",
        data=chunks(),
        headers={"Authorization": "Bearer " + api.issued["writer-a"]},
    ) as response:
        assert response.status == 413
        assert (await response.json())["error"]["code"] == "body_too_large"
    rows = await api.fetch("SELECT name FROM plugins WHERE name = 'huge'")
    assert rows == []


async def test_unknown_paths_and_methods_answer_in_the_error_shape(api: ApiHarness) -> None:
    reply = await api.call("GET", "/api/v1/nothing-here", token="reader-a")
    assert (reply.status, reply.error["code"]) == (404, "not_found")
    reply = await api.call("DELETE", "/api/v1/plugins", token="writer-a")
    assert (reply.status, reply.error["code"]) == (405, "method_not_allowed")
    reply = await api.call("GET", "/api/v1/operations/not-a-number", token="reader-a")
    assert reply.status == 404


async def test_request_id_and_source_address_reach_the_audit_entry(api: ApiHarness) -> None:
    reply = await api.call(
        "PATCH",
        "/api/v1/plugins/resizer",
        token="writer-a",
        body={"version": "1.1"},
        headers={"X-Request-Id": "req-42"},
    )
    assert reply.status == 200
    assert reply.headers["X-Request-Id"] == "req-42"
    (entry,) = await api.fetch(
        "SELECT actor, request_id, source_address, before_state::text AS b, after_state::text AS a"
        " FROM audit_log WHERE action = 'plugin.update'"
    )
    assert (entry["actor"], entry["request_id"], entry["source_address"]) == (
        "writer-a",
        "req-42",
        "127.0.0.1",
    )
    assert json.loads(entry["b"]) == {"version": None}
    assert json.loads(entry["a"]) == {"version": "1.1"}
    # A request id that is not sane is replaced, not echoed.
    reply = await api.call(
        "GET", "/api/v1/plugins", token="reader-a", headers={"X-Request-Id": "bad id with spaces"}
    )
    assert reply.headers["X-Request-Id"] != "bad id with spaces"
    assert len(reply.headers["X-Request-Id"]) == 32


_FUTURE = "2030-01-01T00:00:00Z"

# (method, path, token, body or raw bytes, status, code, field)
BAD_INPUT: list[tuple[str, str, str, Any, int, str, str | None]] = [
    ("POST", "/plugins", "writer-a", b'{"name": ', 400, "malformed_json", None),
    ("POST", "/plugins", "writer-a", b"\xff\xfe", 400, "malformed_json", None),
    ("POST", "/plugins", "writer-a", [1, 2], 422, "invalid_body", None),
    ("POST", "/plugins", "writer-a", {"name": "x", "colour": "red"}, 422, "unknown_field", "colour"),
    ("POST", "/plugins", "writer-a", {}, 422, "missing_field", "name"),
    ("POST", "/plugins", "writer-a", {"name": "bad name!"}, 422, "invalid_value", "name"),
    ("POST", "/plugins", "writer-a", {"name": "x", "enabled": "yes"}, 422, "invalid_value", "enabled"),
    ("POST", "/plugins", "writer-a", {"name": "x", "installed_from": "FTP"}, 422, "invalid_value", "installed_from"),
    ("POST", "/plugins", "writer-a", {"name": "x", "config_schema": {"type": "nonsense"}}, 422, "invalid_json_schema", "config_schema"),
    ("POST", "/plugins", "writer-a", {"name": "x", "config_schema": "object"}, 422, "invalid_value", "config_schema"),
    ("POST", "/plugins", "writer-a", {"name": "x", "dependencies": ["ok", "not ok"]}, 422, "invalid_value", "dependencies[1]"),
    ("POST", "/plugins", "writer-a", {"name": "resizer"}, 409, "already_exists", "name"),
    ("PATCH", "/plugins/resizer", "writer-a", {"status": "exploded"}, 422, "invalid_value", "status"),
    ("PATCH", "/plugins/resizer", "writer-a", {"enabled": None}, 422, "invalid_value", "enabled"),
    ("PATCH", "/plugins/resizer", "writer-a", {"name": "renamed"}, 422, "unknown_field", "name"),
    ("PATCH", "/plugins/missing", "writer-a", {"version": "1"}, 404, "not_found", "name"),
    ("PUT", "/plugins/resizer/environments/bad env", "writer-a", {"version": "1"}, 422, "invalid_value", "environment"),
    ("POST", "/plugins/resizer/operations", "writer-a", {"type": "explode"}, 422, "invalid_value", "type"),
    ("POST", "/plugins/resizer/operations", "writer-a", {"type": "install", "retry_limit": -1}, 422, "invalid_value", "retry_limit"),
    ("POST", "/plugins/resizer/operations", "writer-a", {"type": "install", "retry_limit": 1.5}, 422, "invalid_value", "retry_limit"),
    ("POST", "/plugins/resizer/operations", "writer-a", {"type": "install", "environment": "no spaces"}, 422, "invalid_value", "environment"),
    ("POST", "/plugins/resizer/operations", "writer-a", {"type": "install", "deadline_seconds": 0}, 422, "invalid_value", "deadline_seconds"),
    ("POST", "/plugins/missing/operations", "writer-a", {"type": "install"}, 404, "not_found", "name"),
    ("PATCH", "/operations/{op}", "writer-a", {"status": "running", "duration_ms": 5}, 422, "unknown_field", "duration_ms"),
    ("PATCH", "/operations/{op}", "writer-a", {"status": "bogus"}, 422, "invalid_value", "status"),
    ("PATCH", "/operations/{op}", "writer-a", {"status": "succeeded"}, 409, "illegal_transition", "status"),
    ("PATCH", "/operations/999999", "writer-a", {"status": "running"}, 404, "not_found", "id"),
    ("POST", "/silences", "writer-a", {"matchers": {}, "ends_at": _FUTURE}, 422, "invalid_value", "matchers"),
    ("POST", "/silences", "writer-a", {"matchers": {"bad-label": "x"}, "ends_at": _FUTURE}, 422, "invalid_value", "matchers.bad-label"),
    ("POST", "/silences", "writer-a", {"matchers": {"a": "b"}, "ends_at": "2020-01-01T00:00:00Z"}, 422, "invalid_value", "ends_at"),
    ("POST", "/silences", "writer-a", {"matchers": {"a": "b"}, "ends_at": "2030-01-01T00:00:00"}, 422, "invalid_value", "ends_at"),
    ("POST", "/silences", "writer-a", {"matchers": {"a": "b"}}, 422, "missing_field", "ends_at"),
    ("POST", "/silences/999/expire", "writer-a", None, 404, "not_found", "id"),
    ("POST", "/alerts/nope/ack", "writer-a", None, 404, "not_found", "fingerprint"),
    ("POST", "/approvals/999/decision", "admin-a", {"decision": "approved"}, 404, "not_found", "id"),
    ("POST", "/approvals/999/decision", "admin-a", {"decision": "maybe"}, 422, "invalid_value", "decision"),
    ("GET", "/plugins?status=bogus", "reader-a", None, 422, "invalid_value", "status"),
    ("GET", "/plugins?colour=red", "reader-a", None, 422, "unknown_field", "colour"),
    ("GET", "/plugins?limit=1&limit=2", "reader-a", None, 422, "invalid_value", "limit"),
    ("GET", "/audit?limit=0", "reader-a", None, 422, "invalid_value", "limit"),
    ("GET", "/audit?since=yesterday", "reader-a", None, 422, "invalid_value", "since"),
    ("GET", "/plugins/resizer?verbose=1", "reader-a", None, 422, "unknown_field", "verbose"),
    ("GET", "/operations?status=done", "reader-a", None, 422, "invalid_value", "status"),
    ("GET", "/alerts?severity=loud", "reader-a", None, 422, "invalid_value", "severity"),
    ("GET", "/approvals?status=maybe", "reader-a", None, 422, "invalid_value", "status"),
    ("GET", "/plugins/missing", "reader-a", None, 404, "not_found", "name"),
]  # fmt: skip


async def _counts(api: ApiHarness) -> dict[str, int]:
    counts = {}
    for table in (
        "plugins",
        "plugin_environments",
        "plugin_operations",
        "plugin_approvals",
        "alert_silences",
        "audit_log",
    ):
        (row,) = await api.fetch(f"SELECT count(*) AS n FROM {table}")  # noqa: S608 - constant
        counts[table] = int(row["n"])
    (row,) = await api.fetch("SELECT md5(string_agg(p::text, ',' ORDER BY id)) AS h FROM plugins p")
    counts["plugins_hash"] = hash(row["h"])
    return counts


async def test_bad_input_gets_its_named_error_and_changes_nothing(api: ApiHarness) -> None:
    created = await api.call(
        "POST", "/api/v1/plugins/resizer/operations", token="writer-a", body={"type": "update"}
    )
    assert created.status == 201
    op = created.body["id"]
    before = await _counts(api)
    for method, path, token, payload, status, code, field in BAD_INPUT:
        url = "/api/v1" + path.replace("{op}", str(op))
        if isinstance(payload, bytes):
            reply = await api.call(method, url, token=token, data=payload)
        else:
            reply = await api.call(method, url, token=token, body=payload)
        case = (method, path, payload)
        assert reply.status == status, (case, reply.body)
        assert reply.error["code"] == code, (case, reply.body)
        assert reply.error["field"] == field, (case, reply.body)
        assert reply.error["message"], case
    assert await _counts(api) == before


def test_a_subclass_of_a_domain_error_keeps_its_status() -> None:
    from pluginmon.daemon.api_http import status_of
    from pluginmon.registry.errors import ConflictError, NotFoundError, RegistryError

    class KeyGone(ConflictError):
        code = "key_gone"

    class Missing(NotFoundError):
        pass

    assert status_of(KeyGone("the key k1 is retired")) == 409
    assert status_of(Missing("no such plugin")) == 404
    assert status_of(ConflictError("x")) == 409
    assert status_of(RegistryError("anything else")) == 422


def test_only_the_issued_spelling_of_a_token_parses() -> None:
    issued = tokens.issue()
    text = issued.text
    parsed = tokens.parse(text)
    assert parsed is not None
    assert parsed.secret == issued.secret
    # The last of the 43 characters carries 2 unused bits: flipping them spells the same
    # bytes, which must not be accepted as the token.
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(text[-1])
    same_bytes = [alphabet[(last & ~0b11) | low] for low in range(4)]
    others = [c for c in same_bytes if c != text[-1]]
    assert len(others) == 3
    for other in others:
        assert tokens.parse(text[:-1] + other) is None


async def test_an_integrity_error_without_a_constraint_name_says_where(migrated_db: str) -> None:
    """A NOT NULL (or a trigger's RAISE) names no constraint: the 409 then names the SQLSTATE,
    table and column, never the values the server's message quotes."""
    conn = await asyncpg.connect(migrated_db)
    try:
        with pytest.raises(asyncpg.NotNullViolationError) as caught:
            await conn.execute(
                "INSERT INTO audit_log (tenant_id, actor, action, entity_type)"
                " VALUES ('a', NULL, 'x', 'secret-value')"
            )
    finally:
        await conn.close()
    where = refused_where(caught.value)
    assert where == "sqlstate 23502, table audit_log, column actor"
    assert "secret-value" not in where
