"""The cluster-wide roles the migrations use: created, and checked grantable, before any file runs.

Roles are cluster-wide while a pluginmon schema is per database, so a second pluginmon
database on the same server finds its roles already there. ``sql/030_api.sql`` grants two of
them to the migrating user when that user is no superuser, and PostgreSQL 16+ allows a
non-superuser that GRANT only with the ADMIN option on the role (CREATEROLE alone no longer
suffices). A CREATEROLE user gets that option automatically on the roles it creates, not on
roles that exist already. The migrator (``storage.migrate``) therefore runs
``prepare_cluster_roles`` before the files: it creates the missing roles as the migrating
user (who then holds ADMIN on them), and when a pending file would still fail it returns
one message that names the roles and the exact statement an administrator runs, instead of
the server's error from the middle of a migration. Before 16 the ADMIN option is not enough
(``_before_16``): there the message asks for CREATEROLE. Applied files are never edited (their
checksums are recorded), so this step, not the file, is where the fix lives.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import psycopg
from psycopg import sql

logger = logging.getLogger(__name__)

# PostgreSQL 16 moved "who may grant a role" from CREATEROLE to the ADMIN option.
ADMIN_OPTION_REQUIRED_FROM = 160000


@dataclass(frozen=True, slots=True)
class ClusterRole:
    name: str
    created_by: str  # the migration file that creates it when missing
    # The files that grant it to the migrating user (needs ADMIN on 16+ unless superuser).
    granted_in: tuple[str, ...] = ()

    @property
    def granted_to_migrator(self) -> bool:
        return bool(self.granted_in)


CLUSTER_ROLES = (
    ClusterRole("pluginmon_tenant_reader", "003_tenancy.sql"),
    ClusterRole("pluginmon_tenant_writer", "003_tenancy.sql"),
    ClusterRole("pluginmon_api", "030_api.sql", granted_in=("030_api.sql",)),
    ClusterRole(
        "pluginmon_audit_retention",
        "030_api.sql",
        granted_in=(
            "030_api.sql",
            "031_audit_expire_execute.sql",
            "130_audit_expire_per_tenant.sql",
        ),
    ),
)


@dataclass(frozen=True, slots=True)
class Migrator:
    """The migrating user as the server sees it."""

    user: str
    superuser: bool
    createrole: bool
    server_version_num: int


@dataclass(frozen=True, slots=True)
class RoleState:
    role: ClusterRole
    exists: bool
    has_admin: bool  # the migrating user holds the ADMIN option on it
    admins: tuple[str, ...] = ()  # other roles that hold it (who can pass it on)


def roles_needed(pending_files: set[str]) -> tuple[ClusterRole, ...]:
    """The roles that the pending migration files create or grant.

    Files are matched by their version (``031``), so an engine's variant of a file
    (``031_audit_expire_execute.citus.sql``) counts as the file it replaces.
    """
    pending = {_version(f) for f in pending_files}
    return tuple(
        role
        for role in CLUSTER_ROLES
        if _version(role.created_by) in pending
        or pending.intersection(map(_version, role.granted_in))
    )


def _version(filename: str) -> str:
    return filename.split("_", 1)[0]


def missing_privileges(migrator: Migrator, states: tuple[RoleState, ...]) -> str | None:
    """Why the pending files would fail for ``migrator`` (one message), or None.

    ``states`` are taken after ``prepare_cluster_roles`` created what it could.
    """
    if migrator.superuser:
        return None
    if migrator.server_version_num < ADMIN_OPTION_REQUIRED_FROM:
        return _before_16(migrator, states)
    missing = [s.role.name for s in states if not s.exists]
    if missing:
        creates = "; ".join(f"CREATE ROLE {name} NOLOGIN" for name in missing)
        return (
            f"{_roles(missing)} {'does' if len(missing) == 1 else 'do'} not exist and "
            f"{migrator.user} may not create {'it' if len(missing) == 1 else 'them'} (no "
            f"CREATEROLE): as a superuser run ALTER ROLE {migrator.user} CREATEROLE, or "
            f"create the roles beforehand: {creates}; {admin_grant(missing, migrator)}"
        )
    lacking = [s for s in states if s.role.granted_to_migrator and not s.has_admin]
    if not lacking:
        return None
    names = [s.role.name for s in lacking]
    admins = sorted({admin for s in lacking for admin in s.admins})
    who = f" ({', '.join(admins)} may)" if admins else ""
    one = len(lacking) == 1
    return (
        f"{_roles(names)} {'exists' if one else 'exist'} already "
        "(roles are cluster-wide: another pluginmon database on this server, or an "
        f"administrator, created {'it' if one else 'them'}) and {migrator.user} has no "
        f"ADMIN option on {'it' if one else 'them'}, which the migrations need to grant "
        f"{'it' if one else 'them'} to {migrator.user} (PostgreSQL 16+): as a superuser or "
        f"a role that holds that option{who}, run {admin_grant(names, migrator)}"
    )


def _before_16(migrator: Migrator, states: tuple[RoleState, ...]) -> str | None:
    """Before PostgreSQL 16 only CREATEROLE will do. CREATEROLE may then create and grant any
    non-superuser role; the ADMIN option alone may not get through the files: it is a column
    of the one membership row a role has in another, so 030's ``REVOKE
    pluginmon_audit_retention FROM`` the migrating user (undoing the moment's grant, which is
    a no-op for a member) takes the option away too, and 031's grant then fails."""
    if migrator.createrole:
        return None
    needed = [s.role.name for s in states if not s.exists or s.role.granted_to_migrator]
    if not needed:
        return None
    return (
        f"{migrator.user} has no CREATEROLE, which the migrations need before PostgreSQL 16 "
        f"to create or grant {_roles(needed)} (the ADMIN option alone does not last through "
        "them: before 16, revoking the membership a migration grants for a moment takes the "
        f"option with it): as a superuser run ALTER ROLE {migrator.user} CREATEROLE, or "
        "migrate as a superuser"
    )


