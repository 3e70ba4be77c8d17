"""Shared fixtures: a real PostgreSQL server (throwaway, or PLUGINMON_TEST_DATABASE_URL)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from pluginmon.storage.embedded import EmbeddedPostgres
from pluginmon.storage.migrate import migrate
from tests.dbutil import (
    citus_nodes,
    create_database,
    drop_database,
    has_timescaledb,
    migrated_copy,
    with_database,
)

TIMESCALEDB_SKIP_REASON = (
    "the test database has no timescaledb extension "
    "(set PLUGINMON_TEST_DATABASE_URL to a TimescaleDB 2.x server to run these)"
)


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    """URL of a maintenance database on the test server; tests create their own databases."""
    external = os.environ.get("PLUGINMON_TEST_DATABASE_URL")
    if external:
        yield external
        return
    # Not under pytest's basetemp: pytest resets that tree to 0700 at every session start,
    # which would cut off a server that runs as a separate user when we are root.
    data_dir = Path(tempfile.mkdtemp(prefix="pluginmon-test-pg-"))
    server = EmbeddedPostgres(data_dir)
    server.start()
    try:
        yield server.url("postgres")
    finally:
        server.stop(mode="immediate")
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def timescaledb_available(pg_admin_url: str) -> bool:
    return has_timescaledb(pg_admin_url)


@pytest.fixture
def requires_timescaledb(timescaledb_available: bool, pg_admin_url: str) -> None:
    if not timescaledb_available:
        pytest.skip(TIMESCALEDB_SKIP_REASON)
    if citus_nodes(pg_admin_url) is not None:
        # The server may offer both extensions, but a database has one of them.
        pytest.skip("on Citus: TimescaleDB cannot share a database with Citus")


@pytest.fixture
def fresh_db(pg_admin_url: str) -> Iterator[str]:
    """URL of a new, empty database, dropped after the test."""
    name = create_database(pg_admin_url, prefix="fresh")
    try:
        yield with_database(pg_admin_url, name)
    finally:
        drop_database(pg_admin_url, name)


@pytest.fixture(scope="session")
def migrated_template(pg_admin_url: str) -> Iterator[str]:
    """Name of a database migrated once per session, copied by ``migrated_db``."""
    if citus_nodes(pg_admin_url) is not None:
        # Never read there: migrated_copy migrates (or reuses) a Citus database of its own.
        yield "no-template-on-citus"
        return
    name = create_database(pg_admin_url, prefix="tpl")
    migrate(with_database(pg_admin_url, name))
    try:
        yield name
    finally:
        drop_database(pg_admin_url, name)


@pytest.fixture
def migrated_db(pg_admin_url: str, migrated_template: str) -> Iterator[str]:
    """URL of a new database with every migration applied, dropped after the test."""
    with migrated_copy(pg_admin_url, migrated_template, prefix="mig") as url:
        yield url


@pytest.fixture
async def conn(migrated_db: str) -> AsyncIterator[asyncpg.Connection]:
    """An asyncpg connection to ``migrated_db`` (a module may define its own ``conn``)."""
    connection = await asyncpg.connect(migrated_db)
    try:
        yield connection
    finally:
        await connection.close()


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


@pytest.fixture
def server_tmp_dir() -> Iterator[Path]:
    """A temporary directory for a test's own EmbeddedPostgres, outside pytest's basetemp.

    pytest resets its basetemp tree to 0700 whenever any pytest session starts; a server that
    runs as a separate user (we are root in CI) would then lose its data directory.
    """
    path = Path(tempfile.mkdtemp(prefix="pluginmon-test-own-pg-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
