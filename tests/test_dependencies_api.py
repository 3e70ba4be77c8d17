"""Plugin dependencies through /api/v1 and `pluginmon deps` against the real database: results
per environment recomputed on every change, a two-dependent conflict, a cycle, dev edges that
never gate, plugins.dependencies in step, audit entries, and the effect on the health gauge,
the Prometheus metric, the built-in rule and inhibition."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import asyncpg
import psycopg
import pytest
from prometheus_client import CollectorRegistry

from dashboards.grafana_queries import GrafanaContext, Variable, dashboard_queries, grafana_sql
from pluginmon.alerts.engine import AlertEngine
from pluginmon.alerts.health import DEPENDENCIES_UNSATISFIED, METRIC_PREFIX
from pluginmon.alerts.rules import Rule, builtin_rules
from pluginmon.collectors.models import PluginKey
from pluginmon.daemon.api_metrics import ApiMetrics
from pluginmon.daemon.api_wiring import registry_job
from pluginmon.daemon.dependency_metrics import METRIC_NAME
from pluginmon.registry import dependencies
from pluginmon.registry.lifecycle import OPERATION_TYPES, OperationState, Status
from pluginmon.registry.operations import Operation, changed_plugin_state
from pluginmon.registry.tokens import Role
from tests.alerts_helpers import FakeClock, plugin_ids, plugin_sample, snapshot
from tests.api_helpers import START, ApiHarness, api_server
from tests.daemon_helpers import run_cli
from tests.dashboards_helpers import DASHBOARDS_DIR


@pytest.fixture
async def api(migrated_db: str) -> AsyncIterator[ApiHarness]:
    async with api_server(migrated_db) as harness:
        await harness.token("ci", tenant="a", role=Role.WRITER)
        await harness.token("viewer", tenant="a", role=Role.READER)
        await harness.token("other", tenant="b", role=Role.WRITER)
        yield harness


async def plugin(api: ApiHarness, name: str, **environments: str | None) -> None:
    """A plugin with ``environment=version`` states (each installed and enabled)."""
    reply = await api.call("POST", "/api/v1/plugins", token="ci", body={"name": name})
    assert reply.status == 201, reply.body
    for environment, version in environments.items():
        reply = await api.call(
            "PUT",
            f"/api/v1/plugins/{name}/environments/{environment}",
            token="ci",
            body={"version": version, "status": "installed", "enabled": True},
        )
        assert reply.status == 200, reply.body


async def depend(
    api: ApiHarness, name: str, dependency: str, version_range: str, kind: str = "runtime"
) -> dict[str, Any]:
    reply = await api.call(
        "PUT",
        f"/api/v1/plugins/{name}/dependencies/{dependency}",
        token="ci",
        body={"version_range": version_range, "kind": kind},
    )
    assert reply.status == 200, reply.body
    assert isinstance(reply.body, dict)
    return reply.body


async def items(api: ApiHarness, name: str, environment: str) -> dict[str, dict[str, Any]]:
    reply = await api.call(
        "GET", f"/api/v1/plugins/{name}/dependencies?environment={environment}", token="viewer"
    )
    assert reply.status == 200, reply.body
    return {i["dependency"]: i for i in reply.body["items"]}


async def test_satisfied_per_environment_and_recomputed_on_every_change(api: ApiHarness) -> None:
    await plugin(api, "db", production="2.3.1", staging="1.9.0")
    await plugin(api, "api", production="1.4.0", staging="1.5.0")
    put = await depend(api, "api", "db", "^2.0.0")
    assert (put["environment"], put["satisfied"], put["conflict"]) == ("production", True, False)

    prod = (await items(api, "api", "production"))["db"]
    assert {k: prod[k] for k in ("version_range", "kind", "satisfied", "conflict")} == {
        "version_range": "^2.0.0",
        "kind": "runtime",
        "satisfied": True,
        "conflict": False,
    }
    assert prod["reason"] == (
        'api@1.4.0 wants db@"^2.0.0" (runtime); found db@2.3.1 in production: satisfied'
    )
    staging = (await items(api, "api", "staging"))["db"]
    assert (staging["satisfied"], staging["problem"], staging["installed_version"]) == (
        False,
        "out_of_range",
        "1.9.0",
    )
    assert staging["reason"] == 'api@1.5.0 wants db@"^2.0.0" (runtime); found db@1.9.0 in staging'
    # where the dependent does not run there is nothing to check
    dev = (await items(api, "api", "dev"))["db"]
    assert (dev["satisfied"], dev["problem"]) == (False, "dependent_not_deployed")

    # an environment change moves the result in the same request
    reply = await api.call(
        "PUT", "/api/v1/plugins/db/environments/staging", token="ci", body={"version": "2.0.0"}
    )
    assert reply.status == 200
    assert (await items(api, "api", "staging"))["db"]["satisfied"] is True
    reply = await api.call(
        "PUT", "/api/v1/plugins/db/environments/production", token="ci", body={"enabled": False}
    )
    prod = (await items(api, "api", "production"))["db"]
    assert (prod["satisfied"], prod["problem"]) == (False, "disabled")
    assert prod["reason"].endswith("found db@2.3.1 in production, disabled")

    # the edge's summary columns and the seed's plugins.dependencies are in step
    [row] = await api.fetch(
        "SELECT satisfied, conflict, conflict_reason, in_cycle FROM plugin_dependencies"
    )
    assert (row["satisfied"], row["conflict"], row["in_cycle"]) == (False, False, False)
    assert row["conflict_reason"].startswith("production: api@1.4.0 wants db@")
    states = await api.fetch(
        "SELECT environment, satisfied FROM plugin_dependency_states ORDER BY environment"
    )
    assert [tuple(r) for r in states] == [("production", False), ("staging", True)]
    body = (await api.call("GET", "/api/v1/plugins/api", token="viewer")).body
    assert body["dependencies"] == ["db"]


async def test_a_write_moves_results_through_what_it_changes_only(api: ApiHarness) -> None:
    """Writes that change no input of a result skip the recompute (an operation's transition
    without an effect, a catalogue update of other fields or of a field to its own value);
    those that change one still recompute in the same request."""
    await plugin(api, "db", staging="2.1.0")
    await plugin(api, "api", staging="1.0.0")
    await depend(api, "api", "db", "^2.0.0")
    assert (await items(api, "api", "staging"))["db"]["satisfied"] is True

    async def operation(kind: str, **extra: str) -> None:
        reply = await api.call(
            "POST",
            "/api/v1/plugins/db/operations",
            token="ci",
            body={"type": kind, "environment": "staging", **extra},
        )
        assert reply.status == 201, reply.body
        for status in ("running", "succeeded"):
            reply = await api.call(
                "PATCH",
                f"/api/v1/operations/{reply.body['id']}",
                token="ci",
                body={"status": status},
            )
            assert reply.status == 200, reply.body

    await operation("configure")  # no effect on the plugin's state
    assert (await items(api, "api", "staging"))["db"]["satisfied"] is True
    await operation("update", version="1.9.0")
    found = (await items(api, "api", "staging"))["db"]
    assert (found["satisfied"], found["problem"], found["installed_version"]) == (
        False,
        "out_of_range",
        "1.9.0",
    )
    await operation("update", version="2.0.0")
    assert (await items(api, "api", "staging"))["db"]["satisfied"] is True
    await operation("disable")
    found = (await items(api, "api", "staging"))["db"]
    assert (found["satisfied"], found["problem"]) == (False, "disabled")

    # the catalogue: same values and other fields leave the results; a new list is repaired
    for body in ({"description": "tuned"}, {"dependencies": ["db"]}):
        reply = await api.call("PATCH", "/api/v1/plugins/api", token="ci", body=body)
        assert reply.status == 200, reply.body
    assert (await items(api, "api", "staging"))["db"]["problem"] == "disabled"
    reply = await api.call("PATCH", "/api/v1/plugins/api", token="ci", body={"dependencies": []})
    assert reply.status == 200, reply.body
    [row] = await api.fetch("SELECT dependencies FROM plugins WHERE name = 'api'")
    assert row["dependencies"] == ["db"]  # the declared edge keeps its name listed


def test_which_transitions_change_a_plugins_state() -> None:
    """The decision behind skipping the recompute, for every type and final status."""
    changing = set()
    for kind in OPERATION_TYPES:
        for status in Status:
            for version in (None, "1.2.3"):
                op = Operation(
                    id=1,
                    tenant_id="a",
                    plugin_id=1,
                    plugin="db",
                    type=kind,
                    environment="staging",
                    version=version,
                    requested_by=None,
                    requested_by_token_id=None,
                    approval_id=None,
                    state=OperationState(
                        status=status, retry_count=0, retry_limit=0, started_at=START
                    ),
                    details={},
                    created_at=START,
                    updated_at=START,
                )
                if changed_plugin_state(op):
                    changing.add((kind, status.value))
    assert changing == {
        (kind, "succeeded")
        for kind in ("install", "update", "rollback", "restore", "uninstall", "enable", "disable")
    }


async def test_declaring_validates_audits_and_keeps_the_name_list(api: ApiHarness) -> None:
    await plugin(api, "db", production="1.0.0")
    reply = await api.call(
        "POST", "/api/v1/plugins", token="ci", body={"name": "api", "dependencies": ["later"]}
    )
    assert reply.status == 201
    bad = await api.call(
        "PUT",
        "/api/v1/plugins/api/dependencies/db",
        token="ci",
        body={"version_range": "^1.2.3.4"},
    )
    assert (bad.status, bad.error["code"], bad.error["field"]) == (
        422,
        "invalid_value",
        "version_range",
    )
    assert "'^1.2.3.4'" in bad.error["message"]
    bad_kind = await api.call(
        "PUT", "/api/v1/plugins/api/dependencies/db", token="ci", body={"kind": "peer"}
    )
    assert (bad_kind.status, bad_kind.error["field"]) == (422, "kind")
    missing = await api.call(
        "PUT", "/api/v1/plugins/api/dependencies/nope", token="ci", body={"version_range": "*"}
    )
    assert (missing.status, missing.error["field"]) == (404, "dependency")
    itself = await api.call("PUT", "/api/v1/plugins/api/dependencies/api", token="ci", body={})
    assert (itself.status, itself.error["field"]) == (422, "dependency")
    reader = await api.call("PUT", "/api/v1/plugins/api/dependencies/db", token="viewer", body={})
    assert reader.status == 403
    # another tenant's plugin is not found, and theirs does not see ours
    await api.call("POST", "/api/v1/plugins", token="other", body={"name": "db"})
    cross = await api.call("GET", "/api/v1/plugins/api/dependencies", token="other")
    assert cross.status == 404

    await depend(api, "api", "db", "~1.0")
    await depend(api, "api", "db", ">=1", kind="dev")  # one edge per pair: the kind moves
    edges = await api.fetch("SELECT version_range, kind FROM plugin_dependencies")
    assert [tuple(r) for r in edges] == [(">=1", "dev")]
    names = await api.fetch("SELECT dependencies FROM plugins WHERE name = 'api'")
    assert names[0]["dependencies"] == ["db", "later"]

    patched = await api.call(
        "PATCH", "/api/v1/plugins/api", token="ci", body={"dependencies": ["later"]}
    )
    assert patched.status == 200
    names = await api.fetch("SELECT dependencies FROM plugins WHERE name = 'api'")
    assert names[0]["dependencies"] == ["db", "later"]  # the edge keeps its name listed
    repaired = await api.fetch(
        "SELECT actor FROM audit_log WHERE action = 'plugin.dependencies.sync'"
    )
    assert [r["actor"] for r in repaired] == ["ci"]
    removed = await api.call("DELETE", "/api/v1/plugins/api/dependencies/db", token="ci")
    assert (removed.status, removed.body["removed"]) == (200, True)
    again = await api.call("DELETE", "/api/v1/plugins/api/dependencies/db", token="ci")
    assert again.status == 404
    names = await api.fetch("SELECT dependencies FROM plugins WHERE name = 'api'")
    assert names[0]["dependencies"] == ["later"]
    audit = await api.fetch(
        "SELECT action, entity_id, before_state, after_state FROM audit_log "
        "WHERE action LIKE 'plugin.dependenc%' ORDER BY seq"
    )
    assert [(r["action"], r["entity_id"]) for r in audit] == [
        ("plugin.dependency.set", "api->db"),
        ("plugin.dependency.set", "api->db"),
        ("plugin.dependencies.sync", "api"),  # after the PATCH that dropped the name
        ("plugin.dependency.remove", "api->db"),
    ]
    assert '"~1.0"' in audit[1]["before_state"]
    assert '">=1"' in audit[1]["after_state"]


async def test_two_dependents_that_conflict(api: ApiHarness) -> None:
    await plugin(api, "db", production="1.9.0")
    await plugin(api, "api", production="1.4.0")
    await plugin(api, "web", production="3.0.0")
    await depend(api, "api", "db", "^1.0.0")
    assert (await items(api, "api", "production"))["db"]["satisfied"] is True
    await depend(api, "web", "db", "^2.0.0")
    api_db = (await items(api, "api", "production"))["db"]
    web_db = (await items(api, "web", "production"))["db"]
    assert (api_db["conflict"], api_db["satisfied"], api_db["problem"]) == (True, False, "conflict")
    assert (web_db["conflict"], web_db["satisfied"]) == (True, False)
    assert api_db["reason"] == (
        'api@1.4.0 wants db@"^1.0.0" (runtime); conflicts with: web@3.0.0 wants db@"^2.0.0"; '
        "no version of db satisfies them together; found db@1.9.0 in production"
    )
    problems = await api.call("GET", "/api/v1/dependencies/problems", token="viewer")
    assert sorted((p["plugin"], p["problem"]) for p in problems.body["items"]) == [
        ("api", "conflict"),
        ("web", "conflict"),
    ]
    # web relaxes its range: the conflict is gone and api is satisfied again
    await depend(api, "web", "db", ">=1.5.0")
    assert (await items(api, "api", "production"))["db"]["satisfied"] is True
    assert (await items(api, "web", "production"))["db"]["satisfied"] is True


async def test_a_cycle_is_a_conflict_and_dev_edges_never_gate(api: ApiHarness) -> None:
    for name in ("a", "b", "c"):
        await plugin(api, name, production="1.0.0")
    await depend(api, "a", "b", "*")
    await depend(api, "b", "c", "*")
    await depend(api, "c", "a", "^1", kind="dev")  # dev: closes no cycle
    assert all(i["satisfied"] for i in (await items(api, "b", "production")).values())
    await depend(api, "c", "a", "^1")
    c_a = (await items(api, "c", "production"))["a"]
    assert (c_a["conflict"], c_a["problem"]) == (True, "cycle")
    assert c_a["reason"].endswith("runtime dependency cycle in production: c -> a -> b -> c")
    cycle = await api.fetch("SELECT count(*) AS n FROM plugin_dependencies WHERE in_cycle")
    assert cycle[0]["n"] == 3
    await depend(api, "c", "a", "^2", kind="dev")
    c_a = (await items(api, "c", "production"))["a"]
    assert (c_a["satisfied"], c_a["conflict"], c_a["problem"]) == (False, False, "out_of_range")
    cycle = await api.fetch("SELECT count(*) AS n FROM plugin_dependencies WHERE in_cycle")
    assert cycle[0]["n"] == 0

    # the dev problem is reported, but the maintenance job's gauge and metric count none
    registry = CollectorRegistry()
    metrics = ApiMetrics(registry)
    await registry_job(lambda: api.pool, metrics=metrics, clock=lambda: START)()
    labels = {"tenant": "a", "plugin": "a", "environment": "production"}
    assert registry.get_sample_value(METRIC_NAME, labels) == 0.0
    # c has no runtime dependency left: no series at all
    assert registry.get_sample_value(METRIC_NAME, {**labels, "plugin": "c"}) is None
    gauge = await api.fetch(
        "SELECT p.name, m.value FROM plugin_metrics m"
        " JOIN plugins p ON p.id = m.plugin_id AND p.tenant_id = m.tenant_id "
        "WHERE m.metric_name = $1 ORDER BY p.name",
        DEPENDENCIES_UNSATISFIED,
    )
    assert [tuple(r) for r in gauge] == [("a", 0.0), ("b", 0.0)]

    cli = run_cli(
        "deps", "check", "--tenant", "a", env={"PLUGINMON_DATABASE_URL": api.database_url}
    )
    assert cli.returncode == 0, cli.stderr
    assert "0 runtime problem(s), 1 dev problem(s)" in cli.stdout
    assert "(dev: reported, never gating)" in cli.stdout


async def test_deps_cli_sets_checks_and_exits_1_on_a_runtime_problem(api: ApiHarness) -> None:
    await plugin(api, "db", production="1.9.0", staging="2.1.0")
    await plugin(api, "api", production="1.4.0", staging="1.4.0")
    await plugin(api, "web", production="3.0.0")
    env = {"PLUGINMON_DATABASE_URL": api.database_url}
    done = run_cli("deps", "set", "api", "db", "^2.0.0", "--tenant", "a", env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "api -> db@^2.0.0 (runtime)",
        'production: PROBLEM: api@1.4.0 wants db@"^2.0.0" (runtime); found db@1.9.0 in production',
    ]
    bad = run_cli("deps", "set", "api", "db", "2.x.y", "--tenant", "a", env=env)
    assert bad.returncode == 2
    assert "version_range '2.x.y'" in bad.stderr
    assert run_cli("deps", "set", "web", "db", "^1.0.0", "--tenant", "a", env=env).returncode == 0

    staging = run_cli("deps", "check", "--tenant", "a", "--environment", "staging", env=env)
    assert (staging.returncode, staging.stdout.strip()) == (
        0,
        "pluginmon deps check: every dependency is satisfied",
    )
    check = run_cli("deps", "check", "--tenant", "a", "--environment", "production", env=env)
    assert check.returncode == 1, check.stderr
    assert check.stdout.splitlines() == [
        "pluginmon deps check: 2 runtime problem(s), 0 dev problem(s)",
        "",
        "ERESOLVE conflicting ranges: no version satisfies every dependent",
        "tenant a, environment production",
        "Found: db@1.9.0",
        "Could not resolve dependency:",
        '  runtime db@"^2.0.0" from api',
        '    api@1.4.0 wants db@"^2.0.0" (runtime); conflicts with: web@3.0.0 wants '
        'db@"^1.0.0"; no version of db satisfies them together; found db@1.9.0 in production',
        '  runtime db@"^1.0.0" from web',
        '    web@3.0.0 wants db@"^1.0.0" (runtime); conflicts with: api@1.4.0 wants '
        'db@"^2.0.0"; no version of db satisfies them together; found db@1.9.0 in production',
    ]
    everyone = run_cli("deps", "check", "--json", env=env)  # every tenant (a CI over all)
    assert everyone.returncode == 1, everyone.stderr
    assert sorted(
        (p["tenant"], p["plugin"], p["problem"]) for p in json.loads(everyone.stdout)
    ) == [
        ("a", "api", "conflict"),
        ("a", "web", "conflict"),
    ]
    listed = run_cli("deps", "list", "api", "--tenant", "a", "--environment", "staging", env=env)
    assert listed.stdout.strip() == (
        'db@^2.0.0 runtime ok: api@1.4.0 wants db@"^2.0.0" (runtime); found db@2.1.0 in staging: '
        "satisfied"
    )
    assert run_cli("deps", "remove", "web", "db", "--tenant", "a", env=env).returncode == 0
    other_tenant = run_cli("deps", "check", "--tenant", "b", env=env)
    assert (other_tenant.returncode, other_tenant.stdout.strip()) == (
        0,
        "pluginmon deps check: every dependency is satisfied",
    )
    actors = await api.fetch(
        "SELECT DISTINCT actor FROM audit_log WHERE action LIKE 'plugin.dependency.%'"
    )
    assert [r["actor"].startswith("cli:") for r in actors] == [True]


async def test_health_alert_and_metric_follow_runtime_dependencies(
    api: ApiHarness, migrated_db: str
) -> None:
    await plugin(api, "db", production="1.0.0")
    await plugin(api, "api", production="1.0.0")
    await depend(api, "api", "db", "^2.0.0")
    clock = FakeClock()
    registry = CollectorRegistry()
    metrics = ApiMetrics(registry)
    await registry_job(lambda: api.pool, metrics=metrics, clock=clock)()
    labels = {"tenant": "a", "plugin": "api", "environment": "production"}
    assert registry.get_sample_value(METRIC_NAME, labels) == 1.0

    rules = [r for r in builtin_rules() if r.name == "PluginDependencyUnsatisfied"]
    engine = AlertEngine(api.pool, rules, clock=clock)
    await engine.start()
    key = PluginKey("a", "api", "production")
    ids = await plugin_ids(api.pool, [key])
    clock.advance(1)
    await engine.process(snapshot(clock(), [plugin_sample(key, clock())]), ids)
    firing = [(a.key.plugin, a.alertname) for a in engine.firing()]
    assert firing == [("api", "PluginDependencyUnsatisfied")]
    [alert] = engine.firing()
    assert alert.annotations["summary"] == (
        "1 runtime dependenc(ies) of plugin api (a/production) unsatisfied or conflicting"
    )
    score = engine.latest_health()[key]
    component = score.component(METRIC_PREFIX + DEPENDENCIES_UNSATISFIED)
    assert component is not None
    assert (component.score, component.weight) == (0.0, 2.0)
    assert component.detail == "1 runtime dependency unsatisfied or conflicting"
    assert score.score < 100.0

    # db moves into range: the next maintenance run writes 0; health and the alert recover
    reply = await api.call(
        "PUT", "/api/v1/plugins/db/environments/production", token="ci", body={"version": "2.0.1"}
    )
    assert reply.status == 200
    clock.advance(1)
    await registry_job(lambda: api.pool, metrics=metrics, clock=clock)()
    assert registry.get_sample_value(METRIC_NAME, labels) == 0.0
    clock.advance(1)
    await engine.process(snapshot(clock(), [plugin_sample(key, clock())]), ids)
    assert engine.firing() == []
    component = engine.latest_health()[key].component(METRIC_PREFIX + DEPENDENCIES_UNSATISFIED)
    assert component is not None
    assert component.score == 100.0


async def test_inhibition_skips_edges_on_a_cycle(migrated_db: str) -> None:
    async with asyncpg.create_pool(migrated_db, min_size=1, max_size=4) as pool:
        clock = FakeClock()
        keys = {n: PluginKey("acme", n, "production") for n in ("db", "api", "cache")}
        ids = await plugin_ids(pool, list(keys.values()))
        async with pool.acquire() as conn:
            for a, b in (("api", "db"), ("db", "cache"), ("cache", "db")):
                await conn.execute(
                    "INSERT INTO plugin_dependencies (tenant_id, plugin_id, depends_on_plugin_id)"
                    " VALUES ('acme', $1, $2)",
                    ids[keys[a]],
                    ids[keys[b]],
                )
            await dependencies.refresh(conn, now=clock())
            cycle = await conn.fetch(
                "SELECT p.name FROM plugin_dependencies x"
                " JOIN plugins p ON p.id = x.plugin_id AND p.tenant_id = x.tenant_id "
                "WHERE x.in_cycle ORDER BY p.name"
            )
        assert [r["name"] for r in cycle] == ["cache", "db"]
        rules = [Rule(name="Down", metric="up", op="==", threshold=0)]
        engine = AlertEngine(pool, rules, clock=clock)
        await engine.start()
        samples = [plugin_sample(k, clock(), up=False) for k in keys.values()]
        await engine.process(snapshot(clock(), samples), ids)
        inhibited = {a.key.plugin: a.inhibited for a in engine.alerts()}
        # api -> db still inhibits; db <-> cache, both down, are both told
        assert inhibited == {"api": True, "db": False, "cache": False}


async def test_the_plugin_dashboard_dependencies_table(api: ApiHarness) -> None:
    await plugin(api, "db", production="1.9.0", staging="2.1.0")
    await plugin(api, "api", production="1.4.0", staging="1.4.0")
    await plugin(api, "lint", production="0.1.0")
    await depend(api, "api", "db", "^2.0.0")
    await depend(api, "api", "lint", "^1", kind="dev")
    [query] = [
        q
        for q in dashboard_queries(DASHBOARDS_DIR / "postgres" / "pluginmon-plugin.json")
        if q.title == "Dependencies"
    ]
    [api_id] = [r["id"] for r in await api.fetch("SELECT id FROM plugins WHERE name = 'api'")]
    context = GrafanaContext(
        time_from=START - timedelta(hours=1),
        time_to=START,
        interval="1m",
        variables={
            "tenant": Variable(("a",)),
            "environment": Variable(("production", "staging"), multi=True),
            "plugin": Variable((str(api_id),)),
        },
    )
    with psycopg.connect(api.database_url) as conn:
        cur = conn.execute(grafana_sql(query.text, context).encode())
        columns = [c.name for c in cur.description or ()]
        rows = [dict(zip(columns, r, strict=True)) for r in cur.fetchall()]
    # problems first (runtime before dev), then the satisfied ones
    assert [(r["environment"], r["dependency"], r["kind"], r["satisfied"]) for r in rows] == [
        ("production", "db", "runtime", False),
        ("production", "lint", "dev", False),
        ("staging", "lint", "dev", False),
        ("staging", "db", "runtime", True),
    ]
    assert rows[0]["reason"] == (
        'api@1.4.0 wants db@"^2.0.0" (runtime); found db@1.9.0 in production'
    )
    assert (rows[2]["installed_version"], rows[2]["problem"]) == (None, "not_deployed")
    assert (rows[3]["installed_version"], rows[3]["problem"]) == ("2.1.0", None)
