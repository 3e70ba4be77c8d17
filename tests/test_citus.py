"""The Citus backend on a real local cluster: a coordinator and two workers (tests/citus_cluster.py).

Skipped, with the reason, when no Citus build is found on the machine. One migrated database
serves the module; each test uses its own tenants.
"""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import psycopg
import pytest

from pluginmon.daemon.api_wiring import registry_job
from pluginmon.registry import backup_schedule, crypto, secrets
from pluginmon.registry.actor import Actor
from pluginmon.registry.policies import ApprovalPolicy
from pluginmon.registry.tokens import Role
from pluginmon.storage import plugin_metrics
from pluginmon.storage.backend import Retention, admin_connection
from pluginmon.storage.citus import CitusMaintenance
from pluginmon.storage.migrate import Backend, MigrationError, migrate
from pluginmon.storage.queries import (
    CITUS_SCOPE,
    PLAIN_SCOPE,
    detect_tenant_scope,
    quote_literal,
    set_local_tenant_sql,
)
from tests import test_dashboards_postgres as dashboards
from tests.api_helpers import START, Clock, api_server
from tests.citus_cluster import CitusCluster, running_cluster
from tests.daemon_helpers import (
    DaemonProcess,
    WebhookReceiver,
    plugin_processes,
    run_cli,
    wait_for,
)
from tests.dbutil import with_database
from tests.test_e2e_daemon import RULES, WEBHOOK_SECRET, labels
from tests.vulns_helpers import load, write_osv_database
from tests.writer_helpers import copy_samples, create_plugins, sample_row

REFERENCE = ("tenants", "tenant_role_bindings", "api_tokens", "rollup_watermarks",
             "rollup_metrics_watermarks")  # fmt: skip
DISTRIBUTED_BY_TENANT = (
    "plugins", "plugin_operations", "plugin_config", "plugin_dependencies", "plugin_alerts",
    "plugin_backups", "plugin_restore_points", "plugin_approvals", "plugin_vulnerabilities",
    "plugin_analytics", "notification_outbox", "alert_notifications_sent", "alert_silences",
    "plugin_environments", "plugin_approval_decisions", "plugin_dependency_states",
    "plugin_backup_verifications", "plugin_sboms", "plugin_vex_statements", "plugin_samples",
    "plugin_metrics", "rollup_samples_1m", "rollup_samples_1h", "rollup_metrics_1m",
    "rollup_metrics_1h",
)  # fmt: skip
ON_COORDINATOR = ("schema_migrations", "audit_log", "audit_chain")


@pytest.fixture(scope="session")
def citus_cluster() -> Iterator[CitusCluster]:
    with running_cluster("pluginmon-test-citus-") as cluster:
        yield cluster


@pytest.fixture(scope="module")
def citus_db(citus_cluster: CitusCluster) -> Iterator[str]:
    """A Citus database with every migration applied (coordinator URL)."""
    with citus_cluster.database(prefix="mig") as url:
        result = migrate(url)
        assert result.backend is Backend.CITUS
        yield url


def worker_url(cluster: CitusCluster, coordinator_url: str, index: int = 0) -> str:
    return with_database(
        cluster.url(node=cluster.workers[index]), coordinator_url.rsplit("/", 1)[1]
    )


def tenant_name() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


def test_migrations_apply_once_and_the_backend_is_sticky(citus_cluster: CitusCluster) -> None:
    with citus_cluster.database(prefix="sticky") as url:
        first = migrate(url)
        assert first.backend is Backend.CITUS
        assert [f for f in first.applied if f >= "100"] == [
            "100_distribute.citus.sql",
            "101_rollups_colocated.citus.sql",
            "102_tenant_on_workers.citus.sql",
            "103_tenant_conflict_keys.citus.sql",
            "104_acknowledged_alerts_index.sql",  # common: the index on every shard
            "110_partition_maintenance_sequential.citus.sql",
            "120_hot_updates.citus.sql",  # the shards' storage parameters left as they are
            "121_usage_updates_hot.sql",  # common: the index dropped on every shard
            "122_audit_lane_wait.sql",  # common: the audit tables stay on the coordinator
            "123_open_operations_index.sql",  # common: the index rebuilt on every shard
            "124_audit_hash_inline.sql",  # common: the audit tables stay on the coordinator
            "125_current_tenant_membership_first.citus.sql",
            "126_search_path_temp_last.sql",  # common: the functions' settings
            "127_audit_target_index.sql",  # common: the audit tables stay on the coordinator
            "128_time_range_brin.citus.sql",  # a B-tree: columnar partitions keep no BRIN
            "129_health_rows_not_rolled_up.citus.sql",  # 101's refresh, health rows left out
            "130_audit_expire_per_tenant.sql",  # common: nothing propagated to the workers
            "131_audit_actor_action_indexes.sql",  # common: the audit tables stay on the coordinator
            "132_health_rows_out_of_metric_aggregates.postgres.sql",  # nothing: 129 did it
        ]
        # 031's common file cannot run on Citus; its Citus variant ran instead.
        assert "031_audit_expire_execute.citus.sql" in first.applied
        again = migrate(url)
        assert again.applied == ()
        assert again.already_applied == len(first.applied)
        with pytest.raises(MigrationError, match="migrated for backend citus, not postgres"):
            migrate(url, backend=Backend.POSTGRES)
        with psycopg.connect(url) as conn:
            backends = conn.execute("SELECT DISTINCT backend FROM schema_migrations").fetchall()
        assert backends == [("citus",)]
        # Row-level security runs the tenant check on the workers: their copy of the function
        # has 125's body and 126's search path too (pg_temp last), not only the coordinator's.
        for index in range(len(citus_cluster.workers)):
            with psycopg.connect(worker_url(citus_cluster, url, index)) as conn:
                row = conn.execute(
                    "SELECT proconfig::text, prosrc LIKE '%pg_has_role(session_user%AND NOT%'"
                    " FROM pg_proc WHERE proname = 'pluginmon_current_tenant'"
                ).fetchone()
            assert row is not None
            assert row[0].endswith('pg_temp"}'), row[0]
            assert row[1] is True


