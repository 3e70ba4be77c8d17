"""The database's upkeep while the daemon runs: migrate until ready, periodic maintenance, the ingest ledger pruned, rollup back-fill after a spool replay."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Final, Protocol

import psycopg

from pluginmon.storage.backend import (
    AdminConnection,
    Maintenance,
    MaintenanceReport,
    Retention,
    admin_connection,
    detect_backend,
    maintenance_lock,
    require_autocommit,
)
from pluginmon.storage.engines import backfill_rollups, maintenance_for, prepare_database
from pluginmon.storage.errors import backoff_seconds
from pluginmon.storage.migrate import Backend, MigrationError
from pluginmon.storage.reachability import RETRIED_AT_START, failure_reason

logger = logging.getLogger(__name__)

# Retry delays while the database cannot be used at start-up: doubling from the first to
# the cap (the daemon's database_retry_max_seconds), with jitter.
MIGRATE_RETRY_FIRST_SECONDS = 0.5
MIGRATE_RETRY_MAX_SECONDS = 30.0

# How long the ingest ledger remembers a written batch unless the daemon says otherwise.
DEFAULT_LEDGER_RETENTION: Final = timedelta(days=7)
# Horizon in the server's clock, so that daemons with skewed clocks agree.
_PRUNE_LEDGER = "DELETE FROM ingest_ledger WHERE committed_at < now() - %s::interval"

# The maintenance job's row in maintenance_runs (sql/062).
MAINTENANCE_JOB: Final = "maintenance"
# A run that started less than this share of the interval ago is not repeated. Not the whole
# interval: a daemon alone starts a run every interval by its own clock, and the time its
# connection takes varies, so the previous start can look a little less than an interval old.
RUN_SPACING_SHARE: Final = 0.9
# Seconds since the last run started, or NULL when none finished (never ran, or its daemon
# died or failed during it: then it is due at once). Server clock.
_LAST_RUN_AGE = """
SELECT extract(epoch FROM now() - started_at)::float8
  FROM maintenance_runs
 WHERE job = %s AND finished_at IS NOT NULL AND finished_at >= started_at
"""
_RUN_STARTED = """
INSERT INTO maintenance_runs AS r (job, started_at, finished_at, instance)
VALUES (%s, now(), NULL, %s)
ON CONFLICT (job) DO UPDATE
   SET started_at = excluded.started_at, finished_at = NULL, instance = excluded.instance
