"""Test helpers for throwaway databases on the test server (admin plane, psycopg).

When the test server is a Citus coordinator (``PLUGINMON_TEST_DATABASE_URL`` names a database
with the citus extension and its workers registered), a new database is made on every node
with the extension, the coordinator and the workers registered: CREATE DATABASE does not
reach the workers in Citus 12. A Citus database cannot be copied by template (the shards on
the workers would not be), so copies are migrated from scratch there.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql

from pluginmon.storage.migrate import migrate


def with_database(url: str, database: str) -> str:
    """``url`` pointing at another database on the same server."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + database))


def with_node(url: str, host: str, port: int) -> str:
    """``url`` pointing at another server (the same user and database)."""
    parts = urlsplit(url)
    user = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    return urlunsplit(parts._replace(netloc=f"{user}{host}:{port}"))


def citus_nodes(admin_url: str) -> tuple[tuple[str, int], list[tuple[str, int]]] | None:
    """(coordinator, workers) when ``admin_url`` is a Citus coordinator's database with
    workers, else None."""
    with psycopg.connect(admin_url) as conn:
        if conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'citus'").fetchone() is None:
            return None
        rows = conn.execute(
            "SELECT nodename, nodeport, groupid FROM pg_dist_node"
            " WHERE noderole = 'primary' AND isactive ORDER BY groupid"
        ).fetchall()
    coordinator = [(str(h), int(p)) for h, p, g in rows if g == 0]
    workers = [(str(h), int(p)) for h, p, g in rows if g != 0]
    if not coordinator or not workers:
        return None
    return coordinator[0], workers


def _create_on_citus(admin_url: str, name: str) -> None:
    nodes = citus_nodes(admin_url)
    assert nodes is not None
    (c_host, c_port), workers = nodes
    for host, port in workers:
        with psycopg.connect(with_node(admin_url, host, port), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        with psycopg.connect(
            with_database(with_node(admin_url, host, port), name), autocommit=True
        ) as conn:
            conn.execute("CREATE EXTENSION citus")
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    with psycopg.connect(with_database(admin_url, name), autocommit=True) as conn:
        conn.execute("CREATE EXTENSION citus")
        conn.execute("SELECT citus_set_coordinator_host(%s, %s)", (c_host, c_port))
        for host, port in workers:
            conn.execute("SELECT citus_add_node(%s, %s)", (host, port))


def create_database(admin_url: str, *, template: str | None = None, prefix: str = "t") -> str:
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    if citus_nodes(admin_url) is not None:
        if template is not None:
            # (migrated_copy catches this and migrates a new database instead)
            raise psycopg.errors.ObjectInUse("a Citus database cannot be copied by template")
        _create_on_citus(admin_url, name)
        return name
    with psycopg.connect(admin_url, autocommit=True) as conn:
        if template is None:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        else:
            conn.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                    sql.Identifier(name), sql.Identifier(template)
                )
            )
    return name


def drop_database(admin_url: str, name: str) -> None:
    nodes = citus_nodes(admin_url)
    urls = [admin_url] + [with_node(admin_url, h, p) for h, p in (nodes[1] if nodes else [])]
    for url in urls:
        drop_on_server(url, name)


def drop_on_server(url: str, name: str, *, attempts: int = 5) -> None:
    """DROP DATABASE ... WITH (FORCE) on the server of ``url``. Retried: on a Citus node the
    extension's maintenance daemon may connect to the database again between FORCE's
    termination of the sessions and the drop (ObjectInUse)."""
    for attempt in range(attempts):
        try:
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )
            return
        except psycopg.errors.ObjectInUse:
            if attempt == attempts - 1:
                raise
            time.sleep(0.5 * (attempt + 1))


@contextmanager
def migrated_copy(admin_url: str, template: str, *, prefix: str) -> Iterator[str]:
    """URL of a new database copied from the migrated database ``template``, dropped on exit.

    TimescaleDB's background workers may hold the template open: then the new database is
    migrated from scratch instead.
    """
    try:
        name = create_database(admin_url, template=template, prefix=prefix)
    except psycopg.errors.ObjectInUse:
        name = create_database(admin_url, prefix=prefix)
        migrate(with_database(admin_url, name))
    try:
        yield with_database(admin_url, name)
    finally:
        drop_database(admin_url, name)


def has_timescaledb(url: str) -> bool:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'"
        ).fetchone()
        return row is not None
