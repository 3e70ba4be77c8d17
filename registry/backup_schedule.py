"""The backups' periodic duties, run by the registry job: retention of expired backup records,
scheduled verification (an interval per provider; transient failures retried sooner), and the
gauges the built-in rules PluginBackupStale / PluginBackupVerificationFailed and the health
component read back from plugin_metrics.

Once per database: a session advisory lock on one connection, held while artifacts are read,
so two daemons never verify the same backup at once. Verification itself runs outside any
transaction (an artifact can take minutes to read); each result is written in its own short
transaction. The connection is the daemon's own role, which sees every tenant.

Retention removes the record only. pluginmon reads backup storage and never writes to it: the
artifact itself is the platform's backup job's to delete. A backup that a restore point still
references is kept (status ``expired``) until that restore point goes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

import asyncpg

from pluginmon.alerts.health import (
    BACKUP_STALE,
    BACKUP_VERIFICATION_FAILED,
    BACKUP_VERIFIED_AGE_SECONDS,
)
from pluginmon.registry import audit, backups
from pluginmon.registry.actor import DAEMON, Actor
from pluginmon.registry.backup_readers import Readers, VerifyStatus
from pluginmon.registry.errors import NotFoundError
from pluginmon.storage import job_runs

logger = logging.getLogger(__name__)

# Any constant works as long as every pluginmon process uses the same one ("plbkup").
BACKUP_LOCK_KEY = 0x706C_626B_7570
# Its row in maintenance_runs.
BACKUPS_JOB = "backups"


@dataclass(frozen=True, slots=True)
class BackupSchedule:
    """When to verify (per provider), how many per run, and when a plugin's backups are stale."""

    interval_seconds: Mapping[str, float] = field(default_factory=dict)
    default_interval_seconds: float = 86400.0
    # Providers the schedule leaves alone (the verify endpoint still reads them).
    disabled: frozenset[str] = frozenset()
    # After a transient failure (host unreachable): try again sooner than the interval.
    retry_seconds: float = 900.0
    batch: int = 20
    stale_after_seconds: float = 26 * 3600.0
    # "tenant/plugin" -> seconds
    plugin_stale_after_seconds: Mapping[str, float] = field(default_factory=dict)

    def interval_for(self, provider: str) -> float:
        return self.interval_seconds.get(provider, self.default_interval_seconds)

    def stale_after_for(self, tenant: str, plugin: str) -> float:
        return self.plugin_stale_after_seconds.get(f"{tenant}/{plugin}", self.stale_after_seconds)


@dataclass(frozen=True, slots=True)
class LastVerified:
    """The newest verified backup of one (tenant, plugin, environment); None: none ever."""

    tenant_id: str
    plugin: str
    environment: str
    verified_at: datetime | None
    failed_backups: int


@dataclass(frozen=True, slots=True)
class BackupRunReport:
    ran: bool
    expired_deleted: tuple[int, ...] = ()
    expired_kept: tuple[int, ...] = ()
    verified: tuple[backups.Verification, ...] = ()
    last_verified: tuple[LastVerified, ...] = ()


def is_stale(
    last: LastVerified, *, now: datetime, schedule: BackupSchedule
) -> tuple[bool, float | None]:
    """(stale?, age in seconds of the newest verified backup) — pure."""
    if last.verified_at is None:
        return True, None
    age = (now - last.verified_at).total_seconds()
    return age > schedule.stale_after_for(last.tenant_id, last.plugin), age


# One tenant's backups past expires_at, locked, each with whether a restore point needs it
# (the subquery names the tenant parameter too: Citus routes it to one shard group only so).
_EXPIRED_OF_TENANT = """
SELECT b.id, b.tenant_id, b.plugin_id, p.name AS plugin, b.environment,
       b.provider, b.location, b.status,
       EXISTS (SELECT 1 FROM plugin_restore_points r
                WHERE r.backup_id = b.id AND r.tenant_id = $2) AS referenced
  FROM plugin_backups b JOIN plugins p ON p.id = b.plugin_id AND p.tenant_id = b.tenant_id
 WHERE b.expires_at <= $1 AND b.tenant_id = $2
 ORDER BY b.id
   FOR UPDATE OF b
"""


