"""The real sql/ schema: idempotent migrations, the contract's columns and indexes, constraints."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import asyncpg
import psycopg
import pytest
from psycopg import errors

from pluginmon.registry import audit
from pluginmon.storage import alert_state, health_store
from pluginmon.storage.backend import (
    Retention,
    admin_connection,
    detect_backend,
)
from pluginmon.storage.engines import (
    prepare_database,
)
from pluginmon.storage.errors import constraint_name
from pluginmon.storage.health_store import HealthWrite
from pluginmon.storage.migrate import Backend, applied_versions, migrate
from pluginmon.storage.queries import ensure_plugins, ensure_tenant_and_plugin, set_tenant
from tests.dbutil import is_citus, migrated_copy
from tests.schema_helpers import (
    SAMPLE_COLUMNS,
    TENANT_TABLES,
    Conn,
    add_plugin,
    backend_of,
)

# Everything a migration can create, as text, so two states of the schema compare equal.
_FINGERPRINT_SQL = """
SELECT 'column ' || c.relname || '.' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
       || ' ' || a.attnotnull || ' ' || coalesce(pg_get_expr(d.adbin, d.adrelid), '')
  FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
  JOIN pg_namespace n ON n.oid = c.relnamespace
  LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
 WHERE n.nspname IN ('public', 'pluginmon_tenant') AND a.attnum > 0 AND NOT a.attisdropped
UNION ALL
SELECT 'constraint ' || conrelid::regclass || ' ' || conname || ' ' || pg_get_constraintdef(oid)
  FROM pg_constraint WHERE connamespace = 'public'::regnamespace
UNION ALL
SELECT 'index ' || indexdef FROM pg_indexes WHERE schemaname = 'public'
UNION ALL
SELECT 'policy ' || tablename || ' ' || policyname || ' ' || coalesce(qual, '') FROM pg_policies
UNION ALL
SELECT 'function ' || p.oid::regprocedure || ' ' || md5(p.prosrc)
  FROM pg_proc p WHERE p.pronamespace = 'public'::regnamespace
UNION ALL
SELECT 'view ' || schemaname || '.' || viewname || ' ' || md5(definition) FROM pg_views
 WHERE schemaname IN ('public', 'pluginmon_tenant')
UNION ALL
SELECT 'trigger ' || tgrelid::regclass || ' ' || tgname FROM pg_trigger WHERE NOT tgisinternal
UNION ALL
SELECT 'rls ' || relname || ' ' || relrowsecurity FROM pg_class
 WHERE relnamespace = 'public'::regnamespace AND relkind IN ('r', 'p')
