"""notification_outbox (asyncpg): queueing notifications, claiming due ones, recording outcomes, reconciling those delivered from the alert journal."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from asyncpg.exceptions import FeatureNotSupportedError

from pluginmon.storage.alert_state import QUERY_TIMEOUT_SECONDS, Connection

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class OutboxWrite:
    """One notification to queue (also the outbox entry of the disk journal, storage.alert_journal,
    where ``plugin_id`` is None while the plugin has no database id yet: ``plugin`` names it)."""

    tenant_id: str
    plugin_id: int | None
    environment: str
    receiver: str
    receiver_kind: str  # "webhook" | "alertmanager"
    group_key: str
    idempotency_key: str
    body: str
    fingerprints: tuple[str, ...]
    created_at: datetime
    instance: str = ""  # the owning daemon: only its deliverer sends this row
    plugin: str = ""  # the plugin's name ('' in entries journaled before names were kept)


@dataclass(frozen=True, slots=True)
class DeliveryRecord:
    """How a notification delivered outside the outbox table (from the alert journal, while
    the database was away) ended: the journal's mark, and what reconciliation writes.

    ``outcome`` is "delivered" (a 2xx: its key goes to alert_notifications_sent) or
    "failed" (given up); ``attempts`` counts the POSTs made.
    """

    idempotency_key: str
    receiver: str
    outcome: str  # "delivered" | "failed"
    attempts: int
    at: datetime
    status_code: int | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class ReconciledNotification:
    """A notification the database has not seen yet, with how far its delivery got:
    ``record`` None = still to deliver (queued as pending, after ``attempts`` attempts, due
    at ``next_attempt_at``)."""

    write: OutboxWrite
    record: DeliveryRecord | None = None
    attempts: int = 0
    next_attempt_at: datetime | None = None
    last_status_code: int | None = None
    last_error: str | None = None


@dataclass(frozen=True, slots=True)
class ClaimedNotification:
    id: int
    tenant_id: str
    receiver: str
    receiver_kind: str
    group_key: str
    idempotency_key: str
    body: str
    attempts: int  # including the attempt being made now
    created_at: datetime | None = None  # when it was queued (give_up_after_seconds counts from it)


def _plugin_id(row: OutboxWrite) -> int:
    if row.plugin_id is None:
        raise ValueError(
            f"notification {row.idempotency_key} about plugin {row.plugin!r} has no plugin id"
        )
    return row.plugin_id


async def insert_outbox(conn: Connection, rows: Sequence[OutboxWrite]) -> None:
    """Queue notifications (a key already in the outbox is kept as it is); ValueError for a
    row without a plugin id."""
    if not rows:
        return
    await conn.executemany(
        """INSERT INTO notification_outbox (tenant_id, plugin_id, environment, receiver,
               receiver_kind, group_key, idempotency_key, body, fingerprints, next_attempt_at,
               created_at, updated_at, instance)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10, $10, $11)
           ON CONFLICT (tenant_id, idempotency_key) DO NOTHING""",
        [
            (
                r.tenant_id,
                _plugin_id(r),
                r.environment,
                r.receiver,
                r.receiver_kind,
                r.group_key,
                r.idempotency_key,
                r.body,
                list(r.fingerprints),
                r.created_at,
                r.instance,
            )
            for r in rows
        ],
        timeout=QUERY_TIMEOUT_SECONDS,
    )


# A key the outbox already holds as pending takes the journal's outcome (its delivery
# happened outside the table); a finished row is left as it is.
_RECONCILE = """
INSERT INTO notification_outbox AS o (tenant_id, plugin_id, environment, receiver,
       receiver_kind, group_key, idempotency_key, body, fingerprints, status, attempts,
       next_attempt_at, last_status_code, last_error, created_at, delivered_at, updated_at,
       instance)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)
ON CONFLICT (tenant_id, idempotency_key) DO UPDATE SET
    status = EXCLUDED.status, attempts = GREATEST(o.attempts, EXCLUDED.attempts),
    last_status_code = EXCLUDED.last_status_code, last_error = EXCLUDED.last_error,
    delivered_at = EXCLUDED.delivered_at, updated_at = EXCLUDED.updated_at
 WHERE o.status = 'pending' AND EXCLUDED.status <> 'pending'
