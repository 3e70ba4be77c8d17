"""Vulnerability findings of plugins: reading them, their lifecycle (accepted with reason/actor/expiry, open again when the acceptance expires), and the counts the health component, the built-in rule and the metric read.

Imports of scanner reports and VEX (new findings open, fixed when no longer matched,
suppressed by VEX) are registry.vulnerability_imports; SBOMs and offline scans
registry.sboms. Reads are read-only and tell the status in effect at ``now``: an acceptance
past its expiry reads as open before the maintenance job (registry.maintenance) writes that
down with its audit entry. Every write leaves one audit entry in the caller's transaction.
Requests run under row-level security (the tenant's rows only); the maintenance job runs as
the owner (every tenant).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Final

import asyncpg

from pluginmon.alerts.health import VULNERABILITIES_CRITICAL
from pluginmon.registry import audit
from pluginmon.registry.actor import DAEMON, Actor
from pluginmon.registry.errors import ConflictError, InvalidError, NotFoundError
from pluginmon.registry.plugins import plugin_id

MAX_REASON_CHARS: Final = 2000


class FindingStatus(StrEnum):
    """plugin_vulnerabilities.status (acknowledged, mitigated and false_positive are the
    seed's, kept for rows written by others; this module sets the other four)."""

    OPEN = "open"
    ACKNOWLEDGED = "acknowledged"
    MITIGATED = "mitigated"
    FIXED = "fixed"
    FALSE_POSITIVE = "false_positive"
    ACCEPTED = "accepted"
    SUPPRESSED = "suppressed"


# Statuses in which a finding counts against the plugin (health, rule, metric).
ACTIVE_STATUSES: Final = (FindingStatus.OPEN, FindingStatus.ACKNOWLEDGED)
# Statuses a finding leaves for "fixed" when its source no longer reports it.
LIVE_STATUSES: Final = [
    str(s) for s in FindingStatus if s not in (FindingStatus.FIXED, FindingStatus.FALSE_POSITIVE)
]


@dataclass(frozen=True, slots=True)
class VulnerabilityFinding:
    id: int
    plugin: str
    environment: str
    vulnerability_id: str
    aliases: tuple[str, ...]
    package_name: str
    package_version: str | None
    ecosystem: str | None
    severity: str
    cvss_score: float | None
    cvss_vector: str | None
    status: FindingStatus
    title: str | None
    affected_range: str | None
    fixed_version: str | None
    scanner: str
    detected_at: datetime
    last_seen_at: datetime | None
    resolved_at: datetime | None
    accepted_reason: str | None
    accepted_by: str | None
    accepted_until: datetime | None
    suppression: str | None


@dataclass(frozen=True, slots=True)
class OpenCount:
    tenant_id: str
    plugin: str
    environment: str
    severity: str
    count: int


# Reads tell the status in effect at $1 (now): an acceptance past its expiry is open again,
# whether or not the maintenance job has written that down yet (the same CASE in both).
_SELECT: Final = """
SELECT v.id, p.name AS plugin, v.environment, v.vulnerability_id, v.aliases, v.package_name,
       v.package_version, v.ecosystem, v.severity, v.cvss_score::float8 AS cvss_score,
       v.cvss_vector,
       CASE WHEN v.status = 'accepted' AND v.accepted_until <= $1 THEN 'open'
            ELSE v.status END AS status,
       v.title, v.affected_range, v.fixed_version, v.scanner,
       v.detected_at, v.last_seen_at, v.resolved_at, v.accepted_reason, v.accepted_by,
       v.accepted_until, v.suppression
  FROM plugin_vulnerabilities v JOIN plugins p ON p.id = v.plugin_id AND p.tenant_id = v.tenant_id
"""


def _finding(row: asyncpg.Record) -> VulnerabilityFinding:
    return VulnerabilityFinding(
        **{
            **dict(row),
            "aliases": tuple(row["aliases"] or ()),
            "status": FindingStatus(row["status"]),
        }
    )


# --- findings -----------------------------------------------------------------------------------


async def list_findings(
    conn: asyncpg.Connection,
    plugin_name: str,
    *,
    now: datetime,
    environment: str | None = None,
    status: str | None = None,
    severity: str | None = None,
    limit: int = 1000,
) -> list[VulnerabilityFinding]:
    """The plugin's findings with their status at ``now`` (``status`` filters on that)."""
    plugin = await plugin_id(conn, plugin_name)
    rows = await conn.fetch(
        _SELECT
        + """ WHERE v.plugin_id = $2 AND ($3::text IS NULL OR v.environment = $3)
                AND ($4::text IS NULL OR $4 = CASE WHEN v.status = 'accepted'
                     AND v.accepted_until <= $1 THEN 'open' ELSE v.status END)
                AND ($5::text IS NULL OR v.severity = $5)
              ORDER BY CASE v.severity WHEN 'critical' THEN 0 WHEN 'high' THEN 1
                       WHEN 'medium' THEN 2 WHEN 'low' THEN 3 ELSE 4 END,
                       v.vulnerability_id, v.package_name, v.scanner
              LIMIT $6""",
        now,
        plugin,
        environment,
        status,
        severity,
        limit,
    )
    return [_finding(r) for r in rows]


async def get_finding(
    conn: asyncpg.Connection, finding_id: int, *, now: datetime
) -> VulnerabilityFinding:
    """The finding with its status at ``now``."""
    row = await conn.fetchrow(_SELECT + " WHERE v.id = $2", now, finding_id)
    if row is None:
        raise NotFoundError(f"no vulnerability finding with id {finding_id}", field="id")
    return _finding(row)


async def accept(
    conn: asyncpg.Connection,
    finding_id: int,
    *,
    tenant_id: str,
    actor: Actor,
    now: datetime,
    reason: str,
    until: datetime,
) -> VulnerabilityFinding:
    """Accept an open finding until ``until`` (it opens again then, unless fixed first)."""
    if not reason.strip():
        raise InvalidError("reason must say why the risk is accepted", field="reason")
    if len(reason) > MAX_REASON_CHARS:
        raise InvalidError(f"reason is longer than {MAX_REASON_CHARS} characters", field="reason")
    if until <= now:
        raise InvalidError("until must be in the future", field="until")
    before = await get_finding(conn, finding_id, now=now)
    if before.status not in ACTIVE_STATUSES:
        raise ConflictError(
            f"finding {finding_id} is {before.status}; only an open finding can be accepted",
            field="status",
        )
    row = await conn.fetchrow(
        """UPDATE plugin_vulnerabilities
              SET status = 'accepted', accepted_reason = $2, accepted_by = $3,
                  accepted_at = $4, accepted_until = $5
            WHERE id = $1 RETURNING plugin_id""",
        finding_id,
        reason,
        actor.name,
        now,
        until,
    )
    assert row is not None
    after = await get_finding(conn, finding_id, now=now)
    await audit.append(
        conn,
        tenant_id=tenant_id,
        actor=actor,
        action="vulnerability.accept",
        entity_type="vulnerability",
        entity_id=str(finding_id),
        plugin_id=int(row["plugin_id"]),
        plugin_name=after.plugin,
        environment=after.environment,
        occurred_at=now,
        before={"status": before.status},
        after={"status": after.status, "reason": reason, "until": until.isoformat()},
        details={"vulnerability_id": after.vulnerability_id, "package": after.package_name},
    )
    return after


async def expire_acceptances(
    conn: asyncpg.Connection, *, now: datetime, actor: Actor = DAEMON
) -> list[VulnerabilityFinding]:
    """Accepted findings past their ``accepted_until`` are open again (audited each)."""
    rows = await conn.fetch(
        """UPDATE plugin_vulnerabilities SET status = 'open'
            WHERE status = 'accepted' AND accepted_until <= $1
        RETURNING id, tenant_id, plugin_id, accepted_until""",
        now,
    )
    reopened = []
    for r in rows:
        finding = await get_finding(conn, int(r["id"]), now=now)
        reopened.append(finding)
        await audit.append(
            conn,
            tenant_id=r["tenant_id"],
            actor=actor,
            action="vulnerability.acceptance_expired",
            entity_type="vulnerability",
            entity_id=str(r["id"]),
            plugin_id=int(r["plugin_id"]),
            plugin_name=finding.plugin,
            environment=finding.environment,
            occurred_at=now,
            before={"status": "accepted", "until": r["accepted_until"].isoformat()},
            after={"status": "open"},
        )
    return reopened


# --- counts for health, rules and metrics ----------------------------------------------------------


async def open_counts(conn: asyncpg.Connection) -> list[OpenCount]:
    """Open findings per (tenant, plugin, environment, severity), distinct vulnerabilities per
    package (two scanners reporting one issue count once)."""
    rows = await conn.fetch(
        """SELECT v.tenant_id, p.name AS plugin, v.environment, v.severity,
                  count(DISTINCT (v.vulnerability_id, v.package_name)) AS count
             FROM plugin_vulnerabilities v JOIN plugins p ON p.id = v.plugin_id AND p.tenant_id = v.tenant_id
            WHERE v.status = ANY($1::text[])
            GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4""",
        [str(s) for s in ACTIVE_STATUSES],
    )
    return [OpenCount(**dict(r)) for r in rows]


async def write_gauges(conn: asyncpg.Connection, *, now: datetime) -> int:
    """One ``vulnerabilities_critical`` gauge row per (plugin, environment) that has findings
    (zeros too, so PluginVulnerabilityCritical resolves when the last critical is gone)."""
    status = await conn.execute(
        """INSERT INTO plugin_metrics ("timestamp", tenant_id, plugin_id, environment,
                                       metric_name, metric_kind, value, labels)
           SELECT $1, tenant_id, plugin_id, environment, $2, 'gauge',
                  count(DISTINCT (vulnerability_id, package_name))
                      FILTER (WHERE severity = 'critical' AND status = ANY($3::text[])),
                  '{}'
             FROM plugin_vulnerabilities
            WHERE status <> 'fixed' OR resolved_at > $1::timestamptz - interval '1 hour'
            GROUP BY tenant_id, plugin_id, environment""",
        now,
        VULNERABILITIES_CRITICAL,
        [str(s) for s in ACTIVE_STATUSES],
    )
    return int(status.split()[-1])
