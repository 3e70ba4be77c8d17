"""Migrations runner (admin plane, psycopg): sql/NNN_name[.backend].sql applied in order, once each.

Also the one place that decides which backend a database gets (``choose_backend``): Citus when
the ``citus`` extension is installed in the database; TimescaleDB only when the server offers
it, preloads it and its version is one the migrations run on; PostgreSQL otherwise.

The Citus backend runs the PostgreSQL files (a Citus coordinator is a PostgreSQL server whose
tables are plain until distributed) unless a version has its own ``NNN_name.citus.sql``;
its own migrations (100-119) then distribute the tables.
"""

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

from pluginmon.storage.citus_conversion import forget_other_backends_files, record_as_citus
from pluginmon.storage.cluster_roles import prepare_cluster_roles

logger = logging.getLogger(__name__)

# Every admin-plane connection gives up after this long when the server does not answer (a
# black-holed host), instead of the operating system's TCP timeout of minutes.
DEFAULT_CONNECT_TIMEOUT_SECONDS = 10.0

# Any constant works as long as every pluginmon process uses the same one.
MIGRATION_LOCK_KEY = 0x706C_6D69_6772  # "plmigr"

_FILE_RE = re.compile(
    r"^(?P<version>\d{3})_(?P<name>[a-z0-9_]+?)(?:\.(?P<backend>postgres|timescaledb|citus))?\.sql$"
)


class Backend(StrEnum):
    POSTGRES = "postgres"
    TIMESCALEDB = "timescaledb"
    CITUS = "citus"


class MigrationError(RuntimeError):
    """A migration cannot be applied; the message names the file."""


class DatabaseRefusedError(MigrationError):
    """The database cannot take this pluginmon's schema until an operator acts.

    ``reason`` is a short stable word (the ``reason`` label of
    ``pluginmon_database_error_info``); the message says what to do.
    """

    reason = "refused"


class NotPreloadedError(DatabaseRefusedError):
    """TimescaleDB is installed but not in ``shared_preload_libraries``."""

    reason = "not_preloaded"


class ExtensionMissingError(DatabaseRefusedError):
    """``backend = "timescaledb"`` on a server that does not offer the extension."""

    reason = "extension_missing"


class ExtensionTooOldError(DatabaseRefusedError):
    """The server's (or the database's) TimescaleDB is older than the migrations need."""

    reason = "extension_too_old"


class MissingPrivilegeError(DatabaseRefusedError):
    """The migrating user may not create or grant a cluster role a pending file needs."""

    reason = "missing_privilege"


