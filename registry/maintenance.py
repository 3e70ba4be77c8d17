"""The registry's periodic duties, run by the daemon (and by ``pluginmon api``): expire
approvals past their time, fail operations past their deadline, and refresh the catalogue's
usage columns and the operation gauges (registry.usage), recompute every tenant's
dependency results with their health gauge (registry.dependencies); and for vulnerabilities
(registry.vulnerabilities): reopen acceptances past their expiry, match SBOMs that changed (or
all of them when the advisory database changed) offline, and write the critical-findings gauge.

Once per database, like the storage maintenance: the work runs in one transaction holding a
transaction-scoped advisory lock, so of many daemons sharing a database one does it and the
others return at once; and with ``interval_seconds`` (the daemon's maintenance interval) once
per interval for the whole database: the run is recorded in maintenance_runs (job
``registry``, storage.job_runs) in the same transaction, and a daemon whose turn comes less
than an interval after the last run skips it. Without that, N daemons at different phases
each found the lock free in turn and refreshed the usage columns and gauges of every plugin
N times an interval. The connection is the daemon's own role, which sees every tenant.
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final

import asyncpg

from pluginmon.registry import approvals, dependencies, operations, sboms, usage, vulnerabilities
from pluginmon.registry.actor import DAEMON
from pluginmon.storage import job_runs

logger = logging.getLogger(__name__)

# Any constant works as long as every pluginmon process uses the same one ("plregi").
REGISTRY_LOCK_KEY = 0x706C_7265_6769
# Its row in maintenance_runs.
REGISTRY_JOB: Final = "registry"


@dataclass(frozen=True, slots=True)
class RegistryMaintenanceReport:
    # False when another process held the lock, or ran the work less than an interval ago,
    # and this run did nothing.
    ran: bool
    approvals_expired: tuple[approvals.Approval, ...] = ()
    deadline_failed: tuple[operations.Operation, ...] = ()
    usage_refreshed: int = 0
    # Unsatisfied runtime dependencies per (tenant, plugin, environment), zeros included.
    dependencies_unsatisfied: Mapping[tuple[str, str, str], int] = field(default_factory=dict)
    acceptances_expired: tuple[vulnerabilities.VulnerabilityFinding, ...] = ()
    vulnerability_scans: tuple[sboms.ScanResult, ...] = ()
    vulnerability_counts: tuple[vulnerabilities.OpenCount, ...] = ()


async def run(
    conn: asyncpg.Connection,
    *,
    now: datetime,
    usage_window_seconds: float = 120.0,
    stuck_after_seconds: float = 1800.0,
    failed_window_seconds: float = 3600.0,
    vulnerability_db: sboms.VulnerabilityDatabase | None = None,
    interval_seconds: float | None = None,
    instance: str = "",
) -> RegistryMaintenanceReport:
    """One run of the duties; ``ran=False`` when another process holds the lock or (with
    ``interval_seconds``) ran them less than an interval ago."""
    snapshot = None
    if vulnerability_db is not None:
        # Loaded (in a thread) before the lock is taken; reloaded only when its files change.
        try:
            snapshot = await vulnerability_db.current()
        except (OSError, zipfile.BadZipFile) as exc:
            logger.warning(
                "vulnerability_db %s unusable, offline scans skipped: %s",
                vulnerability_db.path,
                exc,
            )
    async with conn.transaction():
        if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", REGISTRY_LOCK_KEY):
            return RegistryMaintenanceReport(ran=False)
        if not await job_runs.start_if_due(
            conn, REGISTRY_JOB, interval_seconds=interval_seconds, instance=instance
        ):
            return RegistryMaintenanceReport(ran=False)
        expired = await approvals.expire_due(conn, now=now)
        failed = await operations.fail_overdue(conn, now=now)
        await usage.write_operation_gauges(
            conn,
            now=now,
            stuck_after_seconds=stuck_after_seconds,
            failed_window_seconds=failed_window_seconds,
        )
        deps = await dependencies.refresh(conn, now=now, write_gauge=True)
        reopened = await vulnerabilities.expire_acceptances(conn, now=now)
        scans = (
            await sboms.scan_sboms(
                conn, index=snapshot.index, digest=snapshot.digest, now=now, actor=DAEMON
            )
            if snapshot is not None
            else []
        )
        await vulnerabilities.write_gauges(conn, now=now)
        counts = await vulnerabilities.open_counts(conn)
        await job_runs.finish(conn, REGISTRY_JOB, interval_seconds=interval_seconds)
    # After the commit, in batches of their own: one statement in the transaction held the
    # row locks of every plugin whose usage changed until the end of the run, and every
    # agent's health update of those rows waited for it (12 s at 100 agents).
    refreshed = await usage.refresh(conn, now=now, window_seconds=usage_window_seconds)
    return RegistryMaintenanceReport(
        ran=True,
        approvals_expired=tuple(expired),
        deadline_failed=tuple(failed),
        usage_refreshed=refreshed,
        dependencies_unsatisfied=deps.unsatisfied,
        acceptances_expired=tuple(reopened),
        vulnerability_scans=tuple(scans),
        vulnerability_counts=tuple(counts),
    )