"""
_RUN_FINISHED = "UPDATE maintenance_runs SET finished_at = clock_timestamp() WHERE job = %s"


class StartupReport(Protocol):
    """Who hears about each failed start-up attempt (storage.reachability.DatabaseWatch)."""

    def startup_failed(
        self, error: BaseException, *, attempt: int, retry_in_seconds: float
    ) -> object: ...


async def migrate_until_ready(
    database_url: str,
    *,
    backend: Backend | None,
    retention: Retention,
    stop: asyncio.Event,
    report: StartupReport,
    retry_first_seconds: float = MIGRATE_RETRY_FIRST_SECONDS,
    retry_max_seconds: float = MIGRATE_RETRY_MAX_SECONDS,
) -> bool:
    """Apply migrations and policies (admin plane, in a thread); retry while the database
    cannot be used. True once the schema is ready, False when ``stop`` was set first.

    Every failed attempt goes to ``report`` with its attempt number and the next delay
    (it decides what to log, and how often). Retried: an unreachable or read-only server,
    and the conditions only an operator fixes (a wrong password, a missing database or
    privilege, TimescaleDB not preloaded, a schema from a newer pluginmon) so the daemon
    picks the fix up without a restart. Raised: a migration refused (a changed file, bad
    SQL), and anything unexpected.
    """
    attempt = 0
    while not stop.is_set():
        try:
            prepared = await asyncio.to_thread(
                prepare_database, database_url, retention, backend=backend
            )
        except (OSError, psycopg.Error, MigrationError) as exc:
            if failure_reason(exc) not in RETRIED_AT_START:
                raise
            delay = backoff_seconds(
                attempt, initial_seconds=retry_first_seconds, max_seconds=retry_max_seconds
            )
            attempt += 1
            report.startup_failed(exc, attempt=attempt, retry_in_seconds=delay)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await stop.wait()
            continue
        logger.info(
            "schema ready (backend %s, %d migration(s) applied now%s)",
            prepared.backend.value,
            len(prepared.migrations.applied),
            f", policies: {', '.join(prepared.policy_changes)}" if prepared.policy_changes else "",
        )
        return True
    return False


class LateRows(Protocol):
    """A spool that remembers the oldest row it gave back (storage.ingest.SampleSpool)."""

    def take_late_rows_since(self) -> datetime | None: ...

    def note_late_rows(self, since: datetime) -> None: ...


async def prune_ingest_ledger(conn: AdminConnection, *, older_than: timedelta) -> int | None:
    """Delete ingest ledger rows committed more than ``older_than`` ago, under the
    database-wide maintenance lock (one of many daemons does it); rows deleted, or None when
    another session held the lock. ``conn``: autocommit (``admin_connection``).

    A batch replayed after its ledger row is gone would be written again: ``older_than``
    must outlast the longest time a crashed daemon stays down (its spool may hold batches
    that were committed and not yet acked).
    """
    require_autocommit(conn)
    async with maintenance_lock(conn) as acquired:
        if not acquired:
            return None
        async with conn.transaction():
            cur = await conn.execute(_PRUNE_LEDGER, (older_than,))
        return max(cur.rowcount, 0)


class Maintainer:
    """The periodic maintenance job: partitions, retention and rollups, the ingest ledger
    pruned by age, then the rollups back-filled from the oldest row the spools gave back
    since the last run.

    The advisory lock lets one of many daemons sharing the database do the work while the
    others return at once. With ``interval_seconds`` (the daemon's maintenance interval) the
    work is also done once per interval for the whole database, however many daemons run
    it: under the lock, a run is skipped when the last one (by any daemon, sql/062) started
    less than ``RUN_SPACING_SHARE`` of the interval ago. A run that did not finish does not
    count, so the work does not lapse when the daemon doing it dies. Without it every run
    does the work (tests, one-off calls). Each run uses its own admin-plane (psycopg)
    connection, not one of the pool's.
    """

    def __init__(
        self,
        database_url: str,
        *,
        retention: Retention,
        spools: Sequence[LateRows],
        ledger_retention: timedelta = DEFAULT_LEDGER_RETENTION,
        interval_seconds: float | None = None,
        instance: str = "",
    ) -> None:
        if ledger_retention <= timedelta(0):
            raise ValueError(f"ledger_retention must be positive, got {ledger_retention}")
        if interval_seconds is not None and not interval_seconds > 0:
            raise ValueError(f"interval_seconds must be positive, got {interval_seconds}")
        self._url = database_url
        self._retention = retention
        self._spools = tuple(spools)
        self._ledger_retention = ledger_retention
        self._spacing_seconds = (
            None if interval_seconds is None else RUN_SPACING_SHARE * interval_seconds
        )
        self._instance = instance
        self._maintenance: Maintenance | None = None  # known after the first connection

    async def run(self) -> MaintenanceReport:
        """One run; the report says ``ran=False`` when another daemon held the lock or ran
        the work less than an interval ago."""
        async with admin_connection(self._url) as conn:
            if self._maintenance is None:
                self._maintenance = maintenance_for(await detect_backend(conn))
            # Held across the whole run; the steps take it again (session advisory locks nest).
            async with maintenance_lock(conn) as acquired:
                if not acquired:
                    logger.debug("maintenance: another session holds the lock; skipping")
                    report = MaintenanceReport(backend=self._maintenance.backend, ran=False)
                    pruned = None
                elif not await self._due(conn):
                    report = MaintenanceReport(backend=self._maintenance.backend, ran=False)
                    pruned = None
                else:
                    report = await self._maintenance.run(conn, self._retention)
                    pruned = await prune_ingest_ledger(conn, older_than=self._ledger_retention)
                    if self._spacing_seconds is not None:
                        await conn.execute(_RUN_FINISHED, (MAINTENANCE_JOB,))
        await self.backfill_after_replay()
        if report.ran:
            logger.info(
                "maintenance: %d partition(s) created, %d dropped, %d row(s) removed, "
                "analytics of %d day(s) computed%s",
                len(report.partitions_created),
                len(report.partitions_dropped),
                sum(rows for _, rows in report.rows_removed) + (pruned or 0),
                len(report.analytics_days),
                "; failed steps: " + ", ".join(f"{s} ({why})" for s, why in report.failed_steps)
                if report.failed_steps
                else "",
            )
        return report

    async def _due(self, conn: AdminConnection) -> bool:
        """Under the lock: whether the work is due (and if so, its start recorded)."""
        if self._spacing_seconds is None:
            return True
        cur = await conn.execute(_LAST_RUN_AGE, (MAINTENANCE_JOB,))
        row = await cur.fetchone()
        # A negative age (the server's clock stepped back) does not hold the work back.
        if row is not None and row[0] is not None and 0 <= float(row[0]) < self._spacing_seconds:
            logger.debug(
                "maintenance: the last run started %.1f s ago (less than %.1f s); skipping",
                float(row[0]),
                self._spacing_seconds,
            )
            return False
        await conn.execute(_RUN_STARTED, (MAINTENANCE_JOB, self._instance))
        return True

    async def backfill_after_replay(self) -> None:
        """Rows replayed from the spools after an outage may be older than the rollups'
        regular refresh looks back: recompute the rollups from the oldest of them."""
        taken = [(spool, spool.take_late_rows_since()) for spool in self._spools]
        since = min((when for _, when in taken if when is not None), default=None)
        if since is None:
            return
        try:
            refreshed = await backfill_rollups(self._url, since, self._retention)
        except BaseException:
            for spool, when in taken:
                if when is not None:
                    spool.note_late_rows(when)  # try again on the next run
            raise
        logger.info(
            "rollups back-filled from %s after a spool replay (%d refresh(es))",
            since.isoformat(),
            len(refreshed),
        )
