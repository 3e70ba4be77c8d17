"""Named database failure conditions: told apart from transient ones, said at a bounded rate, shown by /readyz and metrics.

Real errors from the real test server (a role with a password, a database that does not
exist, a closed port, a read-only session, a missing privilege), `pluginmon migrate` and
`pluginmon run` as subprocesses; the pure parts (backend choice, log throttle) with data.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg
import psycopg
import pytest
from psycopg import sql

from pluginmon.storage.cluster_roles import CLUSTER_ROLES
from pluginmon.storage.migrate import (
    Backend,
    ExtensionMissingError,
    ExtensionTooOldError,
    MigrationError,
    NewerSchemaError,
    NotPreloadedError,
    TimescaleOffer,
    choose_backend,
    parse_preload_libraries,
    version_tuple,
)
from pluginmon.storage.reachability import (
    RETRIED_AT_START,
    LogThrottle,
    condition,
    failure_message,
    failure_reason,
)
from tests.daemon_helpers import DaemonProcess, run_cli, wait_for
from tests.dbutil import create_database, drop_database
from tests.net_helpers import free_port

# -- the pure parts ----------------------------------------------------------------------------


def test_preload_libraries_are_parsed_like_the_server_lists_them() -> None:
    assert parse_preload_libraries("") == ()
    assert parse_preload_libraries("timescaledb") == ("timescaledb",)
    assert parse_preload_libraries("pg_stat_statements, 'timescaledb'") == (
        "pg_stat_statements",
        "timescaledb",
    )
    assert parse_preload_libraries('"$libdir/timescaledb.so",auto_explain') == (
        "timescaledb",
        "auto_explain",
    )
    # A look-alike is not the loader.
    assert "timescaledb" not in parse_preload_libraries("timescaledb_toolkit")


def test_versions_compare_as_numbers() -> None:
    assert version_tuple("2.28.3") == (2, 28, 3)
    assert version_tuple("2.9.0-dev") == (2, 9, 0)
    assert version_tuple("2.9.0") < (2, 13) <= version_tuple("2.13.0") < version_tuple("2.28.3")


READY = TimescaleOffer(default_version="2.28.3", preload_libraries=("timescaledb",))
NOT_PRELOADED = TimescaleOffer(default_version="2.28.3", preload_libraries=("pg_stat_statements",))
TOO_OLD = TimescaleOffer(default_version="2.9.1", preload_libraries=("timescaledb",))
ABSENT = TimescaleOffer(default_version=None, preload_libraries=())


def test_auto_takes_timescaledb_only_when_usable_and_warns_when_it_is_not() -> None:
    assert choose_backend(None, READY).backend is Backend.TIMESCALEDB
    assert choose_backend(None, READY).warning is None
    assert choose_backend(None, ABSENT) == choose_backend(Backend.POSTGRES, READY)
    assert choose_backend(None, ABSENT).backend is Backend.POSTGRES
    assert choose_backend(None, ABSENT).warning is None  # nothing there: nothing to say

    fallback = choose_backend(None, NOT_PRELOADED)
    assert fallback.backend is Backend.POSTGRES
    assert fallback.warning is not None
    assert "shared_preload_libraries = 'timescaledb'" in fallback.warning
    assert "restart PostgreSQL" in fallback.warning
    assert "'pg_stat_statements'" in fallback.warning  # what is listed now, to append to

    old = choose_backend(None, TOO_OLD)
    assert old.backend is Backend.POSTGRES
    assert old.warning is not None
    assert "2.9.1 is older than the 2.13" in old.warning
    # An old extension already created in this database counts too.
    installed_old = TimescaleOffer(
        default_version="2.28.3", installed_version="2.10.0", preload_libraries=("timescaledb",)
    )
    assert choose_backend(None, installed_old).backend is Backend.POSTGRES


def test_backend_timescaledb_refuses_what_auto_falls_back_from() -> None:
    assert choose_backend(Backend.TIMESCALEDB, READY).backend is Backend.TIMESCALEDB
    with pytest.raises(NotPreloadedError, match="shared_preload_libraries") as info:
        choose_backend(Backend.TIMESCALEDB, NOT_PRELOADED)
    assert failure_reason(info.value) == "not_preloaded"
    with pytest.raises(ExtensionTooOldError, match=r"older than the 2\.13"):
        choose_backend(Backend.TIMESCALEDB, TOO_OLD)
    with pytest.raises(ExtensionMissingError, match="pg_available_extensions"):
        choose_backend(Backend.TIMESCALEDB, ABSENT)
    # Without SHOW rights the loader's setting decides.
    hidden = TimescaleOffer(default_version="2.28.3", loader_loaded=True, preload_libraries=None)
    assert choose_backend(Backend.TIMESCALEDB, hidden).backend is Backend.TIMESCALEDB


def test_log_throttle_says_a_new_reason_at_once_and_a_lasting_one_every_interval() -> None:
    now = [0.0]
    throttle = LogThrottle(interval_seconds=10, clock=lambda: now[0])
    said = []
    for step in range(40):  # a retry every 0.5 s for 20 s
        now[0] = step * 0.5
        reason = "unreachable" if step < 30 else "authentication_failed"
        if throttle.due(reason):
            said.append((now[0], reason))
    assert said == [
        (0.0, "unreachable"),
        (10.0, "unreachable"),
        (15.0, "authentication_failed"),  # changed: at once
    ]
    assert throttle.due("authentication_failed", repeat=False) is False
    now[0] = 100.0
    assert throttle.due("authentication_failed", repeat=False) is False  # once per change
    throttle.reset()
    assert throttle.due("authentication_failed") is True
    with pytest.raises(ValueError, match="interval_seconds"):
        LogThrottle(interval_seconds=0, clock=lambda: 0.0)


def test_failure_message_is_the_servers_words_on_one_line_without_passwords() -> None:
    libpq = psycopg.OperationalError(
        'connection failed: connection to server at "127.0.0.1", port 5432 failed: '
        'FATAL:  password authentication failed for user "pm"'
    )
    assert failure_message(libpq) == 'password authentication failed for user "pm"'
    assert failure_reason(libpq) == "authentication_failed"
    echoed = ValueError('missing "=" after "postgresql://pm:hunter2@db/x" in\n  connection info')
    message = failure_message(echoed)
    assert "hunter2" not in message
    assert "\n" not in message
    assert failure_reason(echoed) == "error"
    assert "error" not in RETRIED_AT_START


def test_named_errors_and_their_causes() -> None:
    assert failure_reason(NewerSchemaError("newer")) == "newer_schema"
    assert failure_reason(MigrationError("001_a.sql: changed after it was applied")) == (
        "migration_failed"
    )
    assert "migration_failed" not in RETRIED_AT_START
    assert failure_reason(TimeoutError()) == "timeout"
    assert failure_reason(ConnectionRefusedError(111, "refused")) == "unreachable"
    assert condition("authentication_failed").permanent
    assert not condition("read_only").permanent


# -- real errors from the real server --------------------------------------------------------


@dataclass(frozen=True)
class Role:
    name: str
    password: str
    database: str
    admin_url: str

    def url(self, *, password: str | None = None, database: str | None = None) -> str:
        parts = urlsplit(self.admin_url)
        host = parts.hostname or "127.0.0.1"
        secret = quote(self.password if password is None else password, safe="")
        netloc = f"{self.name}:{secret}@{host}:{parts.port}"
        return urlunsplit(parts._replace(netloc=netloc, path="/" + (database or self.database)))


@pytest.fixture
def role(pg_admin_url: str) -> Iterator[Role]:
    """A login role with a password and an empty database it owns."""
    name = f"pm_role_{uuid.uuid4().hex[:8]}"
    password = f"right-{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(name), sql.Literal(password)
            )
        )
    database = create_database(pg_admin_url, prefix="roledb")
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("ALTER DATABASE {} OWNER TO {}").format(
                sql.Identifier(database), sql.Identifier(name)
            )
        )
    try:
        yield Role(name, password, database, pg_admin_url)
    finally:
        drop_database(pg_admin_url, database)
        with psycopg.connect(pg_admin_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


@pytest.fixture
def refused_role(role: Role) -> Role:
    """``role`` where the server checks passwords: a test of a wrong one skips where the test
    server trusts loopback (the local Citus cluster of tests/citus_cluster.py does)."""
    try:
        psycopg.connect(role.url(password="wrong-probe"), connect_timeout=10).close()
    except psycopg.OperationalError:
        return role
    pytest.skip("the test server accepts any password (trust auth): nothing to refuse")


def both_drivers(url: str) -> tuple[BaseException, BaseException]:
    """What psycopg and asyncpg raise connecting to ``url``."""
    import asyncio

    errors: list[BaseException] = []
    try:
        psycopg.connect(url, connect_timeout=5).close()
    except psycopg.Error as exc:
        errors.append(exc)

    async def connect() -> None:
        conn = await asyncpg.connect(url, timeout=5)
        await conn.close()

    try:
        asyncio.run(connect())
    except (OSError, asyncpg.PostgresError) as exc:
        errors.append(exc)
    assert len(errors) == 2, f"both drivers should have failed on {url}: {errors}"
    return errors[0], errors[1]


def test_connection_failures_of_both_drivers_get_one_reason(refused_role: Role) -> None:
    role = refused_role
    for exc in both_drivers(role.url(password="wrong-password")):
        assert failure_reason(exc) == "authentication_failed", repr(exc)
        assert "password authentication failed" in failure_message(exc)
    for exc in both_drivers(role.url(database="no_such_database_here")):
        assert failure_reason(exc) == "database_missing", repr(exc)
        assert 'database "no_such_database_here" does not exist' in failure_message(exc)
    closed = f"postgresql://pm:x@127.0.0.1:{free_port()}/pm"
    for exc in both_drivers(closed):
        assert failure_reason(exc) == "unreachable", repr(exc)


def test_statement_failures_get_their_reason(role: Role, pg_admin_url: str) -> None:
    with psycopg.connect(role.url(), autocommit=True) as conn:
        conn.execute("SET default_transaction_read_only = on")
        with pytest.raises(psycopg.Error) as read_only:
            conn.execute("CREATE TABLE t_read_only (x int)")
    assert failure_reason(read_only.value) == "read_only"
    # Another database the role does not own: no CREATE on its public schema (PG 15+).
    other = create_database(pg_admin_url, prefix="noprivs")
    try:
        with (
            psycopg.connect(role.url(database=other), autocommit=True) as conn,
            pytest.raises(psycopg.Error) as denied,
        ):
            conn.execute("CREATE TABLE t_denied (x int)")
        assert failure_reason(denied.value) == "missing_privilege"
        wrapped = MigrationError("001_core.sql: permission denied")
        wrapped.__cause__ = denied.value
        assert failure_reason(wrapped) == "missing_privilege"  # through the cause

        result = run_cli("migrate", env={"PLUGINMON_DATABASE_URL": role.url(database=other)})
        assert result.returncode == 1, result.stderr
        assert "permission denied for schema public" in result.stderr
        assert "missing_privilege" in result.stderr
    finally:
        drop_database(pg_admin_url, other)


def test_migrate_with_a_wrong_password_exits_1_with_the_servers_message(refused_role: Role) -> None:
    role = refused_role
    result = run_cli("migrate", env={"PLUGINMON_DATABASE_URL": role.url(password="wrong-pw-1")})
    assert result.returncode == 1
    assert f'password authentication failed for user "{role.name}"' in result.stderr
    assert "authentication_failed" in result.stderr
    assert "wrong-pw-1" not in result.stderr + result.stdout
    assert role.password not in result.stderr + result.stdout


def test_migrate_on_a_schema_from_a_newer_pluginmon_exits_1(migrated_db: str) -> None:
    with psycopg.connect(migrated_db, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO schema_migrations (version, name, filename, backend, checksum,"
            " duration_ms) SELECT 990, 'from_the_future', '990_from_the_future.sql',"
            " min(backend), repeat('0', 64), 1 FROM schema_migrations"
        )
    result = run_cli("migrate", env={"PLUGINMON_DATABASE_URL": migrated_db})
    assert result.returncode == 1, result.stdout
    assert "migrated by a newer pluginmon (990_from_the_future.sql applied" in result.stderr
    assert "newer_schema" in result.stderr


# -- pluginmon run with a wrong password -----------------------------------------------------

RETRY_MAX_SECONDS = 0.2  # the log interval is twice this: 0.4 s


def test_run_with_a_wrong_password_says_so_at_a_bounded_rate_then_recovers(
    refused_role: Role, pg_admin_url: str, tmp_path: Path, migrated_db: str
) -> None:
    role = refused_role
    # migrated_db: the cluster-wide roles exist on this server, created by a superuser (who
    # migrated the template), so this owner, without CREATEROLE, may not create them and
    # holds no ADMIN option on them. What the migrator's missing_privilege message tells the
    # administrator to run once (storage/cluster_roles.py; docs/storage.md):
    del migrated_db
    wrong = f"wrong-{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        if conn.info.server_version < 160000:  # before 16: CREATEROLE (cluster_roles.py)
            conn.execute(sql.SQL("ALTER ROLE {} CREATEROLE").format(sql.Identifier(role.name)))
        else:
            conn.execute(
                sql.SQL("GRANT {} TO {} WITH ADMIN TRUE, INHERIT FALSE, SET FALSE").format(
                    sql.SQL(", ").join(sql.Identifier(r.name) for r in CLUSTER_ROLES),
                    sql.Identifier(role.name),
                )
            )
    daemon = DaemonProcess(
        tmp_path=tmp_path,
        database_url=role.url(password=wrong),
        config_text="",
        extra_env={"PLUGINMON_DATABASE_RETRY_MAX_SECONDS": str(RETRY_MAX_SECONDS)},
    ).start()
    try:

        def refused() -> str | None:
            daemon.assert_alive()
            status, text = daemon.get("/readyz")
            return text if status == 503 and "authentication_failed" in text else None

        text = wait_for("/readyz to name authentication_failed", refused, timeout=40)
        assert f'password authentication failed for user "{role.name}"' in text
        assert daemon.metric("pluginmon_database_error_info", reason="authentication_failed") == 1
        assert daemon.metric("pluginmon_database_up") == 0

        def startup_lines() -> list[dict[str, object]]:
            return [r for r in daemon.log_records() if r.get("reason") == "authentication_failed"]

        lines = wait_for("6 start-up log lines", lambda: startup_lines()[5:] and startup_lines())

        # Then the operator fixes the password: the daemon picks it up without a restart.
        with psycopg.connect(pg_admin_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                    sql.Identifier(role.name), sql.Literal(wrong)
                )
            )
        daemon.wait_ready(timeout=40)
        assert daemon.metric("pluginmon_database_up") == 1
        assert (
            daemon.metric("pluginmon_database_error_info", reason="authentication_failed") is None
        )
    finally:
        daemon.kill()

    messages = [str(r["message"]) for r in lines]
    assert all(
        m.startswith("database login refused at start-up (authentication_failed), attempt ")
        for m in messages
    ), messages[0]
    assert all(f'password authentication failed for user "{role.name}"' in m for m in messages)
    assert all(r["level"] == "error" for r in lines)
    # Every line says which attempt it was: several lines (not once), and fewer lines than
    # attempts (not every step) ...
    attempts = [int(str(r["attempt"])) for r in lines]
    assert attempts == sorted(set(attempts))
    assert attempts[-1] - attempts[0] > len(attempts) - 1, attempts
    # ... and never two within the log interval (2 x database_retry_max_seconds).
    times = [datetime.fromisoformat(str(r["ts"])) for r in lines]
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(times)]
    assert min(gaps) >= 2 * RETRY_MAX_SECONDS - 0.002, gaps
    log = daemon.log_text()
    assert "database ready (it was: authentication_failed)" in log
    assert wrong not in log
    assert role.password not in log
