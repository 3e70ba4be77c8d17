"""plugin_alerts rows (asyncpg): loading, adopting, saving and acknowledging alert instances."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

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
    """The whole persisted state of one alert instance (``id`` None = not stored yet).

    Also the alert entry of the disk journal (storage.alert_journal encodes it as it is),
    where ``plugin_id`` is None while the plugin has no database id yet (evaluated before
    migrations or during an outage): ``plugin`` names it, and the id is looked up when the
    entry reaches the database.
    """

    id: int | None
    tenant_id: str
    plugin_id: int | None
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
    plugin: str = ""  # the plugin's name ('' in entries journaled before names were kept)


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
ON CONFLICT (tenant_id, fingerprint) WHERE status <> 'resolved' DO UPDATE SET
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
    """Insert or update one alert instance; returns its id (ValueError without a plugin id)."""
    if alert.plugin_id is None:
        raise ValueError(f"alert {alert.rule_name} of plugin {alert.plugin!r} has no plugin id")
    annotations = json.dumps(dict(alert.annotations), sort_keys=True)
    if alert.id is not None:
        updated = await conn.fetchval(
            _UPDATE_ALERT,
            alert.id,
            alert.tenant_id,
            alert.fingerprint,
            alert.status,
            alert.inhibited,
            alert.value,
            annotations,
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
    return int(
        await conn.fetchval(
            _INSERT_ALERT,
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
            annotations,
            alert.started_at,
            alert.fired_at,
            alert.resolved_at,
            alert.silenced_until,
            alert.last_active_at,
            alert.last_evaluated_at,
            alert.notified_at,
            alert.instance,
            timeout=QUERY_TIMEOUT_SECONDS,
        )
    )


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


async def acknowledge(
    conn: Connection, fingerprint: str, by: str, at: datetime, *, tenant_id: str | None = None
) -> str | None:
    """Acknowledge the open alert with ``fingerprint`` (of ``tenant_id`` when given: one
    shard group on Citus): its tenant, or None if there is none.

    The one write of an acknowledgement (registry.alert_actions audits it around this)."""
    row = await conn.fetchval(
        """UPDATE plugin_alerts
              SET acknowledged_at = $3, acknowledged_by = $2,
                  status = CASE WHEN status = 'firing' THEN 'acknowledged' ELSE status END,
                  updated_at = $3
            WHERE fingerprint = $1 AND status <> 'resolved'
              AND ($4::text IS NULL OR tenant_id = $4)
        RETURNING tenant_id""",
        fingerprint,
        by,
        at,
        tenant_id,
        timeout=QUERY_TIMEOUT_SECONDS,
    )
    return None if row is None else str(row)


async def acknowledged(conn: Connection) -> dict[str, tuple[datetime, str | None]]:
    """Open alerts someone acknowledged: fingerprint -> (when, by whom)."""
    rows = await conn.fetch(
        """SELECT fingerprint, acknowledged_at, acknowledged_by FROM plugin_alerts
            WHERE status <> 'resolved' AND acknowledged_at IS NOT NULL""",
        timeout=QUERY_TIMEOUT_SECONDS,
    )
    return {r["fingerprint"]: (r["acknowledged_at"], r["acknowledged_by"]) for r in rows}
