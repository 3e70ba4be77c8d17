"""Data-plane (asyncpg) periodic jobs done once per interval for the whole database: the job's maintenance_runs row (sql/062) read and written under the job's own lock.

The storage maintenance (storage.upkeep.Maintainer) records its runs there from the admin
plane; the registry job and the backups duty (registry.maintenance, registry.backup_schedule)
run on the daemon's pool and record theirs here, each under its own job name. Every daemon
tries each job on its interval; the one that holds the job's advisory lock reads the row
and skips the work when the last finished run started less than RUN_SPACING_SHARE of the
interval ago (server clock, so daemons with skewed clocks agree). A run that did not finish
(its daemon died, or its transaction rolled back) does not count: the next daemon runs it.
"""

from __future__ import annotations

import logging
from typing import Final

import asyncpg

from pluginmon.storage.upkeep import RUN_SPACING_SHARE

logger = logging.getLogger(__name__)

_LAST_RUN_AGE: Final = """
SELECT extract(epoch FROM now() - started_at)::float8
  FROM maintenance_runs
 WHERE job = $1 AND finished_at IS NOT NULL AND finished_at >= started_at
"""
_RUN_STARTED: Final = """
INSERT INTO maintenance_runs AS r (job, started_at, finished_at, instance)
VALUES ($1, now(), NULL, $2)
ON CONFLICT (job) DO UPDATE
   SET started_at = excluded.started_at, finished_at = NULL, instance = excluded.instance
"""
_RUN_FINISHED: Final = "UPDATE maintenance_runs SET finished_at = clock_timestamp() WHERE job = $1"


async def start_if_due(
    conn: asyncpg.Connection, job: str, *, interval_seconds: float | None, instance: str
) -> bool:
    """With the job's lock held: whether ``job`` is due, and if so its start recorded.

    ``interval_seconds`` None: always due, nothing recorded (tests, one-off runs). Inside a
    transaction the record is the transaction's: it counts only once committed with the
    work (:func:`finish` before the commit)."""
    if interval_seconds is None:
        return True
    age = await conn.fetchval(_LAST_RUN_AGE, job)
    spacing = RUN_SPACING_SHARE * interval_seconds
    # A negative age (the server's clock stepped back) does not hold the work back.
    if age is not None and 0 <= float(age) < spacing:
        logger.debug(
            "%s: the last run started %.1f s ago (less than %.1f s); skipping",
            job,
            float(age),
            spacing,
        )
        return False
    await conn.execute(_RUN_STARTED, job, instance)
    return True


async def finish(conn: asyncpg.Connection, job: str, *, interval_seconds: float | None) -> None:
    """Record the end of the run :func:`start_if_due` started (nothing without an interval)."""
    if interval_seconds is not None:
        await conn.execute(_RUN_FINISHED, job)
