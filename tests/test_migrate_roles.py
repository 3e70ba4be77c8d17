"""Migrating as a non-superuser database owner: the cluster-wide roles on a server of the test's own.

Roles are cluster-wide, so the session's shared server (whose roles a superuser created when
it migrated the template) cannot show a first migration: these tests start their own
embedded PostgreSQL (18, from the pip package), where no pluginmon role exists yet.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import sql

from pluginmon.storage.cluster_roles import (
    CLUSTER_ROLES,
    Migrator,
    RoleState,
    missing_privileges,
    roles_needed,
    tenant_group_warning,
)
from pluginmon.storage.embedded import EmbeddedPostgres
from pluginmon.storage.migrate import MissingPrivilegeError, applied_versions, migrate
from pluginmon.storage.reachability import failure_reason
from tests.daemon_helpers import run_cli
from tests.pg_cluster import system_postgres_bin_dir, throwaway_cluster

API_ROLES = "pluginmon_api, pluginmon_audit_retention"

# -- the pure decision ----------------------------------------------------------------------


def _states(
    *, exists: bool, has_admin: bool, admins: tuple[str, ...] = ()
) -> tuple[RoleState, ...]:
    return tuple(
        RoleState(role=role, exists=exists, has_admin=has_admin, admins=admins)
        for role in CLUSTER_ROLES
    )


def _migrator(
    *, superuser: bool = False, createrole: bool = True, version: int = 180000
) -> Migrator:
    return Migrator(
        user="pm_owner", superuser=superuser, createrole=createrole, server_version_num=version
    )


def test_an_engine_variant_of_a_file_needs_the_roles_of_the_file_it_replaces() -> None:
    # Citus runs 031_audit_expire_execute.citus.sql instead of 031_audit_expire_execute.sql:
    # a database with only 031 pending still grants the retention role, so the pre-flight
    # check must run for it.
    def names(files: set[str]) -> list[str]:
        return [role.name for role in roles_needed(files)]

    assert names({"031_audit_expire_execute.citus.sql"}) == ["pluginmon_audit_retention"]
    assert names({"031_audit_expire_execute.sql"}) == ["pluginmon_audit_retention"]
    assert names({"030_api.sql"}) == ["pluginmon_api", "pluginmon_audit_retention"]
    assert names({"003_tenancy.citus.sql", "127_audit_target_index.sql"}) == [
        "pluginmon_tenant_reader",
        "pluginmon_tenant_writer",
    ]
    assert names({"032_other.sql", "310_later.sql"}) == []


def test_superusers_and_role_admins_pass_and_others_get_the_statement_to_run() -> None:
    assert (
        missing_privileges(_migrator(superuser=True), _states(exists=False, has_admin=False))
        is None
    )
    assert missing_privileges(_migrator(), _states(exists=True, has_admin=True)) is None
    # Before PostgreSQL 16 CREATEROLE may create and grant any non-superuser role, and the
    # ADMIN option does not last through 030 (test_before_16_... below): CREATEROLE it is.
    old = _migrator(version=150008)
    assert missing_privileges(old, _states(exists=True, has_admin=False)) is None
    assert missing_privileges(old, _states(exists=False, has_admin=False)) is None
    for exists, has_admin in ((True, True), (True, False), (False, False)):
        refused = missing_privileges(
            _migrator(createrole=False, version=150008),
            _states(exists=exists, has_admin=has_admin),
        )
        assert refused is not None
        assert "ALTER ROLE pm_owner CREATEROLE" in refused
        assert "ADMIN TRUE" not in refused
        assert "WITH ADMIN OPTION" not in refused
        assert API_ROLES in refused

    lacking = missing_privileges(
        _migrator(), _states(exists=True, has_admin=False, admins=("pm_first",))
    )
    assert lacking is not None
    assert f"GRANT {API_ROLES} TO pm_owner WITH ADMIN TRUE, INHERIT FALSE, SET FALSE" in lacking
    assert "(pm_first may)" in lacking
    assert "PostgreSQL 16+" in lacking
    # The tenant groups are not granted by a migration: only the two API roles are named.
    assert "pluginmon_tenant_reader" not in lacking

    absent = missing_privileges(_migrator(createrole=False), _states(exists=False, has_admin=False))
    assert absent is not None
    assert "pm_owner may not create them (no CREATEROLE)" in absent
    assert "ALTER ROLE pm_owner CREATEROLE" in absent
    assert "CREATE ROLE pluginmon_api NOLOGIN" in absent

    warned = tenant_group_warning(_migrator(), _states(exists=True, has_admin=False))
    assert warned is not None
    assert "pluginmon_bind_tenant_role" in warned
    assert tenant_group_warning(_migrator(), _states(exists=True, has_admin=True)) is None


# -- a server of the test's own -----------------------------------------------------------------


@pytest.fixture
def own_admin_url(server_tmp_dir: Path) -> Iterator[str]:
    server = EmbeddedPostgres(server_tmp_dir / "pg")
    server.start()
    try:
        yield server.url("postgres")
    finally:
        server.stop(mode="immediate")


def _login(admin_url: str, user: str, *, createrole: bool, database: str) -> str:
    """A login role (with or without CREATEROLE) owning a new ``database``; its URL."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN {} PASSWORD {}").format(
                sql.Identifier(user),
                sql.SQL("CREATEROLE" if createrole else "NOCREATEROLE"),
                sql.Literal(f"pw-{user}"),
            )
        )
    return _database(admin_url, user, database)


