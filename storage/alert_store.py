"""The alerts' data-plane SQL (asyncpg) and the disk journal of what it could not store yet."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg

from pluginmon.storage.errors import TRANSIENT_ERRORS
from pluginmon.storage.spool import Spool, SpooledBatch

logger = logging.getLogger(__name__)


QUERY_TIMEOUT_SECONDS = 10.0

Connection = Any  # asyncpg.Connection or a pool proxy; asyncpg ships no type stubs


@dataclass(frozen=True, slots=True)
class StoredAlert:
    id: int
    tenant_id: str
    plugin_id: int
    environment: str
    rule_name: str
    fingerprint: str
    severity: str
    status: str
    inhibited: bool
    value: float | None
    labels: dict[str, str]
    annotations: dict[str, str]
    started_at: datetime
    fired_at: datetime | None
    resolved_at: datetime | None
    acknowledged_at: datetime | None
    acknowledged_by: str | None
    silenced_until: datetime | None
    last_active_at: datetime | None
    notified_at: datetime | None
    instance: str = ""  # the daemon that owns it ('' = written before owners were recorded)


@dataclass(frozen=True, slots=True)
class AlertWrite:
    """The whole persisted state of one alert instance (``id`` None = not stored yet)."""

    id: int | None
    tenant_id: str
    plugin_id: int
    environment: str
    rule_name: str
    fingerprint: str
    severity: str
    status: str
    inhibited: bool
    value: float | None
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    started_at: datetime
    fired_at: datetime | None
    resolved_at: datetime | None
    silenced_until: datetime | None
    last_active_at: datetime | None
    last_evaluated_at: datetime
    notified_at: datetime | None
    instance: str = ""  # the owning daemon (its `host` setting)


@dataclass(frozen=True, slots=True)
class OutboxWrite:
    tenant_id: str
    plugin_id: int
    environment: str
    receiver: str
    receiver_kind: str  # "webhook" | "alertmanager"
    group_key: str
    idempotency_key: str
    body: str
    fingerprints: tuple[str, ...]
    created_at: datetime
    instance: str = ""  # the owning daemon: only its deliverer sends this row


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


@dataclass(frozen=True, slots=True)
class Silence:
    id: int
    tenant_id: str
    matchers: dict[str, str]  # alert label name -> shell glob
    starts_at: datetime
    ends_at: datetime
    created_by: str
    comment: str


@dataclass(frozen=True, slots=True)
class HealthWrite:
    tenant_id: str
    plugin_id: int
    environment: str
    score: float
    labels_json: str  # the plugin_metrics row's labels, already serialised
    update_plugin: bool = True  # also set plugins.health_score / last_health_check


# --- alert state ------------------------------------------------------------------------------

_SELECT_ALERTS = """
SELECT id, tenant_id, plugin_id, environment, rule_name, fingerprint, severity, status,
    inhibited, value, labels::text AS labels, annotations::text AS annotations, started_at,
    fired_at, resolved_at, acknowledged_at, acknowledged_by, silenced_until, last_active_at,
    notified_at, instance
  FROM plugin_alerts
 WHERE (NOT $1 OR status <> 'resolved') AND ($2::bigint IS NULL OR plugin_id = $2)
   AND ($3::text IS NULL OR instance = $3)
 ORDER BY id
"""


def _stored(row: Any) -> StoredAlert:
    return StoredAlert(
        id=row["id"],
        tenant_id=row["tenant_id"],
        plugin_id=row["plugin_id"],
        environment=row["environment"],
        rule_name=row["rule_name"],
        fingerprint=row["fingerprint"],
        severity=row["severity"],
        status=row["status"],
        inhibited=row["inhibited"],
        value=row["value"],
        labels=json.loads(row["labels"]),
        annotations=json.loads(row["annotations"]),
        started_at=row["started_at"],
        fired_at=row["fired_at"],
        resolved_at=row["resolved_at"],
        acknowledged_at=row["acknowledged_at"],
        acknowledged_by=row["acknowledged_by"],
        silenced_until=row["silenced_until"],
        last_active_at=row["last_active_at"],
        notified_at=row["notified_at"],
        instance=row["instance"],
    )


async def load_open_alerts(conn: Connection, instance: str | None = None) -> list[StoredAlert]:
    """Open alerts, oldest first: those owned by ``instance``, or every daemon's when None."""
    return await load_alerts(conn, open_only=True, instance=instance)


