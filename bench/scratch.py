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
    ``<database_prefix>_<random>`` is created on that server and dropped afterwards; when
    ``database_url`` names a Citus database on a coordinator, the new one is a Citus database
    on the same nodes (see ``citus_workers``).
    """
    if database_url is None:
        with tempfile.TemporaryDirectory(prefix=server_dir_prefix) as directory:
            server = EmbeddedPostgres(Path(directory))
            server.start()
            # As a daemon on the embedded default connects: through the Unix socket.
            url = server.local_url()
            try:
                if migrated:
                    migrate(url)
                yield url
            finally:
                server.stop()
        return
    with new_database(database_url, prefix=database_prefix) as url:
        if migrated:
            migrate(url)
        yield url


@contextmanager
def new_database(server_url: str, *, prefix: str) -> Iterator[str]:
    """URL of a new, empty database ``<prefix>_<random>`` on ``server_url``'s server, dropped
    afterwards; when ``server_url`` names a Citus database on a coordinator, a Citus database
    on the same nodes (created on every worker, see ``citus_workers``)."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    workers = citus_workers(server_url)
    nodes = node_urls(server_url, workers)
    for node in nodes:
        with psycopg.connect(node, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = with_database(server_url, name)
    try:
        if workers:
            make_citus_database(url, workers)
        yield url
    finally:
        for node in nodes:
            with psycopg.connect(node, autocommit=True) as conn:
                conn.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )


def node_urls(url: str, workers: list[tuple[str, int]] | None = None) -> list[str]:
    """``url`` and the same database on each Citus worker (``citus_workers`` unless given)."""
    found = citus_workers(url) if workers is None else workers
    return [url, *(with_node(url, host, port) for host, port in found)]


def citus_workers(database_url: str) -> list[tuple[str, int]]:
    """The active workers when ``database_url`` names a Citus database on a coordinator (the
    citus extension created there, workers added), else []. A scratch database made beside
    it is then made a Citus database too: created on every worker, with the extension, the
    same workers added (a new database on a coordinator is plain PostgreSQL otherwise)."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        has_citus = conn.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus')"
        ).fetchone()
        if not has_citus or not has_citus[0]:
            return []
        rows = conn.execute(
            "SELECT nodename, nodeport FROM pg_dist_node"
            " WHERE groupid <> 0 AND noderole = 'primary' AND isactive ORDER BY nodeid"
        ).fetchall()
    return [(str(host), int(str(port))) for host, port in rows]


def with_node(url: str, host: str, port: int) -> str:
    """``url`` pointed at another server (same user, password and database)."""
    parts = urlsplit(url)
    credentials = parts.netloc.rpartition("@")[0]
    netloc = f"{credentials}@{host}:{port}" if credentials else f"{host}:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


def make_citus_database(url: str, workers: list[tuple[str, int]]) -> None:
    """The citus extension in ``url``'s database on the coordinator and every worker, the
    coordinator's own address recorded and the workers added (what makes a Citus database)."""
    for host, port in workers:
        with psycopg.connect(with_node(url, host, port), autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS citus")
    parts = urlsplit(url)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS citus")
        conn.execute(
            "SELECT citus_set_coordinator_host(%s, %s)", (parts.hostname, parts.port or 5432)
        )
        for host, port in workers:
            conn.execute("SELECT citus_add_node(%s, %s)", (host, port))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on at the moment of the call."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
