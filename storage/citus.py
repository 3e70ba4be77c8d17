"""Citus maintenance: the PostgreSQL backend's pass, then old partitions converted to columnar.

The Citus backend keeps the PostgreSQL backend's shape (sql/100-102): day partitions created
and dropped by the same functions, rollups refreshed from the same watermarks (their Citus
versions push the refresh down to each shard group). What it adds is the compression
equivalent: partitions wholly older than ``retention.compress_after`` are rewritten with the
columnar access method (``alter_old_partitions_set_access_method``), read as before.
"""

from __future__ import annotations

import dataclasses
import logging
from datetime import datetime

from psycopg import errors

from pluginmon.storage.backend import (
    AdminConnection,
    MaintenanceReport,
    Retention,
    maintenance_lock,
    require_autocommit,
)
from pluginmon.storage.migrate import Backend
from pluginmon.storage.partitions import PARTITIONED, PostgresMaintenance

logger = logging.getLogger(__name__)

# Partitions whose access method is already columnar, among those old enough to convert.
_ROW_PARTITIONS_SQL = """
SELECT count(*) FROM pluginmon_partitions(%s::regclass) p
  JOIN pg_class c ON c.oid = p.partition
  JOIN pg_am am ON am.oid = c.relam
 WHERE p.upper_bound <= %s AND am.amname <> 'columnar'
"""


class CitusMaintenance(PostgresMaintenance):
    """``PostgresMaintenance``'s pass, then the columnar conversion of old partitions."""

    @property
    def backend(self) -> Backend:
        return Backend.CITUS

    async def run(self, conn: AdminConnection, retention: Retention) -> MaintenanceReport:
        report = await super().run(conn, retention)
        if not report.ran:
            return report
        failed = list(report.failed_steps)
        async with maintenance_lock(conn) as acquired:
            if acquired:
                for parent, _field in PARTITIONED:
                    try:
                        await convert_old_partitions(
                            conn, parent, older_than=self._clock() - retention.compress_after
                        )
                    except (errors.LockNotAvailable, errors.QueryCanceled) as exc:
                        logger.warning("maintenance: columnar of %s postponed: %s", parent, exc)
                        failed.append((f"columnar:{parent}", str(exc)))
        return dataclasses.replace(report, failed_steps=tuple(failed))


async def convert_old_partitions(
    conn: AdminConnection, parent: str, *, older_than: datetime
) -> int:
    """Rewrite ``parent``'s partitions that end before ``older_than`` as columnar; returns
    how many were still row-based (each conversion rewrites one partition's shards)."""
    require_autocommit(conn)
    cur = await conn.execute(_ROW_PARTITIONS_SQL, (parent, older_than))
    row = await cur.fetchone()
    pending = int(row[0]) if row is not None else 0
    if pending:
        await conn.execute(
            "CALL alter_old_partitions_set_access_method(%s::regclass, %s, 'columnar')",
            (parent, older_than),
        )
        logger.info("maintenance: %d partition(s) of %s converted to columnar", pending, parent)
    return pending