def _database(admin_url: str, user: str, database: str) -> str:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} OWNER {}").format(
                sql.Identifier(database), sql.Identifier(user)
            )
        )
    parts = urlsplit(admin_url)
    netloc = f"{user}:{quote(f'pw-{user}', safe='')}@{parts.hostname}:{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc, path="/" + database))


def _roles_exist(admin_url: str) -> list[str]:
    with psycopg.connect(admin_url) as conn:
        rows = conn.execute(
            "SELECT rolname FROM pg_roles WHERE rolname LIKE 'pluginmon\\_%' ORDER BY 1"
        ).fetchall()
    return [str(r[0]) for r in rows]


def _api_works(url: str) -> None:
    """What the daemon does with the roles: requests as pluginmon_api, audit retention."""
    with psycopg.connect(url) as conn:
        conn.execute("SET LOCAL ROLE pluginmon_api")
        assert conn.execute("SELECT current_user, count(*) FROM plugins").fetchone() == (
            "pluginmon_api",
            0,
        )
        conn.rollback()
        conn.execute("INSERT INTO tenants (id, name) VALUES ('acme', 'acme')")
        conn.execute(
            "INSERT INTO audit_log (tenant_id, actor, action, entity_type, occurred_at)"
            " VALUES ('acme', 'test', 'probe', 'test', now() - interval '2 days')"
        )
        # Only the retention role deletes audit rows: its functions must have been handed
        # over, with EXECUTE left to the daemon's role (030/031, and 130 per tenant).
        expired = conn.execute("SELECT pluginmon_audit_expire(now() - interval '1 day')")
        assert expired.fetchone() == (1,)
        conn.execute("INSERT INTO tenants (id, name) VALUES ('globex', 'globex')")
        conn.execute(
            "INSERT INTO audit_log (tenant_id, actor, action, entity_type, occurred_at)"
            " VALUES ('globex', 'test', 'probe', 'test', now() - interval '3 days')"
        )
        expired = conn.execute(
            "SELECT pluginmon_audit_expire_tenant('globex', now() - interval '1 day', 100)"
        )
        assert expired.fetchone() == (1,)
        owner = conn.execute(
            "SELECT proowner::regrole::text FROM pg_proc"
            " WHERE proname IN ('pluginmon_audit_expire', 'pluginmon_audit_expire_tenant')"
        ).fetchall()
        assert owner == [("pluginmon_audit_retention",), ("pluginmon_audit_retention",)]
        conn.commit()
        # The daemon's role acts as pluginmon_api, never as the retention role (which alone
        # deletes audit rows).
        user = conn.execute("SELECT session_user").fetchone()
        assert user is not None
        can_set = "SET" if conn.info.server_version >= 160000 else "MEMBER"  # SET: 16+
        row = conn.execute(
            f"SELECT pg_has_role(session_user, 'pluginmon_api', '{can_set}'),"
            f" pg_has_role(session_user, 'pluginmon_audit_retention', '{can_set}'),"
            " pg_has_role(session_user, 'pluginmon_audit_retention', 'USAGE')"
        ).fetchone()
        assert row == (True, False, False), user


def test_a_createrole_owner_migrates_a_fresh_server_and_a_second_database(
    own_admin_url: str,
) -> None:
    assert _roles_exist(own_admin_url) == []

    # No CREATEROLE and no roles yet: refused before any file, with what to do.
    plain = _login(own_admin_url, "pm_plain", createrole=False, database="pm_plain_db")
    with pytest.raises(MissingPrivilegeError) as refused:
        migrate(plain)
    assert failure_reason(refused.value) == "missing_privilege"
    assert "pm_plain may not create them (no CREATEROLE)" in str(refused.value)
    assert list(applied_versions(plain)) == []
    assert _roles_exist(own_admin_url) == []

    # A CREATEROLE owner: creates the roles, holds ADMIN on them, migrates.
    first = _login(own_admin_url, "pm_first", createrole=True, database="pm_first_db")
    result = migrate(first)
    assert {"030_api.sql", "031_audit_expire_execute.sql"} <= set(result.applied)
    assert _roles_exist(own_admin_url) == sorted(role.name for role in CLUSTER_ROLES)
    _api_works(first)

    # A second pluginmon database on the same server, same owner: the roles exist already.
    second = _database(own_admin_url, "pm_first", "pm_second_db")
    assert "031_audit_expire_execute.sql" in migrate(second).applied
    _api_works(second)
    assert migrate(second).applied == ()  # and nothing to do again


