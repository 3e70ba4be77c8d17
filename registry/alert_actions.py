"""What people do about alerts: list them, acknowledge one by fingerprint, create, list and
expire silences. Each change is audited.

The alert engine owns the alerts' lifecycle; these write only what it reads back on its next
evaluation (plugin_alerts.acknowledged_at/by, alert_silences), so they work the same from
``pluginmon run`` and from a central ``pluginmon api`` with no engine in the process.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

import asyncpg

from pluginmon.registry import audit
from pluginmon.registry.actor import Actor
from pluginmon.registry.errors import ConflictError, InvalidError, NotFoundError
from pluginmon.storage import alert_inputs, alert_state
from pluginmon.storage.alert_inputs import SILENCE_COLUMNS, Silence, silence_of
from pluginmon.storage.queries import where_given

ALERT_STATUSES: Final = ("pending", "firing", "resolved", "acknowledged", "silenced")
SEVERITIES: Final = ("info", "warning", "critical")
LABEL_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MAX_MATCHERS = 32
MAX_COMMENT_CHARS = 2_000


@dataclass(frozen=True, slots=True)
class AlertItem:
    id: int
    fingerprint: str
    rule: str
    plugin: str
    environment: str
    severity: str
    status: str
    value: float | None
    labels: dict[str, Any]
    annotations: dict[str, Any]
    started_at: datetime
    fired_at: datetime | None
    resolved_at: datetime | None
    acknowledged_at: datetime | None
    acknowledged_by: str | None
    silenced_until: datetime | None


@dataclass(frozen=True, slots=True)
class SilenceItem:
    id: int
    matchers: dict[str, str]
    starts_at: datetime
    ends_at: datetime
    created_by: str
    comment: str
    created_at: datetime


_ALERT_SELECT = """
SELECT a.id, a.fingerprint, a.rule_name, p.name AS plugin, a.environment, a.severity, a.status,
       a.value, a.labels::text AS labels, a.annotations::text AS annotations, a.started_at,
       a.fired_at, a.resolved_at, a.acknowledged_at, a.acknowledged_by, a.silenced_until
  FROM plugin_alerts a JOIN plugins p ON p.id = a.plugin_id AND p.tenant_id = a.tenant_id
