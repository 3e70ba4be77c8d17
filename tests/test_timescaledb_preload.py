"""TimescaleDB installed but not in shared_preload_libraries: a named condition, never a silent loop.

A real PostgreSQL 15 cluster from the system packages, with the TimescaleDB extension files
installed but the library not preloaded (the commonest set-up mistake): backend "auto" falls
back to PostgreSQL and says what to add and restart; backend "timescaledb" refuses with a
message naming shared_preload_libraries (`pluginmon migrate` exits 1, `pluginmon run` says it
on /readyz and in pluginmon_database_error_info). Restarted with the library preloaded, the
same server gets the TimescaleDB backend. Skipped where the packages are not installed.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from pluginmon.storage.backend import admin_connection, detect_backend
from pluginmon.storage.backend import read_timescale_offer as read_offer_async
from pluginmon.storage.migrate import Backend, TimescaleOffer, read_timescale_offer
from tests.daemon_helpers import DaemonProcess, run_cli, wait_for
from tests.pg_cluster import Cluster, extension_control_file, system_postgres_bin_dir

BIN_DIR = system_postgres_bin_dir()
SKIP_REASON = ""
if BIN_DIR is None:
    SKIP_REASON = (
        "no /usr/lib/postgresql/*/bin/initdb: the PostgreSQL server package is not installed"
    )
elif extension_control_file(BIN_DIR, "timescaledb") is None:
    SKIP_REASON = f"timescaledb.control is not installed for the server in {BIN_DIR}"

pytestmark = pytest.mark.skipif(bool(SKIP_REASON), reason=SKIP_REASON)
if SKIP_REASON:
    print(f"skipping the TimescaleDB preload tests: {SKIP_REASON}")


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """The server with TimescaleDB installed and NOT preloaded (module-wide: initdb is slow)."""
    assert BIN_DIR is not None
    directory = Path(tempfile.mkdtemp(prefix="pluginmon-test-tsdb-"))
    server = Cluster(BIN_DIR, directory / "cluster").init().start()
    try:
        yield server
    finally:
        server.remove()
        shutil.rmtree(directory, ignore_errors=True)


def new_database(server: Cluster, name: str, *, owner: str | None = None) -> str:
    with psycopg.connect(server.url(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"' + (f' OWNER "{owner}"' if owner else ""))
    return name


def plain_role(server: Cluster) -> str:
    """The URL of a plain login role (no superuser, no pg_read_all_settings), made once."""
    with psycopg.connect(server.url(), autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = 'plain_user'").fetchone() is None:
            conn.execute("CREATE ROLE plain_user LOGIN PASSWORD 'plain-pw'")
    return server.url(user="plain_user", password="plain-pw")


def migrate_cli(url: str, backend: str) -> tuple[int, str, str]:
    result = run_cli("migrate", env={"PLUGINMON_DATABASE_URL": url, "PLUGINMON_BACKEND": backend})
    return result.returncode, result.stdout, result.stderr


def recorded_backend(url: str) -> str | None:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT min(backend) FROM schema_migrations").fetchone()
        return None if row is None else str(row[0])


def test_auto_falls_back_to_postgres_and_says_what_to_preload(cluster: Cluster) -> None:
    url = cluster.url(new_database(cluster, "auto_fallback"))
    code, out, err = migrate_cli(url, "auto")
    assert code == 0, err
    assert out.startswith("backend postgres: applied"), out
    # The warning names the setting, the library and the restart.
    assert "shared_preload_libraries" in err
    assert "'timescaledb'" in err
    assert "restart PostgreSQL" in err
    assert "using the PostgreSQL backend instead" in err
    assert recorded_backend(url) == "postgres"
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT to_regclass('plugin_samples')").fetchone() == (
            "plugin_samples",
        )
        # CREATE EXTENSION never ran: it would have killed the connection.
        assert conn.execute("SELECT count(*) FROM pg_extension WHERE extname = 'timescaledb'")\
            .fetchone() == (0,)  # fmt: skip
    assert cluster.password not in out + err


def test_backend_timescaledb_refuses_naming_shared_preload_libraries(cluster: Cluster) -> None:
    url = cluster.url(new_database(cluster, "ts_refused"))
    code, out, err = migrate_cli(url, "timescaledb")
    assert code == 1, (out, err)
    assert "shared_preload_libraries" in err
    assert "not preloaded" in err
    assert "not_preloaded" in err  # the condition's name, as the metric labels it
    assert "the connection is closed" not in err
    with psycopg.connect(url) as conn:
        # Nothing was half-applied: not even the bookkeeping of a first migration.
        assert conn.execute(
            "SELECT count(*) FROM pg_tables WHERE tablename = 'plugins'"
        ).fetchone() == (0,)


def test_run_with_backend_timescaledb_not_preloaded_says_so(
    cluster: Cluster, tmp_path: Path
) -> None:
    url = cluster.url(new_database(cluster, "ts_run"))
    daemon = DaemonProcess(
        tmp_path=tmp_path,
        database_url=url,
        config_text="",
        extra_env={"PLUGINMON_BACKEND": "timescaledb", "PLUGINMON_DATABASE_RETRY_MAX_SECONDS": "1"},
    ).start()
    try:

        def refused() -> str | None:
            daemon.assert_alive()
            status, text = daemon.get("/readyz")
            return text if status == 503 and "not_preloaded" in text else None

        text = wait_for("/readyz to name not_preloaded", refused, timeout=40)
        assert "shared_preload_libraries" in text
        assert daemon.metric("pluginmon_database_error_info", reason="not_preloaded") == 1
        assert daemon.metric("pluginmon_database_up") == 0
        # The daemon keeps saying it (rate-limited), with what to do.
        wait_for(
            "a second start-up log line",
            lambda: (
                sum(r.get("reason") == "not_preloaded" for r in daemon.log_records()) >= 2 or None
            ),
            timeout=30,
        )
    finally:
        daemon.kill()
    lines = [r for r in daemon.log_records() if r.get("reason") == "not_preloaded"]
    assert all("shared_preload_libraries" in r["message"] for r in lines)
    assert {r["level"] for r in lines} == {"error"}
    assert cluster.password not in daemon.log_text()


def test_offer_seen_by_a_user_who_may_not_read_shared_preload_libraries(
    cluster: Cluster,
) -> None:
    """A plain login role cannot SHOW shared_preload_libraries (42501); the loader's own
    setting answers instead, and says the same."""
    with psycopg.connect(plain_role(cluster), autocommit=True) as conn:
        offer = read_timescale_offer(conn)
    assert offer.preload_libraries is None
    assert offer.loader_loaded is False
    assert offer.preloaded is False
    assert offer.default_version is not None

    async def read_async(url: str) -> tuple[TimescaleOffer, Backend]:
        async with admin_connection(url) as conn:
            return await read_offer_async(conn), await detect_backend(conn)

    # The maintenance plane (async) reads the same, and auto would not choose TimescaleDB.
    assert asyncio.run(read_async(plain_role(cluster))) == (offer, Backend.POSTGRES)
    superuser_offer, _ = asyncio.run(read_async(cluster.url()))
    assert superuser_offer.preload_libraries == ()


def test_preloaded_server_gets_the_timescaledb_backend(cluster: Cluster) -> None:
    """Same binaries, restarted with the library preloaded (runs last: it changes the server)."""
    cluster.configure({"shared_preload_libraries": "'timescaledb'"})
    cluster.stop()
    cluster.start()
    with psycopg.connect(cluster.url(), autocommit=True) as conn:
        assert read_timescale_offer(conn).preload_libraries == ("timescaledb",)
    with psycopg.connect(plain_role(cluster), autocommit=True) as conn:
        offer = read_timescale_offer(conn)
        assert (offer.preload_libraries, offer.loader_loaded, offer.preloaded) == (
            None,
            True,
            True,
        )
    url = cluster.url(new_database(cluster, "ts_preloaded"))
    code, out, err = migrate_cli(url, "auto")
    assert code == 0, err
    assert out.startswith(f"backend {Backend.TIMESCALEDB.value}: applied"), out
    assert "shared_preload_libraries" not in err
    assert recorded_backend(url) == "timescaledb"
    with psycopg.connect(url) as conn:
        hypertables = conn.execute(
            "SELECT hypertable_name FROM timescaledb_information.hypertables ORDER BY 1"
        ).fetchall()
    assert ("plugin_samples",) in hypertables