"""

_RECORD_SENT = """
INSERT INTO alert_notifications_sent (idempotency_key, tenant_id, outbox_id, receiver,
       status_code, attempts, delivered_at)
SELECT $1, $2, o.id, $3, $4, $5, $6 FROM notification_outbox o WHERE o.idempotency_key = $1
ON CONFLICT (tenant_id, idempotency_key) DO NOTHING
"""


async def reconcile_outbox(conn: Connection, rows: Sequence[ReconciledNotification]) -> None:
    """Write notifications the journal held into the outbox, in order, with their delivery
    so far: delivered ones as 'delivered' (their keys in alert_notifications_sent, so no
    deliverer POSTs them again), given-up ones as 'failed', the rest as 'pending' with their
    attempts. Idempotent: a key already there is only moved from pending to its outcome.
    ValueError for a row without a plugin id. Run it inside the caller's transaction."""
    if not rows:
        return
    args = []
    sent = []
    for r in rows:
        w, record = r.write, r.record
        status = "pending" if record is None else record.outcome
        at = w.created_at if record is None else record.at
        args.append(
            (
                w.tenant_id,
                _plugin_id(w),
                w.environment,
                w.receiver,
                w.receiver_kind,
                w.group_key,
                w.idempotency_key,
                w.body,
                list(w.fingerprints),
                status,
                r.attempts if record is None else record.attempts,
                r.next_attempt_at or w.created_at,
                r.last_status_code if record is None else record.status_code,
                r.last_error if record is None else record.error,
                w.created_at,
                at if status == "delivered" else None,
                at,
                w.instance,
            )
        )
        if record is not None and record.outcome == "delivered":
            sent.append(
                (
                    w.idempotency_key,
                    w.tenant_id,
                    w.receiver,
                    record.status_code if record.status_code is not None else 0,
                    record.attempts,
                    record.at,
                )
            )
    await conn.executemany(_RECONCILE, args, timeout=QUERY_TIMEOUT_SECONDS)
    if sent:
        await conn.executemany(_RECORD_SENT, sent, timeout=QUERY_TIMEOUT_SECONDS)


async def last_notified(
    conn: Connection, instance: str | None = None
) -> dict[tuple[str, str], datetime]:
    """(receiver, group_key) -> when its latest notification was queued (by ``instance``,
    or by any daemon when None)."""
    rows = await conn.fetch(
        """SELECT receiver, group_key, max(created_at) AS at FROM notification_outbox
            WHERE $1::text IS NULL OR instance = $1
            GROUP BY receiver, group_key""",
        instance,
        timeout=QUERY_TIMEOUT_SECONDS,
    )
    return {(r["receiver"], r["group_key"]): r["at"] for r in rows}


_CLAIM = """
WITH due AS (
    SELECT o.id FROM notification_outbox o
     WHERE o.status = 'pending' AND o.next_attempt_at <= $1
       -- only this daemon's rows, and only for receivers it has configured: another
       -- daemon's "webhook-0" is not ours, and a row whose receiver was removed from the
       -- configuration waits (pending) instead of being sent anywhere else
       AND o.instance = $4
       AND ((o.receiver_kind = 'webhook' AND o.receiver = ANY($5::text[]))
            OR (o.receiver_kind = 'alertmanager' AND o.receiver = $6::text))
       -- one at a time per receiver and group, oldest first: a resolved never overtakes
       -- the firing it resolves, even while that one is being retried
       AND NOT EXISTS (SELECT 1 FROM notification_outbox p
                        WHERE p.status = 'pending' AND p.instance = o.instance
                          AND p.receiver = o.receiver AND p.receiver_kind = o.receiver_kind
                          AND p.group_key = o.group_key AND p.id < o.id
                          -- (group keys carry the tenant label: the same rows, and on
                          -- Citus a join inside one shard group)
                          AND p.tenant_id = o.tenant_id)
     ORDER BY o.next_attempt_at, o.id
     LIMIT $2
     FOR UPDATE SKIP LOCKED
)
UPDATE notification_outbox o
   SET attempts = o.attempts + 1,
       -- a lease: if this deliverer dies mid-POST, another one retries after it
       next_attempt_at = $1 + make_interval(secs => $3),
       updated_at = $1
  FROM due WHERE o.id = due.id
RETURNING o.id, o.tenant_id, o.receiver, o.receiver_kind, o.group_key, o.idempotency_key,
          o.body, o.attempts, o.created_at
"""


