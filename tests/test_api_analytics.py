"""GET /api/v1/plugins/{name}/analytics over real HTTP on loopback and the real database: the daily rows in range, tenant isolation, from/to validated with 422 naming the field, the OpenAPI entry."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from openapi_spec_validator import validate

from pluginmon.registry.tokens import Role
from tests.api_helpers import START, ApiHarness, api_server

DAY = timedelta(days=1)
D = datetime(2026, 2, 20, tzinfo=UTC)


def _insert(url: str, tenant: str, plugin: str, day: datetime, *, environment: str = "production",
            uptime: float = 0.5, cpu: float = 10.0) -> None:  # fmt: skip
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO plugin_analytics (tenant_id, plugin_id, environment, period,"
            " period_start, sample_count, observed_seconds, up_seconds, uptime_ratio,"
            " cpu_seconds, rss_bytes_p50, rss_bytes_p95, rss_bytes_p99, restarts, operations,"
            " operation_failures, computed_through, invocations, errors)"
            " SELECT %s, id, %s, 'day', %s, 100, 1000, 1000 * %s, %s, %s, 1e6, 2e6, 3e6, 2, 5, 1,"
            " %s, 40, 4 FROM plugins WHERE tenant_id = %s AND name = %s",
            (tenant, environment, day, uptime, uptime, cpu, day + DAY, tenant, plugin),
        )


@pytest.fixture
async def api(migrated_db: str) -> AsyncIterator[ApiHarness]:
    async with api_server(migrated_db) as harness:
        await harness.token("reader-a", tenant="a", role=Role.READER)
        await harness.token("writer-a", tenant="a", role=Role.WRITER)
        await harness.token("writer-b", tenant="b", role=Role.WRITER)
        for token, name in (
            ("writer-a", "resizer"),
            ("writer-b", "resizer"),
            ("writer-a", "only-a"),
        ):
            created = await harness.call(
                "POST", "/api/v1/plugins", token=token, body={"name": name}
            )
            assert created.status == 201, created.body
        for offset in range(4):
            _insert(migrated_db, "a", "resizer", D + offset * DAY, uptime=0.25 * offset,
                    cpu=100.0 + offset)  # fmt: skip
        _insert(migrated_db, "a", "resizer", D, environment="staging", uptime=1.0)
        _insert(migrated_db, "b", "resizer", D, uptime=0.9, cpu=7.0)
        _insert(migrated_db, "a", "only-a", D)
        yield harness


async def test_daily_rows_in_range_oldest_first(api: ApiHarness) -> None:
    reply = await api.call(
        "GET",
        "/api/v1/plugins/resizer/analytics?from=2026-02-20T00:00:00Z&to=2026-02-23T00:00:00%2B00:00",
        token="reader-a",
    )
    assert reply.status == 200, reply.body
    body = reply.body
    assert (body["plugin"], body["environment"]) == ("resizer", "production")
    assert (body["from"], body["to"]) == ("2026-02-20T00:00:00Z", "2026-02-23T00:00:00Z")
    # Days starting in [from, to): the fourth day and the staging row are not in it.
    assert [item["day"] for item in body["items"]] == ["2026-02-20", "2026-02-21", "2026-02-22"]
    assert [item["uptime_ratio"] for item in body["items"]] == [0.0, 0.25, 0.5]
    assert [item["cpu_seconds"] for item in body["items"]] == [100.0, 101.0, 102.0]
    first = body["items"][0]
    assert first["rss_bytes_p95"] == 2e6
    assert (first["restarts"], first["operations"], first["operation_failures"]) == (2, 5, 1)
    assert (first["invocations"], first["errors"]) == (40, 4)
    assert first["computed_through"] == "2026-02-21T00:00:00Z"

    staging = await api.call(
        "GET",
        "/api/v1/plugins/resizer/analytics?environment=staging&from=2026-02-01T00:00:00Z",
        token="reader-a",
    )
    assert staging.status == 200, staging.body
    assert [(i["day"], i["uptime_ratio"]) for i in staging.body["items"]] == [("2026-02-20", 1.0)]


async def test_default_range_is_the_30_days_before_now(api: ApiHarness) -> None:
    # The harness clock is START (2026-03-01 12:00): D (2026-02-20) onwards is inside.
    _insert(api.database_url, "a", "resizer", START - timedelta(days=31))
    reply = await api.call("GET", "/api/v1/plugins/resizer/analytics", token="reader-a")
    assert reply.status == 200, reply.body
    assert [item["day"] for item in reply.body["items"]] == [
        "2026-02-20",
        "2026-02-21",
        "2026-02-22",
        "2026-02-23",
    ]
    assert reply.body["to"] == "2026-03-01T12:00:00Z"


async def test_tenants_see_only_their_own_analytics(api: ApiHarness) -> None:
    mine = await api.call(
        "GET", "/api/v1/plugins/resizer/analytics?from=2026-02-01T00:00:00Z", token="writer-b"
    )
    assert mine.status == 200, mine.body
    assert [(i["day"], i["uptime_ratio"], i["cpu_seconds"]) for i in mine.body["items"]] == [
        ("2026-02-20", 0.9, 7.0)
    ]
    # Another tenant's plugin does not exist for b.
    other = await api.call("GET", "/api/v1/plugins/only-a/analytics", token="writer-b")
    assert other.status == 404, other.body
    assert other.error["code"] == "not_found"
    missing = await api.call("GET", "/api/v1/plugins/nope/analytics", token="reader-a")
    assert missing.status == 404
    unauthenticated = await api.call("GET", "/api/v1/plugins/resizer/analytics")
    assert unauthenticated.status == 401


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("from=yesterday", "from"),
        ("to=2026-13-01T00:00:00Z", "to"),
        ("from=2026-02-20T00:00:00", "from"),  # no offset: ambiguous
        ("from=2026-02-21T00:00:00Z&to=2026-02-21T00:00:00Z", "from"),
        ("from=2026-02-22T00:00:00Z&to=2026-02-21T00:00:00Z", "from"),
        ("from=2025-01-01T00:00:00Z&to=2026-02-21T00:00:00Z", "to"),
        ("from=2024-01-01T00:00:00Z", "from"),  # to is now (START): from is the one too early
        ("environment=Bad%20Env", "environment"),
        ("since=2026-02-01T00:00:00Z", "since"),
    ],
)
async def test_bad_ranges_are_422_naming_the_field(api: ApiHarness, query: str, field: str) -> None:
    reply = await api.call("GET", f"/api/v1/plugins/resizer/analytics?{query}", token="reader-a")
    assert reply.status == 422, reply.body
    assert reply.error["field"] == field, reply.body


async def test_a_range_of_exactly_366_days_is_accepted(api: ApiHarness) -> None:
    reply = await api.call(
        "GET",
        "/api/v1/plugins/resizer/analytics?from=2025-02-20T00:00:00Z&to=2026-02-21T00:00:00Z",
        token="reader-a",
    )
    assert reply.status == 200, reply.body
    assert [item["day"] for item in reply.body["items"]] == ["2026-02-20"]


async def test_openapi_lists_the_analytics_route(api: ApiHarness) -> None:
    reply = await api.call("GET", "/api/v1/openapi.json")
    assert reply.status == 200
    validate(reply.body)
    operation = reply.body["paths"]["/api/v1/plugins/{name}/analytics"]["get"]
    names = {p["name"] for p in operation["parameters"]}
    assert {"name", "environment", "from", "to"} <= names
    assert "since" not in names
    assert "until" not in names
