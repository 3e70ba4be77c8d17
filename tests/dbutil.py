"""Test helpers for throwaway databases on the test server (admin plane, psycopg)."""

from __future__ import annotations

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


def create_database(admin_url: str, *, template: str | None = None, prefix: str = "t") -> str:
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
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
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


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
