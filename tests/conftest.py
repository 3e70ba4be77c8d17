"""Shared fixtures: a real PostgreSQL server (throwaway, or PLUGINMON_TEST_DATABASE_URL)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from storage.embedded import EmbeddedPostgres
from storage.migrate import migrate
from tests.dbutil import create_database, drop_database, has_timescaledb, with_database

TIMESCALEDB_SKIP_REASON = (
    "the test database has no timescaledb extension "
    "(set PLUGINMON_TEST_DATABASE_URL to a TimescaleDB 2.x server to run these)"
)


@pytest.fixture(scope="session")
def pg_admin_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a maintenance database on the test server; tests create their own databases."""
    external = os.environ.get("PLUGINMON_TEST_DATABASE_URL")
    if external:
        yield external
        return
    server = EmbeddedPostgres(tmp_path_factory.mktemp("embedded-pg"))
    server.start()
    try:
        yield server.url("postgres")
    finally:
        server.stop(mode="immediate")


@pytest.fixture(scope="session")
def timescaledb_available(pg_admin_url: str) -> bool:
    return has_timescaledb(pg_admin_url)


@pytest.fixture
def requires_timescaledb(timescaledb_available: bool) -> None:
    if not timescaledb_available:
        pytest.skip(TIMESCALEDB_SKIP_REASON)


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
    name = create_database(pg_admin_url, prefix="tpl")
    migrate(with_database(pg_admin_url, name))
    try:
        yield name
    finally:
        drop_database(pg_admin_url, name)


@pytest.fixture
def migrated_db(pg_admin_url: str, migrated_template: str) -> Iterator[str]:
    """URL of a new database with every migration applied, dropped after the test."""
    try:
        name = create_database(pg_admin_url, template=migrated_template, prefix="mig")
    except psycopg.errors.ObjectInUse:
        # TimescaleDB's background workers may hold the template open: migrate from scratch.
        name = create_database(pg_admin_url, prefix="mig")
        migrate(with_database(pg_admin_url, name))
    try:
        yield with_database(pg_admin_url, name)
    finally:
        drop_database(pg_admin_url, name)


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent
