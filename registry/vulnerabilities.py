"""Vulnerability findings of plugins: scanner report and VEX imports (SBOMs and offline scans
are registry.sboms), the lifecycle (open -> fixed when no longer matched, accepted
with reason/actor/expiry and back to open when it expires, suppressed by VEX), and the counts
the health component, the built-in rule and the metric read.

Every write leaves one audit entry in the caller's transaction. Requests run under row-level
security (the tenant's rows only); the maintenance job runs as the owner (every tenant).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Final

import asyncpg

from pluginmon.alerts.health import VULNERABILITIES_CRITICAL
from pluginmon.registry import audit
from pluginmon.registry.actor import DAEMON, Actor
from pluginmon.registry.errors import ConflictError, InvalidError, NotFoundError
from pluginmon.registry.plugins import check_environment, plugin_id
from pluginmon.registry.scan_reports import (
    RESOLVING_STATES,
    SUPPRESSING_STATES,
    Finding,
    ReportError,
    ReportFormat,
    parse_findings,
    parse_vex,
)

OFFLINE_SCANNER: Final = "osv-offline"
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
_LIVE_STATUSES: Final = [
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
class SyncResult:
    """What one import or scan changed for one (plugin, environment, scanner)."""

    scanner: str
    findings: int
    opened: int
    fixed: int
    suppressed: int


@dataclass(frozen=True, slots=True)
class OpenCount:
    tenant_id: str
    plugin: str
    environment: str
    severity: str
    count: int


_SELECT: Final = """
SELECT v.id, p.name AS plugin, v.environment, v.vulnerability_id, v.aliases, v.package_name,
       v.package_version, v.ecosystem, v.severity, v.cvss_score::float8 AS cvss_score,
       v.cvss_vector, v.status, v.title, v.affected_range, v.fixed_version, v.scanner,
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


_UPSERT: Final = """
INSERT INTO plugin_vulnerabilities AS v (
    tenant_id, plugin_id, plugin_version, environment, scanner, vulnerability_id, package_name,
    package_version, ecosystem, severity, cvss_score, cvss_vector, aliases, title, description,
    affected_range, fixed_version, detected_at, last_seen_at, status)
SELECT $1, $2, $3, $4, $5, f.vulnerability_id, f.package_name, f.package_version, f.ecosystem,
       f.severity, f.cvss_score, f.cvss_vector, f.aliases, f.title, f.description,
       f.affected_range, f.fixed_version, $6, $6, 'open'
  FROM jsonb_to_recordset($7::jsonb) AS f(vulnerability_id text, package_name text,
       package_version text, ecosystem text, severity text, cvss_score numeric,
       cvss_vector text, aliases text[], title text, description text, affected_range text,
       fixed_version text)
ON CONFLICT (tenant_id, plugin_id, environment, scanner, vulnerability_id, package_name)
    DO UPDATE
   SET plugin_version = EXCLUDED.plugin_version,
       package_version = EXCLUDED.package_version,
       severity = EXCLUDED.severity, cvss_score = EXCLUDED.cvss_score,
       cvss_vector = EXCLUDED.cvss_vector, aliases = EXCLUDED.aliases,
       title = EXCLUDED.title, description = EXCLUDED.description,
       affected_range = EXCLUDED.affected_range, fixed_version = EXCLUDED.fixed_version,
       last_seen_at = EXCLUDED.last_seen_at,
       -- matched again after it was fixed: open again (a regression), from now
       status = CASE WHEN v.status = 'fixed' AND v.suppression IS NULL
                     THEN 'open' ELSE v.status END,
       detected_at = CASE WHEN v.status = 'fixed' AND v.suppression IS NULL
                          THEN EXCLUDED.detected_at ELSE v.detected_at END,
       resolved_at = CASE WHEN v.status = 'fixed' AND v.suppression IS NULL
                          THEN NULL ELSE v.resolved_at END
RETURNING (xmax = 0) AS inserted, status
"""

_FIX_UNMATCHED: Final = """
UPDATE plugin_vulnerabilities
   SET status = 'fixed', resolved_at = $4, suppression = NULL
 WHERE plugin_id = $1 AND environment = $2 AND scanner = $3 AND status = ANY($6::text[])
   AND NOT ((vulnerability_id, package_name) IN (
        SELECT * FROM unnest($5::text[], $7::text[])))
"""

