"""Plugins' CycloneDX SBOMs and their offline scans: storing an SBOM, matching stored SBOMs
against the OSV advisory database (``vulnerability_db``), and the database loaded once per
change of its files. The findings then follow registry.vulnerabilities' lifecycle."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg

from pluginmon.registry import audit, osv
from pluginmon.registry.actor import Actor
from pluginmon.registry.errors import InvalidError
from pluginmon.registry.plugins import check_environment, plugin_id
from pluginmon.registry.scan_reports import Finding, ReportError, Sbom, parse_sbom
from pluginmon.registry.vulnerability_imports import (
    OFFLINE_SCANNER,
    SyncResult,
    result_details,
    sync_findings,
)


@dataclass(frozen=True, slots=True)
class SbomInfo:
    plugin: str
    environment: str
    sha256: str
    component_count: int
    skipped_components: int
    subject_version: str | None
    uploaded_at: datetime


def _prepare_sbom(
    document: Mapping[str, Any],
) -> tuple[Sbom, str, str, list[dict[str, str | None]]]:
    """The parsed SBOM, its canonical text, that text's SHA-256 and its components' rows."""
    try:
        sbom: Sbom = parse_sbom(document)
    except ReportError as exc:
        raise InvalidError(exc.message, field=exc.field) from None
    text = json.dumps(document, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(text.encode()).hexdigest()
    components: list[dict[str, str | None]] = [
        {"ecosystem": c.ecosystem, "name": c.name, "version": c.version, "purl": c.purl}
        for c in sbom.components
    ]
    return sbom, text, digest, components


async def put_sbom(
    conn: asyncpg.Connection,
    *,
    tenant_id: str,
    actor: Actor,
    now: datetime,
    plugin_name: str,
    environment: str,
    document: Mapping[str, Any],
) -> SbomInfo:
    """Store the plugin's CycloneDX SBOM for ``environment``; the next scan matches it."""
    check_environment(environment)
    plugin = await plugin_id(conn, plugin_name)
    # An SBOM may be tens of MiB (api.max_document_bytes): parsed, serialised and hashed in
    # a thread, off the event loop.
    sbom, text, digest, components = await asyncio.to_thread(_prepare_sbom, document)
    previous = await conn.fetchval(
        "SELECT sha256 FROM plugin_sboms WHERE plugin_id = $1 AND environment = $2",
        plugin,
        environment,
    )
    await conn.execute(
        """INSERT INTO plugin_sboms (tenant_id, plugin_id, environment, document, sha256,
               components, component_count, subject_version, uploaded_at, uploaded_by)
           VALUES ($1, $2, $3, $4::jsonb, $5, $6::jsonb, $7, $8, $9, $10)
           ON CONFLICT (tenant_id, plugin_id, environment) DO UPDATE
              SET document = EXCLUDED.document, sha256 = EXCLUDED.sha256,
                  components = EXCLUDED.components, component_count = EXCLUDED.component_count,
                  subject_version = EXCLUDED.subject_version,
                  uploaded_at = EXCLUDED.uploaded_at, uploaded_by = EXCLUDED.uploaded_by,
                  scanned_at = NULL, scanned_db_digest = NULL""",
        tenant_id,
        plugin,
        environment,
        text,
        digest,
        json.dumps(components),
        len(components),
        sbom.subject_version,
        now,
        actor.name,
    )
    await audit.append(
        conn,
        tenant_id=tenant_id,
        actor=actor,
        action="sbom.put",
        entity_type="sbom",
        entity_id=f"{plugin_name}/{environment}",
        plugin_id=plugin,
        plugin_name=plugin_name,
        environment=environment,
        occurred_at=now,
        before=None if previous is None else {"sha256": previous},
        after={"sha256": digest, "components": len(components)},
        details={"skipped_components": sbom.skipped},
    )
    return SbomInfo(
        plugin=plugin_name,
        environment=environment,
        sha256=digest,
        component_count=len(components),
        skipped_components=sbom.skipped,
        subject_version=sbom.subject_version,
        uploaded_at=now,
    )


def match_findings(index: osv.AdvisoryIndex, components: Sequence[osv.Component]) -> list[Finding]:
    """The offline matcher's findings for ``components`` (pure)."""
    return [
        Finding(
            vulnerability_id=m.advisory.id,
            package_name=m.component.name,
            package_version=m.component.version,
            ecosystem=m.component.ecosystem,
            severity=m.advisory.severity,
            cvss_score=m.advisory.cvss_score,
            cvss_vector=m.advisory.cvss_vector,
            title=m.advisory.summary,
            description=m.advisory.details,
            fixed_version=next(iter(osv.fixed_versions(m.affected)), None),
            affected_range=osv.affected_text(m.affected) or None,
            aliases=m.advisory.aliases,
        )
        for m in index.match(components)
    ]