def test_another_owner_on_the_same_server_is_told_who_can_grant_and_then_migrates(
    own_admin_url: str,
) -> None:
    first = _login(own_admin_url, "pm_first", createrole=True, database="pm_first_db")
    migrate(first)  # creates the cluster roles: pm_first holds ADMIN on them

    other = _login(own_admin_url, "pm_other", createrole=True, database="pm_other_db")
    result = run_cli("migrate", env={"PLUGINMON_DATABASE_URL": other})
    assert result.returncode == 1, result.stderr
    assert "missing_privilege" in result.stderr
    grant = f"GRANT {API_ROLES} TO pm_other WITH ADMIN TRUE, INHERIT FALSE, SET FALSE"
    assert grant in result.stderr
    assert "(pm_first may)" in result.stderr
    assert "pw-pm_other" not in result.stderr + result.stdout
    assert list(applied_versions(other)) == []  # refused before any file ran

    # What the message says, done by pm_first (no superuser needed): now it migrates.
    with psycopg.connect(first, autocommit=True) as conn:
        conn.execute(grant)
    assert "031_audit_expire_execute.sql" in migrate(other).applied
    _api_works(other)


# -- a server before PostgreSQL 16 (the Debian package, when installed) ------------------------


# PostgreSQL 15 (the path .ci/run checks), or None: the oldest release the migrations support
# (DESIGN.md: 15 through 18; 13 and older lack date_bin), and the last before 16.
BEFORE_16 = system_postgres_bin_dir("15")
if BEFORE_16 is None:
    print(
        "skipping the pre-16 migration-role test: no /usr/lib/postgresql/15/bin/initdb "
        "(Debian's postgresql-15 package is not installed)"
    )


@pytest.fixture
def before_16_admin_url() -> Iterator[str]:
    if BEFORE_16 is None:
        pytest.skip("no PostgreSQL 15 server installed (postgresql-15 on Debian 12)")
    with throwaway_cluster(BEFORE_16) as url:
        yield url


def test_before_16_the_admin_option_alone_is_refused_up_front_and_createrole_migrates(
    before_16_admin_url: str,
) -> None:
    with psycopg.connect(before_16_admin_url) as conn:
        assert conn.info.server_version < 160000

    # A CREATEROLE owner on a fresh server creates the roles (before 16 the creator is not
    # made a member of them) and migrates.
    first = _login(before_16_admin_url, "pm_first", createrole=True, database="pm_first_db")
    assert {"030_api.sql", "031_audit_expire_execute.sql"} <= set(migrate(first).applied)
    _api_works(first)

    # The premise, with 030's and 031's own statements: before 16 the moment's GRANT to a
    # member is a no-op, its REVOKE deletes the one membership row, ADMIN option included,
    # and 031's GRANT is then refused.
    probe = _login(before_16_admin_url, "pm_probe", createrole=False, database="pm_probe_db")
    with psycopg.connect(before_16_admin_url, autocommit=True) as conn:
        conn.execute("GRANT pluginmon_audit_retention TO pm_probe WITH ADMIN OPTION")
    with psycopg.connect(probe, autocommit=True) as conn:
        conn.execute("GRANT pluginmon_audit_retention TO pm_probe")  # 030
        conn.execute("REVOKE pluginmon_audit_retention FROM pm_probe")  # 030
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="admin option"):
            conn.execute("GRANT pluginmon_audit_retention TO CURRENT_USER")  # 031

    # Another owner given the ADMIN option on the roles, what this message said before 16
    # until it was found that 030's REVOKE of its moment's membership takes the option along
    # (the single membership row) and 031's GRANT then fails half-way through the files.
    other = _login(before_16_admin_url, "pm_other", createrole=False, database="pm_other_db")
    with psycopg.connect(before_16_admin_url, autocommit=True) as conn:
        conn.execute(f"GRANT {API_ROLES} TO pm_other WITH ADMIN OPTION")
    result = run_cli("migrate", env={"PLUGINMON_DATABASE_URL": other})
    assert result.returncode == 1, result.stderr
    assert "missing_privilege" in result.stderr
    assert "ALTER ROLE pm_other CREATEROLE" in result.stderr
    assert "pw-pm_other" not in result.stderr + result.stdout
    assert list(applied_versions(other)) == []  # refused before any file ran

    # What the message says: now it migrates, and is left no member of the retention role.
    with psycopg.connect(before_16_admin_url, autocommit=True) as conn:
        conn.execute("ALTER ROLE pm_other CREATEROLE")
    assert "031_audit_expire_execute.sql" in migrate(other).applied
    _api_works(other)