ORDER BY 1
"""


def _fingerprint(url: str) -> list[str]:
    with psycopg.connect(url) as conn:
        return [str(row[0]) for row in conn.execute(_FINGERPRINT_SQL).fetchall()]


@pytest.fixture(scope="module")
def shared_db(pg_admin_url: str, migrated_template: str) -> Iterator[str]:
    """One migrated database for the module; ``conn`` rolls every test back."""
    with migrated_copy(pg_admin_url, migrated_template, prefix="schema") as url:
        yield url


@pytest.fixture
def conn(shared_db: str) -> Iterator[Conn]:
    """A connection inside a transaction that is rolled back after the test."""
    with psycopg.connect(shared_db) as connection:
        try:
            yield connection
        finally:
            connection.rollback()


@pytest.fixture
def own_conn(migrated_db: str) -> Iterator[Conn]:
    """Autocommit, on a database of its own (for what must really commit)."""
    with psycopg.connect(migrated_db, autocommit=True) as connection:
        yield connection


def test_migrations_apply_twice_without_change(fresh_db: str) -> None:
    first = migrate(fresh_db)
    assert [name[:3] for name in first.applied][:4] == ["001", "002", "003", "004"]
    before = _fingerprint(fresh_db)
    assert any(line.startswith("column plugin_samples.timestamp") for line in before)

    second = migrate(fresh_db)

    assert second.applied == ()
    assert second.already_applied == len(first.applied)
    assert _fingerprint(fresh_db) == before


def test_plugin_samples_columns_are_the_contract(conn: Conn) -> None:
    rows = conn.execute(
        "SELECT attname, format_type(atttypid, atttypmod), attnotnull FROM pg_attribute"
        " WHERE attrelid = 'plugin_samples'::regclass AND attnum > 0 AND NOT attisdropped"
        " ORDER BY attnum"
    ).fetchall()
    assert tuple(r[0] for r in rows) == SAMPLE_COLUMNS
    nullable = {r[0] for r in rows if not r[2]}
    assert nullable == {
        "uss_bytes",
        "swap_bytes",
        "fds",
        "read_bytes",
        "write_bytes",
        "ctx_switches_voluntary",
        "ctx_switches_involuntary",
    }
    types = {r[0]: r[1] for r in rows}
    assert types["timestamp"] == "timestamp with time zone"
    assert types["cpu_percent"] == "double precision"
    assert types["plugin_id"] == "bigint"
    assert types["threads"] == "integer"
    assert types["up"] == "boolean"
    # Exactly these on the hot path (ingest speed is benchmarked): two B-trees, and the BRIN
    # that time-range reads use (sql/128; its cost to ingest is in docs/BENCHMARKS.md).
    indexes = conn.execute(
        "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'plugin_samples'"
        " AND schemaname = 'public' ORDER BY 1"
    ).fetchall()
    assert [r[0] for r in indexes] == [
        "idx_plugin_samples_plugin_time",
        "idx_plugin_samples_tenant_time",
        "idx_plugin_samples_time",
    ]
    assert 'USING btree (plugin_id, "timestamp" DESC)' in indexes[0][1]
    assert 'USING btree (tenant_id, "timestamp" DESC)' in indexes[1][1]
    assert 'USING brin ("timestamp") WITH (autosummarize=' in indexes[2][1]


def test_seed_recommended_indexes(conn: Conn) -> None:
    defs = {
        str(r[0]): str(r[1])
        for r in conn.execute(
            "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'"
        ).fetchall()
    }
    assert (
        'plugin_metrics USING btree (plugin_id, metric_name, "timestamp" DESC)'
        in (defs["idx_plugin_metrics_timeseries"])
    )
    assert defs["idx_plugins_tenant_status_health"].endswith(
        "USING btree (tenant_id, status, health_score) WHERE (tenant_id IS NOT NULL)"
    )
    assert defs["idx_plugin_operations_env_type_status"].endswith(
        "USING btree (environment, operation_type, status, started_at)"
    )
    # The seed's partial indexes.
    assert "WHERE (NOT satisfied)" in defs["idx_plugin_dependencies_unsatisfied"]
    assert "NOT is_secret" in defs["idx_plugin_config_non_secret"]
    assert "WHERE (enabled AND (status = 'installed'::text))" in defs["idx_plugins_tenant_active"]
    assert "(tenant_id, severity, status" in defs["idx_plugin_alerts_tenant_severity_status"]
    assert defs["idx_plugin_alerts_open_fingerprint"].startswith("CREATE UNIQUE INDEX")
    assert "WHERE (status <> 'resolved'::text)" in defs["idx_plugin_alerts_open_fingerprint"]


async def test_acknowledged_open_alerts_are_read_through_their_own_index(
    migrated_db: str,
) -> None:
    """104: every agent reads the acknowledged open alerts each cycle; with thousands of
    open alerts in a fleet's database the read uses the partial index of the few acknowledged
    ones, not a scan of every open alert."""
    conn = await asyncpg.connect(migrated_db)
    try:
        ids = await ensure_plugins(conn, [("acme", f"p{i}", "prod") for i in range(2000)])
        await conn.execute(
            """INSERT INTO plugin_alerts (tenant_id, plugin_id, environment, rule_name,
                   fingerprint, severity, status)
               SELECT 'acme', pid, 'prod', 'R', md5(pid::text), 'warning', 'firing'
                 FROM unnest($1::bigint[]) pid""",
            list(ids.values()),
        )
        await conn.execute(
            "UPDATE plugin_alerts SET acknowledged_at = now(), acknowledged_by = 'ops'"
            " WHERE plugin_id = ANY($1)",
            [ids[("acme", "p7")], ids[("acme", "p9")]],
        )
        await conn.execute("ANALYZE plugin_alerts")
        defs = await conn.fetchval(
            "SELECT indexdef FROM pg_indexes WHERE indexname = 'idx_plugin_alerts_acknowledged_open'"
        )
        assert defs.endswith(
            "(fingerprint) WHERE ((status <> 'resolved'::text) AND (acknowledged_at IS NOT NULL))"
        )
        if is_citus(migrated_db):
            # Citus shows one shard's plan unless asked for all: the one holding acme's rows
            # is the one that uses the index.
            await conn.execute("SET citus.explain_all_tasks TO on")
        plan = "\n".join(
            r[0]
            for r in await conn.fetch(
                "EXPLAIN SELECT fingerprint, acknowledged_at, acknowledged_by FROM plugin_alerts"
                " WHERE status <> 'resolved' AND acknowledged_at IS NOT NULL"
            )
        )
        assert "idx_plugin_alerts_acknowledged_open" in plan
        acked = await alert_state.acknowledged(conn)
        assert [by for _, by in acked.values()] == ["ops", "ops"]
        assert len(acked) == 2
    finally:
        await conn.close()


def test_plugin_source_enum_is_the_seeds(conn: Conn) -> None:
    rows = conn.execute(
        "SELECT enumlabel FROM pg_enum WHERE enumtypid = 'plugin_source'::regtype ORDER BY enumsortorder"
    ).fetchall()
    assert [r[0] for r in rows] == [
        "MARKETPLACE",
        "GIT_REPOSITORY",
        "NPM_REGISTRY",
        "LOCAL_FILE",
        "DOCKER_REGISTRY",
        "INTERNAL",
        "CUSTOM",
    ]


def test_rollup_views_have_the_contract_columns(conn: Conn) -> None:
    for view in ("plugin_samples_1m", "plugin_samples_1h"):
        rows = conn.execute(
            "SELECT column_name, data_type FROM information_schema.columns"
            " WHERE table_schema = 'public' AND table_name = %s ORDER BY ordinal_position",
            (view,),
        ).fetchall()
        assert rows == [
            ("bucket", "timestamp with time zone"),
            ("tenant_id", "text"),
            ("plugin_id", "bigint"),
            ("environment", "text"),
            ("sample_count", "bigint"),
            ("cpu_percent_avg", "double precision"),
            ("cpu_percent_max", "double precision"),
            ("rss_bytes_avg", "double precision"),
            ("rss_bytes_max", "bigint"),
            ("vms_bytes_max", "bigint"),
            ("threads_max", "integer"),
            ("process_count_max", "integer"),
            ("up_ratio", "double precision"),
            ("restarts_sum", "bigint"),
            # sql/090: percentiles over the bucket's raw rows.
            ("cpu_percent_p50", "double precision"),
            ("cpu_percent_p95", "double precision"),
            ("cpu_percent_p99", "double precision"),
            ("rss_bytes_p50", "double precision"),
            ("rss_bytes_p95", "double precision"),
            ("rss_bytes_p99", "double precision"),
        ], view


def test_every_tenant_table_has_row_level_security(conn: Conn) -> None:
    backend = backend_of(conn)
    rows = conn.execute(
        """
        SELECT c.relname, c.relrowsecurity,
               EXISTS (SELECT 1 FROM pg_policies p WHERE p.tablename = c.relname)
          FROM pg_class c
         WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p')
           AND NOT c.relispartition
           AND EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid
                        AND a.attname IN ('tenant_id') AND NOT a.attisdropped)
        """
    ).fetchall()
    tables = {str(r[0]): (bool(r[1]), bool(r[2])) for r in rows}
    assert set(TENANT_TABLES) - {"tenants"} <= tables.keys()
    # TimescaleDB refuses compression next to row security: those two are read through the
    # tenant-checked views instead (test_rls covers them on both backends).
    exempt = {"plugin_samples", "plugin_metrics"} if backend is Backend.TIMESCALEDB else set()
    unprotected = sorted(
        name
        for name, (rls, policy) in tables.items()
        if name not in exempt and not (rls and policy)
    )
    assert unprotected == []
    tenants = conn.execute(
        "SELECT relrowsecurity FROM pg_class WHERE oid = 'tenants'::regclass"
    ).fetchone()
    assert tenants == (True,)


# -- constraints ---------------------------------------------------------------------------


def _sample_values(plugin_id: int, cpu: float) -> tuple[object, ...]:
    return ("2026-01-01T00:00:00Z", "acme", plugin_id, "prod", "h", cpu, 1, 1, None, None, 1, None,
            None, None, None, None, 1, 0, True)  # fmt: skip


def _insert_sample(conn: Conn, plugin_id: int, cpu: float) -> None:
    conn.execute(
        "INSERT INTO plugin_samples VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s,"
        " %s, %s, %s, %s, %s, %s)",
        _sample_values(plugin_id, cpu),
    )


BadRow = Callable[[Conn, int, int], object]

BAD_ROWS: dict[str, tuple[BadRow, type[Exception], str | None]] = {
    "negative cpu": (
        lambda c, p, _o: _insert_sample(c, p, -0.5),
        errors.CheckViolation,
        "plugin_samples_cpu_percent_nonnegative",
    ),
    "health 101": (
        lambda c, p, _o: c.execute("UPDATE plugins SET health_score = 101 WHERE id = %s", (p,)),
        errors.CheckViolation,
        "plugins_health_score_range",
    ),
    "negative memory usage": (
        lambda c, p, _o: c.execute("UPDATE plugins SET memory_usage = -1 WHERE id = %s", (p,)),
        errors.CheckViolation,
        "plugins_memory_usage_nonnegative",
    ),
    "duplicate plugin name in a tenant": (
        lambda c, _p, _o: add_plugin(c, "acme", "resizer"),
        errors.UniqueViolation,
        "plugins_tenant_name_key",
    ),
    "unknown source": (
        lambda c, p, _o: c.execute(
            "UPDATE plugins SET installed_from = 'FTP_SERVER' WHERE id = %s", (p,)
        ),
        errors.InvalidTextRepresentation,
        None,
    ),
    "dependency on a missing plugin": (
        lambda c, p, _o: c.execute(
            "INSERT INTO plugin_dependencies (tenant_id, plugin_id, depends_on_plugin_id)"
            " VALUES ('acme', %s, 999999)",
            (p,),
        ),
        errors.ForeignKeyViolation,
        "plugin_dependencies_depends_on_fkey",
    ),
    "dependency on another tenant's plugin": (
        lambda c, p, other: c.execute(
            "INSERT INTO plugin_dependencies (tenant_id, plugin_id, depends_on_plugin_id)"
            " VALUES ('acme', %s, %s)",
            (p, other),
        ),
        errors.ForeignKeyViolation,
        "plugin_dependencies_depends_on_fkey",
    ),
    "child row claiming another tenant": (
        lambda c, p, _o: c.execute(
            "INSERT INTO plugin_operations (tenant_id, plugin_id, environment, operation_type)"
            " VALUES ('globex', %s, 'prod', 'install')",
            (p,),
        ),
        errors.ForeignKeyViolation,
        "plugin_operations_plugin_fkey",
    ),
    "retries beyond the limit": (
        lambda c, p, _o: c.execute(
            "INSERT INTO plugin_operations (tenant_id, plugin_id, environment, operation_type,"
            " retry_count, retry_limit) VALUES ('acme', %s, 'prod', 'install', 4, 3)",
            (p,),
        ),
        errors.CheckViolation,
        "plugin_operations_retry_within_limit",
    ),
    "tenant id that is not a slug": (
        lambda c, _p, _o: c.execute("INSERT INTO tenants (id) VALUES ('Acme Corp')"),
        errors.CheckViolation,
        "tenants_id_slug",
    ),
    "unknown metric kind": (
        lambda c, p, _o: c.execute(
            "INSERT INTO plugin_metrics VALUES (now(), 'acme', %s, 'prod', 'x', 'rate', 1, '{}')",
            (p,),
        ),
        errors.CheckViolation,
        "plugin_metrics_kind_check",
    ),
    "alert severity outside the enum": (
        lambda c, p, _o: c.execute(
            "INSERT INTO plugin_alerts (tenant_id, plugin_id, environment, rule_name, fingerprint,"
            " severity) VALUES ('acme', %s, 'prod', 'r', 'f', 'page')",
            (p,),
        ),
        errors.CheckViolation,
        "plugin_alerts_severity_check",
    ),
    "secret stored in clear": (
        lambda c, p, _o: c.execute(
            "INSERT INTO plugin_config (tenant_id, plugin_id, environment, key, value, is_secret,"
            " secret_ciphertext, secret_key_id) VALUES ('acme', %s, 'prod', 'token', '\"s3cr3t\"',"
            " true, '\\x01', 'k1')",
            (p,),
        ),
        errors.CheckViolation,
        "plugin_config_secret_encrypted",
    ),
    "cvss above 10": (
        lambda c, p, _o: c.execute(
            "INSERT INTO plugin_vulnerabilities (tenant_id, plugin_id, vulnerability_id, severity,"
            " cvss_score) VALUES ('acme', %s, 'CVE-1', 'high', 10.5)",
            (p,),
        ),
        errors.CheckViolation,
        "plugin_vulnerabilities_cvss_range",
    ),
    "self-approval": (
        lambda c, p, _o: c.execute(
            "INSERT INTO plugin_approvals (tenant_id, plugin_id, environment, request_type, status,"
            " requested_by, decided_by, decided_at) VALUES ('acme', %s, 'prod', 'install',"
            " 'approved', 'ann', 'ann', now())",
            (p,),
        ),
        errors.CheckViolation,
        "plugin_approvals_not_self_approved",
    ),
}


def _skip_config_triggers_on_citus(conn: Conn) -> None:
    if conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'citus'").fetchone():
        pytest.skip(
            "on Citus sql/100 drops plugin_config's schema, version and required triggers "
            "(Citus refuses triggers on distributed tables): the API checks and numbers "
            "config values there (tests/test_api_config.py)"
        )


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_constraints_reject_bad_rows(conn: Conn, case: str) -> None:
    plugin_id = add_plugin(conn, "acme", "resizer")
    other_tenant_plugin = add_plugin(conn, "globex", "resizer")
    statement, error, constraint = BAD_ROWS[case]
    with pytest.raises(error) as caught:
        statement(conn, plugin_id, other_tenant_plugin)
    if constraint is not None:
        assert isinstance(caught.value, psycopg.Error)
        assert constraint_name(caught.value) == constraint
    else:
        assert "plugin_source" in str(caught.value)


def test_open_alert_fingerprint_is_unique_until_resolved(conn: Conn) -> None:
    plugin_id = add_plugin(conn, "acme", "resizer")
    insert = (
        "INSERT INTO plugin_alerts (tenant_id, plugin_id, environment, rule_name, fingerprint,"
        " severity, status, resolved_at) VALUES ('acme', %s, 'prod', 'cpu', 'fp1', 'warning', %s, %s)"
    )
    conn.execute(insert, (plugin_id, "firing", None))
    with pytest.raises(errors.UniqueViolation) as caught, conn.transaction():
        conn.execute(insert, (plugin_id, "pending", None))
    assert constraint_name(caught.value) == "idx_plugin_alerts_open_fingerprint"
    conn.execute("UPDATE plugin_alerts SET status = 'resolved', resolved_at = now()")
    conn.execute(insert, (plugin_id, "firing", None))
    assert conn.execute("SELECT count(*) FROM plugin_alerts").fetchone() == (2,)


# PostgreSQL 18 reports ON DELETE RESTRICT as restrict_violation, 15 as foreign_key_violation.
RESTRICT_ERRORS = (errors.RestrictViolation, errors.ForeignKeyViolation)


def test_restrict_and_cascade(conn: Conn) -> None:
    base = add_plugin(conn, "acme", "base")
    user = add_plugin(conn, "acme", "user")
    conn.execute(
        "INSERT INTO plugin_dependencies (tenant_id, plugin_id, depends_on_plugin_id)"
        " VALUES ('acme', %s, %s)",
        (user, base),
    )
    conn.execute(
        "INSERT INTO plugin_config (tenant_id, plugin_id, environment, key, value)"
        " VALUES ('acme', %s, 'prod', 'size', '3')",
        (user,),
    )
    with pytest.raises(RESTRICT_ERRORS) as caught, conn.transaction():
        conn.execute("DELETE FROM plugins WHERE id = %s", (base,))
    assert constraint_name(caught.value) == "plugin_dependencies_depends_on_fkey"

    conn.execute(
        "INSERT INTO plugin_backups (tenant_id, plugin_id, environment, provider, location)"
        " VALUES ('acme', %s, 'prod', 's3', 's3://b/k')",
        (user,),
    )
    with pytest.raises(RESTRICT_ERRORS) as caught, conn.transaction():
        conn.execute("DELETE FROM plugins WHERE id = %s", (user,))
    assert constraint_name(caught.value) == "plugin_backups_plugin_fkey"

    conn.execute("DELETE FROM plugin_backups")
    conn.execute("DELETE FROM plugins WHERE id = %s", (user,))
    # The dependent's own dependency rows and config went with it; base can go now.
    assert conn.execute("SELECT count(*) FROM plugin_dependencies").fetchone() == (0,)
    assert conn.execute("SELECT count(*) FROM plugin_config").fetchone() == (0,)
    conn.execute("DELETE FROM plugins WHERE id = %s", (base,))
    add_plugin(conn, "acme", "last")
    with pytest.raises(RESTRICT_ERRORS) as caught, conn.transaction():
        conn.execute("DELETE FROM tenants WHERE id = 'acme'")
    assert constraint_name(caught.value) == "plugins_tenant_id_fkey"


# -- plugin_config: schema validation, secrets, versions -----------------------------------------

CONFIG_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["mode", "workers"],
    "properties": {
        "mode": {"type": "string", "enum": ["fast", "safe"]},
        "workers": {"type": "integer"},
        "ratio": {"type": ["number", "null"]},
        "api_token": {"type": "string"},
    },
}


def _set_config(conn: Conn, plugin_id: int, key: str, value: object) -> None:
    conn.execute(
        "INSERT INTO plugin_config (tenant_id, plugin_id, environment, key, value)"
        " VALUES ('acme', %s, 'prod', %s, %s::jsonb)",
        (plugin_id, key, json.dumps(value)),
    )


@pytest.mark.parametrize(
    ("key", "value", "constraint"),
    [
        ("workers", "4", "plugin_config_schema_type"),
        ("workers", 2.5, "plugin_config_schema_type"),
        ("mode", "turbo", "plugin_config_schema_enum"),
        ("colour", "red", "plugin_config_schema_key"),
        ("ratio", "high", "plugin_config_schema_type"),
    ],
)
def test_config_values_are_checked_against_the_schema(
    conn: Conn, key: str, value: object, constraint: str
) -> None:
    _skip_config_triggers_on_citus(conn)
    plugin_id = add_plugin(conn, "acme", "resizer", config_schema=json.dumps(CONFIG_SCHEMA))
    with conn.transaction():
        _set_config(conn, plugin_id, "mode", "fast")
        _set_config(conn, plugin_id, "workers", 4)
        _set_config(conn, plugin_id, "ratio", None)
    with pytest.raises(errors.CheckViolation) as caught:
        _set_config(conn, plugin_id, key, value)
    assert constraint_name(caught.value) == constraint


def test_config_required_keys_versions_and_secrets(own_conn: Conn) -> None:
    conn = own_conn
    _skip_config_triggers_on_citus(conn)
    plugin_id = add_plugin(conn, "acme", "resizer", config_schema=json.dumps(CONFIG_SCHEMA))
    # Required keys are checked at commit: one key alone is refused.
    with pytest.raises(errors.CheckViolation) as caught, conn.transaction():
        _set_config(conn, plugin_id, "mode", "fast")
    assert constraint_name(caught.value) == "plugin_config_schema_required"
    assert "workers" in str(caught.value)

    with conn.transaction():
        _set_config(conn, plugin_id, "mode", "fast")
        _set_config(conn, plugin_id, "workers", 4)
    _set_config(conn, plugin_id, "workers", 8)
    rows = conn.execute(
        "SELECT version, value, is_current FROM plugin_config WHERE key = 'workers' ORDER BY version"
    ).fetchall()
    assert rows == [(1, 4, False), (2, 8, True)]

    insert_secret = (
        "INSERT INTO plugin_config (tenant_id, plugin_id, environment, key, is_secret,"
        " secret_ciphertext, secret_key_id) VALUES ('acme', %s, 'prod', 'api_token', true, %s, 'kms:1')"
    )
    # Bytes that are not pluginmon's envelope (format 1, at least 89 bytes: sql/070) are refused.
    with pytest.raises(errors.CheckViolation) as caught:
        conn.execute(insert_secret, (plugin_id, b"\x8f\x01ciphertext"))
    assert constraint_name(caught.value) == "plugin_config_secret_format"
    conn.execute(insert_secret, (plugin_id, b"\x01" + bytes(88)))
    plain = conn.execute(
        "SELECT key FROM plugin_config WHERE is_current AND NOT is_secret ORDER BY key"
    ).fetchall()
    assert plain == [("mode",), ("workers",)]
    # A secret without ciphertext is refused.
    with pytest.raises(errors.CheckViolation) as caught:
        conn.execute(
            "INSERT INTO plugin_config (tenant_id, plugin_id, environment, key, is_secret)"
            " VALUES ('acme', %s, 'prod', 'api_token', true)",
            (plugin_id,),
        )
    assert constraint_name(caught.value) == "plugin_config_secret_encrypted"


# -- data-plane helpers ----------------------------------------------------------------------


async def test_ensure_tenant_and_plugin_is_an_idempotent_upsert(migrated_db: str) -> None:
    conns = [await asyncpg.connect(migrated_db) for _ in range(4)]
    try:
        first = await ensure_tenant_and_plugin(conns[0], "acme", "resizer", "prod")
        assert await ensure_tenant_and_plugin(conns[0], "acme", "resizer", "staging") == first
        # Concurrent first sightings of one plugin agree on its id.
        ids = await asyncio.gather(
            *(ensure_tenant_and_plugin(c, "globex", "indexer", "prod") for c in conns)
        )
        assert len(set(ids)) == 1
        assert ids[0] != first
        row = await conns[0].fetchrow(
            "SELECT tenant_id, name, environment, status, enabled FROM plugins WHERE id = $1", first
        )
        assert tuple(row) == ("acme", "resizer", "prod", "installed", True)
        assert await conns[0].fetchval("SELECT count(*) FROM tenants") == 2
        with pytest.raises(ValueError, match="slug"):
            await ensure_tenant_and_plugin(conns[0], "Not A Slug", "x", "prod")
    finally:
        for c in conns:
            await c.close()


async def test_ensure_plugins_resolves_many_at_once_like_the_single_upsert(
    migrated_db: str,
) -> None:
    conns = [await asyncpg.connect(migrated_db) for _ in range(4)]
    try:
        known = await ensure_tenant_and_plugin(conns[0], "acme", "p0001", "prod")
        keys = [(f"t{i % 7}", f"p{i:04d}", "prod") for i in range(1200)]
        keys.append(("acme", "p0001", "staging"))  # exists; another environment, same id
        keys.append(("t0", "p0000", "staging"))  # twice in one call: one plugin
        ids = await ensure_plugins(conns[0], keys)
        assert len(ids) == 1201
        assert ids[("acme", "p0001")] == known
        assert await conns[0].fetchval("SELECT count(*) FROM plugins") == 1201
        # the first key names a new plugin's environment; the single upsert agrees on ids
        assert (
            await conns[0].fetchval(
                "SELECT environment FROM plugins WHERE tenant_id = 't0' AND name = 'p0000'"
            )
            == "prod"
        )
        assert await ensure_tenant_and_plugin(conns[1], "t3", "p0003", "x") == ids[("t3", "p0003")]
        # Again: every id read back, nothing created.
        assert await ensure_plugins(conns[1], keys) == ids
        assert await conns[0].fetchval("SELECT count(*) FROM plugins") == 1201
        # Four sessions creating overlapping sets in opposite orders agree, without deadlock.
        fresh = [("globex", f"q{i:03d}", "prod") for i in range(300)]
        orders = [fresh, fresh[::-1], fresh[100:] + fresh[:100], fresh[::2] + fresh[1::2]]
        found = await asyncio.gather(
            *(ensure_plugins(c, o) for c, o in zip(conns, orders, strict=True))
        )
        assert all(f == found[0] for f in found)
        assert len(set(found[0].values())) == 300
        assert set(found[0].values()).isdisjoint(ids.values())
        # A key the schema refuses: ValueError naming it, nothing written.
        with pytest.raises(ValueError, match="'Bad Tenant' is not a valid slug"):
            await ensure_plugins(conns[0], [("newco", "a", "prod"), ("Bad Tenant", "b", "p")])
        with pytest.raises(ValueError, match="plugin name"):
            await ensure_plugins(conns[0], [("newco", "", "prod")])
        assert await conns[0].fetchval("SELECT count(*) FROM tenants WHERE id = 'newco'") == 0
        assert await ensure_plugins(conns[0], []) == {}

        # Every tenant and plugin created is audited once, by the daemon, whichever of the
        # racing sessions created it; the chains verify.
        rows = await conns[0].fetch(
            """SELECT tenant_id, actor, action, entity_id, plugin_id, environment,
                      details->>'source' AS source
                 FROM audit_log ORDER BY id"""
        )
        assert {(r["actor"], r["source"]) for r in rows} == {("daemon", "discovered")}
        created_tenants = [r["entity_id"] for r in rows if r["action"] == "tenant.create"]
        assert sorted(created_tenants) == sorted([*(f"t{i}" for i in range(7)), "acme", "globex"])
        plugins_audited = {
            (r["tenant_id"], r["entity_id"]): (r["plugin_id"], r["environment"])
            for r in rows
            if r["action"] == "plugin.create"
        }
        assert len(plugins_audited) == len(rows) - len(created_tenants) == 1201 + 300
        assert plugins_audited[("t0", "p0000")] == (ids[("t0", "p0000")], "prod")
        assert plugins_audited[("globex", "q007")] == (found[0][("globex", "q007")], "prod")
        # A tenant's creation comes before its plugins' in its chain.
        first_seen: dict[str, str] = {}
        for r in rows:
            first_seen.setdefault(r["tenant_id"], r["action"])
        assert set(first_seen.values()) == {"tenant.create"}
        verdicts = await audit.verify(conns[0])
        assert [(v.tenant_id, v.problem) for v in verdicts if v.problem is not None] == []
        assert sum(v.checked for v in verdicts) == len(rows)
    finally:
        for c in conns:
            await c.close()


async def test_set_tenant_and_detect_backend(migrated_db: str) -> None:
    conn = await asyncpg.connect(migrated_db)
    try:
        if is_citus(migrated_db):
            # A session-wide SET never reaches the workers: refused there (by design).
            with pytest.raises(ValueError, match="only be set for a transaction"):
                await set_tenant(conn, "acme")
            async with conn.transaction():
                await set_tenant(conn, "globex", local=True)
                assert await conn.fetchval("SELECT pluginmon_current_tenant()") == "globex"
            recorded = await conn.fetchval("SELECT min(backend) FROM schema_migrations")
            assert recorded == "citus"
            return
        await set_tenant(conn, "acme")
        assert await conn.fetchval("SELECT current_setting('pluginmon.tenant_id')") == "acme"
        async with conn.transaction():
            await set_tenant(conn, "globex", local=True)
            assert await conn.fetchval("SELECT pluginmon_current_tenant()") == "globex"
        assert await conn.fetchval("SELECT pluginmon_current_tenant()") == "acme"
        await set_tenant(conn, None)
        assert await conn.fetchval("SELECT pluginmon_current_tenant()") is None
        recorded = await conn.fetchval("SELECT min(backend) FROM schema_migrations")
    finally:
        await conn.close()
    async with admin_connection(migrated_db) as admin:
        assert (await detect_backend(admin)).value == recorded


@pytest.fixture
def silent_server_url() -> Iterator[str]:
    """A URL whose server completes the TCP handshake and then never answers (a black hole
    as far as libpq can tell): without connect_timeout, connecting would wait forever."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        yield f"postgresql://pluginmon@127.0.0.1:{port}/pluginmon"