@dataclass(frozen=True, slots=True)
class ScanResult:
    plugin: str
    environment: str
    sync: SyncResult


# The SBOMs of one tenant still to match, locked (SKIP LOCKED: two runs share the work).
_SCAN_CLAIM = """
SELECT s.id, s.tenant_id, s.plugin_id, p.name, s.environment, s.components,
       coalesce(s.subject_version, e.version, p.version, '') AS plugin_version
  FROM plugin_sboms s JOIN plugins p ON p.id = s.plugin_id AND p.tenant_id = s.tenant_id
  LEFT JOIN plugin_environments e
    ON e.plugin_id = s.plugin_id AND e.tenant_id = s.tenant_id
   AND e.environment = s.environment
 WHERE ($1::bigint IS NULL OR s.plugin_id = $1)
   AND ($2 OR s.scanned_db_digest IS DISTINCT FROM $3)
   AND s.tenant_id = $4
 ORDER BY s.id
   FOR UPDATE OF s SKIP LOCKED
"""


async def scan_sboms(
    conn: asyncpg.Connection,
    *,
    index: osv.AdvisoryIndex,
    digest: str,
    now: datetime,
    actor: Actor,
    plugin_name: str | None = None,
    force: bool = False,
) -> list[ScanResult]:
    """Match the stored SBOMs (one plugin's, or all visible) against ``index``: only those not
    yet matched against this database ``digest`` unless ``force``."""
    plugin = None if plugin_name is None else await plugin_id(conn, plugin_name)
    # Tenant by tenant: Citus locks rows only within one shard group (the same rows, in a
    # few more statements, on the other backends). The tenants are read without a lock.
    tenants = await conn.fetch(
        """SELECT DISTINCT tenant_id FROM plugin_sboms
            WHERE ($1::bigint IS NULL OR plugin_id = $1)
              AND ($2 OR scanned_db_digest IS DISTINCT FROM $3)""",
        plugin,
        force,
        digest,
    )
    rows: list[asyncpg.Record] = []
    for tenant in sorted(t["tenant_id"] for t in tenants):
        rows.extend(await conn.fetch(_SCAN_CLAIM, plugin, force, digest, tenant))
    results = []
    for r in rows:
        components = [osv.Component(**c) for c in json.loads(r["components"])]
        findings = match_findings(index, components)
        sync = await sync_findings(
            conn,
            tenant_id=r["tenant_id"],
            plugin=int(r["plugin_id"]),
            plugin_version=r["plugin_version"],
            environment=r["environment"],
            scanner=OFFLINE_SCANNER,
            findings=findings,
            now=now,
        )
        await conn.execute(
            "UPDATE plugin_sboms SET scanned_at = $2, scanned_db_digest = $3"
            " WHERE id = $1 AND tenant_id = $4",
            r["id"],
            now,
            digest,
            r["tenant_id"],
        )
        await audit.append(
            conn,
            tenant_id=r["tenant_id"],
            actor=actor,
            action="vulnerability.scan",
            entity_type="sbom",
            entity_id=f"{r['name']}/{r['environment']}",
            plugin_id=int(r["plugin_id"]),
            plugin_name=r["name"],
            environment=r["environment"],
            occurred_at=now,
            details={**result_details(sync), "database": digest[:16]},
        )
        results.append(ScanResult(plugin=r["name"], environment=r["environment"], sync=sync))
    return results


# --- the advisory database ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DatabaseSnapshot:
    digest: str
    index: osv.AdvisoryIndex


class VulnerabilityDatabase:
    """The ``vulnerability_db`` directory or zip, loaded once per change of its digest (file
    reads in a thread: the event loop never waits on them)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._loaded: DatabaseSnapshot | None = None
        self._lock = asyncio.Lock()

    async def current(self) -> DatabaseSnapshot:
        async with self._lock:
            digest = await asyncio.to_thread(osv.database_digest, self.path)
            if self._loaded is None or self._loaded.digest != digest:
                index = await asyncio.to_thread(osv.load_database, self.path)
                self._loaded = DatabaseSnapshot(digest=digest, index=index)
            return self._loaded