# Citus runs FOR UPDATE only inside one shard group (one tenant): there the claim is made
# tenant by tenant, the tenants with due rows first read without a lock.
_CLAIM_ONE_TENANT = _CLAIM.replace(
    "AND o.instance = $4", "AND o.instance = $4 AND o.tenant_id = $7"
)
_DUE_TENANTS = """
SELECT DISTINCT tenant_id FROM notification_outbox
 WHERE status = 'pending' AND next_attempt_at <= $1 AND instance = $2
"""


class _ClaimMode:
    """Whether claims go tenant by tenant: learnt from the database's first refusal (Citus)
    and kept for the process, whose daemon has one database (per tenant is correct on every
    backend, only more statements)."""

    per_tenant = False


async def claim_due(
    conn: Connection,
    now: datetime,
    *,
    limit: int,
    lease_seconds: float,
    instance: str,
    webhooks: Sequence[str],
    alertmanager: str | None,
) -> list[ClaimedNotification]:
    """Claim up to ``limit`` due notifications of ``instance`` for the named receivers
    (``FOR UPDATE SKIP LOCKED``: several deliverers of one instance can share its rows) and
    lease them for ``lease_seconds``."""
    args = (now, limit, lease_seconds, instance, list(webhooks), alertmanager)
    rows: list[Any] = []
    if not _ClaimMode.per_tenant:
        try:
            async with conn.transaction():
                rows = await conn.fetch(_CLAIM, *args, timeout=QUERY_TIMEOUT_SECONDS)
        except FeatureNotSupportedError:
            logger.info("the database locks rows of one tenant at a time: claiming per tenant")
            _ClaimMode.per_tenant = True
    if _ClaimMode.per_tenant:
        tenants = await conn.fetch(_DUE_TENANTS, now, instance, timeout=QUERY_TIMEOUT_SECONDS)
        for tenant in tenants:
            if len(rows) >= limit:
                break
            async with conn.transaction():
                rows.extend(
                    await conn.fetch(
                        _CLAIM_ONE_TENANT,
                        now,
                        limit - len(rows),
                        *args[2:],
                        tenant["tenant_id"],
                        timeout=QUERY_TIMEOUT_SECONDS,
                    )
                )
    claimed = [
        ClaimedNotification(
            id=r["id"],
            tenant_id=r["tenant_id"],
            receiver=r["receiver"],
            receiver_kind=r["receiver_kind"],
            group_key=r["group_key"],
            idempotency_key=r["idempotency_key"],
            body=r["body"],
            attempts=r["attempts"],
            created_at=r["created_at"],
        )
        for r in rows
    ]
    claimed.sort(key=lambda c: c.id)
    return claimed


async def already_sent(conn: Connection, keys: Iterable[str]) -> set[str]:
    keys = list(keys)
    if not keys:
        return set()
    rows = await conn.fetch(
        "SELECT idempotency_key FROM alert_notifications_sent WHERE idempotency_key = ANY($1::text[])",
        keys,
        timeout=QUERY_TIMEOUT_SECONDS,
    )
    return {r["idempotency_key"] for r in rows}


@dataclass(frozen=True, slots=True)
class DeliveryOutcome:
    notification: ClaimedNotification
    outcome: str  # "delivered" | "retry" | "failed"
    at: datetime
    status_code: int | None = None
    error: str | None = None
    next_attempt_at: datetime | None = None