# VEX: a statement about the vulnerability (or one of its aliases) and the package (or every
# package) decides open findings and earlier suppressions. Accepted findings keep their status.
_APPLY_VEX: Final = """
UPDATE plugin_vulnerabilities v
   SET status = CASE WHEN s.state = ANY($4::text[]) THEN 'suppressed'
                     WHEN s.state = ANY($5::text[]) THEN 'fixed'
                     ELSE 'open' END,
       suppression = CASE WHEN s.state = ANY($4::text[]) OR s.state = ANY($5::text[])
                          THEN 'vex:' || s.state || coalesce(' (' || s.justification || ')', '')
                          END,
       resolved_at = CASE WHEN s.state = ANY($4::text[]) OR s.state = ANY($5::text[])
                          THEN coalesce(v.resolved_at, $3) END
  FROM (SELECT DISTINCT ON (vv.id) vv.id AS finding_id, st.state, st.justification
          FROM plugin_vulnerabilities vv
          JOIN plugin_vex_statements st
            ON st.plugin_id = vv.plugin_id AND st.tenant_id = vv.tenant_id
           AND st.environment = vv.environment
           AND (st.vulnerability_id = vv.vulnerability_id OR st.vulnerability_id = ANY(vv.aliases))
           AND (st.package_name = '' OR st.package_name = vv.package_name)
         WHERE vv.plugin_id = $1 AND vv.environment = $2
           AND (vv.status = 'open' OR (vv.status IN ('suppressed', 'fixed') AND vv.suppression IS NOT NULL))
         -- a package-specific statement wins over a vulnerability-wide one
         ORDER BY vv.id, (st.package_name = '') ASC, st.recorded_at DESC) AS s
 WHERE v.id = s.finding_id
RETURNING v.status
"""


def _finding_json(findings: Sequence[Finding]) -> str:
    # Deduplicated by the table's key: one report may list a package twice (two paths).
    seen: dict[tuple[str, str], dict[str, Any]] = {}
    for f in findings:
        seen[(f.vulnerability_id, f.package_name)] = {
            "vulnerability_id": f.vulnerability_id,
            "package_name": f.package_name,
            "package_version": f.package_version,
            "ecosystem": f.ecosystem,
            "severity": f.severity.value,
            "cvss_score": f.cvss_score,
            "cvss_vector": f.cvss_vector,
            "aliases": list(f.aliases),
            "title": (f.title or None) and f.title[:1000],
            "description": (f.description or None) and f.description[:8000],
            "affected_range": f.affected_range,
            "fixed_version": f.fixed_version,
        }
    return json.dumps(list(seen.values()))


async def apply_vex(
    conn: asyncpg.Connection, plugin: int, environment: str, *, now: datetime
) -> int:
    """Apply the VEX statements to the plugin's findings; returns how many are suppressed."""
    rows = await conn.fetch(
        _APPLY_VEX, plugin, environment, now, sorted(SUPPRESSING_STATES), sorted(RESOLVING_STATES)
    )
    return sum(1 for r in rows if r["status"] == FindingStatus.SUPPRESSED)


async def sync_findings(
    conn: asyncpg.Connection,
    *,
    tenant_id: str,
    plugin: int,
    plugin_version: str,
    environment: str,
    scanner: str,
    findings: Sequence[Finding],
    now: datetime,
) -> SyncResult:
    """Make the stored findings of ``scanner`` what ``findings`` says: new ones open, known
    ones refreshed, the ones no longer reported fixed; then VEX applies."""
    payload = _finding_json(findings)
    rows = await conn.fetch(
        _UPSERT, tenant_id, plugin, plugin_version, environment, scanner, now, payload
    )
    keys = json.loads(payload)
    fixed = await conn.execute(
        _FIX_UNMATCHED,
        plugin,
        environment,
        scanner,
        now,
        [k["vulnerability_id"] for k in keys],
        _LIVE_STATUSES,
        [k["package_name"] for k in keys],
    )
    suppressed = await apply_vex(conn, plugin, environment, now=now)
    return SyncResult(
        scanner=scanner,
        findings=len(keys),
        opened=sum(1 for r in rows if r["inserted"]),
        fixed=int(fixed.split()[-1]),
        suppressed=suppressed,
    )


