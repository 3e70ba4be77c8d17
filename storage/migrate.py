"""Migrations runner (admin plane, psycopg): sql/NNN_name[.backend].sql applied in order, once each."""

from __future__ import annotations

import hashlib
import logging
import math
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from importlib import resources
from pathlib import Path

import psycopg

logger = logging.getLogger(__name__)

# Every admin-plane connection gives up after this long when the server does not answer (a
# black-holed host), instead of the operating system's TCP timeout of minutes.
DEFAULT_CONNECT_TIMEOUT_SECONDS = 10.0

# Any constant works as long as every pluginmon process uses the same one.
MIGRATION_LOCK_KEY = 0x706C_6D69_6772  # "plmigr"

_FILE_RE = re.compile(
    r"^(?P<version>\d{3})_(?P<name>[a-z0-9_]+?)(?:\.(?P<backend>postgres|timescaledb))?\.sql$"
)


class Backend(StrEnum):
    POSTGRES = "postgres"
    TIMESCALEDB = "timescaledb"


class MigrationError(RuntimeError):
    """A migration cannot be applied; the message names the file."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    path: Path
    sql: str
    checksum: str

    @property
    def filename(self) -> str:
        return self.path.name


@dataclass(frozen=True, slots=True)
class MigrationResult:
    backend: Backend
    applied: tuple[str, ...]
    already_applied: int


def connect_timeout_param(seconds: float) -> int:
    """libpq's ``connect_timeout``: whole seconds, and libpq treats less than 2 as 2."""
    if not seconds > 0:
        raise ValueError(f"connect timeout must be positive, got {seconds}")
    return max(2, math.ceil(seconds))


def default_sql_dir() -> Path:
    return Path(str(resources.files("pluginmon.sql")))


def discover(sql_dir: Path, backend: Backend) -> list[Migration]:
    """Migrations for ``backend`` in version order.

    A version is either one common file (``001_core.sql``) or a pair of backend variants
    (``003_timeseries.postgres.sql`` and ``003_timeseries.timescaledb.sql``).
    """
    by_version: dict[int, dict[str | None, Path]] = {}
    for candidate in sorted(sql_dir.glob("*.sql")):
        match = _FILE_RE.match(candidate.name)
        if match is None:
            raise MigrationError(
                f"{candidate.name}: migration file names must look like NNN_name.sql or "
                "NNN_name.postgres.sql / NNN_name.timescaledb.sql"
            )
        variants = by_version.setdefault(int(match["version"]), {})
        variants[match["backend"]] = candidate
    migrations: list[Migration] = []
    for version in sorted(by_version):
        variants = by_version[version]
        if None in variants and len(variants) > 1:
            names = ", ".join(sorted(p.name for p in variants.values()))
            raise MigrationError(
                f"version {version:03d} has both common and backend files: {names}"
            )
        path = variants.get(None) or variants.get(backend.value)
        if path is None:
            raise MigrationError(
                f"version {version:03d} has no file for backend {backend.value}: "
                + ", ".join(sorted(p.name for p in variants.values()))
            )
        text = path.read_text(encoding="utf-8")
        match = _FILE_RE.match(path.name)
        assert match is not None
        migrations.append(
            Migration(
                version=version,
                name=match["name"],
                path=path,
                sql=text,
                checksum=hashlib.sha256(text.encode("utf-8")).hexdigest(),
            )
        )
    return migrations


def detect_backend(conn: psycopg.Connection[tuple[object, ...]]) -> Backend:
    """TimescaleDB when the server offers the extension, PostgreSQL otherwise."""
    row = conn.execute(
        "SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'"
    ).fetchone()
    return Backend.TIMESCALEDB if row is not None else Backend.POSTGRES