async def record_outcomes(conn: Connection, outcomes: Sequence[DeliveryOutcome]) -> None:
    """Mark delivered/retry/failed in one transaction; delivered keys go to
    alert_notifications_sent so they are never POSTed again. Each row is found by its id
    and tenant: on Citus one shard, not a statement on every shard (with the shard locks a
    multi-shard UPDATE takes) per notification."""
    if not outcomes:
        return
    async with conn.transaction():
        delivered = [o for o in outcomes if o.outcome == "delivered"]
        if delivered:
            await conn.executemany(
                """UPDATE notification_outbox SET status = 'delivered', delivered_at = $2,
                          last_status_code = $3, last_error = NULL, updated_at = $2
                    WHERE id = $1 AND tenant_id = $4""",
                [
                    (o.notification.id, o.at, o.status_code, o.notification.tenant_id)
                    for o in delivered
                ],
                timeout=QUERY_TIMEOUT_SECONDS,
            )
            await conn.executemany(
                """INSERT INTO alert_notifications_sent (idempotency_key, tenant_id, outbox_id,
                          receiver, status_code, attempts, delivered_at)
                   VALUES ($1, $2, $3, $4, $5, $6, $7)
                   ON CONFLICT (tenant_id, idempotency_key) DO NOTHING""",
                [
                    (
                        o.notification.idempotency_key,
                        o.notification.tenant_id,
                        o.notification.id,
                        o.notification.receiver,
                        o.status_code if o.status_code is not None else 0,
                        o.notification.attempts,
                        o.at,
                    )
                    for o in delivered
                ],
                timeout=QUERY_TIMEOUT_SECONDS,
            )
        retries = [o for o in outcomes if o.outcome == "retry"]
        if retries:
            await conn.executemany(
                """UPDATE notification_outbox SET next_attempt_at = $2, last_status_code = $3,
                          last_error = $4, updated_at = $5
                    WHERE id = $1 AND tenant_id = $6 AND status = 'pending'""",
                [
                    (
                        o.notification.id,
                        o.next_attempt_at,
                        o.status_code,
                        o.error,
                        o.at,
                        o.notification.tenant_id,
                    )
                    for o in retries
                ],
                timeout=QUERY_TIMEOUT_SECONDS,
            )
        failed = [o for o in outcomes if o.outcome == "failed"]
        if failed:
            await conn.executemany(
                """UPDATE notification_outbox SET status = 'failed', last_status_code = $2,
                          last_error = $3, updated_at = $4
                    WHERE id = $1 AND tenant_id = $5 AND status = 'pending'""",
                [
                    (o.notification.id, o.status_code, o.error, o.at, o.notification.tenant_id)
                    for o in failed
                ],
                timeout=QUERY_TIMEOUT_SECONDS,
            )


async def pending_count(conn: Connection, instance: str | None = None) -> int:
    """Pending notifications (of ``instance``, or of every daemon when None)."""
    return int(
        await conn.fetchval(
            """SELECT count(*) FROM notification_outbox
                WHERE status = 'pending' AND ($1::text IS NULL OR instance = $1)""",
            instance,
            timeout=QUERY_TIMEOUT_SECONDS,
        )
    )


async def unconfigured_receivers(
    conn: Connection, instance: str, webhooks: Sequence[str], alertmanager: str | None
) -> dict[tuple[str, str], int]:
    """(receiver kind, receiver name) -> pending rows of ``instance`` for a receiver that is
    not (or no longer) configured: they wait instead of being claimed."""
    rows = await conn.fetch(
        """SELECT receiver_kind, receiver, count(*) AS n FROM notification_outbox
            WHERE status = 'pending' AND instance = $1
              AND NOT ((receiver_kind = 'webhook' AND receiver = ANY($2::text[]))
                       OR (receiver_kind = 'alertmanager' AND receiver IS NOT DISTINCT FROM $3::text))
            GROUP BY receiver_kind, receiver""",
        instance,
        list(webhooks),
        alertmanager,
        timeout=QUERY_TIMEOUT_SECONDS,
    )
    return {(r["receiver_kind"], r["receiver"]): int(r["n"]) for r in rows}


async def prune_outbox(conn: Connection, *, delivered_before: datetime) -> int:
    """Delete finished (delivered or failed) outbox rows and delivered keys older than that."""
    async with conn.transaction():
        status = await conn.execute(
            """DELETE FROM notification_outbox
                WHERE status <> 'pending' AND updated_at < $1""",
            delivered_before,
            timeout=QUERY_TIMEOUT_SECONDS,
        )
        await conn.execute(
            "DELETE FROM alert_notifications_sent WHERE delivered_at < $1",
            delivered_before,
            timeout=QUERY_TIMEOUT_SECONDS,
        )
    return int(status.split()[-1])
