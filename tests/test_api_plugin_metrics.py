"""POST and GET /api/v1/plugins/{name}/metrics over real HTTP on loopback and the real
database: pushes stored with their kinds and audited, the scrape limits, tokens and tenants,
the read with rates and quantiles, and the re-emission until a pushed series expires."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
import pytest
from openapi_spec_validator import validate

from pluginmon.collectors.exposition import ExpositionLimits
from pluginmon.collectors.push import PushConfig, PushStore
from pluginmon.daemon.api_plugin_metrics import PluginMetricsHandlers, reemit_job
from pluginmon.registry.tokens import Role
from tests.api_helpers import ApiHarness, api_server
from tests.daemon_helpers import REPO, run_cli, wait_for
from tests.net_helpers import free_port, stop_process

TEXT = b"""# HELP requests_total Requests served
# TYPE requests_total counter
requests_total{method="get"} 100
requests_total{method="post",tenant="evil"} 7
# TYPE queue_depth gauge
queue_depth 987654.25
"""

LIMITS = ExpositionLimits(max_body_bytes=4096, max_series=8)


@pytest.fixture
async def handlers() -> PluginMetricsHandlers:
    return PluginMetricsHandlers(
        PushStore(PushConfig(default_ttl_seconds=600, max_ttl_seconds=3600, limits=LIMITS))
    )


@pytest.fixture
async def api(migrated_db: str, handlers: PluginMetricsHandlers) -> AsyncIterator[ApiHarness]:
    async with api_server(migrated_db, plugin_metrics=handlers) as harness:
        await harness.token("reader-a", tenant="a", role=Role.READER)
        await harness.token("writer-a", tenant="a", role=Role.WRITER)
        await harness.token("writer-b", tenant="b", role=Role.WRITER)
        for token in ("writer-a", "writer-b"):
            created = await harness.call(
                "POST", "/api/v1/plugins", token=token, body={"name": "resizer"}
            )
            assert created.status == 201, created.body
        yield harness


async def _push(
    api: ApiHarness,
    body: bytes,
    *,
    token: str | None = "writer-a",  # noqa: S107 - a token name from the harness
    plugin: str = "resizer",
    content_type: str = "text/plain; version=0.0.4",
    query: str = "",
) -> tuple[int, object]:
    reply = await api.call(
        "POST",
        f"/api/v1/plugins/{plugin}/metrics{query}",
        token=token,
        data=body,
        headers={"Content-Type": content_type},
    )
    return reply.status, reply.body


async def _rows(api: ApiHarness) -> list[tuple[str, str, str, str, float, dict[str, str]]]:
    rows = await api.fetch(
        """SELECT m.tenant_id, m.environment, m.metric_name, m.metric_kind, m.value,
                  m.labels::text AS labels
             FROM plugin_metrics m ORDER BY m.tenant_id, m.metric_name, m.labels::text"""
    )
    return [
        (
            r["tenant_id"],
            r["environment"],
            r["metric_name"],
            r["metric_kind"],
            r["value"],
            json.loads(r["labels"]),
        )
        for r in rows
    ]


async def test_a_text_push_is_stored_with_kinds_and_audited_without_values(
    api: ApiHarness,
) -> None:
    status, body = await _push(api, TEXT, query="?environment=staging")
    assert status == 200, body
    assert isinstance(body, dict)
    assert body["series"] == 3
    assert body["series_live"] == 3
    assert body["environment"] == "staging"
    assert body["expires_at"] > body["pushed_at"]
    assert await _rows(api) == [
        ("a", "staging", "queue_depth", "gauge", 987654.25, {}),
        ("a", "staging", "requests_total", "counter", 100.0, {"method": "get"}),
        # A pushed tenant label never becomes the row's tenant.
        (
            "a",
            "staging",
            "requests_total",
            "counter",
            7.0,
            {"exported_tenant": "evil", "method": "post"},
        ),
    ]
    plugin_ids = await api.fetch(
        "SELECT DISTINCT m.plugin_id = p.id AS same FROM plugin_metrics m"
        " JOIN plugins p ON p.tenant_id = m.tenant_id AND p.name = 'resizer'"
        " WHERE m.tenant_id = 'a'"
    )
    assert [r["same"] for r in plugin_ids] == [True]
    audit = await api.fetch(
        "SELECT actor, action, entity_type, entity_id, plugin_name, environment,"
        " details::text AS details FROM audit_log WHERE action LIKE 'plugin_metrics%'"
    )
    assert len(audit) == 1
    entry = audit[0]
    assert (entry["actor"], entry["action"], entry["entity_id"], entry["environment"]) == (
        "writer-a",
        "plugin_metrics.push",
        "resizer",
        "staging",
    )
    details = json.loads(entry["details"])
    assert details["series"] == 3
    assert details["metric_names"] == ["queue_depth", "requests_total"]
    assert "987654" not in entry["details"]  # names and counts, never values


async def test_tokens_and_tenants(api: ApiHarness) -> None:
    assert (await _push(api, TEXT, token=None))[0] == 401
    status, body = await _push(api, TEXT, token="reader-a")
    assert status == 403, body
    # writer-b has its own "resizer"; an unknown plugin is 404 for everyone.
    status, body = await _push(api, TEXT, token="writer-a", plugin="nope")
    assert status == 404
    assert isinstance(body, dict)
    assert body["error"]["field"] == "name"
    assert await _rows(api) == []
    status, _ = await _push(api, TEXT, token="writer-b")
    assert status == 200
    assert {row[0] for row in await _rows(api)} == {"b"}
    # Reads: a's reader sees none of b's series under the same plugin name.
    reply = await api.call("GET", "/api/v1/plugins/resizer/metrics", token="reader-a")
    assert reply.status == 200, reply.body
    assert reply.body["items"] == []
    assert (await api.call("GET", "/api/v1/plugins/nope/metrics", token="reader-a")).status == 404
    assert (await api.call("GET", "/api/v1/plugins/resizer/metrics")).status == 401


async def test_limits_answer_413_and_422_and_store_nothing(api: ApiHarness) -> None:
    big = b"queue_depth 1\n" + b"# " + b"x" * 5000 + b"\n"
    status, body = await _push(api, big)
    assert status == 413
    assert isinstance(body, dict)
    assert body["error"]["code"] == "body_too_large"
    many = "".join(f'requests_total{{n="{i}"}} {i}\n' for i in range(9)).encode()
    status, body = await _push(api, b"# TYPE requests_total counter\n" + many)
    assert status == 422
    assert isinstance(body, dict)
    assert body["error"]["code"] == "too_many_series"
    assert body["error"]["field"] == "body"
    status, body = await _push(api, b"queue_depth{ 12 secret-value\n")
    assert status == 422
    assert isinstance(body, dict)
    assert body["error"]["code"] == "parse_error"
    assert "secret-value" not in json.dumps(body)
    status, body = await _push(
        api,
        json.dumps(
            {"metrics": [{"name": "x", "kind": "gauge", "value": 1, "bucket": {}}]}
        ).encode(),
        content_type="application/json",
    )
    assert status == 422
    assert isinstance(body, dict)
    assert "bucket" in body["error"]["message"]
    status, body = await _push(api, TEXT, query="?ttl_seconds=-5")
    assert status == 422
    assert isinstance(body, dict)
    assert body["error"]["field"] == "ttl_seconds"
    status, body = await _push(api, TEXT, query="?colour=blue")
    assert status == 422
    assert isinstance(body, dict)
    assert body["error"]["code"] == "unknown_field"
    assert await _rows(api) == []
    assert await api.fetch("SELECT 1 FROM audit_log WHERE action = 'plugin_metrics.push'") == []


async def test_live_pushed_series_count_toward_max_series(api: ApiHarness) -> None:
    assert (await _push(api, TEXT))[0] == 200  # 3 live
    more = b"".join(b'jobs{n="%d"} 1\n' % i for i in range(6))
    status, body = await _push(api, more)
    assert status == 422, body
    assert isinstance(body, dict)
    assert body["error"]["code"] == "too_many_series"
    # The same three again replace themselves: still within the limit.
    status, body = await _push(api, TEXT)
    assert status == 200
    assert isinstance(body, dict)
    assert body["series_live"] == 3


async def test_read_shows_kinds_labels_rates_and_quantiles(api: ApiHarness) -> None:
    def histogram(count: float, sum_: float, buckets: dict[str, float], done: float) -> bytes:
        return json.dumps(
            {
                "metrics": [
                    {"name": "jobs_total", "kind": "counter", "value": done},
                    {"name": "lag_seconds", "kind": "gauge", "value": 4.5, "labels": {"q": "x"}},
                    {
                        "name": "job_seconds",
                        "kind": "histogram",
                        "buckets": buckets,
                        "sum": sum_,
                        "count": count,
                    },
                ]
            }
        ).encode()

    status, body = await _push(
        api, histogram(0, 0, {"1": 0, "10": 0}, 100), content_type="application/json"
    )
    assert status == 200, body
    api.clock.advance(10)
    status, body = await _push(
        api, histogram(100, 300, {"1": 10, "10": 100}, 150), content_type="application/json"
    )
    assert status == 200, body
    reply = await api.call("GET", "/api/v1/plugins/resizer/metrics", token="reader-a")
    assert reply.status == 200, reply.body
    items = {(i["metric"], json.dumps(i["labels"], sort_keys=True)): i for i in reply.body["items"]}
    jobs = items[("jobs_total", "{}")]
    assert (jobs["kind"], jobs["value"]) == ("counter", 150.0)
    assert jobs["rate_per_second"] == pytest.approx(5.0)
    lag = items[("lag_seconds", '{"q": "x"}')]
    assert (lag["kind"], lag["value"], lag["rate_per_second"]) == ("gauge", 4.5, None)
    assert items[("job_seconds_bucket", '{"le": "+Inf"}')]["kind"] == "histogram"
    derived = reply.body["derived"]
    assert derived["jobs_total/s"] == pytest.approx(5.0)
    assert derived["lag_seconds"] == 4.5
    # 100 observations in 10 s: 10 <= 1, 90 in (1, 10]; p95 is inside (1, 10].
    assert 1.0 < derived["job_seconds:p95"] <= 10.0
    assert derived["job_seconds:p95"] == pytest.approx(1 + 9 * (95 - 10) / 90)
    # metric= narrows to one family (its _bucket/_sum/_count too).
    reply = await api.call(
        "GET", "/api/v1/plugins/resizer/metrics?metric=job_seconds", token="reader-a"
    )
    assert reply.status == 200, reply.body
    assert {i["metric"] for i in reply.body["items"]} == {
        "job_seconds_bucket",
        "job_seconds_sum",
        "job_seconds_count",
    }
    # since= after the last push: nothing; an unknown environment: nothing.
    reply = await api.call(
        "GET",
        "/api/v1/plugins/resizer/metrics?environment=staging",
        token="reader-a",
    )
    assert reply.status == 200
    assert reply.body["items"] == []


async def test_pushed_series_are_written_again_until_they_expire(
    api: ApiHarness, handlers: PluginMetricsHandlers
) -> None:
    pushes = handlers._pushes  # the live set the route records into
    status, body = await _push(api, TEXT, query="?ttl_seconds=60")
    assert status == 200, body
    job = reemit_job(lambda: api.pool, pushes, handlers, clock=api.clock)
    api.clock.advance(30)
    assert await job() == 3
    api.clock.advance(31)  # 61 s after the push: expired
    assert await job() == 0
    assert pushes.live_series(now=api.clock()) == 0
    assert pushes.expired_series == 3
    rows = await api.fetch(
        'SELECT "timestamp", count(*) AS n FROM plugin_metrics GROUP BY 1 ORDER BY 1'
    )
    assert [r["n"] for r in rows] == [3, 3]
    assert (rows[1]["timestamp"] - rows[0]["timestamp"]).total_seconds() == 30


async def test_openapi_document_has_both_routes_and_stays_valid(api: ApiHarness) -> None:
    reply = await api.call("GET", "/api/v1/openapi.json")
    assert reply.status == 200
    validate(reply.body)
    path = reply.body["paths"]["/api/v1/plugins/{name}/metrics"]
    post = path["post"]
    assert post["x-pluginmon-role"] == "writer"
    assert {"text/plain", "application/openmetrics-text", "application/json"} == set(
        post["requestBody"]["content"]
    )
    assert {"401", "403", "404", "413", "422"} <= set(post["responses"])
    assert "ttl_seconds" in post["description"]
    assert {p["name"] for p in post["parameters"]} >= {"name", "environment", "ttl_seconds"}
    assert {p["name"] for p in path["get"]["parameters"]} >= {"metric", "since", "environment"}


def _request(url: str, *, token: str | None = None, data: bytes | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=data, method="POST" if data else "GET")  # noqa: S310
    if token is not None:
        request.add_header("Authorization", "Bearer " + token)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - loopback
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


def test_pluginmon_api_stores_pushes_and_re_emits_them_itself(
    migrated_db: str, tmp_path: Path
) -> None:
    """The central deployment samples nothing: the API process keeps the live set."""
    port = free_port()
    config = tmp_path / "api.toml"
    config.write_text(
        f'http_host = "127.0.0.1"\nhttp_port = {port}\n'
        "[plugin_metrics]\ninterval_seconds = 0.5\npush_ttl_seconds = 60\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLUGINMON_")}
    env.update({"PLUGINMON_DATABASE_URL": migrated_db, "PYTHONPATH": str(REPO)})
    created = run_cli(
        "token", "create", "--tenant", "acme", "--role", "writer", "--name", "job",
        env={"PLUGINMON_DATABASE_URL": migrated_db},
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    token = created.stdout.splitlines()[-1]
    process = subprocess.Popen(
        [sys.executable, "-m", "pluginmon.daemon.cli", "api", "--config", str(config)],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for("pluginmon api ready", lambda: _request(base + "/readyz")[0] == 200, timeout=60)
        status, _ = _request(
            base + "/api/v1/plugins", token=token, data=json.dumps({"name": "job"}).encode()
        )
        assert status == 201
        status, body = _request(base + "/api/v1/plugins/job/metrics", token=token, data=TEXT)
        assert status == 200, body

        def stored() -> int:
            with psycopg.connect(migrated_db) as conn:
                row = conn.execute(
                    'SELECT count(DISTINCT "timestamp") FROM plugin_metrics'
                    " WHERE tenant_id = 'acme' AND metric_name = 'queue_depth'"
                ).fetchone()
            assert row is not None
            return int(row[0])

        wait_for("the push written again by pluginmon api", lambda: stored() >= 3, timeout=30)
        status, metrics = _request(base + "/metrics")
        assert status == 200
        assert b"pluginmon_plugin_pushes_total 1.0" in metrics
        assert b"pluginmon_plugin_push_live_series 3.0" in metrics
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            stop_process(process)