async def load_alerts(
    conn: Connection,
    *,
    open_only: bool = False,
    plugin_id: int | None = None,
    instance: str | None = None,
) -> list[StoredAlert]:
    """Alert rows, oldest first (all of them, or only those not resolved; only one owner's
    when ``instance`` is given)."""
    rows = await conn.fetch(
        _SELECT_ALERTS, open_only, plugin_id, instance, timeout=QUERY_TIMEOUT_SECONDS
    )
    return [_stored(r) for r in rows]


async def adopt_unowned(conn: Connection, instance: str) -> tuple[int, int]:
    """Give ``instance`` the open alerts and pending notifications that have no owner yet
    (written before sql/022); returns (alerts, notifications) adopted."""
    async with conn.transaction():
        alerts = await conn.execute(
            "UPDATE plugin_alerts SET instance = $1 WHERE instance = '' AND status <> 'resolved'",
            instance,
            timeout=QUERY_TIMEOUT_SECONDS,
        )
        outbox = await conn.execute(
            "UPDATE notification_outbox SET instance = $1 WHERE instance = '' AND status = 'pending'",
            instance,
            timeout=QUERY_TIMEOUT_SECONDS,
        )
    return int(alerts.split()[-1]), int(outbox.split()[-1])


# The engine never writes acknowledged_at/by (acknowledge() does); a firing alert that someone
# acknowledged meanwhile stays 'acknowledged' whatever the engine thought.

_INSERT_ALERT = """
INSERT INTO plugin_alerts AS plugin_alerts (
    tenant_id, plugin_id, environment, rule_name, fingerprint, severity, status, inhibited,
    value, labels, annotations, started_at, fired_at, resolved_at, silenced_until,
    last_active_at, last_evaluated_at, notified_at, updated_at, instance)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10::jsonb, $11::jsonb, $12, $13, $14, $15, $16,
        $17, $18, $17, $19)
ON CONFLICT (fingerprint) WHERE status <> 'resolved' DO UPDATE SET
    instance = $19,
    status = CASE WHEN $7 = 'firing' AND plugin_alerts.acknowledged_at IS NOT NULL
                  THEN 'acknowledged' ELSE $7 END, inhibited = $8, value = $9, annotations = $11::jsonb,
    fired_at = $13, resolved_at = $14, silenced_until = $15, last_active_at = $16,
    last_evaluated_at = $17, notified_at = $18, updated_at = $17
RETURNING id
"""

_UPDATE_ALERT = """
UPDATE plugin_alerts SET
    status = CASE WHEN $4 = 'firing' AND plugin_alerts.acknowledged_at IS NOT NULL
                  THEN 'acknowledged' ELSE $4 END,
    inhibited = $5, value = $6, annotations = $7::jsonb, fired_at = $8, resolved_at = $9,
    silenced_until = $10, last_active_at = $11, last_evaluated_at = $12, notified_at = $13,
    updated_at = $12
WHERE id = $1 AND tenant_id = $2 AND fingerprint = $3
RETURNING id
"""


async def save_alert(conn: Connection, alert: AlertWrite) -> int:
    """Insert or update one alert instance; returns its id."""
    args = (
        alert.tenant_id,
        alert.plugin_id,
        alert.environment,
        alert.rule_name,
        alert.fingerprint,
        alert.severity,
        alert.status,
        alert.inhibited,
        alert.value,
        json.dumps(dict(alert.labels), sort_keys=True),
        json.dumps(dict(alert.annotations), sort_keys=True),
        alert.started_at,
        alert.fired_at,
        alert.resolved_at,
        alert.silenced_until,
        alert.last_active_at,
        alert.last_evaluated_at,
        alert.notified_at,
        alert.instance,
    )
    if alert.id is not None:
        updated = await conn.fetchval(
            _UPDATE_ALERT,
            alert.id,
            alert.tenant_id,
            alert.fingerprint,
            alert.status,
            alert.inhibited,
            alert.value,
            args[10],
            alert.fired_at,
            alert.resolved_at,
            alert.silenced_until,
            alert.last_active_at,
            alert.last_evaluated_at,
            alert.notified_at,
            timeout=QUERY_TIMEOUT_SECONDS,
        )
        if updated is not None:
            return int(updated)
    return int(await conn.fetchval(_INSERT_ALERT, *args, timeout=QUERY_TIMEOUT_SECONDS))


