"""The /api/v1 endpoints of vulnerability tracking: SBOM upload, scanner report and VEX
import, the findings of a plugin, and accepting a finding. Glue only: registry.vulnerabilities
decides."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Final, Literal

from pydantic import AwareDatetime, ConfigDict, Field

from pluginmon.daemon.api_http import Call, Route
from pluginmon.daemon.api_models import ENVIRONMENT_PATTERN, Items, Query, Request, Response
from pluginmon.registry import sboms, vulnerabilities, vulnerability_imports
from pluginmon.registry.scan_reports import ReportFormat
from pluginmon.registry.tokens import Role
from pluginmon.registry.vulnerabilities import MAX_REASON_CHARS

# SBOMs and scanner reports ([api] max_document_bytes): real CycloneDX SBOMs pass the 1 MiB
# of every other JSON body.
DEFAULT_MAX_DOCUMENT_BYTES: Final = 32 * 1024 * 1024
_DOCUMENT_LIMIT_NOTE: Final = (
    "The body may be up to [api] max_document_bytes (32 MiB by default), not max_body_bytes; "
    "larger bodies get 413 body_too_large."
)

FindingStatus = Literal[
    "open", "acknowledged", "mitigated", "fixed", "false_positive", "accepted", "suppressed"
]
FindingSeverity = Literal["unknown", "low", "medium", "high", "critical"]
ImportFormat = Literal["osv-scanner", "trivy", "grype", "cyclonedx-vex"]


class JsonDocument(Request):
    """A whole JSON document (a CycloneDX SBOM or VEX, a scanner's report): its shape is the
    format's, checked by the registry, which names the field that is wrong."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)

    def document(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class EnvironmentQuery(Query):
    environment: str = Field(default="production", pattern=ENVIRONMENT_PATTERN)


class ImportQuery(EnvironmentQuery):
    format: ImportFormat


class FindingListQuery(Query):
    environment: str | None = Field(default=None, pattern=ENVIRONMENT_PATTERN)
    status: FindingStatus | None = None
    severity: FindingSeverity | None = None


class AcceptRequest(Request):
    reason: str = Field(min_length=1, max_length=MAX_REASON_CHARS)
    until: AwareDatetime


class SbomOut(Response):
    plugin: str
    environment: str
    sha256: str
    component_count: int
    skipped_components: int
    subject_version: str | None
    uploaded_at: datetime

    @classmethod
    def of(cls, s: sboms.SbomInfo) -> SbomOut:
        return cls(
            plugin=s.plugin,
            environment=s.environment,
            sha256=s.sha256,
            component_count=s.component_count,
            skipped_components=s.skipped_components,
            subject_version=s.subject_version,
            uploaded_at=s.uploaded_at,
        )


class ImportOut(Response):
    format: str
    findings: int
    opened: int
    fixed: int
    suppressed: int

    @classmethod
    def of(cls, r: vulnerability_imports.SyncResult) -> ImportOut:
        return cls(
            format=r.scanner,
            findings=r.findings,
            opened=r.opened,
            fixed=r.fixed,
            suppressed=r.suppressed,
        )


class VulnerabilityOut(Response):
    id: int
    plugin: str
    environment: str
    vulnerability_id: str
    aliases: list[str]
    package_name: str
    package_version: str | None
    ecosystem: str | None
    severity: FindingSeverity
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

    @classmethod
    def of(cls, f: vulnerabilities.VulnerabilityFinding) -> VulnerabilityOut:
        values = {name: getattr(f, name) for name in cls.model_fields}
        values["aliases"] = list(f.aliases)
        return cls.model_validate(values)


async def put_sbom(call: Call) -> SbomOut:
    body: JsonDocument = call.body
    query: EnvironmentQuery = call.query
    info = await sboms.put_sbom(
        call.conn,
        tenant_id=call.tenant_id,
        actor=call.actor,
        now=call.now,
        plugin_name=call.params["name"],
        environment=query.environment,
        document=body.document(),
    )
    return SbomOut.of(info)


async def import_report(call: Call) -> ImportOut:
    body: JsonDocument = call.body
    query: ImportQuery = call.query
    result = await vulnerability_imports.import_report(
        call.conn,
        tenant_id=call.tenant_id,
        actor=call.actor,
        now=call.now,
        plugin_name=call.params["name"],
        environment=query.environment,
        report_format=ReportFormat(query.format),
        document=body.document(),
    )
    return ImportOut.of(result)


async def list_findings(call: Call) -> Items[VulnerabilityOut]:
    query: FindingListQuery = call.query
    # Read-only: an acceptance past its expiry reads as open (the maintenance job writes
    # that down, audited).
    found = await vulnerabilities.list_findings(
        call.conn,
        call.params["name"],
        now=call.now,
        environment=query.environment,
        status=query.status,
        severity=query.severity,
        limit=query.limit,
    )
    return Items[VulnerabilityOut](items=[VulnerabilityOut.of(f) for f in found])


async def get_finding(call: Call) -> VulnerabilityOut:
    return VulnerabilityOut.of(
        await vulnerabilities.get_finding(call.conn, call.param_int("id"), now=call.now)
    )


async def accept_finding(call: Call) -> VulnerabilityOut:
    body: AcceptRequest = call.body
    # A write anyway: an expired acceptance is written down (audited) before the new one.
    await vulnerabilities.expire_acceptances(call.conn, now=call.now)
    finding = await vulnerabilities.accept(
        call.conn,
        call.param_int("id"),
        tenant_id=call.tenant_id,
        actor=call.actor,
        now=call.now,
        reason=body.reason,
        until=body.until,
    )
    return VulnerabilityOut.of(finding)


def vulnerability_routes(*, max_document_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES) -> list[Route]:
    """``max_document_bytes``: the body limit of the SBOM and report routes (413 past it)."""
    body_errors = (400, 404, 413, 422)

    def document_limit() -> int:
        return max_document_bytes

    # fmt: off
    return [
        Route("PUT", "/plugins/{name}/sbom",
              "Store the plugin's CycloneDX SBOM for an environment (matched offline against "
              "the OSV database by the maintenance job and `pluginmon vulns scan`)", SbomOut,
              put_sbom, role=Role.WRITER, body=JsonDocument, query=EnvironmentQuery,
              tag="vulnerabilities", errors=body_errors, max_body_bytes=document_limit,
              description=_DOCUMENT_LIMIT_NOTE),
        Route("POST", "/plugins/{name}/vulnerabilities/import",
              "Import an OSV-Scanner, Trivy or Grype JSON report (replaces that scanner's "
              "findings) or a CycloneDX VEX (suppresses not_affected, closes resolved)",
              ImportOut, import_report, role=Role.WRITER, body=JsonDocument, query=ImportQuery,
              tag="vulnerabilities", errors=body_errors, max_body_bytes=document_limit,
              description=_DOCUMENT_LIMIT_NOTE),
        Route("GET", "/plugins/{name}/vulnerabilities", "List a plugin's vulnerability findings",
              Items[VulnerabilityOut], list_findings, query=FindingListQuery,
              tag="vulnerabilities", errors=(404, 422)),
        Route("GET", r"/vulnerabilities/{id:\d+}", "Read a vulnerability finding",
              VulnerabilityOut, get_finding, tag="vulnerabilities", errors=(404,)),
        Route("POST", r"/vulnerabilities/{id:\d+}/accept",
              "Accept an open finding's risk until a time (it opens again then)",
              VulnerabilityOut, accept_finding, role=Role.ADMIN, body=AcceptRequest,
              tag="vulnerabilities", errors=(400, 404, 409, 413, 422)),
    ]
    # fmt: on
