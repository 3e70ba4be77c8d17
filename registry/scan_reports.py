"""Reading scanner reports and CycloneDX documents into findings, VEX statements and SBOM
components: OSV-Scanner JSON, Trivy JSON, Grype JSON, CycloneDX VEX and CycloneDX SBOMs.

Pure: a parsed JSON document in, frozen dataclasses out. A document that is not of the named
format raises :class:`ReportError` naming the path of the field that is missing or wrong.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

from pluginmon.registry import osv
from pluginmon.registry.cvss import (
    CvssError,
    Severity,
    base_score,
    severity_of_label,
    severity_of_score,
)


class ReportFormat(StrEnum):
    OSV_SCANNER = "osv-scanner"
    TRIVY = "trivy"
    GRYPE = "grype"
    CYCLONEDX_VEX = "cyclonedx-vex"


class ReportError(ValueError):
    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


@dataclass(frozen=True, slots=True)
class Finding:
    """One vulnerability in one package, as a scanner (or the offline matcher) saw it."""

    vulnerability_id: str
    package_name: str
    package_version: str
    ecosystem: str | None
    severity: Severity
    cvss_score: float | None
    cvss_vector: str | None
    title: str | None
    description: str | None
    fixed_version: str | None
    affected_range: str | None = None
    aliases: tuple[str, ...] = ()


# CycloneDX analysis states that say the finding does not apply (suppressed) or is dealt with.
SUPPRESSING_STATES: Final = frozenset({"not_affected", "false_positive"})
RESOLVING_STATES: Final = frozenset({"resolved", "resolved_with_pedigree"})
VEX_STATES: Final = frozenset(
    {
        "resolved",
        "resolved_with_pedigree",
        "exploitable",
        "in_triage",
        "false_positive",
        "not_affected",
    }
)


@dataclass(frozen=True, slots=True)
class VexStatement:
    """A CycloneDX ``vulnerabilities[]`` analysis: ``package_name`` None means every package."""

    vulnerability_id: str
    package_name: str | None
    state: str
    justification: str | None
    detail: str | None


@dataclass(frozen=True, slots=True)
class Sbom:
    components: tuple[osv.Component, ...]
    # metadata.component.version: the version of the plugin the SBOM describes, when given.
    subject_version: str | None
    skipped: int  # components without a purl of a known ecosystem or without a version


def _obj(value: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ReportError(f"{path} must be a JSON object", field=path)
    return value


def _list(value: Any, path: str, *, required: bool = True) -> Sequence[Any]:
    if value is None and not required:
        return ()
    if not isinstance(value, list):
        raise ReportError(f"{path} must be a JSON array", field=path)
    return value


def _str(value: Any, path: str) -> str:
    if not isinstance(value, str) or not value:
        raise ReportError(f"{path} must be a non-empty string", field=path)
    return value


def _opt_obj(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _opt_str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _from_vector(vector: Any) -> tuple[Severity, float, str] | None:
    if not isinstance(vector, str):
        return None
    try:
        s = base_score(vector)
    except CvssError:
        return None
    return s.severity, s.base_score, s.vector


def _best(
    candidates: Sequence[tuple[Severity, float, str] | None],
) -> tuple[Severity, float, str] | None:
    found = [c for c in candidates if c is not None]
    return max(found, key=lambda c: c[1]) if found else None


# --- OSV-Scanner ------------------------------------------------------------------------------


def _osv_scanner(doc: Mapping[str, Any]) -> Iterator[Finding]:
    for i, result in enumerate(_list(doc.get("results"), "results")):
        result = _obj(result, f"results[{i}]")
        for j, pkg in enumerate(_list(result.get("packages"), f"results[{i}].packages")):
            where = f"results[{i}].packages[{j}]"
            pkg = _obj(pkg, where)
            package = _obj(pkg.get("package"), f"{where}.package")
            name = _str(package.get("name"), f"{where}.package.name")
            version = _str(package.get("version"), f"{where}.package.version")
            ecosystem = _opt_str(package.get("ecosystem"))
            # groups[].max_severity is the scanner's CVSS score for aliases of one issue.
            group_score: dict[str, float] = {}
            for group in _list(pkg.get("groups"), f"{where}.groups", required=False):
                if isinstance(group, Mapping):
                    try:
                        group_value = float(group.get("max_severity") or "")
                    except ValueError:
                        continue
                    for gid in group.get("ids") or []:
                        group_score[str(gid)] = group_value
            for k, vuln in enumerate(_list(pkg.get("vulnerabilities"), f"{where}.vulnerabilities")):
                try:
                    advisory = osv.parse_advisory(_obj(vuln, f"{where}.vulnerabilities[{k}]"))
                except ValueError as exc:
                    raise ReportError(
                        f"{where}.vulnerabilities[{k}]: {exc}",
                        field=f"{where}.vulnerabilities[{k}].id",
                    ) from None
                severity, score = advisory.severity, advisory.cvss_score
                if score is None and advisory.id in group_score:
                    score = group_score[advisory.id]
                    severity = severity_of_score_or(score, severity)
                fixed = next(
                    (
                        v
                        for a in advisory.affected
                        for v in osv.fixed_versions(a)
                        if osv.normalize_name(a.ecosystem, a.name)
                        == osv.normalize_name(ecosystem or "", name)
                    ),
                    None,
                )
                yield Finding(
                    vulnerability_id=advisory.id,
                    package_name=name,
                    package_version=version,
                    ecosystem=ecosystem,
                    severity=severity,
                    cvss_score=score,
                    cvss_vector=advisory.cvss_vector,
                    title=advisory.summary,
                    description=advisory.details,
                    fixed_version=fixed,
                    aliases=advisory.aliases,
                )


def severity_of_score_or(score: float, fallback: Severity) -> Severity:
    return severity_of_score(score) if 0.0 <= score <= 10.0 else fallback


# --- Trivy ---------------------------------------------------------------------------------------


def _trivy(doc: Mapping[str, Any]) -> Iterator[Finding]:
    for i, result in enumerate(_list(doc.get("Results"), "Results")):
        result = _obj(result, f"Results[{i}]")
        ecosystem = _opt_str(result.get("Type"))
        vulns = _list(
            result.get("Vulnerabilities"), f"Results[{i}].Vulnerabilities", required=False
        )
        for j, v in enumerate(vulns):
            where = f"Results[{i}].Vulnerabilities[{j}]"
            v = _obj(v, where)
            cvss = _opt_obj(v.get("CVSS"))
            best = _best(
                [
                    _from_vector(src.get("V3Vector"))
                    for src in cvss.values()
                    if isinstance(src, Mapping)
                ]
            )
            yield Finding(
                vulnerability_id=_str(v.get("VulnerabilityID"), f"{where}.VulnerabilityID"),
                package_name=_str(v.get("PkgName"), f"{where}.PkgName"),
                package_version=_str(v.get("InstalledVersion"), f"{where}.InstalledVersion"),
                ecosystem=ecosystem,
                severity=best[0] if best else severity_of_label(v.get("Severity")),
                cvss_score=best[1] if best else None,
                cvss_vector=best[2] if best else None,
                title=_opt_str(v.get("Title")),
                description=_opt_str(v.get("Description")),
                fixed_version=_opt_str(v.get("FixedVersion")),
            )


# --- Grype ---------------------------------------------------------------------------------------


def _grype(doc: Mapping[str, Any]) -> Iterator[Finding]:
    for i, match in enumerate(_list(doc.get("matches"), "matches")):
        where = f"matches[{i}]"
        match = _obj(match, where)
        vuln = _obj(match.get("vulnerability"), f"{where}.vulnerability")
        artifact = _obj(match.get("artifact"), f"{where}.artifact")
        cvss = [
            _from_vector(c.get("vector"))
            for c in _list(vuln.get("cvss"), f"{where}.vulnerability.cvss", required=False)
            if isinstance(c, Mapping)
        ]
        best = _best(cvss)
        fix = _opt_obj(vuln.get("fix"))
        fixed = [str(x) for x in fix.get("versions") or []]
        related = _list(
            match.get("relatedVulnerabilities"), f"{where}.relatedVulnerabilities", required=False
        )
        aliases = tuple(str(r["id"]) for r in related if isinstance(r, Mapping) and r.get("id"))
        yield Finding(
            vulnerability_id=_str(vuln.get("id"), f"{where}.vulnerability.id"),
            package_name=_str(artifact.get("name"), f"{where}.artifact.name"),
            package_version=_str(artifact.get("version"), f"{where}.artifact.version"),
            ecosystem=_opt_str(artifact.get("type")),
            severity=best[0] if best else severity_of_label(vuln.get("severity")),
            cvss_score=best[1] if best else None,
            cvss_vector=best[2] if best else None,
            title=None,
            description=_opt_str(vuln.get("description")),
            fixed_version=fixed[0] if fixed else None,
            aliases=aliases,
        )


def parse_findings(report_format: ReportFormat, doc: Any) -> list[Finding]:
    """The findings of a scanner report (not VEX: see :func:`parse_vex`)."""
    doc = _obj(doc, "the report")
    parsers = {
        ReportFormat.OSV_SCANNER: _osv_scanner,
        ReportFormat.TRIVY: _trivy,
        ReportFormat.GRYPE: _grype,
    }
    return list(parsers[report_format](doc))


# --- CycloneDX ------------------------------------------------------------------------------------


def _check_cyclonedx(doc: Mapping[str, Any]) -> None:
    if doc.get("bomFormat") != "CycloneDX":
        raise ReportError("bomFormat must be 'CycloneDX'", field="bomFormat")


def _walk_components(items: Sequence[Any], path: str) -> Iterator[tuple[str, Mapping[str, Any]]]:
    for i, c in enumerate(items):
        where = f"{path}[{i}]"
        c = _obj(c, where)
        yield where, c
        yield from _walk_components(
            _list(c.get("components"), f"{where}.components", required=False),
            f"{where}.components",
        )


def parse_sbom(doc: Any) -> Sbom:
    """A CycloneDX SBOM's packages (nested components included), by purl."""
    doc = _obj(doc, "the SBOM")
    _check_cyclonedx(doc)
    components: list[osv.Component] = []
    skipped = 0
    seen: set[tuple[str, str, str]] = set()
    for _where, c in _walk_components(
        _list(doc.get("components"), "components", required=False), "components"
    ):
        purl = _opt_str(c.get("purl"))
        found = osv.component_of_purl(purl, version=_opt_str(c.get("version"))) if purl else None
        if found is None:
            skipped += 1
            continue
        key = (found.ecosystem, found.name, found.version)
        if key not in seen:
            seen.add(key)
            components.append(found)
    subject = _opt_obj(_opt_obj(doc.get("metadata")).get("component"))
    return Sbom(
        components=tuple(components),
        subject_version=_opt_str(subject.get("version")),
        skipped=skipped,
    )


