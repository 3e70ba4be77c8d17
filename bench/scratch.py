"""Scratch resources for one benchmark run: a PostgreSQL database, a free TCP port (shared by
the bench scripts)."""

from __future__ import annotations

import socket
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql

from pluginmon.storage.embedded import EmbeddedPostgres
from pluginmon.storage.migrate import migrate


def with_database(url: str, database: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path="/" + database))


@contextmanager
def scratch_database(
    database_url: str | None,
    *,
    server_dir_prefix: str,
    database_prefix: str = "pluginmon_bench",
    migrated: bool = True,
) -> Iterator[str]:
    """URL of a fresh database, migrated unless ``migrated`` is False, removed afterwards.

    Without ``database_url`` a throwaway embedded server (its directory named with
    ``server_dir_prefix``) is started and stopped afterwards; with one, a database named
    ``<database_prefix>_<random>`` is created on that server and dropped afterwards.
    """
    if database_url is None:
        with tempfile.TemporaryDirectory(prefix=server_dir_prefix) as directory:
            server = EmbeddedPostgres(Path(directory))
            url = server.start()
            try:
                if migrated:
                    migrate(url)
                yield url
            finally:
                server.stop()
        return
    name = f"{database_prefix}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = with_database(database_url, name)
    try:
        if migrated:
            migrate(url)
        yield url
    finally:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on at the moment of the call."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