def test_tables_are_distributed_by_tenant_or_reference(citus_db: str) -> None:
    with psycopg.connect(citus_db) as conn:
        rows = conn.execute(
            "SELECT logicalrelid::regclass::text, partmethod,"
            " column_to_column_name(logicalrelid, partkey), colocationid"
            " FROM pg_dist_partition"
        ).fetchall()
        kinds = {name: (method, column, colocation) for name, method, column, colocation in rows}
        plugins_group = kinds["plugins"][2]
        for name in REFERENCE:
            assert kinds[name][0] == "n", name
        for name in DISTRIBUTED_BY_TENANT:
            assert kinds[name][:2] == ("h", "tenant_id"), name
            assert kinds[name][2] == plugins_group, f"{name} is not co-located with plugins"
        assert kinds["ingest_ledger"][:2] == ("h", "batch_id")
        for name in ON_COORDINATOR:
            assert name not in kinds
        # Every key of a distributed table carries tenant_id (Citus refuses it otherwise).
        keys = conn.execute(
            "SELECT conrelid::regclass::text, conname FROM pg_constraint c"
            " JOIN pg_dist_partition p ON p.logicalrelid = c.conrelid AND p.partmethod = 'h'"
            " WHERE contype IN ('p', 'u') AND NOT EXISTS (SELECT 1 FROM pg_attribute a"
            "   WHERE a.attrelid = c.conrelid AND a.attname = column_to_column_name("
            "   p.logicalrelid, p.partkey) AND a.attnum = ANY (c.conkey))"
        ).fetchall()
        assert keys == []


def test_copy_through_coordinator_and_worker_lands_on_the_coordinator(
    citus_cluster: CitusCluster, citus_db: str
) -> None:
    tenant = tenant_name()
    plugin_ids = asyncio.run(create_plugins(citus_db, tenant=tenant, count=3))
    rows = [sample_row(n, plugin_ids, tenant=tenant) for n in range(500)]
    asyncio.run(copy_samples(citus_db, rows[:250]))
    asyncio.run(copy_samples(worker_url(citus_cluster, citus_db, 1), rows[250:]))
    with psycopg.connect(citus_db) as conn:
        count, cpu_sum, first, last = conn.execute(
            'SELECT count(*), sum(cpu_percent), min("timestamp"), max("timestamp")'
            " FROM plugin_samples WHERE tenant_id = %s",
            (tenant,),
        ).fetchone() or (None, None, None, None)
        ledger = conn.execute("SELECT sum(row_count) FROM ingest_ledger").fetchone()
    assert count == 500
    assert cpu_sum == sum(float(str(row[5])) for row in rows)
    assert (first, last) == (rows[0][0], rows[-1][0])
    assert ledger is not None
    assert int(ledger[0]) >= 500


def test_rls_shows_each_tenant_only_its_rows(citus_db: str) -> None:
    mine, theirs = tenant_name(), tenant_name()
    for tenant in (mine, theirs):
        asyncio.run(create_plugins(citus_db, tenant=tenant, count=2))
    role = f"r{uuid.uuid4().hex[:10]}"
    with psycopg.connect(citus_db, autocommit=True) as conn:
        conn.execute(f'CREATE ROLE "{role}" LOGIN')
        conn.execute("SELECT pluginmon_bind_tenant_role(%s, %s)", (role, mine))
    # A login role bound to a tenant: no setting needed, a query without WHERE sees its own.
    with psycopg.connect(citus_db.replace("postgres@", f"{role}@")) as conn:
        seen = conn.execute("SELECT DISTINCT tenant_id FROM plugins").fetchall()
        samples = conn.execute("SELECT DISTINCT tenant_id FROM plugin_samples_1m").fetchall()
    assert seen == [(mine,)]
    assert samples == []  # readable (no permission error), and nothing of the other tenant
    # The API's way: pluginmon_api with SET LOCAL pluginmon.tenant_id, propagated to workers.
    with psycopg.connect(citus_db) as conn:
        conn.execute("SET LOCAL ROLE pluginmon_api")
        conn.execute("SET LOCAL citus.propagate_set_commands = 'local'")
        conn.execute(f"SET LOCAL pluginmon.tenant_id = '{theirs}'")
        api_seen = conn.execute("SELECT DISTINCT tenant_id FROM plugins").fetchall()
        api_count = conn.execute("SELECT count(*) FROM plugins").fetchone()
    assert api_seen == [(theirs,)]
    assert api_count == (2,)
    # Without the setting an API session sees nothing at all.
    with psycopg.connect(citus_db) as conn:
        conn.execute("SET LOCAL ROLE pluginmon_api")
        assert conn.execute("SELECT count(*) FROM plugins").fetchone() == (0,)


def _insert_samples(conn: psycopg.Connection[tuple[object, ...]], tenant: str,
                    plugin_id: int, moments: list[datetime]) -> None:  # fmt: skip
    for index, moment in enumerate(moments):
        conn.execute(
            'INSERT INTO plugin_samples ("timestamp", tenant_id, plugin_id, environment, host,'
            " cpu_percent, rss_bytes, vms_bytes, threads, process_count, up)"
            " VALUES (%s, %s, %s, 'production', 'h', %s, %s, 1, 1, 1, %s)",
            (moment, tenant, plugin_id, float(index % 7), 1000 + index, index % 3 != 0),
        )


