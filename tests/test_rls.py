"""Tenant isolation as real login roles: bound readers and writers, unbound members, app roles."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import errors, sql

from pluginmon.storage import timescale
from pluginmon.storage.migrate import Backend
from pluginmon.storage.queries import set_local_tenant_sql
from tests.dbutil import is_citus, migrated_copy
from tests.schema_helpers import (
    TENANT_TABLES,
    Conn,
    add_plugin,
    backend_of,
    insert_samples,
    samples_series,
)

# What a tenant role reads: the plain tables (row-level security) and the views (tenant check);
# plugin_samples / plugin_metrics resolve to pluginmon_tenant.* through the role's search_path.
TENANT_RELATIONS: tuple[str, ...] = (
    *TENANT_TABLES,
    "plugin_samples",
    "plugin_metrics",
    "plugin_samples_1m",
    "plugin_samples_1h",
)


def _key_column(relation: str) -> str:
    return "id" if relation == "tenants" else "tenant_id"


def _seed_tenant(conn: Conn, tenant: str) -> None:
    main = add_plugin(conn, tenant, "resizer", status="installed")
    dep = add_plugin(conn, tenant, "codec")
    conn.execute(
        "INSERT INTO plugin_operations (tenant_id, plugin_id, environment, operation_type)"
        " VALUES (%s, %s, 'prod', 'install')",
        (tenant, main),
    )
    conn.execute(
        "INSERT INTO plugin_config (tenant_id, plugin_id, environment, key, value)"
        " VALUES (%s, %s, 'prod', 'size', '3')",
        (tenant, main),
    )
    conn.execute(
        "INSERT INTO plugin_dependencies (tenant_id, plugin_id, depends_on_plugin_id)"
        " VALUES (%s, %s, %s)",
        (tenant, main, dep),
    )
    conn.execute(
        "INSERT INTO plugin_alerts (tenant_id, plugin_id, environment, rule_name, fingerprint,"
        " severity, status) VALUES (%s, %s, 'prod', 'cpu', %s, 'warning', 'firing')",
        (tenant, main, f"{tenant}-cpu"),
    )
    conn.execute(
        "INSERT INTO audit_log (tenant_id, actor, action, entity_type) VALUES (%s, 'ann', 'install', 'plugin')",
        (tenant,),
    )
    backup = conn.execute(
        "INSERT INTO plugin_backups (tenant_id, plugin_id, environment, provider, location)"
        " VALUES (%s, %s, 'prod', 's3', 's3://b/k') RETURNING id",
        (tenant, main),
    ).fetchone()
    assert backup is not None
    conn.execute(
        "INSERT INTO plugin_restore_points (tenant_id, plugin_id, backup_id, environment, label,"
        " provider, location) VALUES (%s, %s, %s, 'prod', 'before-upgrade', 's3', 's3://b/k')",
        (tenant, main, backup[0]),
    )
    conn.execute(
        "INSERT INTO plugin_approvals (tenant_id, plugin_id, environment, request_type, requested_by)"
        " VALUES (%s, %s, 'prod', 'update', 'ann')",
        (tenant, main),
    )
    conn.execute(
        "INSERT INTO plugin_vulnerabilities (tenant_id, plugin_id, vulnerability_id, severity)"
        " VALUES (%s, %s, 'CVE-2026-1', 'high')",
        (tenant, main),
    )
    conn.execute(
        "INSERT INTO plugin_analytics (tenant_id, plugin_id, environment, period, period_start,"
        " invocations) VALUES (%s, %s, 'prod', 'hour', date_trunc('hour', now()), 10)",
        (tenant, main),
    )
    conn.execute(
        "INSERT INTO plugin_metrics VALUES (now(), %s, %s, 'prod', 'health_score', 'gauge', 97, '{}')",
        (tenant, main),
    )
    end = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(hours=2)
    insert_samples(
        conn,
        samples_series(end - timedelta(minutes=5), end, timedelta(minutes=1), [(tenant, main)]),
    )


@pytest.fixture(scope="module")
def seeded_db(pg_admin_url: str, migrated_template: str) -> Iterator[str]:
    """One database with rows for tenants 'a' and 'b' in every tenant table and rollup."""
    with migrated_copy(pg_admin_url, migrated_template, prefix="rls") as url:
        with psycopg.connect(url, autocommit=True) as conn:
            with conn.transaction():
                _seed_tenant(conn, "a")
                _seed_tenant(conn, "b")
            if backend_of(conn) is Backend.TIMESCALEDB:
                timescale.refresh_rollups(conn, None, None)
            else:
                for rollup, width in (
                    ("rollup_samples_1m", "1 minute"),
                    ("rollup_samples_1h", "1 hour"),
                ):
                    conn.execute(
                        "SELECT pluginmon_refresh_rollup(%s::regclass, %s::interval, '1 hour')",
                        (rollup, width),
                    )
        yield url


class Roles:
    """Login roles created for one module; dropped (they are cluster-wide) at the end."""

    def __init__(self, admin_url: str, database_url: str) -> None:
        self.admin_url = admin_url
        self.database_url = database_url
        self.prefix = f"pmrls_{uuid.uuid4().hex[:8]}"
        self.created: list[str] = []

    def create(self, suffix: str) -> tuple[str, str]:
        role = f"{self.prefix}_{suffix}"
        password = secrets.token_urlsafe(16)
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                    sql.Identifier(role), sql.Literal(password)
                )
            )
        self.created.append(role)
        return role, password

    def url(self, role: str, password: str) -> str:
        parts = urlsplit(self.database_url)
        host = parts.netloc.rpartition("@")[2]
        return urlunsplit(parts._replace(netloc=f"{role}:{quote(password, safe='')}@{host}"))

    def drop_all(self) -> None:
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            for role in self.created:
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                    (role,),
                )
                conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
                conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


@pytest.fixture(scope="module")
def roles(pg_admin_url: str, seeded_db: str) -> Iterator[Roles]:
    created = Roles(pg_admin_url, seeded_db)
    try:
        yield created
    finally:
        created.drop_all()


def _bound(roles: Roles, suffix: str, tenant: str, access: str) -> str:
    role, password = roles.create(suffix)
    with psycopg.connect(roles.database_url, autocommit=True) as conn:
        conn.execute("SELECT pluginmon_bind_tenant_role(%s, %s, %s)", (role, tenant, access))
    return roles.url(role, password)


@pytest.fixture(scope="module")
def reader_a(roles: Roles) -> str:
    return _bound(roles, "reader_a", "a", "reader")


@pytest.fixture(scope="module")
def writer_a(roles: Roles) -> str:
    return _bound(roles, "writer_a", "a", "writer")


def _tenants_seen(conn: Conn, relation: str) -> set[str]:
    column = _key_column(relation)
    rows = conn.execute(
        sql.SQL("SELECT DISTINCT {} FROM {}").format(
            sql.Identifier(column), sql.Identifier(relation)
        )
    ).fetchall()
    return {str(r[0]) for r in rows}


def test_owner_sees_every_tenant(seeded_db: str) -> None:
    with psycopg.connect(seeded_db) as conn:
        for relation in TENANT_RELATIONS:
            assert _tenants_seen(conn, relation) == {"a", "b"}, relation


def test_bound_reader_sees_only_its_tenant_whatever_it_sets(reader_a: str) -> None:
    with psycopg.connect(reader_a, autocommit=True) as conn:
        search_path = conn.execute("SHOW search_path").fetchone()
        assert search_path is not None
        assert str(search_path[0]).startswith("pluginmon_tenant")
        for relation in TENANT_RELATIONS:
            assert _tenants_seen(conn, relation) == {"a"}, relation

        conn.execute("SET pluginmon.tenant_id = 'b'")
        for relation in TENANT_RELATIONS:
            assert _tenants_seen(conn, relation) == {"a"}, relation

        # Switching to the group role does not escape the binding either.
        conn.execute("SET ROLE pluginmon_tenant_reader")
        if is_citus(reader_a):
            # Citus reaches the workers as the current role, and the group role may not log
            # in: the read fails instead of showing anything (by design).
            with pytest.raises(errors.ConnectionFailure, match="not permitted to log in"):
                _tenants_seen(conn, "plugins")
        else:
            for relation in TENANT_RELATIONS:
                assert _tenants_seen(conn, relation) == {"a"}, relation
        conn.execute("RESET ROLE")

        # And every other relation with row security that the reader can read at all (tables
        # later migrations add) holds nothing of b's.
        readable = conn.execute(
            "SELECT c.relname FROM pg_class c WHERE c.relnamespace = 'public'::regnamespace"
            " AND c.relrowsecurity AND has_table_privilege(c.oid, 'SELECT')"
            " AND EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attname = 'tenant_id')"
        ).fetchall()
        for (relation,) in readable:
            assert _tenants_seen(conn, str(relation)) <= {"a"}, relation


def test_bound_reader_cannot_write_or_reach_raw_storage(reader_a: str, seeded_db: str) -> None:
    with psycopg.connect(seeded_db) as owner:
        b_plugin = owner.execute("SELECT id FROM plugins WHERE tenant_id = 'b' LIMIT 1").fetchone()
        raw = owner.execute(
            "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_inherits i"
            " JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE i.inhparent = 'plugin_samples'::regclass LIMIT 1"
        ).fetchone()
    assert b_plugin is not None
    assert raw is not None  # a partition (PostgreSQL) or a chunk (TimescaleDB)
    forbidden = [
        ("INSERT INTO plugins (tenant_id, name) VALUES ('b', 'evil')", ()),
        ("INSERT INTO plugins (tenant_id, name) VALUES ('a', 'evil')", ()),
        ("UPDATE plugins SET enabled = false WHERE id = %s", (b_plugin[0],)),
        ("DELETE FROM plugin_alerts WHERE tenant_id = 'b'", ()),
        ("SELECT count(*) FROM public.plugin_samples", ()),
        ("SELECT count(*) FROM public.plugin_metrics", ()),
        ("SELECT count(*) FROM rollup_samples_1m", ()),
        ("SELECT count(*) FROM tenant_role_bindings", ()),
        (f"SELECT count(*) FROM {raw[0]}", ()),  # noqa: S608 - a name from the catalog
        ("SELECT pluginmon_bind_tenant_role(current_user, 'b')", ()),
    ]
    allowed = []
    with psycopg.connect(reader_a, autocommit=True) as conn:
        for statement, params in forbidden:
            try:
                conn.execute(statement, params)
            except errors.InsufficientPrivilege:
                continue
            allowed.append(statement)
        if is_citus(reader_a):
            # sql/102 grants the tables behind the tenant views to the tenant roles (Citus
            # reads a view's shards as the caller, by design); row security keeps them to a.
            readable = ("plugin_samples", "plugin_metrics", "rollup_samples_1m")
            assert allowed == [
                "SELECT count(*) FROM public.plugin_samples",
                "SELECT count(*) FROM public.plugin_metrics",
                "SELECT count(*) FROM rollup_samples_1m",
            ]
            for table in readable:
                seen = conn.execute(sql.SQL("SELECT DISTINCT tenant_id FROM {}").format(
                    sql.Identifier(table))).fetchall()  # fmt: skip
                assert {r[0] for r in seen} <= {"a"}, table
            return
    assert allowed == []


def test_bound_writer_writes_its_tenant_only(writer_a: str, seeded_db: str) -> None:
    with psycopg.connect(writer_a) as conn:
        try:
            conn.execute("SET pluginmon.tenant_id = 'b'")
            conn.execute("INSERT INTO plugins (tenant_id, name) VALUES ('a', 'written-by-a')")
            with (
                pytest.raises(errors.InsufficientPrivilege, match="row-level security"),
                conn.transaction(),
            ):
                conn.execute("INSERT INTO plugins (tenant_id, name) VALUES ('b', 'evil')")
            updated = conn.execute("UPDATE plugins SET enabled = false WHERE tenant_id = 'b'")
            assert updated.rowcount == 0
            deleted = conn.execute("DELETE FROM plugin_alerts WHERE tenant_id = 'b'")
            assert deleted.rowcount == 0
            # Nor can a row of a's be handed over to b.
            # (Citus refuses any change of the distribution column before row security.)
            refusal = (
                (errors.FeatureNotSupported, "partition value")
                if is_citus(writer_a)
                else (errors.InsufficientPrivilege, "row-level security")
            )
            with pytest.raises(refusal[0], match=refusal[1]), conn.transaction():
                conn.execute("UPDATE plugin_analytics SET tenant_id = 'b' WHERE tenant_id = 'a'")
            assert _tenants_seen(conn, "plugins") == {"a"}
        finally:
            conn.rollback()
    with psycopg.connect(seeded_db) as owner:
        rows = owner.execute(
            "SELECT tenant_id, count(*) FILTER (WHERE enabled) FROM plugins GROUP BY 1 ORDER BY 1"
        ).fetchall()
    assert rows == [("a", 2), ("b", 2)]


def test_unbound_group_member_sees_nothing(roles: Roles) -> None:
    role, password = roles.create("unbound")
    with psycopg.connect(roles.database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("GRANT pluginmon_tenant_reader TO {}").format(sql.Identifier(role)))
    with psycopg.connect(roles.url(role, password), autocommit=True) as conn:
        conn.execute("SET pluginmon.tenant_id = 'a'")
        for relation in (
            "plugins",
            "plugin_alerts",
            "plugin_samples_1m",
            "pluginmon_tenant.plugin_samples",
        ):
            rows = conn.execute(
                sql.SQL("SELECT count(*) FROM {}").format(sql.SQL(relation))
            ).fetchone()
            assert rows == (0,), relation


def test_application_role_follows_the_tenant_setting(roles: Roles) -> None:
    role, password = roles.create("app")
    with psycopg.connect(roles.database_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("GRANT SELECT ON plugins, plugin_samples_1h TO {}").format(sql.Identifier(role))
        )
        if is_citus(roles.database_url):
            # Citus reads a view's shards as the caller: the table behind it too (sql/102).
            conn.execute(
                sql.SQL("GRANT SELECT ON rollup_samples_1h TO {}").format(sql.Identifier(role))
            )
    citus = is_citus(roles.database_url)
    with psycopg.connect(roles.url(role, password), autocommit=not citus) as conn:
        assert conn.execute("SELECT count(*) FROM plugins").fetchone() == (0,)
        if citus:
            # Only a SET LOCAL that Citus propagates reaches the workers' policies (by design;
            # storage.queries.TenantScope): the same setting, for the transaction.
            conn.execute(set_local_tenant_sql("b"))
        else:
            conn.execute("SET pluginmon.tenant_id = 'b'")
        assert _tenants_seen(conn, "plugins") == {"b"}
        assert _tenants_seen(conn, "plugin_samples_1h") == {"b"}


def test_bound_reader_cannot_rebind_itself_with_a_temporary_table(reader_a: str) -> None:
    """A session's temporary schema is searched first for tables unless the search path names
    it: a bound role that shadowed tenant_role_bindings with a temporary table of its own was
    given the tenant it wrote there by the SECURITY DEFINER tenant check. The check's search
    path now ends with pg_temp (sql/126), so it reads the real bindings."""
    with psycopg.connect(reader_a, autocommit=True) as conn:
        conn.execute("CREATE TEMPORARY TABLE tenant_role_bindings (role_name text, tenant_id text)")
        conn.execute("INSERT INTO tenant_role_bindings VALUES (session_user, 'b')")
        # The views' own check reads the catalog: shadowed, it would say "bypasses RLS".
        conn.execute(
            "CREATE TEMPORARY TABLE pg_roles (rolname name, rolsuper bool, rolbypassrls bool)"
        )
        conn.execute("INSERT INTO pg_roles VALUES (current_user, true, true)")
        conn.execute("CREATE TEMPORARY TABLE pg_class (oid oid, relowner oid)")
        conn.execute(
            "INSERT INTO pg_class SELECT c.oid, r.oid FROM pg_catalog.pg_class c,"
            " pg_catalog.pg_roles r WHERE r.rolname = current_user"
        )
        assert conn.execute("SELECT pluginmon_current_tenant()").fetchone() == ("a",)
        for relation in TENANT_RELATIONS:
            assert _tenants_seen(conn, relation) == {"a"}, relation


def test_an_unbound_member_cannot_pass_for_a_superuser_with_a_temporary_pg_roles(
    roles: Roles,
) -> None:
    """An unbound member of the tenant groups sees nothing (above); with a temporary pg_roles
    saying it is a superuser, the tenant check used to hand it whatever pluginmon.tenant_id
    said."""
    role, password = roles.create("shadow")
    with psycopg.connect(roles.database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("GRANT pluginmon_tenant_reader TO {}").format(sql.Identifier(role)))
    with psycopg.connect(roles.url(role, password), autocommit=True) as conn:
        conn.execute(
            "CREATE TEMPORARY TABLE pg_roles (rolname name, rolsuper bool, rolbypassrls bool)"
        )
        conn.execute("INSERT INTO pg_roles VALUES (session_user, true, true)")
        conn.execute("SET pluginmon.tenant_id = 'a'")
        assert conn.execute("SELECT pluginmon_current_tenant()").fetchone() == (None,)
        assert conn.execute("SELECT count(*) FROM plugins").fetchone() == (0,)


# The functions that must search pg_temp last (sql/126), whatever the backend; others of the
# same kinds added later are found by the query below.
PINNED = {
    "pluginmon_current_tenant()",
    "pluginmon_bypasses_rls(regclass)",
    "pluginmon_audit_log_chain()",
    "pluginmon_audit_log_append_only()",
    "pluginmon_approval_decision_check()",
    "pluginmon_plugin_config_required()",
    "pluginmon_plugin_config_validate()",
    "pluginmon_plugin_config_version()",
}


def test_every_security_definer_function_searches_pg_temp_last(seeded_db: str) -> None:
    """Each function of pluginmon's that runs with its owner's rights, pins a search path at
    all, or runs as a trigger and reads tables, names pg_temp last in it: otherwise the
    caller's temporary tables come first (see above). Extensions' functions are theirs;
    pluginmon_audit_expire() only the daemon's role may call (sql/126)."""
    with psycopg.connect(seeded_db) as conn:
        rows = conn.execute(
            "SELECT p.oid::regprocedure::text, p.proconfig FROM pg_proc p"
            " WHERE (p.prosecdef OR p.proconfig IS NOT NULL"
            "        OR p.oid IN (SELECT t.tgfoid FROM pg_trigger t))"
            " AND p.proname NOT IN ('pluginmon_touch_updated_at', 'pluginmon_audit_expire')"
            " AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass"
            "                 AND d.objid = p.oid AND d.deptype = 'e')"
            " AND p.pronamespace = current_schema()::regnamespace"
        ).fetchall()
    assert {name for name, _ in rows} >= PINNED
    for name, config in rows:
        paths = [c for c in config or () if c.startswith("search_path=")]
        assert len(paths) == 1, name
        schemas = [s.strip() for s in paths[0].removeprefix("search_path=").split(",")]
        assert schemas[0] == "pg_catalog", (name, schemas)
        assert schemas[-1] == "pg_temp", (name, schemas)