"""


def _alert(row: asyncpg.Record) -> AlertItem:
    return AlertItem(
        id=row["id"],
        fingerprint=row["fingerprint"],
        rule=row["rule_name"],
        plugin=row["plugin"],
        environment=row["environment"],
        severity=row["severity"],
        status=row["status"],
        value=row["value"],
        labels=json.loads(row["labels"]),
        annotations=json.loads(row["annotations"]),
        started_at=row["started_at"],
        fired_at=row["fired_at"],
        resolved_at=row["resolved_at"],
        acknowledged_at=row["acknowledged_at"],
        acknowledged_by=row["acknowledged_by"],
        silenced_until=row["silenced_until"],
    )


async def list_alerts(
    conn: asyncpg.Connection,
    *,
    status: str | None = None,
    severity: str | None = None,
    plugin: str | None = None,
    limit: int = 100,
) -> list[AlertItem]:
    """Alerts, newest first; ``status="open"`` is every status but resolved."""
    if status is not None and status != "open" and status not in ALERT_STATUSES:
        raise InvalidError(
            f"status must be open or one of {', '.join(ALERT_STATUSES)}", field="status"
        )
    if severity is not None and severity not in SEVERITIES:
        raise InvalidError(f"severity must be one of {', '.join(SEVERITIES)}", field="severity")
    # Only the filters given (storage.queries.where_given). A status other than resolved
    # also names the open alerts' partial indexes' predicate, so a generic plan reads the open
    # few, not every resolved alert of the tenant's history.
    where, args = where_given(
        (
            ("a.status = {}", None if status == "open" else status),
            ("a.severity = {}", severity),
            ("p.name = {}", plugin),
        ),
        # idx_plugin_alerts_open_tenant_fingerprint's predicate
        also=["a.status <> 'resolved'"] if status is not None and status != "resolved" else [],
        args=[limit],
    )
    rows = await conn.fetch(
        _ALERT_SELECT + f"{where} ORDER BY a.started_at DESC, a.id DESC LIMIT $1", *args
    )
    return [_alert(r) for r in rows]


async def acknowledge(
    conn: asyncpg.Connection, fingerprint: str, *, tenant_id: str, actor: Actor, now: datetime
) -> tuple[AlertItem, bool]:
    """Acknowledge the open alert of ``tenant_id`` with ``fingerprint``: (the alert, whether
    this changed it).

    No repeat notifications follow; its resolution is still sent (the engine's rule). The
    tenant filter routes the locking read to one shard group on Citus.
    """
    row = await conn.fetchrow(
        _ALERT_SELECT
        + " WHERE a.fingerprint = $1 AND a.tenant_id = $2 AND a.status <> 'resolved'"
        + " FOR UPDATE OF a",
        fingerprint,
        tenant_id,
    )
    if row is None:
        raise NotFoundError(f"no open alert with fingerprint {fingerprint!r}", field="fingerprint")
    before = _alert(row)
    if before.acknowledged_at is not None:
        return before, False
    changed = await alert_state.acknowledge(conn, fingerprint, actor.name, now, tenant_id=tenant_id)
    assert changed == tenant_id  # the row is locked above
    after_row = await conn.fetchrow(
        _ALERT_SELECT + " WHERE a.id = $1 AND a.tenant_id = $2", before.id, tenant_id
    )
    assert after_row is not None
    after = _alert(after_row)
    await audit.append(
        conn,
        tenant_id=tenant_id,
        actor=actor,
        action="alert.acknowledge",
        entity_type="alert",
        entity_id=fingerprint,
        plugin_name=before.plugin,
        environment=before.environment,
        occurred_at=now,
        before={"status": before.status, "acknowledged_by": None},
        after={"status": after.status, "acknowledged_by": actor.name},
        details={"rule": before.rule},
    )
    return after, True


_SILENCE_SELECT = f"SELECT {SILENCE_COLUMNS} FROM alert_silences"  # noqa: S608 - constant


_EXPIRE_SILENCE = f"UPDATE alert_silences SET ends_at = $2, starts_at = $3 WHERE id = $1 AND tenant_id = $4 RETURNING {SILENCE_COLUMNS}"  # noqa: S608 - a constant column list


def _silence(row: asyncpg.Record) -> SilenceItem:
    return _silence_item(silence_of(row))


def _silence_item(silence: Silence) -> SilenceItem:
    return SilenceItem(
        id=silence.id,
        matchers=silence.matchers,
        starts_at=silence.starts_at,
        ends_at=silence.ends_at,
        created_by=silence.created_by,
        comment=silence.comment,
        created_at=silence.created_at,
    )


def check_matchers(matchers: Mapping[str, str]) -> None:
    if not matchers:
        raise InvalidError(
            "matchers must name at least one label (a silence of everything is not allowed)",
            field="matchers",
        )
    if len(matchers) > MAX_MATCHERS:
        raise InvalidError(f"at most {MAX_MATCHERS} matchers", field="matchers")
    for name, pattern in matchers.items():
        if not LABEL_NAME_RE.fullmatch(name):
            raise InvalidError(
                f"matcher label {name!r} is not a label name", field=f"matchers.{name}"
            )
        if not pattern:
            raise InvalidError(
                f"matcher for {name!r} must not be empty (use '*' for any value)",
                field=f"matchers.{name}",
            )


async def create_silence(
    conn: asyncpg.Connection,
    *,
    tenant_id: str,
    actor: Actor,
    now: datetime,
    matchers: Mapping[str, str],
    ends_at: datetime,
    starts_at: datetime | None = None,
    comment: str = "",
) -> SilenceItem:
    """Mute the tenant's alerts whose labels match every glob in ``matchers`` until ``ends_at``."""
    check_matchers(matchers)
    start = starts_at or now
    if ends_at <= now:
        raise InvalidError("ends_at must be in the future", field="ends_at")
    if ends_at <= start:
        raise InvalidError("ends_at must be after starts_at", field="ends_at")
    if len(comment) > MAX_COMMENT_CHARS:
        raise InvalidError(
            f"comment must be at most {MAX_COMMENT_CHARS} characters", field="comment"
        )
    silence = _silence_item(
        await alert_inputs.add_silence(
            conn,
            tenant_id=tenant_id,
            matchers=matchers,
            ends_at=ends_at,
            created_by=actor.name,
            comment=comment,
            starts_at=start,
            created_at=now,
        )
    )
    await audit.append(
        conn,
        tenant_id=tenant_id,
        actor=actor,
        action="silence.create",
        entity_type="silence",
        entity_id=str(silence.id),
        occurred_at=now,
        after={
            "matchers": silence.matchers,
            "starts_at": silence.starts_at,
            "ends_at": silence.ends_at,
            "comment": comment,
        },
    )
    return silence


async def list_silences(
    conn: asyncpg.Connection, *, now: datetime, active: bool | None = None, limit: int = 100
) -> list[SilenceItem]:
    rows = await conn.fetch(
        _SILENCE_SELECT
        + """ WHERE ($1::boolean IS NULL OR ($1 = (starts_at <= $2 AND ends_at > $2)))
              ORDER BY id DESC LIMIT $3""",
        active,
        now,
        limit,
    )
    return [_silence(r) for r in rows]


async def expire_silence(
    conn: asyncpg.Connection, silence_id: int, *, tenant_id: str, actor: Actor, now: datetime
) -> SilenceItem:
    """End a silence now (a silence still to start ends before it began)."""
    row = await conn.fetchrow(
        _SILENCE_SELECT + " WHERE id = $1 AND tenant_id = $2 FOR UPDATE", silence_id, tenant_id
    )
    if row is None:
        raise NotFoundError(f"no silence {silence_id}", field="id")
    before = _silence(row)
    if before.ends_at <= now:
        raise ConflictError(
            f"silence {silence_id} ended at {before.ends_at.isoformat()}",
            field="id",
            code="already_expired",
        )
    # ends_at > starts_at is a constraint: a silence that has not started yet ends as it starts.
    starts_at = min(before.starts_at, now - timedelta(milliseconds=1))
    updated = await conn.fetchrow(
        _EXPIRE_SILENCE,
        silence_id,
        now,
        starts_at,
        tenant_id,
    )
    assert updated is not None
    after = _silence(updated)
    await audit.append(
        conn,
        tenant_id=tenant_id,
        actor=actor,
        action="silence.expire",
        entity_type="silence",
        entity_id=str(silence_id),
        occurred_at=now,
        before={"ends_at": before.ends_at},
        after={"ends_at": after.ends_at},
    )
    return after