def test_retention_drops_and_columnar_converts_old_partitions(citus_cluster: CitusCluster) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    retention = Retention(samples=timedelta(days=10), compress_after=timedelta(days=3))
    with citus_cluster.database(prefix="ret") as url:
        migrate(url)
        tenant = tenant_name()
        (plugin_id,) = asyncio.run(create_plugins(url, tenant=tenant, count=1))
        with psycopg.connect(url, autocommit=True) as conn:
            # Partitions for the last 20 days, then rows in each.
            conn.execute(
                "SELECT pluginmon_maintain_partitions('plugin_samples', interval '90 days', 1, %s)",
                (now - timedelta(days=20),),
            )
            for days in range(20):
                conn.execute(
                    "SELECT pluginmon_create_day_partition('plugin_samples', %s)",
                    ((now - timedelta(days=days)).date(),),
                )
            moments = [now - timedelta(days=d, hours=1) for d in (15, 12, 5, 4, 1)]
            _insert_samples(conn, tenant, plugin_id, moments)

        async def run() -> None:
            async with admin_connection(url) as conn:
                report = await CitusMaintenance(clock=lambda: now).run(conn, retention)
                assert report.ran
                assert report.failed_steps == ()
                assert report.partitions_dropped  # the 15- and 12-day-old days among them

        asyncio.run(run())
        with psycopg.connect(url) as conn:
            kept = conn.execute(
                'SELECT "timestamp" FROM plugin_samples WHERE tenant_id = %s ORDER BY 1',
                (tenant,),
            ).fetchall()
            methods: dict[object, object] = dict(
                conn.execute(
                    "SELECT p.partition::text, am.amname"
                    " FROM pluginmon_partitions('plugin_samples') p"
                    " JOIN pg_class c ON c.oid = p.partition JOIN pg_am am ON am.oid = c.relam"
                    " WHERE p.lower_bound IS NOT NULL"
                ).fetchall()
            )
            bounds = conn.execute(
                "SELECT min(lower_bound) FROM pluginmon_partitions('plugin_samples')"
            ).fetchone()
        assert [row[0] for row in kept] == sorted(moments)[2:]  # 5, 4 and 1 day(s) old
        assert bounds is not None
        assert bounds[0] >= now - timedelta(days=11)
        old = [f"plugin_samples_p{(now - timedelta(days=d)).strftime('%Y%m%d')}" for d in (5, 4)]
        recent = f"plugin_samples_p{(now - timedelta(days=1)).strftime('%Y%m%d')}"
        for name in old:
            assert methods[name] == "columnar", (name, methods)
        assert methods[recent] == "heap"


def test_rollups_refresh_incrementally_and_match_a_group_by(citus_db: str) -> None:
    tenants = [tenant_name(), tenant_name()]
    start = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=30)
    with psycopg.connect(citus_db, autocommit=True) as conn:
        for tenant in tenants:
            (plugin_id,) = asyncio.run(create_plugins(citus_db, tenant=tenant, count=1))
            _insert_samples(
                conn, tenant, plugin_id, [start + timedelta(seconds=20 * i) for i in range(45)]
            )
        at = start + timedelta(minutes=10)
        first = conn.execute(
            "SELECT buckets FROM pluginmon_refresh_rollup('rollup_samples_1m', interval '1 minute',"
            " interval '10 minutes', %s, %s)",
            (at, start),
        ).fetchone()
        # Later: only the new buckets, plus late rows in an already refreshed one.
        _insert_samples(
            conn,
            tenants[0],
            _plugin_of(conn, tenants[0]),
            [start + timedelta(minutes=2, seconds=5)],
        )
        second = conn.execute(
            "SELECT buckets FROM pluginmon_refresh_rollup('rollup_samples_1m', interval '1 minute',"
            " interval '10 minutes', %s)",
            (start + timedelta(minutes=16),),
        ).fetchone()
        # Next minute: one new bucket only (a row arrived in it), updated in place.
        _insert_samples(
            conn,
            tenants[1],
            _plugin_of(conn, tenants[1]),
            [start + timedelta(minutes=15, seconds=30)],
        )
        third = conn.execute(
            "SELECT buckets FROM pluginmon_refresh_rollup('rollup_samples_1m', interval '1 minute',"
            " interval '10 minutes', %s)",
            (start + timedelta(minutes=17),),
        ).fetchone()
        rollup = conn.execute(
            "SELECT tenant_id, bucket, sample_count, cpu_percent_max, rss_bytes_max, up_ratio"
            " FROM rollup_samples_1m WHERE tenant_id = ANY(%s) ORDER BY 1, 2",
            (tenants,),
        ).fetchall()
        raw = conn.execute(
            "SELECT tenant_id, date_bin('1 minute', \"timestamp\", '2000-01-03'), count(*),"
            " max(cpu_percent), max(rss_bytes), avg(up::integer)::double precision"
            ' FROM plugin_samples WHERE tenant_id = ANY(%s) AND "timestamp" < %s'
            " GROUP BY 1, 2 ORDER BY 1, 2",
            (tenants, start + timedelta(minutes=16)),
        ).fetchall()
    assert first == (20,)  # 10 one-minute buckets for each of two tenants
    # The whole lookback once (from the first watermark minus 10 minutes): 15 buckets each.
    assert second == (30,)
    assert third == (1,)  # then one bucket back from the watermark: only the new row's
    assert rollup == raw
    late_bucket = [
        row for row in rollup if row[0] == tenants[0] and row[1] == start + timedelta(minutes=2)
    ]
    assert late_bucket[0][2] == 4  # three regular rows and the late one


def _plugin_of(conn: psycopg.Connection[tuple[object, ...]], tenant: str) -> int:
    row = conn.execute("SELECT id FROM plugins WHERE tenant_id = %s", (tenant,)).fetchone()
    assert row is not None
    return int(str(row[0]))


# -- tenants entered by the API and the CLI (storage.queries.TenantScope) ----------------------


def test_the_tenant_is_quoted_as_a_literal_for_set_local() -> None:
    assert set_local_tenant_sql("acme-2") == (
        "SET LOCAL citus.propagate_set_commands = 'local'; SET LOCAL pluginmon.tenant_id = 'acme-2'"
    )
    assert set_local_tenant_sql(None).endswith("pluginmon.tenant_id = ''")
    with pytest.raises(ValueError, match="not a valid slug"):
        set_local_tenant_sql("a'; RESET ROLE; --")
    assert quote_literal("it's") == "'it''s'"
    with pytest.raises(ValueError, match="backslash"):
        quote_literal("a\\'")


