"""The registry's periodic duties, run by the daemon (and by ``pluginmon api``): expire
approvals past their time and fail operations past their deadline.

Once per database, like the storage maintenance: the work runs in one transaction holding a
transaction-scoped advisory lock, so of many daemons sharing a database one does it and the
others return at once. The connection is the daemon's own role, which sees every tenant.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

from pluginmon.registry import approvals, operations

# Any constant works as long as every pluginmon process uses the same one ("plregi").
REGISTRY_LOCK_KEY = 0x706C_7265_6769


@dataclass(frozen=True, slots=True)
class RegistryMaintenanceReport:
    # False when another process held the lock and this run did nothing.
    ran: bool
    approvals_expired: tuple[approvals.Approval, ...] = ()
    deadline_failed: tuple[operations.Operation, ...] = ()


async def run(conn: asyncpg.Connection, *, now: datetime) -> RegistryMaintenanceReport:
    async with conn.transaction():
        if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", REGISTRY_LOCK_KEY):
            return RegistryMaintenanceReport(ran=False)
        expired = await approvals.expire_due(conn, now=now)
        failed = await operations.fail_overdue(conn, now=now)
    return RegistryMaintenanceReport(
        ran=True, approvals_expired=tuple(expired), deadline_failed=tuple(failed)
    )