def test_admin_plane_gives_up_on_a_server_that_never_answers(silent_server_url: str) -> None:
    with pytest.raises(psycopg.OperationalError, match="timeout"):
        migrate(silent_server_url, connect_timeout_seconds=2)
    with pytest.raises(psycopg.OperationalError, match="timeout"):
        prepare_database(silent_server_url, Retention(), connect_timeout_seconds=1)
    with pytest.raises(psycopg.OperationalError, match="timeout"):
        list(applied_versions(silent_server_url, connect_timeout_seconds=2))
    with pytest.raises(ValueError, match="positive"):
        migrate(silent_server_url, connect_timeout_seconds=0)


async def test_admin_connection_gives_up_on_a_server_that_never_answers(
    silent_server_url: str,
) -> None:
    with pytest.raises(psycopg.OperationalError, match="timeout"):
        async with admin_connection(silent_server_url, connect_timeout_seconds=2):
            pass


def test_admin_plane_modules_do_not_import_asyncpg() -> None:
    """DESIGN.md: the admin plane is psycopg 3 and the data plane asyncpg; neither leaks."""
    code = (
        "import sys\n"
        "import storage.backend, storage.migrate, storage.partitions, storage.timescale\n"
        "print('asyncpg' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "False"


async def test_unchanged_health_and_environment_updates_stay_on_their_page(
    migrated_db: str,
) -> None:
    """120: plugins and plugin_environments keep room on each page, so that the fleet's
    periodic rewrites that change no indexed column (a plugin's unchanged health score with
    its new last_health_check, an environment's usage and health) are HOT updates: no new
    index entries. Without the room (fillfactor 100, the pages full) most of them are not.
    121: plugins' usage columns are not indexed, so the registry's usage updates are HOT
    too."""
    if is_citus(migrated_db):
        pytest.skip("120 leaves the distributed tables' storage parameters as they are")
    conn = await asyncpg.connect(migrated_db)
    try:
        options = dict(
            await conn.fetch(
                "SELECT relname, reloptions FROM pg_class"
                " WHERE relname IN ('plugins', 'plugin_environments')"
            )
        )
        assert options == {"plugins": ["fillfactor=70"], "plugin_environments": ["fillfactor=70"]}
        indexed = await conn.fetch(
            "SELECT indexname FROM pg_indexes WHERE tablename = 'plugins'"
            " AND (indexdef LIKE '%cpu_usage%' OR indexdef LIKE '%memory_usage%')"
        )
        assert indexed == []
        ids = await ensure_plugins(conn, [("hot", f"p{i:04d}", "prod") for i in range(1500)])
        pids = sorted(ids.values())
        await conn.execute(
            """INSERT INTO plugin_environments (tenant_id, plugin_id, environment, cpu_usage)
               SELECT 'hot', pid, 'prod', 1.0 FROM unnest($1::bigint[]) pid""",
            pids,
        )
        await conn.execute(
            "UPDATE plugins SET health_score = 50, cpu_usage = 1, memory_usage = 1"
            " WHERE tenant_id = 'hot'"
        )
        await conn.execute("VACUUM plugins, plugin_environments")  # the old versions gone
        every_fifth = pids[::5]
        # one in ten gets its health rewritten, another one in ten its usage (room for both)
        health, usage = pids[::10], pids[5::10]
        # this session's counts (pending ones included), before and after
        counts_sql = (
            "SELECT relname, n_tup_upd, n_tup_hot_upd FROM pg_stat_xact_user_tables"
            " WHERE relname IN ('plugins', 'plugin_environments')"
        )
        async with conn.transaction():
            before = {r[0]: (r[1], r[2]) for r in await conn.fetch(counts_sql)}
            await health_store.write_health(
                conn,
                [
                    HealthWrite("hot", pid, "prod", 50.0, "", update_plugin=True, write_row=False)
                    for pid in health
                ],
                datetime.now(UTC),
            )
            # the registry's usage update (registry/usage.py), a changed usage
            await conn.execute(
                """UPDATE plugins p SET cpu_usage = v.cpu, memory_usage = v.rss
                     FROM unnest($1::bigint[], $2::float8[], $3::bigint[]) AS v(id, cpu, rss)
                    WHERE p.id = v.id""",
                usage,
                [2.5] * len(usage),
                [1 << 20] * len(usage),
            )
            await conn.execute(
                "UPDATE plugin_environments SET cpu_usage = 2.5, health_score = 90,"
                " last_health_check = now() WHERE plugin_id = ANY($1::bigint[])",
                every_fifth,
            )
            after = {r[0]: (r[1], r[2]) for r in await conn.fetch(counts_sql)}
        counts = {
            name: (after[name][0] - before[name][0], after[name][1] - before[name][1])
            for name in after
        }
        assert counts == {
            "plugins": (len(health) + len(usage), len(health) + len(usage)),
            "plugin_environments": (len(every_fifth), len(every_fifth)),
        }
    finally:
        await conn.close()