async def test_the_scope_is_detected_per_database(
    citus_cluster: CitusCluster, citus_db: str
) -> None:
    # The plain database is on the same coordinator (citus preloaded, no extension in it):
    # the scope follows the database, not the server. (Also where the suite's own test
    # database is a Citus coordinator's, as in a whole-suite run against one.)
    plain = citus_cluster.create_plain_database()
    try:
        for url, expected in (
            (citus_db, CITUS_SCOPE),
            (with_database(citus_cluster.url(), plain), PLAIN_SCOPE),
        ):
            conn = await asyncpg.connect(url)
            try:
                assert await detect_tenant_scope(conn) is expected
            finally:
                await conn.close()
    finally:
        citus_cluster.drop_database(plain)


async def test_on_citus_only_the_propagated_tenant_reaches_the_workers(citus_db: str) -> None:
    tenant = tenant_name()
    await create_plugins(citus_db, tenant=tenant, count=2)
    conn = await asyncpg.connect(citus_db)
    seen: dict[str, list[str]] = {}
    try:
        for name, scope in (("set_config", PLAIN_SCOPE), ("set local", CITUS_SCOPE)):
            async with conn.transaction():
                await scope.enter(conn, tenant, role="pluginmon_api")
                rows = await conn.fetch("SELECT DISTINCT tenant_id FROM plugins")
                seen[name] = [r["tenant_id"] for r in rows]
    finally:
        await conn.close()
    assert seen == {"set_config": [], "set local": [tenant]}


async def test_the_rules_read_plugin_metrics_of_the_pairs_asked_for_on_citus(citus_db: str) -> None:
    """series_windows (each agent's read for its rules) on Citus: only the (plugin,
    environment) pairs and the names asked for come back."""
    tenant = tenant_name()
    a, b = await create_plugins(citus_db, tenant=tenant, count=2)
    now = datetime.now(UTC).replace(microsecond=0)
    conn = await asyncpg.connect(citus_db)
    try:
        await conn.executemany(
            'INSERT INTO plugin_metrics ("timestamp", tenant_id, plugin_id, environment,'
            " metric_name, metric_kind, value, labels) VALUES ($1, $2, $3, $4, $5, 'gauge', $6, '{}')",
            [
                (now - timedelta(minutes=2), tenant, a, "production", "queue_depth", 7.0),
                (now - timedelta(minutes=1), tenant, a, "production", "queue_depth", 3.0),
                (now - timedelta(minutes=1), tenant, a, "staging", "queue_depth", 50.0),
                (now - timedelta(minutes=1), tenant, b, "staging", "queue_depth", 4.0),
                (now - timedelta(minutes=1), tenant, b, "staging", "other_metric", 1.0),
                (now - timedelta(minutes=1), tenant, b, "production", "queue_depth", 99.0),
            ],
        )
        got = await plugin_metrics.series_windows(
            conn,
            [(a, "production"), (b, "staging")],
            ["queue_depth"],
            since=now - timedelta(minutes=5),
            rate_since=now - timedelta(minutes=5),
        )
    finally:
        await conn.close()
    assert sorted(
        (w.plugin_id, w.environment, w.name, w.last_value, w.rate_points) for w in got
    ) == [
        (a, "production", "queue_depth", 3.0, 2),
        (b, "staging", "queue_depth", 4.0, 1),
    ]


async def test_api_requests_read_and_write_their_own_tenant_on_citus(citus_db: str) -> None:
    mine, theirs = tenant_name(), tenant_name()
    async with api_server(citus_db) as api:
        for tenant in (mine, theirs):
            await api.token(f"w-{tenant}", tenant=tenant, role=Role.WRITER)
            for name in ("shared", f"only-{tenant}"):
                reply = await api.call(
                    "POST", "/api/v1/plugins", token=f"w-{tenant}",
                    body={"name": name, "version": tenant},
                )  # fmt: skip
                assert reply.status == 201, reply.body
            # Each tenant's "shared" in staging too: the list writes environments in SQL.
            reply = await api.call(
                "PUT", "/api/v1/plugins/shared/environments/staging", token=f"w-{tenant}",
                body={"version": f"{tenant}-rc"},
            )  # fmt: skip
            assert reply.status == 200, reply.body
        await api.token("operator", tenant=None, role=Role.ADMIN)
        listed = await api.call("GET", "/api/v1/plugins", token=f"w-{mine}")
        shared = await api.call("GET", "/api/v1/plugins/shared", token=f"w-{theirs}")
        hidden = await api.call("GET", f"/api/v1/plugins/only-{theirs}", token=f"w-{mine}")
        as_operator = await api.call(
            "GET", "/api/v1/plugins", token="operator", headers={"X-Pluginmon-Tenant": theirs}
        )
        stored = await api.fetch(
            "SELECT tenant_id, name, version FROM plugins WHERE tenant_id = ANY($1) ORDER BY 1, 2",
            [mine, theirs],
        )
    assert listed.status == 200, listed.body
    assert sorted((p["name"], p["version"]) for p in listed.body["items"]) == [
        (f"only-{mine}", mine),
        ("shared", mine),
    ]
    assert (shared.status, shared.body["version"]) == (200, theirs)
    assert [(e["environment"], e["version"]) for e in shared.body["environments"]] == [
        ("staging", f"{theirs}-rc")
    ]
    # The list's environments are the tenant's own, on the shards the workers hold.
    listed_shared = next(p for p in listed.body["items"] if p["name"] == "shared")
    assert [(e["environment"], e["version"]) for e in listed_shared["environments"]] == [
        ("staging", f"{mine}-rc")
    ]
    assert hidden.status == 404
    assert hidden.error["code"] == "not_found"
    assert as_operator.status == 200, as_operator.body
    assert sorted(p["name"] for p in as_operator.body["items"]) == [f"only-{theirs}", "shared"]
    assert len(stored) == 4