async def expire_due(
    conn: asyncpg.Connection, *, now: datetime, actor: Actor = DAEMON
) -> tuple[list[int], list[int]]:
    """Delete the records of backups past ``expires_at`` that no restore point references;
    mark the referenced ones ``expired``. Returns (deleted ids, kept ids)."""
    async with conn.transaction():
        # Tenant by tenant: Citus locks rows only within one shard group (the same rows, in
        # a few more statements, on the other backends). The tenants are read without a lock.
        tenants = await conn.fetch(
            "SELECT DISTINCT tenant_id FROM plugin_backups WHERE expires_at <= $1 ORDER BY 1", now
        )
        rows: list[asyncpg.Record] = []
        for tenant in tenants:
            rows.extend(await conn.fetch(_EXPIRED_OF_TENANT, now, tenant["tenant_id"]))
        deleted: list[int] = []
        kept: list[int] = []
        for row in rows:
            if row["referenced"]:
                if row["status"] == "expired":
                    continue
                await conn.execute(
                    "UPDATE plugin_backups SET status = 'expired' WHERE id = $1 AND tenant_id = $2",
                    row["id"],
                    row["tenant_id"],
                )
                kept.append(row["id"])
                action = "backup.expire"
            else:
                await conn.execute(
                    "DELETE FROM plugin_backups WHERE id = $1 AND tenant_id = $2",
                    row["id"],
                    row["tenant_id"],
                )
                deleted.append(row["id"])
                action = "backup.delete"
            await audit.append(
                conn,
                tenant_id=row["tenant_id"],
                actor=actor,
                action=action,
                entity_type="backup",
                entity_id=str(row["id"]),
                plugin_id=row["plugin_id"],
                plugin_name=row["plugin"],
                environment=row["environment"],
                occurred_at=now,
                before={"status": row["status"], "location": row["location"]},
                after=None if action == "backup.delete" else {"status": "expired"},
                details={"reason": "expires_at passed", "restore_points": row["referenced"]},
            )
    return deleted, kept


async def due_for_verification(
    conn: asyncpg.Connection, *, now: datetime, schedule: BackupSchedule
) -> list[backups.Backup]:
    """Completed, unexpired backups whose last verification is older than their provider's
    interval (or the retry delay after a transient failure), never-verified ones first."""
    providers = [p.value for p in backups.Provider if p.value not in schedule.disabled]
    intervals = [schedule.interval_for(p) for p in providers]
    rows = await conn.fetch(
        backups.BACKUP_SELECT
        + """ JOIN unnest($2::text[], $3::float8[]) AS s(provider, interval_seconds)
                ON s.provider = b.provider
             WHERE b.status = 'completed'
               AND (b.expires_at IS NULL OR b.expires_at > $1)
               AND (b.last_verification_at IS NULL
                    OR b.last_verification_at <= $1 - make_interval(secs =>
                         CASE WHEN b.last_verification_transient
                              THEN least(s.interval_seconds, $4) ELSE s.interval_seconds END))
             ORDER BY b.last_verification_at NULLS FIRST, b.id
             LIMIT $5""",
        now,
        providers,
        intervals,
        schedule.retry_seconds,
        schedule.batch,
    )
    return [backups.backup_of(r) for r in rows]


async def last_verified(conn: asyncpg.Connection) -> list[LastVerified]:
    """Per (tenant, plugin, environment) with backups: the newest verification success and
    how many live backups failed their latest verification."""
    rows = await conn.fetch(
        """SELECT b.tenant_id, p.name AS plugin, b.environment, max(b.verified_at) AS verified_at,
                  count(*) FILTER (WHERE b.last_verification_status = 'failed'
                                     AND b.status = 'completed') AS failed
             FROM plugin_backups b JOIN plugins p ON p.id = b.plugin_id AND p.tenant_id = b.tenant_id
            GROUP BY b.tenant_id, p.name, b.environment
            ORDER BY 1, 2, 3"""
    )
    return [
        LastVerified(
            tenant_id=r["tenant_id"],
            plugin=r["plugin"],
            environment=r["environment"],
            verified_at=r["verified_at"],
            failed_backups=int(r["failed"]),
        )
        for r in rows
    ]