async def _plugin_version(conn: asyncpg.Connection, plugin: int, environment: str) -> str:
    version = await conn.fetchval(
        """SELECT coalesce(e.version, p.version, '') FROM plugins p
             LEFT JOIN plugin_environments e
               ON e.plugin_id = p.id AND e.tenant_id = p.tenant_id AND e.environment = $2
            WHERE p.id = $1""",
        plugin,
        environment,
    )
    return str(version or "")


async def import_report(
    conn: asyncpg.Connection,
    *,
    tenant_id: str,
    actor: Actor,
    now: datetime,
    plugin_name: str,
    environment: str,
    report_format: ReportFormat,
    document: Any,
) -> SyncResult:
    """Import a scanner report (its findings replace that scanner's earlier ones) or a
    CycloneDX VEX (its statements are kept and applied to every scanner's findings)."""
    check_environment(environment)
    plugin = await plugin_id(conn, plugin_name)
    try:
        if report_format is ReportFormat.CYCLONEDX_VEX:
            statements = parse_vex(document)
            findings: list[Finding] = []
        else:
            findings = parse_findings(report_format, document)
    except ReportError as exc:
        raise InvalidError(exc.message, field=exc.field) from None
    if report_format is ReportFormat.CYCLONEDX_VEX:
        for s in statements:
            await conn.execute(
                """INSERT INTO plugin_vex_statements (tenant_id, plugin_id, environment,
                       vulnerability_id, package_name, state, justification, detail,
                       recorded_at, recorded_by)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
                   ON CONFLICT (tenant_id, plugin_id, environment, vulnerability_id,
                                package_name) DO UPDATE
                      SET state = EXCLUDED.state, justification = EXCLUDED.justification,
                          detail = EXCLUDED.detail, recorded_at = EXCLUDED.recorded_at,
                          recorded_by = EXCLUDED.recorded_by""",
                tenant_id,
                plugin,
                environment,
                s.vulnerability_id,
                s.package_name or "",
                s.state,
                s.justification,
                (s.detail or None) and s.detail[:4000],
                now,
                actor.name,
            )
        suppressed = await apply_vex(conn, plugin, environment, now=now)
        result = SyncResult(str(report_format), len(statements), 0, 0, suppressed)
    else:
        result = await sync_findings(
            conn,
            tenant_id=tenant_id,
            plugin=plugin,
            plugin_version=await _plugin_version(conn, plugin, environment),
            environment=environment,
            scanner=str(report_format),
            findings=findings,
            now=now,
        )
    await audit.append(
        conn,
        tenant_id=tenant_id,
        actor=actor,
        action="vulnerability.import",
        entity_type="vulnerability_report",
        entity_id=str(report_format),
        plugin_id=plugin,
        plugin_name=plugin_name,
        environment=environment,
        occurred_at=now,
        details=result_details(result),
    )
    return result


def result_details(result: SyncResult) -> dict[str, Any]:
    return {
        "scanner": result.scanner,
        "findings": result.findings,
        "opened": result.opened,
        "fixed": result.fixed,
        "suppressed": result.suppressed,
    }


async def list_findings(
    conn: asyncpg.Connection,
    plugin_name: str,
    *,
    environment: str | None = None,
    status: str | None = None,
    severity: str | None = None,
    limit: int = 1000,
) -> list[VulnerabilityFinding]:
    plugin = await plugin_id(conn, plugin_name)
    rows = await conn.fetch(
        _SELECT
        + """ WHERE v.plugin_id = $1 AND ($2::text IS NULL OR v.environment = $2)
                AND ($3::text IS NULL OR v.status = $3) AND ($4::text IS NULL OR v.severity = $4)
              ORDER BY CASE v.severity WHEN 'critical' THEN 0 WHEN 'high' THEN 1
                       WHEN 'medium' THEN 2 WHEN 'low' THEN 3 ELSE 4 END,
                       v.vulnerability_id, v.package_name, v.scanner
              LIMIT $5""",
        plugin,
        environment,
        status,
        severity,
        limit,
    )
    return [_finding(r) for r in rows]


async def get_finding(conn: asyncpg.Connection, finding_id: int) -> VulnerabilityFinding:
    row = await conn.fetchrow(_SELECT + " WHERE v.id = $1", finding_id)
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
    before = await get_finding(conn, finding_id)
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
    after = await get_finding(conn, finding_id)
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
        finding = await get_finding(conn, int(r["id"]))
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