async def touch_alerts(
    conn: Connection, ids: Sequence[int], values: Sequence[float | None], at: datetime
) -> None:
    """Record the latest value and evaluation time of open alerts that did not change."""
    if not ids:
        return
    await conn.execute(
        """UPDATE plugin_alerts a SET value = v.value, last_evaluated_at = $3
           FROM unnest($1::bigint[], $2::double precision[]) AS v(id, value)
           WHERE a.id = v.id AND a.status <> 'resolved'""",
        list(ids),
        list(values),
        at,
        timeout=QUERY_TIMEOUT_SECONDS,
    )


async def acknowledge(conn: Connection, fingerprint: str, by: str, at: datetime) -> bool:
    """Acknowledge the open alert with ``fingerprint``; False if there is none."""
    row = await conn.fetchval(
        """UPDATE plugin_alerts
              SET acknowledged_at = $3, acknowledged_by = $2,
                  status = CASE WHEN status = 'firing' THEN 'acknowledged' ELSE status END,
                  updated_at = $3
            WHERE fingerprint = $1 AND status <> 'resolved'
        RETURNING id""",
        fingerprint,
        by,
        at,
        timeout=QUERY_TIMEOUT_SECONDS,
    )
    return row is not None


async def acknowledged(conn: Connection) -> dict[str, tuple[datetime, str | None]]:
    """Open alerts someone acknowledged: fingerprint -> (when, by whom)."""
    rows = await conn.fetch(
        """SELECT fingerprint, acknowledged_at, acknowledged_by FROM plugin_alerts
            WHERE status <> 'resolved' AND acknowledged_at IS NOT NULL""",
        timeout=QUERY_TIMEOUT_SECONDS,
    )
    return {r["fingerprint"]: (r["acknowledged_at"], r["acknowledged_by"]) for r in rows}


# --- silences and dependencies ----------------------------------------------------------------


async def add_silence(
    conn: Connection,
    *,
    tenant_id: str,
    matchers: Mapping[str, str],
    ends_at: datetime,
    created_by: str,
    comment: str = "",
    starts_at: datetime | None = None,
) -> int:
    return int(
        await conn.fetchval(
            """INSERT INTO alert_silences (tenant_id, matchers, starts_at, ends_at, created_by, comment)
               VALUES ($1, $2::jsonb, coalesce($3, now()), $4, $5, $6) RETURNING id""",
            tenant_id,
            json.dumps(dict(matchers), sort_keys=True),
            starts_at,
            ends_at,
            created_by,
            comment,
            timeout=QUERY_TIMEOUT_SECONDS,
        )
    )


async def active_silences(conn: Connection, now: datetime) -> list[Silence]:
    rows = await conn.fetch(
        """SELECT id, tenant_id, matchers::text AS matchers, starts_at, ends_at, created_by, comment
             FROM alert_silences WHERE starts_at <= $1 AND ends_at > $1 ORDER BY id""",
        now,
        timeout=QUERY_TIMEOUT_SECONDS,
    )
    return [
        Silence(
            id=r["id"],
            tenant_id=r["tenant_id"],
            matchers={str(k): str(v) for k, v in json.loads(r["matchers"]).items()},
            starts_at=r["starts_at"],
            ends_at=r["ends_at"],
            created_by=r["created_by"],
            comment=r["comment"],
        )
        for r in rows
    ]


async def runtime_dependencies(conn: Connection) -> dict[int, tuple[int, ...]]:
    """plugin_id -> the plugins it needs at run time (plugin_dependencies, kind 'runtime')."""
    rows = await conn.fetch(
        """SELECT plugin_id, array_agg(depends_on_plugin_id ORDER BY depends_on_plugin_id) AS deps
             FROM plugin_dependencies WHERE kind = 'runtime' GROUP BY plugin_id""",
        timeout=QUERY_TIMEOUT_SECONDS,
    )
    return {r["plugin_id"]: tuple(r["deps"]) for r in rows}


