"""A PostgreSQL-backend database becoming a Citus database (admin plane, psycopg): the bookkeeping of the move.

An operator restores a PostgreSQL-backend database into a Citus coordinator, creates the
extension and adds the workers, then runs ``pluginmon migrate`` with ``backend = "citus"``
(docs/scaling.md). storage.migrate then calls ``record_as_citus`` once, and on every Citus
database ``forget_other_backends_files``: the versions applied in the PostgreSQL backend's
file where Citus has its own run again as Citus's file.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import psycopg

logger = logging.getLogger(__name__)

# A database migrated before Citus existed here has the narrower CHECK.
_RECORD_AS_CITUS_DDL = """
ALTER TABLE schema_migrations DROP CONSTRAINT IF EXISTS schema_migrations_backend_check;
ALTER TABLE schema_migrations ADD CONSTRAINT schema_migrations_backend_check
    CHECK (backend IN ('postgres', 'timescaledb', 'citus'));
UPDATE schema_migrations SET backend = 'citus' WHERE backend = 'postgres';
"""

# Before a converted database runs Citus's own files: what the PostgreSQL backend's variants
# created that Citus refuses on a table it distributes (092's statement triggers).
_BEFORE_CITUS_FILES_DDL = """
DROP TRIGGER IF EXISTS pluginmon_rollup_invalidation ON plugin_samples;
DROP TRIGGER IF EXISTS pluginmon_rollup_invalidation ON plugin_metrics;
"""


def record_as_citus(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    """schema_migrations says citus from now on (one transaction)."""
    with conn.transaction():
        conn.execute(_RECORD_AS_CITUS_DDL)
    logger.warning("database converted from backend postgres to citus")


def forget_other_backends_files(
    conn: psycopg.Connection[tuple[object, ...]],
    *,
    citus_files: Mapping[int, str],
    applied_files: Mapping[int, str],
) -> list[int]:
    """The versions this Citus database applied in another backend's file, now forgotten.

    A database converted from the PostgreSQL backend applied that backend's file where Citus
    has its own (the distribution migrations from 100 on are no-ops there): their rows leave
    schema_migrations, so they run again as Citus's file, in version order with the pending
    ones. Every Citus file is written to run on a database that holds the earlier versions'
    objects, and the ones below 100 repeat what the PostgreSQL file did (031's grant, 092's
    nothing), so running them again is harmless. A database that was always Citus has none.
    """
    stale = sorted(
        version
        for version, filename in applied_files.items()
        if version in citus_files and citus_files[version] != filename
    )
    if not stale:
        return []
    with conn.transaction():
        conn.execute(_BEFORE_CITUS_FILES_DDL)
        conn.execute("DELETE FROM schema_migrations WHERE version = ANY(%s)", (stale,))
    logger.warning(
        "running Citus's own files for migrations applied in the PostgreSQL backend's: %s",
        ", ".join(citus_files[version] for version in stale),
    )
    return stale