def test_cli_commands_enter_the_tenant_on_citus(citus_db: str) -> None:
    mine, theirs = tenant_name(), tenant_name()
    env = {"PLUGINMON_DATABASE_URL": citus_db}
    asyncio.run(create_plugins(citus_db, tenant=mine, count=2))
    with psycopg.connect(citus_db) as conn:
        conn.execute("INSERT INTO tenants (id, name) VALUES (%s, %s)", (theirs, theirs))
        plugin, other = (
            str(row[0])
            for row in conn.execute(
                "SELECT name FROM plugins WHERE tenant_id = %s ORDER BY name", (mine,)
            ).fetchall()
        )
    # The plugin is looked up under row-level security on the workers: found for its tenant
    # (no values set yet), not found for another one.
    listed = run_cli("config", "list", "--tenant", mine, plugin, "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == []
    elsewhere = run_cli("config", "list", "--tenant", theirs, plugin, "--json", env=env)
    assert elsewhere.returncode == 1
    assert f"no plugin named {plugin!r}" in elsewhere.stderr
    # Writes lock the plugin row (FOR UPDATE): routed to its shard group by the tenant.
    declared = run_cli("deps", "set", "--tenant", mine, plugin, other, "^1.0.0", env=env)
    assert declared.returncode == 0, declared.stderr
    deps = run_cli("deps", "list", "--tenant", mine, plugin, "--json", env=env)
    assert deps.returncode == 0, deps.stderr
    assert [(d["dependency"], d["version_range"]) for d in json.loads(deps.stdout)] == [
        (other, "^1.0.0")
    ]
    configured = run_cli("config", "set", "--tenant", mine, plugin, "retries", "42", env=env)
    assert configured.returncode == 0, configured.stderr
    values = run_cli("config", "list", "--tenant", mine, plugin, "--json", env=env)
    assert [(v["key"], v["value"]) for v in json.loads(values.stdout)] == [("retries", 42)]


# Every INSERT ... ON CONFLICT target in registry/ and storage/ that names a tenant table's key
# (table, columns, predicate of a partial index). PostgreSQL infers the arbiter index from the
# set of columns and the predicate, so each needs a unique index with exactly those on every
# backend: on Citus the keys 100 gave tenant_id, elsewhere the indexes of 103.
CONFLICT_TARGETS = (
    ("plugin_environments", {"tenant_id", "plugin_id", "environment"}, None),
    ("plugin_vulnerabilities", {"tenant_id", "plugin_id", "environment", "scanner",
                                "vulnerability_id", "package_name"}, None),
    ("plugin_vex_statements", {"tenant_id", "plugin_id", "environment", "vulnerability_id",
                               "package_name"}, None),
    ("plugin_sboms", {"tenant_id", "plugin_id", "environment"}, None),
    ("plugin_dependencies", {"tenant_id", "plugin_id", "depends_on_plugin_id", "kind"}, None),
    ("plugin_dependency_states", {"tenant_id", "dependency_id", "environment"}, None),
    ("plugin_alerts", {"tenant_id", "fingerprint"}, "(status <> 'resolved'::text)"),
    ("notification_outbox", {"tenant_id", "idempotency_key"}, None),
    ("alert_notifications_sent", {"tenant_id", "idempotency_key"}, None),
    ("plugin_analytics", {"tenant_id", "plugin_id", "environment", "period", "period_start"},
     None),
)  # fmt: skip

_UNIQUE_INDEXES_SQL = """
SELECT i.indrelid::regclass::text,
       array(SELECT a.attname::text FROM pg_attribute a
              WHERE a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)),
       pg_get_expr(i.indpred, i.indrelid)
  FROM pg_index i WHERE i.indisunique AND i.indrelid::regclass::text = ANY (%s)
"""


def test_every_on_conflict_target_has_a_unique_index_on_every_backend(
    citus_db: str, migrated_db: str
) -> None:
    tables = [table for table, _, _ in CONFLICT_TARGETS]
    for url in (citus_db, migrated_db):
        with psycopg.connect(url) as conn:
            indexes = conn.execute(_UNIQUE_INDEXES_SQL, (tables,)).fetchall()
        have = {(str(t), frozenset(cols), pred) for t, cols, pred in indexes}
        missing = [
            (table, sorted(columns))
            for table, columns, predicate in CONFLICT_TARGETS
            if (table, frozenset(columns), predicate) not in have
        ]
        assert missing == [], url


def _one(conn: psycopg.Connection[tuple[object, ...]], query: str, *args: object) -> object:
    row = conn.execute(query, args).fetchone()
    assert row is not None
    return row[0]


# -- the daemon end to end on the cluster (the shape of tests/test_e2e_daemon.py) -------------


def test_pluginmon_run_on_citus_stores_samples_health_and_alerts(
    citus_cluster: CitusCluster, tmp_path: Path
) -> None:
    with (
        citus_cluster.database(prefix="e2e") as url,
        plugin_processes() as plugins,
        WebhookReceiver() as receiver,
    ):
        webhook = f'[[alerts.webhooks]]\nname = "e2e"\nurl = "{receiver.url}"\n'
        webhook += f'secret = "{WEBHOOK_SECRET}"\n'
        daemon = DaemonProcess(
            tmp_path=tmp_path, database_url=url, config_text=plugins.config() + RULES + webhook
        )
        daemon.start()
        try:
            daemon.wait_ready(timeout=120)  # it migrates the empty Citus database first

            def enough_samples() -> bool:
                samples = daemon.metric("pluginmon_samples_total") or 0
                health = daemon.metric("pluginmon_plugin_health_score", **labels("burner"))
                return samples >= 16 and health is not None

            wait_for("samples and health scores", enough_samples, timeout=60)

            def stored_with_health_and_alert() -> bool:
                with psycopg.connect(url) as conn:
                    row = conn.execute(
                        "SELECT (SELECT count(*) FROM plugin_samples WHERE tenant_id = 'e2e'),"
                        " (SELECT count(health_score) FROM plugins WHERE tenant_id = 'e2e'),"
                        " (SELECT count(*) FROM plugin_alerts WHERE tenant_id = 'e2e')"
                    ).fetchone()
                assert row is not None
                return int(row[0]) >= 16 and int(row[1]) == 2 and int(row[2]) >= 1

            # The daemon samples (and serves /metrics) while it still migrates the database.
            wait_for("rows, health and the alert in the database", stored_with_health_and_alert,
                     timeout=90)  # fmt: skip
            firing = daemon.metric(
                "pluginmon_alerts_firing",
                **labels("burner"),
                alertname="E2EBurnerBusy",
                severity="info",
            )
            database_up = daemon.metric("pluginmon_database_up")

            def firing_posted() -> list[dict[str, object]]:
                out = []
                for _headers, body in list(receiver.requests):
                    payload = json.loads(body)
                    names = {a["labels"]["alertname"] for a in payload["alerts"]}
                    if payload["status"] == "firing" and "E2EBurnerBusy" in names:
                        out.append(payload)
                return out

            posted = wait_for("the webhook to receive the firing alert", firing_posted)
            # What was sampled while the schema was being migrated (a loaded machine takes
            # seconds for 36 files on Citus: ~100 rows at 0.5 s) waits in the unresolved spool
            # and is replayed a few seconds' worth per cycle; a stop before that ends leaves
            # it for the next start, by design (seen: 84 rows left).
            wait_for(
                "the spools to drain",
                lambda: daemon.metric("pluginmon_spool_samples") == 0,
                timeout=90,
            )
        except BaseException:
            daemon.kill()
            raise
        daemon.signal(signal.SIGTERM)
        assert daemon.wait_exit(timeout=30) == 0, daemon.log_text()[-3000:]
        counts = daemon.final_counts()
        with psycopg.connect(url) as conn:
            stored: dict[str, int] = {
                str(name): int(str(count))
                for name, count in conn.execute(
                    "SELECT p.name, count(*) FROM plugin_samples s JOIN plugins p"
                    " ON p.id = s.plugin_id AND p.tenant_id = s.tenant_id"
                    " WHERE s.tenant_id = 'e2e' GROUP BY p.name"
                ).fetchall()
            }
            health = conn.execute(
                "SELECT name, health_score FROM plugins WHERE tenant_id = 'e2e' ORDER BY name"
            ).fetchall()
            alerts = conn.execute(
                "SELECT rule_name, status FROM plugin_alerts WHERE tenant_id = 'e2e'"
                " AND rule_name = 'E2EBurnerBusy'"
            ).fetchall()
            delivered = _one(
                conn,
                "SELECT count(*) FROM notification_outbox WHERE tenant_id = 'e2e'"
                " AND status = 'delivered'",
            )
            backend = _one(conn, "SELECT min(backend) FROM schema_migrations")
    problems = [
        line[-400:] for line in daemon.log_text().splitlines() if '"level": "error"' in line
    ]
    assert backend == "citus"
    assert problems == []
    assert firing == 1
    assert database_up == 1
    assert posted[0]["receiver"] == "e2e"
    assert counts["samples_taken"] >= 16
    assert counts["rows_in_spool"] == 0
    assert set(stored) == {"burner", "sleeper"}
    assert sum(stored.values()) == counts["samples_taken"]
    assert [name for name, _ in health] == ["burner", "sleeper"]
    assert all(score is not None and 0 <= float(str(score)) <= 100 for _, score in health)
    assert alerts
    assert {status for _, status in alerts} <= {"firing", "resolved"}
    assert int(str(delivered)) >= 1


# -- locking reads name the tenant (Citus runs FOR UPDATE only within one shard group) --------

_UPDATE_NEEDS_ONE = ApprovalPolicy(
    operation_types=frozenset({"update"}),
    environments=frozenset({"production"}),
    required_approvals=1,
    expires_after_seconds=600,
)


async def test_operations_approvals_alerts_and_the_registry_job_on_citus(
    citus_db: str, tmp_path: Path
) -> None:
    mine, theirs = tenant_name(), tenant_name()
    advisories = write_osv_database(tmp_path / "osv")
    async with api_server(citus_db, policies=[_UPDATE_NEEDS_ONE], clock=Clock()) as api:
        for tenant in (mine, theirs):
            await api.token(f"ci-{tenant}", tenant=tenant, role=Role.WRITER)
            await api.token(f"ann-{tenant}", tenant=tenant, role=Role.ADMIN)
            created = await api.call(
                "POST", "/api/v1/plugins", token=f"ci-{tenant}", body={"name": "resizer"}
            )
            assert created.status == 201, created.body
        # One gated update in each tenant: both expire in the registry job below.
        waiting = {}
        for tenant in (mine, theirs):
            reply = await api.call(
                "POST", "/api/v1/plugins/resizer/operations", token=f"ci-{tenant}",
                body={"type": "update", "environment": "production", "version": "2.0.0"},
            )  # fmt: skip
            assert reply.body["status"] == "awaiting_approval", reply.body
            waiting[tenant] = reply.body
        # Mine: create -> approve -> run -> fail (a retry) -> run again, then the deadline.
        gated = await api.call(
            "POST", "/api/v1/plugins/resizer/operations", token=f"ci-{mine}",
            body={"type": "update", "environment": "production", "version": "3.0.0",
                  "retry_limit": 1, "deadline_seconds": 60},
        )  # fmt: skip
        url = f"/api/v1/operations/{gated.body['id']}"
        decided = await api.call(
            "POST", f"/api/v1/approvals/{gated.body['approval_id']}/decision",
            token=f"ann-{mine}", body={"decision": "approved"},
        )  # fmt: skip
        assert (decided.status, decided.body["status"]) == (200, "approved"), decided.body
        read = await api.call("GET", url, token=f"ci-{mine}")
        assert read.body["status"] == "pending"
        running = await api.call("PATCH", url, token=f"ci-{mine}", body={"status": "running"})
        assert running.body["status"] == "running", running.body
        api.clock.advance(2)
        failed = await api.call(
            "PATCH", url, token=f"ci-{mine}", body={"status": "failed", "error": "exit 1"}
        )
        assert (failed.body["status"], failed.body["status_reason"]) == (
            "pending", "retry_scheduled")  # fmt: skip
        early = await api.call("PATCH", url, token=f"ci-{mine}", body={"status": "running"})
        assert (early.status, early.error["code"]) == (409, "retry_backoff")
        api.clock.advance(10)
        again = await api.call("PATCH", url, token=f"ci-{mine}", body={"status": "running"})
        assert again.body["status"] == "running", again.body
        # Another tenant's token cannot touch it (row-level security and the tenant filter).
        foreign = await api.call("PATCH", url, token=f"ci-{theirs}", body={"status": "failed"})
        assert foreign.status == 404

        # Alerts: acknowledge one by fingerprint, create and expire a silence.
        plugin_id = (await api.fetch(
            "SELECT id FROM plugins WHERE tenant_id = $1 AND name = 'resizer'", mine))[0]["id"]  # fmt: skip
        fingerprint = f"fp-{mine}"
        async with api.pool.acquire() as conn:
            await conn.execute(
                "INSERT INTO plugin_alerts (tenant_id, plugin_id, environment, rule_name,"
                " fingerprint, severity, status, labels)"
                " VALUES ($1, $2, 'production', 'PluginDown', $3, 'critical', 'firing', $4::jsonb)",
                mine, plugin_id, fingerprint,
                json.dumps({"alertname": "PluginDown", "plugin": "resizer"}),
            )  # fmt: skip
        acked = await api.call("POST", f"/api/v1/alerts/{fingerprint}/ack", token=f"ci-{mine}")
        assert (acked.status, acked.body["status"]) == (200, "acknowledged"), acked.body
        elsewhere = await api.call(
            "POST", f"/api/v1/alerts/{fingerprint}/ack", token=f"ci-{theirs}"
        )
        assert elsewhere.status == 404
        silence = await api.call(
            "POST", "/api/v1/silences", token=f"ci-{mine}",
            body={"matchers": {"plugin": "resizer"}, "ends_at": "2026-03-01T14:00:00Z"},
        )  # fmt: skip
        assert silence.status == 201, silence.body
        api.clock.advance(1)
        ended = await api.call(
            "POST", f"/api/v1/silences/{silence.body['id']}/expire", token=f"ci-{mine}"
        )
        assert (ended.status, ended.body["active"]) == (200, False), ended.body

        # An SBOM to match offline in the job.
        sbom = await api.call(
            "PUT", "/api/v1/plugins/resizer/sbom", token=f"ci-{theirs}", body=load("sbom.cdx.json")
        )
        assert sbom.status == 200, sbom.body

        # The registry job, 10 minutes later: both gated requests expire (two tenants),
        # mine's running operation is past its deadline, the SBOM is scanned.
        api.clock.advance(601)
        job = registry_job(
            lambda: api.pool, metrics=None, clock=api.clock, vulnerability_db=advisories
        )
        await job()
        operations = await api.fetch(
            "SELECT tenant_id, id, status, status_reason, retry_count FROM plugin_operations"
            " WHERE tenant_id = ANY($1) ORDER BY id",
            [mine, theirs],
        )
        approvals = await api.fetch(
            "SELECT tenant_id, operation_id, status FROM plugin_approvals"
            " WHERE tenant_id = ANY($1) ORDER BY id",
            [mine, theirs],
        )
        alert = await api.fetch(
            "SELECT status, acknowledged_by FROM plugin_alerts WHERE tenant_id = $1", mine
        )
        silences = await api.fetch("SELECT ends_at FROM alert_silences WHERE tenant_id = $1", mine)
        findings = await api.fetch(
            "SELECT DISTINCT package_name FROM plugin_vulnerabilities WHERE tenant_id = $1",
            theirs,
        )
        scanned = await api.fetch(
            "SELECT scanned_at FROM plugin_sboms WHERE tenant_id = $1", theirs
        )
        actions = await api.fetch(
            "SELECT tenant_id, action, count(*) AS n FROM audit_log WHERE tenant_id = ANY($1)"
            " GROUP BY 1, 2",
            [mine, theirs],
        )
    by_id = {r["id"]: (r["tenant_id"], r["status"], r["status_reason"], r["retry_count"])
             for r in operations}  # fmt: skip
    assert by_id == {
        waiting[mine]["id"]: (mine, "cancelled", "approval_expired", 0),
        waiting[theirs]["id"]: (theirs, "cancelled", "approval_expired", 0),
        gated.body["id"]: (mine, "failed", "deadline_exceeded", 1),
    }
    assert sorted((r["tenant_id"], r["operation_id"], r["status"]) for r in approvals) == sorted([
        (mine, waiting[mine]["id"], "expired"),
        (theirs, waiting[theirs]["id"], "expired"),
        (mine, gated.body["id"], "approved"),
    ])  # fmt: skip
    assert [(r["status"], r["acknowledged_by"]) for r in alert] == [("acknowledged", f"ci-{mine}")]
    assert [r["ends_at"] for r in silences] == [START + timedelta(seconds=13)]
    assert {r["package_name"] for r in findings} == {"lodash", "jinja2", "requests"}
    assert [r["scanned_at"] for r in scanned] == [api.clock.now]
    counted = {(r["tenant_id"], r["action"]): r["n"] for r in actions}
    assert counted[(mine, "approval.expire")] == 1
    assert counted[(theirs, "approval.expire")] == 1
    assert counted[(mine, "operation.deadline_exceeded")] == 1
    assert counted[(theirs, "vulnerability.scan")] == 1


async def test_secret_rewrap_and_backup_expiry_lock_tenant_by_tenant_on_citus(
    citus_db: str,
) -> None:
    tenants = [tenant_name(), tenant_name()]
    now = datetime.now(UTC)
    old = crypto.Keyring(
        primary_id="k1", keys=(crypto.generate_key(key_id="k1", now=now),), source="test"
    )
    keyring = crypto.rotated(old, now=now, key_id="k2")
    ids = {}
    for tenant in tenants:
        (ids[tenant],) = await create_plugins(citus_db, tenant=tenant, count=1)
    conn = await asyncpg.connect(citus_db)
    try:
        names = {r["tenant_id"]: r["name"] for r in await conn.fetch(
            "SELECT tenant_id, name FROM plugins WHERE tenant_id = ANY($1)", tenants)}  # fmt: skip
        for tenant in tenants:
            for n in range(3):
                blob, key_id = crypto.encrypt(
                    old, b'"s3cret"', aad=crypto.secret_aad(
                        tenant_id=tenant, plugin=names[tenant], environment="production",
                        key=f"key{n}"),
                )  # fmt: skip
                await conn.execute(
                    "INSERT INTO plugin_config (tenant_id, plugin_id, environment, key, is_secret,"
                    " secret_ciphertext, secret_key_id) VALUES ($1, $2, 'production', $3, true,"
                    " $4, $5)",
                    tenant, ids[tenant], f"key{n}", blob, key_id,
                )  # fmt: skip
            await conn.execute(
                "INSERT INTO plugin_backups (tenant_id, plugin_id, environment, provider,"
                " location, checksum, size_bytes, status, created_at, completed_at, expires_at)"
                " VALUES ($1, $2, 'production', 'local', '/nowhere', 'sha256:00', 1,"
                " 'completed', $3, $3, $3)",
                tenant, ids[tenant], now - timedelta(days=2),
            )  # fmt: skip
        report = await secrets.rewrap_all(
            conn, keyring, actor=Actor(name="cli:test"), clock=lambda: now, batch_size=4
        )
        deleted, kept = await backup_schedule.expire_due(conn, now=now)
        under = await conn.fetch(
            "SELECT tenant_id, secret_key_id, count(*) AS n FROM plugin_config"
            " WHERE tenant_id = ANY($1) GROUP BY 1, 2",
            tenants,
        )
        values = await conn.fetch(
            "SELECT tenant_id, key, secret_ciphertext, secret_key_id FROM plugin_config"
            " WHERE tenant_id = ANY($1)",
            tenants,
        )
        backups_left = await conn.fetchval(
            "SELECT count(*) FROM plugin_backups WHERE tenant_id = ANY($1)", tenants
        )
        audited = await conn.fetch(
            "SELECT tenant_id, action FROM audit_log WHERE tenant_id = ANY($1)"
            " AND action IN ('config.secret.rewrap', 'backup.delete') ORDER BY id",
            tenants,
        )
    finally:
        await conn.close()
    assert report.remaining == 0
    assert report.values >= 6  # (other tests' secrets in this database may be re-wrapped too)
    assert sorted((r["tenant_id"], r["secret_key_id"], r["n"]) for r in under) == sorted(
        (tenant, "k2", 3) for tenant in tenants
    )
    for r in values:
        plain = crypto.decrypt(
            keyring, bytes(r["secret_ciphertext"]), key_id=r["secret_key_id"],
            aad=crypto.secret_aad(tenant_id=r["tenant_id"], plugin=names[r["tenant_id"]],
                                  environment="production", key=r["key"]),
            where="test",
        )  # fmt: skip
        assert plain == b'"s3cret"'
    assert len(deleted) >= 2
    assert kept == []
    assert backups_left == 0
    assert sorted(set((r["tenant_id"], r["action"]) for r in audited)) == sorted(
        (tenant, action)
        for tenant in tenants
        for action in ("backup.delete", "config.secret.rewrap")
    )


# -- the Grafana dashboards' SQL (tests/test_dashboards_postgres.py's data and expander) -------


def test_every_dashboard_query_runs_on_citus_as_owner_and_tenant_reader(
    citus_cluster: CitusCluster,
) -> None:
    with citus_cluster.database(prefix="dash") as url:
        migrate(url)
        loaded = dashboards._load(url)
        role = f"grafana_acme_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f'CREATE ROLE "{role}" LOGIN')
            conn.execute("SELECT pluginmon_bind_tenant_role(%s, 'acme')", (role,))
        reader = url.replace("postgres@", f"{role}@")
        failures: list[str] = []
        checked = 0
        for long_range in (False, True):
            context = dashboards._context(
                loaded, environments=("production", "staging"), long_range=long_range
            )
            foreign = dashboards._context(
                loaded, tenant="zeta", plugin="zeta/resizer", long_range=long_range
            )
            for query in dashboards._all_sql_queries():
                where = f"{query.dashboard} {query.location} long_range={long_range}"
                try:
                    owner = dashboards._run(url, query.text, context)
                    mine = dashboards._run(reader, query.text, context)
                    theirs = dashboards._run(reader, query.text, foreign)
                except psycopg.Error as exc:
                    failures.append(f"{where}: {exc}")
                    continue
                checked += 1
                if query.format == "time_series" and not owner.rows:
                    failures.append(f"{where}: no rows")
                if query.location == "variable tenant":
                    assert mine.rows == [("acme",)], where
                    continue
                if mine != owner:
                    failures.append(f"{where}: the reader sees {mine.rows}, the owner {owner.rows}")
                leaked = [v for row in theirs.rows for v in row if v not in (0, None)]
                if leaked:
                    failures.append(f"{where}: zeta's rows for the acme reader: {theirs.rows}")
        assert failures == [], "\n".join(failures)
        assert checked == 2 * len(dashboards._all_sql_queries())
        # The numbers are the ones the PostgreSQL test checks (tests/test_dashboards_postgres).
        production = dashboards._context(loaded)
        for title, expected in (
            ("Plugins", {"plugins": 2}),
            ("Up now", {"up": 1, "down": 1}),
            ("Average health", {"health_score": 67.5}),
            ("Firing alerts", {"firing": 1}),
            ("Restarts", {"restarts": 1}),
        ):
            assert dashboards._panel(reader, dashboards.FLEET, title, production).one() == expected