async def write_gauges(
    conn: asyncpg.Connection,
    found: list[LastVerified],
    *,
    now: datetime,
    schedule: BackupSchedule,
) -> None:
    """One INSERT of the gauges for every (plugin, environment) with backups."""
    tenants: list[str] = []
    names: list[str] = []
    environments: list[str] = []
    metrics: list[str] = []
    values: list[float] = []
    for last in found:
        stale, age = is_stale(last, now=now, schedule=schedule)
        gauges = [(BACKUP_STALE, 1.0 if stale else 0.0)]
        gauges.append((BACKUP_VERIFICATION_FAILED, float(last.failed_backups)))
        if age is not None:
            gauges.append((BACKUP_VERIFIED_AGE_SECONDS, age))
        for metric, value in gauges:
            tenants.append(last.tenant_id)
            names.append(last.plugin)
            environments.append(last.environment)
            metrics.append(metric)
            values.append(value)
    if not metrics:
        return
    await conn.execute(
        """INSERT INTO plugin_metrics ("timestamp", tenant_id, plugin_id, environment, metric_name,
                                       metric_kind, value, labels)
           SELECT $1, g.tenant_id, p.id, g.environment, g.metric, 'gauge', g.value, '{}'
             FROM unnest($2::text[], $3::text[], $4::text[], $5::text[], $6::float8[])
                  AS g(tenant_id, plugin, environment, metric, value)
             JOIN plugins p ON p.tenant_id = g.tenant_id AND p.name = g.plugin""",
        now,
        tenants,
        names,
        environments,
        metrics,
        values,
    )


async def run(
    pool: asyncpg.Pool,
    *,
    readers: Readers,
    schedule: BackupSchedule,
    clock: Callable[[], datetime],
    on_verified: Callable[[backups.Verification], None] | None = None,
    interval_seconds: float | None = None,
    instance: str = "",
) -> BackupRunReport:
    """Retention, due verifications and gauges, once per database (see the module docstring)
    and, with ``interval_seconds``, once per interval for the database (maintenance_runs,
    job ``backups``: storage.job_runs). ``last_verified`` is read by every process, lock or
    not, for its /metrics."""
    async with pool.acquire() as conn:
        if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", BACKUP_LOCK_KEY):
            return BackupRunReport(ran=False, last_verified=tuple(await last_verified(conn)))
        try:
            if not await job_runs.start_if_due(
                conn, BACKUPS_JOB, interval_seconds=interval_seconds, instance=instance
            ):
                return BackupRunReport(ran=False, last_verified=tuple(await last_verified(conn)))
            deleted, kept = await expire_due(conn, now=clock())
            done: list[backups.Verification] = []
            for backup in await due_for_verification(conn, now=clock(), schedule=schedule):
                started_at = clock()
                started = time.monotonic()
                outcome = await backups.read_artifact(backup, readers=readers)
                try:
                    verification = await backups.record_verification(
                        conn,
                        backup,
                        outcome,
                        actor=DAEMON,
                        started_at=started_at,
                        duration_ms=int((time.monotonic() - started) * 1000),
                    )
                except NotFoundError:
                    continue  # removed while it was being read
                if outcome.status is not VerifyStatus.VERIFIED:
                    logger.warning(
                        "backup %d of %s/%s: %s (%s)%s",
                        backup.id,
                        backup.tenant_id,
                        backup.plugin,
                        outcome.result.value,
                        outcome.reason,
                        ", will retry" if outcome.transient else "",
                    )
                done.append(verification)
                if on_verified is not None:
                    on_verified(verification)
            found = await last_verified(conn)
            await write_gauges(conn, found, now=clock(), schedule=schedule)
            await job_runs.finish(conn, BACKUPS_JOB, interval_seconds=interval_seconds)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", BACKUP_LOCK_KEY)
    return BackupRunReport(
        ran=True,
        expired_deleted=tuple(deleted),
        expired_kept=tuple(kept),
        verified=tuple(done),
        last_verified=tuple(found),
    )