class NewerSchemaError(DatabaseRefusedError):
    """The database was migrated by a newer pluginmon than this one."""

    reason = "newer_schema"


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

    A version is either one common file (``001_core.sql``) or backend variants
    (``003_timeseries.postgres.sql`` and ``003_timeseries.timescaledb.sql``). Citus takes its
    own variant where there is one and the PostgreSQL variant otherwise.
    """
    by_version: dict[int, dict[str | None, Path]] = {}
    for candidate in sorted(sql_dir.glob("*.sql")):
        match = _FILE_RE.match(candidate.name)
        if match is None:
            raise MigrationError(
                f"{candidate.name}: migration file names must look like NNN_name.sql or "
                "NNN_name.postgres.sql / NNN_name.timescaledb.sql / NNN_name.citus.sql"
            )
        variants = by_version.setdefault(int(match["version"]), {})
        variants[match["backend"]] = candidate
    migrations: list[Migration] = []
    for version in sorted(by_version):
        variants = by_version[version]
        # A .citus.sql may stand next to a common file (the common file does not run on
        # Citus); the other backends' variants replace a common file, never stand next to it.
        others = {name for name in variants if name is not None and name != "citus"}
        if None in variants and others:
            names = ", ".join(sorted(p.name for p in variants.values()))
            raise MigrationError(
                f"version {version:03d} has both common and backend files: {names}"
            )
        if backend is Backend.CITUS:
            path = (
                variants.get(Backend.CITUS.value)
                or variants.get(None)
                or variants.get(Backend.POSTGRES.value)
            )
        else:
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


# -- which backend: TimescaleDB offered, preloaded and new enough, or PostgreSQL -----------------

# The migrations use create_hypertable(..., by_range(...)), new in TimescaleDB 2.13.
TIMESCALEDB_MIN_VERSION = (2, 13)
# Row-level security on distributed tables and COPY through workers: Citus 11.0; the
# migrations are tested on 12.1.
CITUS_MIN_VERSION = (11, 0)

PRELOAD_HOW_TO = (
    "add timescaledb to shared_preload_libraries in postgresql.conf "
    "(shared_preload_libraries = 'timescaledb', appended to any libraries already listed) "
    "and restart PostgreSQL"
)

# What any user may read: the extension on offer, the one installed in this database, and
# whether the loader is in the server (it defines this setting only when preloaded; a
# placeholder from postgresql.conf without the preload is a string, not an integer); and the
# citus extension installed in this database (an operator creates it on every node and adds
# the workers: pluginmon does not create it).
OFFER_SQL = """
SELECT (SELECT default_version FROM pg_available_extensions WHERE name = 'timescaledb'),
       (SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'),
       EXISTS (SELECT 1 FROM pg_settings
                WHERE name = 'timescaledb.max_background_workers' AND vartype = 'integer'),
       (SELECT extversion FROM pg_extension WHERE extname = 'citus')
"""
# Readable by superusers and pg_read_all_settings members only (42501 otherwise).
PRELOAD_SQL = "SHOW shared_preload_libraries"


@dataclass(frozen=True, slots=True)
class TimescaleOffer:
    """What a server says about TimescaleDB, read by ``read_timescale_offer``."""

    default_version: str | None  # None: the server does not offer the extension
    installed_version: str | None = None  # in this database, when it is created there
    loader_loaded: bool = False  # the timescaledb loader's settings exist
    # SHOW shared_preload_libraries, parsed; None when this user may not read it.
    preload_libraries: tuple[str, ...] | None = None
    # The citus extension's version in this database, None when it is not created there.
    citus_version: str | None = None

    @property
    def preloaded(self) -> bool:
        if self.preload_libraries is not None:
            return "timescaledb" in self.preload_libraries
        return self.loader_loaded


@dataclass(frozen=True, slots=True)
class BackendChoice:
    backend: Backend
    # Why TimescaleDB was not chosen although the server offers it (auto only), else None.
    warning: str | None = None


def parse_preload_libraries(value: str) -> tuple[str, ...]:
    """``shared_preload_libraries`` as library names: quotes, ``$libdir/`` and ``.so`` dropped."""
    names: list[str] = []
    for item in value.split(","):
        name = item.strip().strip("'\"").strip()
        name = name.rsplit("/", 1)[-1].removesuffix(".so")
        if name:
            names.append(name)
    return tuple(names)


def version_tuple(version: str) -> tuple[int, ...]:
    """``"2.28.3"`` -> ``(2, 28, 3)``; a suffix such as ``-dev`` ends the number."""
    parts: list[int] = []
    for piece in version.split("."):
        digits = re.match(r"\d+", piece)
        if digits is None:
            break
        parts.append(int(digits.group()))
    return tuple(parts)


def choose_backend(requested: Backend | None, offer: TimescaleOffer) -> BackendChoice:
    """The backend for a database: ``requested`` (None = auto) checked against ``offer``.

    Auto takes Citus when the citus extension is installed in the database (``Backend.CITUS``
    without it raises ExtensionMissingError). Otherwise auto takes TimescaleDB only when the server offers a version the migrations run on and
    preloads it; otherwise PostgreSQL, with a warning when TimescaleDB is there but unusable.
    ``Backend.TIMESCALEDB`` on a server that cannot run it raises a DatabaseRefusedError
    that names what to change (``shared_preload_libraries``, the version).
    """
    if requested is Backend.POSTGRES:
        return BackendChoice(Backend.POSTGRES)
    if requested is Backend.CITUS or (requested is None and offer.citus_version is not None):
        if offer.citus_version is None:
            raise ExtensionMissingError(
                'backend = "citus" but the citus extension is not installed in this database: '
                "CREATE EXTENSION citus on the coordinator and every worker and add the workers "
                '(citus_add_node), or set backend = "postgres"'
            )
        if version_tuple(offer.citus_version) < CITUS_MIN_VERSION:
            raise ExtensionTooOldError(
                f"Citus {offer.citus_version} is older than the "
                f"{'.'.join(map(str, CITUS_MIN_VERSION))} pluginmon needs (row-level security "
                'and COPY through any node): upgrade Citus, or set backend = "postgres"'
            )
        return BackendChoice(Backend.CITUS)
    minimum = ".".join(map(str, TIMESCALEDB_MIN_VERSION))
    problem: DatabaseRefusedError | None = None
    if offer.default_version is None:
        if requested is None:
            return BackendChoice(Backend.POSTGRES)
        problem = ExtensionMissingError(
            'backend = "timescaledb" but this server does not offer the timescaledb extension '
            "(not in pg_available_extensions): install TimescaleDB "
            f'{minimum} or newer, or set backend = "postgres"'
        )
    elif version_tuple(offer.default_version) < TIMESCALEDB_MIN_VERSION or (
        offer.installed_version is not None
        and version_tuple(offer.installed_version) < TIMESCALEDB_MIN_VERSION
    ):
        found = offer.installed_version or offer.default_version
        problem = ExtensionTooOldError(
            f"TimescaleDB {found} is older than the {minimum} pluginmon needs: install a newer "
            "TimescaleDB (and ALTER EXTENSION timescaledb to it in a database that has it), "
            'or set backend = "postgres"'
        )
    elif not offer.preloaded:
        listed = (
            f" (it is now '{', '.join(offer.preload_libraries)}')"
            if offer.preload_libraries
            else ""
        )
        problem = NotPreloadedError(
            f"TimescaleDB {offer.default_version} is installed but not preloaded: "
            f"{PRELOAD_HOW_TO}{listed}"
        )
    if problem is None:
        return BackendChoice(Backend.TIMESCALEDB)
    if requested is Backend.TIMESCALEDB:
        raise problem
    return BackendChoice(
        Backend.POSTGRES,
        warning=f"{problem}; using the PostgreSQL backend instead (recorded in "
        'schema_migrations: this database stays on it). Set backend = "timescaledb" to '
        "refuse to start instead of falling back.",
    )


def offer_from(
    offer_row: tuple[object, ...] | None, preload_row: tuple[object, ...] | None, *, shown: bool
) -> TimescaleOffer:
    """The offer from OFFER_SQL's row and PRELOAD_SQL's (``shown`` False: it was refused)."""
    assert offer_row is not None
    default_version, installed_version, loader_loaded = offer_row[:3]
    citus_version = offer_row[3] if len(offer_row) > 3 else None
    preload = None
    if shown:
        preload = parse_preload_libraries(str(preload_row[0]) if preload_row else "")
    return TimescaleOffer(
        default_version=None if default_version is None else str(default_version),
        installed_version=None if installed_version is None else str(installed_version),
        loader_loaded=bool(loader_loaded),
        preload_libraries=preload,
        citus_version=None if citus_version is None else str(citus_version),
    )


def read_timescale_offer(conn: psycopg.Connection[tuple[object, ...]]) -> TimescaleOffer:
    """``TimescaleOffer`` of the server and database ``conn`` (autocommit) is connected to."""
    offer_row = conn.execute(OFFER_SQL).fetchone()
    try:
        return offer_from(offer_row, conn.execute(PRELOAD_SQL).fetchone(), shown=True)
    except psycopg.errors.InsufficientPrivilege:
        return offer_from(offer_row, None, shown=False)  # the loader's setting answers


def detect_backend(
    conn: psycopg.Connection[tuple[object, ...]], requested: Backend | None = None
) -> Backend:
    """``choose_backend`` for the server ``conn`` is connected to; the warning is logged."""
    choice = choose_backend(requested, read_timescale_offer(conn))
    if choice.warning is not None:
        logger.warning("%s", choice.warning)
    return choice.backend


_BOOKKEEPING_DDL = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     integer PRIMARY KEY,
    name        text        NOT NULL,
    filename    text        NOT NULL,
    backend     text        NOT NULL CHECK (backend IN ('postgres', 'timescaledb', 'citus')),
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
        if recorded is Backend.POSTGRES and backend is Backend.CITUS:
            # A PostgreSQL-backend database restored into a Citus coordinator becomes a Citus
            # database: the versions where Citus has its own file run again as that file
            # (storage.citus_conversion), then the pending ones as on any Citus database.
            choose_backend(Backend.CITUS, read_timescale_offer(conn))
            record_as_citus(conn)
            recorded = Backend.CITUS
        if backend is not None and backend != recorded:
            raise MigrationError(
                f"database was migrated for backend {recorded.value}, not {backend.value}"
            )
        backend = recorded
        if backend in (Backend.TIMESCALEDB, Backend.CITUS):
            # Only usable while the server still preloads TimescaleDB / has citus.
            choose_backend(backend, read_timescale_offer(conn))
    else:
        backend = detect_backend(conn, backend)

    migrations = discover(directory, backend)
    known = {m.version: m for m in migrations}
    applied = {int(str(row[0])): row for row in applied_rows}
    if backend is Backend.CITUS:
        stale = forget_other_backends_files(
            conn,
            citus_files={m.version: m.filename for m in migrations},
            applied_files={version: str(row[1]) for version, row in applied.items()},
        )
        applied = {version: row for version, row in applied.items() if version not in stale}
    newest_known = max(known, default=0)
    newer = sorted(str(row[1]) for version, row in applied.items() if version > newest_known)
    if newer:
        raise NewerSchemaError(
            f"this database was migrated by a newer pluginmon ({', '.join(newer)} applied; "
            f"this pluginmon knows migrations up to {newest_known:03d}): upgrade pluginmon"
        )
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

    # Before any file: a pending file that could not create or grant its cluster roles would
    # fail half-way with the server's words; this names the roles and the statement to run.
    pending = {m.filename for m in migrations if m.version not in applied}
    problem = prepare_cluster_roles(conn, pending_files=pending)
    if problem is not None:
        raise MissingPrivilegeError(problem)

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