def _package_of_ref(ref: str, refs: Mapping[str, str]) -> str | None:
    """The package an ``affects[].ref`` names: a component's bom-ref, a purl, or a BOM-Link
    ending in ``#<bom-ref or purl>``."""
    target = refs.get(ref, ref)
    if "#" in target and not target.startswith("pkg:"):
        target = refs.get(target.rsplit("#", 1)[1], target.rsplit("#", 1)[1])
    component = osv.component_of_purl(target, version="*") if target.startswith("pkg:") else None
    return component.name if component is not None else None


def parse_vex(doc: Any) -> list[VexStatement]:
    """The analyses of a CycloneDX VEX (or a BOM with ``vulnerabilities``)."""
    doc = _obj(doc, "the VEX document")
    _check_cyclonedx(doc)
    refs: dict[str, str] = {}
    for _where, c in _walk_components(
        _list(doc.get("components"), "components", required=False), "components"
    ):
        if isinstance(c.get("bom-ref"), str) and isinstance(c.get("purl"), str):
            refs[c["bom-ref"]] = c["purl"]
    statements: list[VexStatement] = []
    for i, v in enumerate(_list(doc.get("vulnerabilities"), "vulnerabilities")):
        where = f"vulnerabilities[{i}]"
        v = _obj(v, where)
        vid = _str(v.get("id"), f"{where}.id")
        analysis = _obj(v.get("analysis"), f"{where}.analysis")
        state = _str(analysis.get("state"), f"{where}.analysis.state")
        if state not in VEX_STATES:
            raise ReportError(
                f"{where}.analysis.state must be one of {', '.join(sorted(VEX_STATES))}",
                field=f"{where}.analysis.state",
            )
        packages: list[str | None] = []
        for j, a in enumerate(_list(v.get("affects"), f"{where}.affects", required=False)):
            a = _obj(a, f"{where}.affects[{j}]")
            ref = _str(a.get("ref"), f"{where}.affects[{j}].ref")
            packages.append(_package_of_ref(ref, refs))
        for package in packages or [None]:
            statements.append(
                VexStatement(
                    vulnerability_id=vid,
                    package_name=package,
                    state=state,
                    justification=_opt_str(analysis.get("justification")),
                    detail=_opt_str(analysis.get("detail")),
                )
            )
    return statements
