"""Test helpers for throwaway databases on the test server (admin plane, psycopg).

When the test server is a Citus coordinator (``PLUGINMON_TEST_DATABASE_URL`` names a database
with the citus extension and its workers registered), a new database is made on every node
with the extension, the coordinator and the workers registered: CREATE DATABASE does not
reach the workers in Citus 12. A Citus database cannot be copied by template (the shards on
the workers would not be), so copies are migrated from scratch there, which takes seconds:
a copy a test has finished with is emptied (TRUNCATE, the migrations' own rows put back)
and handed to the next test instead, unless the test changed its schema.
"""

from __future__ import annotations

import atexit
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any
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


def worker_urls(url: str) -> list[str]:
    """``url``'s database on each Citus worker; empty when it is not a coordinator's."""
    nodes = citus_nodes(url)
    return [with_node(url, host, port) for host, port in nodes[1]] if nodes else []


def is_citus(url: str) -> bool:
    """Whether ``url``'s database is a Citus coordinator's (the extension, workers)."""
    return citus_nodes(url) is not None


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
    migrated from scratch instead. On Citus a migrated database is reused (see the module
    docstring).
    """
    if citus_nodes(admin_url) is not None:
        with _citus_migrated(admin_url, prefix=prefix) as url:
            yield url
        return
    try:
        name = create_database(admin_url, template=template, prefix=prefix)
    except psycopg.errors.ObjectInUse:
        name = create_database(admin_url, prefix=prefix)
        migrate(with_database(admin_url, name))
    try:
        yield with_database(admin_url, name)
    finally:
        drop_database(admin_url, name)


# What a test may change in a database's schema (tables and partitions, constraints,
# triggers, functions, policies, distribution, applied migrations): a database whose
# fingerprint differs after the test is dropped, not reused.
_FINGERPRINT_SQL = """
SELECT md5(concat_ws('|',
  (SELECT string_agg(c.oid::regclass::text || ':' || c.relkind::text, ',' ORDER BY c.oid::regclass::text)
     FROM pg_class c WHERE c.relnamespace IN ('public'::regnamespace, 'pluginmon_tenant'::regnamespace)),
  (SELECT string_agg(conname, ',' ORDER BY conname) FROM pg_constraint
    WHERE connamespace = 'public'::regnamespace),
  (SELECT string_agg(tgname, ',' ORDER BY tgname) FROM pg_trigger WHERE NOT tgisinternal),
  (SELECT string_agg(p.oid::regprocedure::text, ',' ORDER BY p.oid::regprocedure::text)
     FROM pg_proc p WHERE p.pronamespace = 'public'::regnamespace),
  (SELECT string_agg(polname, ',' ORDER BY polname) FROM pg_policy),
  (SELECT count(*) FROM pg_dist_partition),
  (SELECT string_agg(filename, ',' ORDER BY filename) FROM schema_migrations)))
"""

# Every table but schema_migrations, and whether Citus distributes it (or copies it as a
# reference table): those are emptied by Citus's own TRUNCATE trigger, the others (the audit
# trail on the coordinator) with triggers off, since audit_log refuses TRUNCATE by trigger.
_TABLES_SQL = """
SELECT c.oid::regclass::text,
       EXISTS (SELECT 1 FROM pg_dist_partition d WHERE d.logicalrelid = c.oid)
  FROM pg_class c
 WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p')
   AND NOT c.relispartition AND c.relname <> 'schema_migrations'
 ORDER BY 1
"""


@dataclass
class _Migrated:
    name: str
    fingerprint: str
    tables: list[str]
    local_tables: list[str]
    # The rows the migrations wrote (watermarks, progress): table -> (columns, rows).
    seed: dict[str, tuple[list[str], list[tuple[Any, ...]]]]


_SPARES: dict[str, list[_Migrated]] = {}


def _snapshot(url: str, name: str) -> _Migrated:
    with psycopg.connect(url) as conn:
        fingerprint = str(_one(conn, _FINGERPRINT_SQL))
        listed = conn.execute(_TABLES_SQL).fetchall()
        tables = [str(name) for name, _ in listed]
        local = [str(name) for name, distributed in listed if not distributed]
        seed: dict[str, tuple[list[str], list[tuple[Any, ...]]]] = {}
        for table in tables:
            cur = conn.execute(sql.SQL("SELECT * FROM {}").format(sql.Identifier(table)))
            rows = cur.fetchall()
            if rows:
                seed[table] = ([c.name for c in cur.description or ()], rows)
    return _Migrated(name, fingerprint, tables, local, seed)


def _one(conn: psycopg.Connection[Any], query: str) -> Any:
    row = conn.execute(query).fetchone()
    assert row is not None
    return row[0]


def _reset(admin_url: str, db: _Migrated) -> bool:
    """Empty ``db`` for the next test; False when it cannot be reused (schema changed)."""
    url = with_database(admin_url, db.name)
    try:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid() AND backend_type = 'client backend'",
                (db.name,),
            )
        with psycopg.connect(url) as conn:
            if _one(conn, _FINGERPRINT_SQL) != db.fingerprint:
                return False
            conn.execute("SET LOCAL lock_timeout = '20s'")
            for tables, triggers in (
                ([t for t in db.tables if t not in db.local_tables], "origin"),
                (db.local_tables, "replica"),
            ):
                conn.execute(f"SET LOCAL session_replication_role = {triggers}")
                conn.execute(
                    sql.SQL("TRUNCATE {} RESTART IDENTITY CASCADE").format(
                        sql.SQL(", ").join(sql.Identifier(t) for t in tables)
                    )
                )
            conn.execute("SET LOCAL session_replication_role = origin")
            for table, (columns, rows) in db.seed.items():
                with conn.cursor() as cur:
                    cur.executemany(
                        sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
                            sql.Identifier(table),
                            sql.SQL(", ").join(sql.Identifier(c) for c in columns),
                            sql.SQL(", ").join(sql.Placeholder() for _ in columns),
                        ),
                        rows,
                    )
        return True
    except psycopg.Error:
        return False


@contextmanager
def _citus_migrated(admin_url: str, *, prefix: str) -> Iterator[str]:
    spares = _SPARES.setdefault(admin_url, [])
    if spares:
        db = spares.pop()
    else:
        name = create_database(admin_url, prefix=prefix)
        migrate(with_database(admin_url, name))
        db = _snapshot(with_database(admin_url, name), name)
    try:
        yield with_database(admin_url, db.name)
    finally:
        if _reset(admin_url, db):
            spares.append(db)
        else:
            drop_database(admin_url, db.name)


@atexit.register
def _drop_spares() -> None:
    for admin_url, spares in _SPARES.items():
        for db in spares:
            with suppress(psycopg.Error):
                drop_database(admin_url, db.name)
        spares.clear()


def has_timescaledb(url: str) -> bool:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'"
        ).fetchone()
        return row is not None