def admin_grant(names: list[str], migrator: Migrator) -> str:
    """The statement that lets ``migrator`` (on 16+) grant ``names``: the option only, as
    inheriting pluginmon_audit_retention would let the daemon's role delete audit rows."""
    return f"GRANT {', '.join(names)} TO {migrator.user} WITH ADMIN TRUE, INHERIT FALSE, SET FALSE"


def _roles(names: list[str]) -> str:
    return ("role " if len(names) == 1 else "roles ") + ", ".join(names)


def tenant_group_warning(migrator: Migrator, states: tuple[RoleState, ...]) -> str | None:
    """Migrations pass without ADMIN on the tenant groups, but binding a Grafana role to a
    tenant (pluginmon_bind_tenant_role, run as this user) grants one of them: say so."""
    if migrator.superuser or migrator.server_version_num < ADMIN_OPTION_REQUIRED_FROM:
        return None
    lacking = [
        s.role.name
        for s in states
        if s.exists and not s.role.granted_to_migrator and not s.has_admin
    ]
    if not lacking:
        return None
    return (
        f"{migrator.user} has no ADMIN option on {', '.join(lacking)}: the migrations do not "
        "need it, but pluginmon_bind_tenant_role (as this user) will fail until a superuser "
        f"runs {admin_grant(lacking, migrator)}"
    )


_MIGRATOR_SQL = """
SELECT current_user, r.rolsuper, r.rolcreaterole, current_setting('server_version_num')::int
  FROM pg_roles r WHERE r.rolname = current_user
"""

# Superusers pass pg_has_role for every role: they need no option, and are not listed.
_ROLE_SQL = """
SELECT r.oid IS NOT NULL,
       r.oid IS NOT NULL AND pg_has_role(current_user, r.oid, 'MEMBER WITH ADMIN OPTION'),
       coalesce((SELECT array_agg(m.rolname::text ORDER BY m.rolname)
                   FROM pg_auth_members a JOIN pg_roles m ON m.oid = a.member
                  WHERE a.roleid = r.oid AND a.admin_option AND NOT m.rolsuper
                    AND m.rolname <> current_user), '{}')
  FROM (SELECT %s::text AS name) wanted LEFT JOIN pg_roles r ON r.rolname = wanted.name
"""


def read_migrator(conn: psycopg.Connection[tuple[object, ...]]) -> Migrator:
    row = conn.execute(_MIGRATOR_SQL).fetchone()
    assert row is not None
    user, superuser, createrole, version = row
    return Migrator(
        user=str(user),
        superuser=bool(superuser),
        createrole=bool(createrole),
        server_version_num=int(str(version)),
    )


def read_role(conn: psycopg.Connection[tuple[object, ...]], role: ClusterRole) -> RoleState:
    row = conn.execute(_ROLE_SQL, (role.name,)).fetchone()
    assert row is not None
    exists, has_admin, admins = row
    assert isinstance(admins, list)
    return RoleState(
        role=role, exists=bool(exists), has_admin=bool(has_admin), admins=tuple(admins)
    )


def prepare_cluster_roles(
    conn: psycopg.Connection[tuple[object, ...]], *, pending_files: set[str]
) -> str | None:
    """Create the missing roles that ``pending_files`` use (autocommit ``conn``), then say
    why those files would still fail for this user (None: they will not, on this count)."""
    needed = roles_needed(pending_files)
    if not needed:
        return None
    migrator = read_migrator(conn)
    may_create = migrator.superuser or migrator.createrole
    for role in needed:
        if not may_create or read_role(conn, role).exists:
            continue
        try:
            conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(role.name)))
            logger.info("created cluster role %s (for %s)", role.name, role.created_by)
        except (psycopg.errors.DuplicateObject, psycopg.errors.UniqueViolation):
            pass  # another database's migrator on this server created it meanwhile
    states = tuple(read_role(conn, role) for role in needed)
    warning = tenant_group_warning(migrator, states)
    if warning is not None:
        logger.warning("%s", warning)
    return missing_privileges(migrator, states)