async def latest_metric_values(
    conn: Connection,
    plugins: Sequence[tuple[int, str]],
    names: Sequence[str],
    since: datetime,
) -> dict[tuple[int, str, str], float]:
    """The newest plugin_metrics value per (plugin id, environment, metric name) since
    ``since``, for the given (plugin id, environment) pairs. The environment matters: one
    plugins row (tenant, name) serves every environment the plugin runs in."""
    if not plugins or not names:
        return {}
    rows = await conn.fetch(
        """SELECT DISTINCT ON (m.plugin_id, m.environment, m.metric_name)
                  m.plugin_id, m.environment, m.metric_name, m.value
             FROM plugin_metrics m
             JOIN unnest($1::bigint[], $2::text[]) AS w(plugin_id, environment)
               ON m.plugin_id = w.plugin_id AND m.environment = w.environment
            WHERE m.metric_name = ANY($3::text[]) AND m."timestamp" >= $4
            ORDER BY m.plugin_id, m.environment, m.metric_name, m."timestamp" DESC""",
        [p[0] for p in plugins],
        [p[1] for p in plugins],
        list(names),
        since,
        timeout=QUERY_TIMEOUT_SECONDS,
    )
    return {(r["plugin_id"], r["environment"], r["metric_name"]): r["value"] for r in rows}


# --- health -----------------------------------------------------------------------------------


async def write_health(conn: Connection, rows: Sequence[HealthWrite], at: datetime) -> None:
    """One 'health_score' gauge row per plugin, and plugins.health_score/last_health_check
    for the rows marked ``update_plugin``."""
    if not rows:
        return
    updates = [r for r in rows if r.update_plugin]
    if updates:
        await conn.execute(
            """UPDATE plugins p SET health_score = v.score, last_health_check = $3
                 FROM unnest($1::bigint[], $2::real[]) AS v(id, score)
                WHERE p.id = v.id""",
            [r.plugin_id for r in updates],
            [r.score for r in updates],
            at,
            timeout=QUERY_TIMEOUT_SECONDS,
        )
    await conn.copy_records_to_table(
        "plugin_metrics",
        records=[
            (
                at,
                r.tenant_id,
                r.plugin_id,
                r.environment,
                "health_score",
                "gauge",
                float(r.score),
                r.labels_json,
            )
            for r in rows
        ],
        columns=[
            "timestamp",
            "tenant_id",
            "plugin_id",
            "environment",
            "metric_name",
            "metric_kind",
            "value",
            "labels",
        ],
        timeout=QUERY_TIMEOUT_SECONDS,
    )


# --- outbox -----------------------------------------------------------------------------------