_BOOKKEEPING_DDL = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     integer PRIMARY KEY,
    name        text        NOT NULL,
    filename    text        NOT NULL,
    backend     text        NOT NULL CHECK (backend IN ('postgres', 'timescaledb')),
    checksum    text        NOT NULL CHECK (checksum ~ '^[0-9a-f]{64}$'),
    applied_at  timestamptz NOT NULL DEFAULT now(),
    duration_ms integer     NOT NULL CHECK (duration_ms >= 0)
)
"""


def migrate(
    database_url: str,
    *,
    sql_dir: Path | None = None,
    backend: Backend | None = None,
    connect_timeout_seconds: float = DEFAULT_CONNECT_TIMEOUT_SECONDS,
) -> MigrationResult:
    """Apply every pending migration, each in its own transaction, under an advisory lock.

    Concurrent runners wait for the lock and then find nothing left to do. An applied file
    whose content changed since is an error that names it; nothing is applied then. A
    server that does not answer within ``connect_timeout_seconds`` raises
    ``psycopg.OperationalError``.
    """
    directory = sql_dir or default_sql_dir()
    with psycopg.connect(
        database_url,
        autocommit=True,
        connect_timeout=connect_timeout_param(connect_timeout_seconds),
    ) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
        try:
            return _migrate_locked(conn, directory, backend)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))


def _migrate_locked(
    conn: psycopg.Connection[tuple[object, ...]], directory: Path, backend: Backend | None
) -> MigrationResult:
    conn.execute(_BOOKKEEPING_DDL)
    applied_rows = conn.execute(
        "SELECT version, filename, backend, checksum FROM schema_migrations ORDER BY version"
    ).fetchall()
    recorded_backends = {str(row[2]) for row in applied_rows}
    if len(recorded_backends) > 1:
        raise MigrationError(f"schema_migrations mixes backends: {sorted(recorded_backends)}")
    if recorded_backends:
        recorded = Backend(recorded_backends.pop())
        if backend is not None and backend != recorded:
            raise MigrationError(
                f"database was migrated for backend {recorded.value}, not {backend.value}"
            )
        backend = recorded
    elif backend is None:
        backend = detect_backend(conn)

    migrations = discover(directory, backend)
    known = {m.version: m for m in migrations}
    applied = {int(str(row[0])): row for row in applied_rows}
    for version, row in applied.items():
        migration = known.get(version)
        if migration is None:
            raise MigrationError(f"{row[1]}: applied to this database but missing from {directory}")
        if migration.checksum != row[3]:
            raise MigrationError(
                f"{migration.filename}: changed after it was applied "
                f"(checksum {str(row[3])[:12]} recorded, {migration.checksum[:12]} on disk); "
                "add a new migration instead of editing an applied one"
            )

    newly_applied: list[str] = []
    for migration in migrations:
        if migration.version in applied:
            continue
        started = time.monotonic()
        try:
            with conn.transaction():
                conn.execute(migration.sql.encode("utf-8"))
                conn.execute(
                    "INSERT INTO schema_migrations"
                    " (version, name, filename, backend, checksum, duration_ms)"
                    " VALUES (%s, %s, %s, %s, %s, %s)",
                    (
                        migration.version,
                        migration.name,
                        migration.filename,
                        backend.value,
                        migration.checksum,
                        int((time.monotonic() - started) * 1000),
                    ),
                )
        except psycopg.Error as exc:
            raise MigrationError(f"{migration.filename}: {exc}") from exc
        logger.info("applied migration %s", migration.filename)
        newly_applied.append(migration.filename)
    return MigrationResult(
        backend=backend, applied=tuple(newly_applied), already_applied=len(applied)
    )


def applied_versions(
    database_url: str, *, connect_timeout_seconds: float = DEFAULT_CONNECT_TIMEOUT_SECONDS
) -> Iterable[tuple[int, str]]:
    with psycopg.connect(
        database_url, connect_timeout=connect_timeout_param(connect_timeout_seconds)
    ) as conn:
        exists = conn.execute("SELECT to_regclass('schema_migrations')").fetchone()
        if exists is None or exists[0] is None:
            return []
        rows = conn.execute("SELECT version, filename FROM schema_migrations ORDER BY version")
        return [(int(str(v)), str(f)) for v, f in rows.fetchall()]