async def insert_outbox(conn: Connection, rows: Sequence[OutboxWrite]) -> None:
    if not rows:
        return
    await conn.executemany(
        """INSERT INTO notification_outbox (tenant_id, plugin_id, environment, receiver,
               receiver_kind, group_key, idempotency_key, body, fingerprints, next_attempt_at,
               created_at, updated_at, instance)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10, $10, $11)
           ON CONFLICT (idempotency_key) DO NOTHING""",
        [
            (
                r.tenant_id,
                r.plugin_id,
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
                          AND p.group_key = o.group_key AND p.id < o.id)
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
    async with conn.transaction():
        rows = await conn.fetch(
            _CLAIM,
            now,
            limit,
            lease_seconds,
            instance,
            list(webhooks),
            alertmanager,
            timeout=QUERY_TIMEOUT_SECONDS,
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
    alert_notifications_sent so they are never POSTed again."""
    if not outcomes:
        return
    async with conn.transaction():
        delivered = [o for o in outcomes if o.outcome == "delivered"]
        if delivered:
            await conn.executemany(
                """UPDATE notification_outbox SET status = 'delivered', delivered_at = $2,
                          last_status_code = $3, last_error = NULL, updated_at = $2
                    WHERE id = $1""",
                [(o.notification.id, o.at, o.status_code) for o in delivered],
                timeout=QUERY_TIMEOUT_SECONDS,
            )
            await conn.executemany(
                """INSERT INTO alert_notifications_sent (idempotency_key, tenant_id, outbox_id,
                          receiver, status_code, attempts, delivered_at)
                   VALUES ($1, $2, $3, $4, $5, $6, $7)
                   ON CONFLICT (idempotency_key) DO NOTHING""",
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
                    WHERE id = $1 AND status = 'pending'""",
                [
                    (o.notification.id, o.next_attempt_at, o.status_code, o.error, o.at)
                    for o in retries
                ],
                timeout=QUERY_TIMEOUT_SECONDS,
            )
        failed = [o for o in outcomes if o.outcome == "failed"]
        if failed:
            await conn.executemany(
                """UPDATE notification_outbox SET status = 'failed', last_status_code = $2,
                          last_error = $3, updated_at = $4
                    WHERE id = $1 AND status = 'pending'""",
                [(o.notification.id, o.status_code, o.error, o.at) for o in failed],
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


# --- the alert journal ------------------------------------------------------------------------
#
# While the database is away the engine appends what it could not persist (alert writes and
# outbox rows) to a disk journal, so a crash during the outage loses neither. The journal is
# a storage.spool.Spool (length + CRC-32 records, fsync per append, torn tail truncated on
# open, a directory lock); each batch is rows of (kind, JSON document), kind "alert" or
# "outbox", in the order _persist would have written them. JSON, not pickle: data, never code.

JOURNAL_FORMAT_VERSION = 1
JOURNAL_MAX_BYTES = 64 * 1024 * 1024
_KIND_ALERT = "alert"
_KIND_OUTBOX = "outbox"


class JournalFormatError(ValueError):
    """A journal entry this version of pluginmon cannot read."""


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _from_iso(value: object) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise JournalFormatError(f"expected a timestamp string, got {value!r}")
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        raise JournalFormatError(f"timestamp without a time zone: {value!r}")
    return parsed


def _required_iso(value: object) -> datetime:
    parsed = _from_iso(value)
    if parsed is None:
        raise JournalFormatError("missing timestamp")
    return parsed


def encode_alert_write(write: AlertWrite) -> str:
    return json.dumps(
        {
            "v": JOURNAL_FORMAT_VERSION,
            "id": write.id,
            "tenant_id": write.tenant_id,
            "plugin_id": write.plugin_id,
            "environment": write.environment,
            "rule_name": write.rule_name,
            "fingerprint": write.fingerprint,
            "severity": write.severity,
            "status": write.status,
            "inhibited": write.inhibited,
            "value": write.value,
            "labels": dict(write.labels),
            "annotations": dict(write.annotations),
            "started_at": _iso(write.started_at),
            "fired_at": _iso(write.fired_at),
            "resolved_at": _iso(write.resolved_at),
            "silenced_until": _iso(write.silenced_until),
            "last_active_at": _iso(write.last_active_at),
            "last_evaluated_at": _iso(write.last_evaluated_at),
            "notified_at": _iso(write.notified_at),
            "instance": write.instance,
        },
        sort_keys=True,
        allow_nan=True,
    )


def _document(text: str) -> dict[str, Any]:
    raw = json.loads(text)
    if not isinstance(raw, dict):
        raise JournalFormatError("journal entry is not a JSON object")
    if raw.get("v") != JOURNAL_FORMAT_VERSION:
        raise JournalFormatError(f"journal entry format {raw.get('v')!r} is not supported")
    return raw


def decode_alert_write(text: str) -> AlertWrite:
    raw = _document(text)
    try:
        value = raw["value"]
        return AlertWrite(
            id=None if raw["id"] is None else int(raw["id"]),
            tenant_id=str(raw["tenant_id"]),
            plugin_id=int(raw["plugin_id"]),
            environment=str(raw["environment"]),
            rule_name=str(raw["rule_name"]),
            fingerprint=str(raw["fingerprint"]),
            severity=str(raw["severity"]),
            status=str(raw["status"]),
            inhibited=bool(raw["inhibited"]),
            value=None if value is None else float(value),
            labels={str(k): str(v) for k, v in raw["labels"].items()},
            annotations={str(k): str(v) for k, v in raw["annotations"].items()},
            started_at=_required_iso(raw["started_at"]),
            fired_at=_from_iso(raw["fired_at"]),
            resolved_at=_from_iso(raw["resolved_at"]),
            silenced_until=_from_iso(raw["silenced_until"]),
            last_active_at=_from_iso(raw["last_active_at"]),
            last_evaluated_at=_required_iso(raw["last_evaluated_at"]),
            notified_at=_from_iso(raw["notified_at"]),
            # absent in entries written before owners were recorded: '' (the replaying
            # engine's instance, see replay_journal)
            instance=str(raw.get("instance", "")),
        )
    except (KeyError, TypeError, AttributeError) as exc:
        raise JournalFormatError(f"malformed alert entry: {exc!r}") from exc


def encode_outbox_write(write: OutboxWrite) -> str:
    return json.dumps(
        {
            "v": JOURNAL_FORMAT_VERSION,
            "tenant_id": write.tenant_id,
            "plugin_id": write.plugin_id,
            "environment": write.environment,
            "receiver": write.receiver,
            "receiver_kind": write.receiver_kind,
            "group_key": write.group_key,
            "idempotency_key": write.idempotency_key,
            "body": write.body,
            "fingerprints": list(write.fingerprints),
            "created_at": _iso(write.created_at),
            "instance": write.instance,
        },
        sort_keys=True,
    )


def decode_outbox_write(text: str) -> OutboxWrite:
    raw = _document(text)
    try:
        return OutboxWrite(
            tenant_id=str(raw["tenant_id"]),
            plugin_id=int(raw["plugin_id"]),
            environment=str(raw["environment"]),
            receiver=str(raw["receiver"]),
            receiver_kind=str(raw["receiver_kind"]),
            group_key=str(raw["group_key"]),
            idempotency_key=str(raw["idempotency_key"]),
            body=str(raw["body"]),
            fingerprints=tuple(str(f) for f in raw["fingerprints"]),
            created_at=_required_iso(raw["created_at"]),
            instance=str(raw.get("instance", "")),
        )
    except (KeyError, TypeError, AttributeError) as exc:
        raise JournalFormatError(f"malformed outbox entry: {exc!r}") from exc


JournalEntry = AlertWrite | OutboxWrite


@dataclass(frozen=True, slots=True)
class JournalBatch:
    """One appended batch, decoded; ``handle`` is what :meth:`AlertJournal.ack` needs."""

    handle: SpooledBatch
    entries: tuple[JournalEntry, ...]


class AlertJournal:
    """The alerts' append-only disk journal (a Spool of (kind, JSON) rows), see above.

    Blocking file I/O, like Spool: async callers go through ``asyncio.to_thread``.
    """

    def __init__(self, directory: Path, *, max_bytes: int = JOURNAL_MAX_BYTES) -> None:
        self._spool = Spool(directory, max_bytes=max_bytes, segment_bytes=max_bytes // 8)
        self.directory = self._spool.directory

    @property
    def batches(self) -> int:
        """Batches appended and not yet acked."""
        return self._spool.batches

    @property
    def entries(self) -> int:
        return self._spool.rows

    def append(self, alerts: Sequence[AlertWrite], outbox: Sequence[OutboxWrite]) -> None:
        """One batch, fsync'ed before returning (SpoolFullError at the cap, OSError)."""
        rows: list[tuple[object, ...]] = [(_KIND_ALERT, encode_alert_write(a)) for a in alerts]
        rows += [(_KIND_OUTBOX, encode_outbox_write(o)) for o in outbox]
        self._spool.append(rows)

    def read(self, max_batches: int | None = None) -> list[JournalBatch]:
        """The oldest ``max_batches`` batches (all when None), decoded, oldest first.

        An entry that does not decode is logged and left out (its batch is still acked).
        """
        batches: list[JournalBatch] = []
        for spooled in self._spool.replay():
            if max_batches is not None and len(batches) >= max_batches:
                break
            entries: list[JournalEntry] = []
            for row in spooled.rows:
                kind, text = row[0], row[1]
                try:
                    if kind == _KIND_ALERT and isinstance(text, str):
                        entries.append(decode_alert_write(text))
                    elif kind == _KIND_OUTBOX and isinstance(text, str):
                        entries.append(decode_outbox_write(text))
                    else:
                        raise JournalFormatError(f"unknown entry kind {kind!r}")
                except (JournalFormatError, ValueError) as exc:
                    logger.error("alert journal %s: skipping entry: %s", self.directory, exc)
            batches.append(JournalBatch(spooled, tuple(entries)))
        return batches

    def ack(self, batches: Sequence[JournalBatch]) -> None:
        """Forget these batches (written to the database); oldest first, as read."""
        for batch in batches:
            self._spool.peek()  # drops an undecodable head that read() skipped
            self._spool.ack(batch.handle)

    def ack_all(self) -> int:
        """Forget every batch; returns how many there were."""
        count = 0
        while (head := self._spool.peek()) is not None:
            self._spool.ack(head)
            count += 1
        return count

    def close(self) -> None:
        self._spool.close()


_FIND_ALERT_INSTANCE = """
SELECT id, last_evaluated_at FROM plugin_alerts
 WHERE plugin_id = $1 AND started_at = $2 AND fingerprint = $3
 ORDER BY id DESC LIMIT 1
"""


async def replay_alert(conn: Connection, write: AlertWrite) -> int | None:
    """Apply one journaled alert write idempotently; returns the row id, None if skipped.

    The instance is found by (plugin, started_at, fingerprint), so replaying a journal twice
    updates the same row instead of inserting a second one; a row evaluated after the write
    was journaled (the database came back and the engine wrote newer state) is left alone.
    """
    row = await conn.fetchrow(
        _FIND_ALERT_INSTANCE,
        write.plugin_id,
        write.started_at,
        write.fingerprint,
        timeout=QUERY_TIMEOUT_SECONDS,
    )
    if row is not None:
        stored_at = row["last_evaluated_at"]
        if stored_at is not None and stored_at > write.last_evaluated_at:
            return None
        return await save_alert(conn, replace(write, id=int(row["id"])))
    return await save_alert(conn, replace(write, id=None))


@dataclass(frozen=True, slots=True)
class ReplayResult:
    alerts: int  # alert writes applied
    notifications: int  # outbox rows offered (a key already in the outbox is kept as is)
    skipped: int  # older than the stored row
    refused: int  # refused by the database (say, the plugin was deleted), logged


async def replay_journal(
    conn: Connection, batches: Sequence[JournalBatch], *, instance: str = ""
) -> ReplayResult:
    """Write journaled batches in order, in one transaction; safe to repeat.

    Each entry keeps the owner instance it was journaled with; an entry without one (written
    before owners were recorded) gets ``instance``, the replaying engine's: the journal lives
    in that daemon's data directory.

    Alert rows are upserted per instance (:func:`replay_alert`), outbox rows are inserted
    with ``ON CONFLICT (idempotency_key) DO NOTHING``, so a notification that was already
    written (or delivered) is not queued twice. Entries the database refuses for good are
    dropped one by one (savepoints) and logged; connection errors propagate.
    """
    alerts = notifications = skipped = refused = 0
    async with conn.transaction():
        for batch in batches:
            for entry in batch.entries:
                if not entry.instance and instance:
                    entry = replace(entry, instance=instance)
                try:
                    async with conn.transaction():  # a savepoint
                        if isinstance(entry, AlertWrite):
                            if await replay_alert(conn, entry) is None:
                                skipped += 1
                            else:
                                alerts += 1
                        else:
                            await insert_outbox(conn, [entry])
                            notifications += 1
                except asyncpg.PostgresError as exc:
                    if isinstance(exc, TRANSIENT_ERRORS):
                        raise
                    refused += 1
                    logger.error(
                        "alert journal: dropping %s for tenant %s plugin %d: %s",
                        "alert state" if isinstance(entry, AlertWrite) else "notification",
                        entry.tenant_id,
                        entry.plugin_id,
                        exc,
                    )
    return ReplayResult(alerts, notifications, skipped, refused)
