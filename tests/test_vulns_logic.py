"""Pure logic of vulnerability tracking: CVSS v3.1 base scores, OSV range evaluation, offline
matching of an SBOM against an advisory database (directory and zips, as osv.dev publishes
them), and each report format's parser against fixtures in the documented shapes."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from pluginmon.alerts.health import VULNERABILITIES_CRITICAL, HealthSettings, score_health
from pluginmon.collectors.models import PluginKey, PluginSample
from pluginmon.registry import osv
from pluginmon.registry.cvss import CvssError, Severity, base_score
from pluginmon.registry.sboms import match_findings
from pluginmon.registry.scan_reports import (
    ReportError,
    ReportFormat,
    parse_findings,
    parse_sbom,
    parse_vex,
)
from tests.vulns_helpers import load, write_osv_database


@pytest.mark.parametrize(
    ("vector", "score", "severity"),
    [
        ("CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H", 9.8, Severity.CRITICAL),
        ("CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:C/C:H/I:H/A:H", 10.0, Severity.CRITICAL),
        ("CVSS:3.1/AV:N/AC:L/PR:H/UI:N/S:U/C:H/I:H/A:H", 7.2, Severity.HIGH),
        ("CVSS:3.1/AV:N/AC:L/PR:N/UI:R/S:C/C:L/I:L/A:N", 6.1, Severity.MEDIUM),
        ("CVSS:3.1/AV:N/AC:L/PR:N/UI:R/S:U/C:L/I:L/A:N", 5.4, Severity.MEDIUM),
        ("CVSS:3.1/AV:L/AC:L/PR:L/UI:N/S:U/C:H/I:N/A:N", 5.5, Severity.MEDIUM),
        ("CVSS:3.1/AV:N/AC:H/PR:N/UI:N/S:U/C:H/I:N/A:N", 5.9, Severity.MEDIUM),
        ("CVSS:3.1/AV:P/AC:H/PR:H/UI:R/S:U/C:L/I:N/A:N", 1.6, Severity.LOW),
        ("CVSS:3.0/AV:N/AC:L/PR:L/UI:N/S:C/C:H/I:H/A:H", 9.9, Severity.CRITICAL),
        ("CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:N/I:N/A:N", 0.0, Severity.LOW),
    ],
)
def test_cvss_base_score_matches_the_specification(
    vector: str, score: float, severity: Severity
) -> None:
    result = base_score(vector)
    assert (result.base_score, result.severity) == (score, severity)


@pytest.mark.parametrize(
    ("vector", "names"),
    [
        ("AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H", "prefix"),
        ("CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H", "A"),
        ("CVSS:3.1/AV:X/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H", "AV:X"),
        ("CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:Q/C:H/I:H/A:H", "S must be"),
    ],
)
def test_cvss_rejects_bad_vectors_naming_the_part(vector: str, names: str) -> None:
    with pytest.raises(CvssError, match=names):
        base_score(vector)


def _range(kind: str, *events: tuple[str, str]) -> osv.VersionRange:
    return osv.VersionRange(kind, tuple(osv.Event(k, v) for k, v in events))


def test_ranges_fixed_is_exclusive_and_last_affected_inclusive() -> None:
    fixed = _range("SEMVER", ("introduced", "0"), ("fixed", "4.17.21"))
    assert osv.in_range("4.17.20", fixed, ecosystem="npm")
    assert not osv.in_range("4.17.21", fixed, ecosystem="npm")  # just outside
    assert not osv.in_range("4.17.22", fixed, ecosystem="npm")
    assert osv.in_range("4.17.21-rc.1", fixed, ecosystem="npm")  # a pre-release sorts before
    two = _range("SEMVER", ("introduced", "0"), ("fixed", "0.2.4"), ("introduced", "1.0.0"),
                 ("fixed", "1.2.6"))  # fmt: skip
    assert [osv.in_range(v, two, ecosystem="npm") for v in ("0.2.3", "0.2.4", "0.9.9", "1.0.0",
            "1.2.5", "1.2.6")] == [True, False, False, True, True, False]  # fmt: skip
    last = _range("ECOSYSTEM", ("introduced", "2.0"), ("last_affected", "2.31.0"))
    assert osv.in_range("2.31.0", last, ecosystem="PyPI")
    assert not osv.in_range("2.31.1", last, ecosystem="PyPI")
    assert not osv.in_range("1.9", last, ecosystem="PyPI")
    # PEP 440 ordering: 2.31.0rc1 < 2.31.0 < 2.31.0.post1
    assert osv.in_range("2.31.0rc1", last, ecosystem="PyPI")
    assert not osv.in_range("2.31.0.post1", last, ecosystem="PyPI")


def test_generic_versions_order_pre_and_post_releases() -> None:
    r = _range("ECOSYSTEM", ("introduced", "1.0"), ("fixed", "1.2.0"))
    assert osv.in_range("1.2.0.beta1", r, ecosystem="Maven")
    assert not osv.in_range("1.2.0.Final", r, ecosystem="Maven")
    assert not osv.in_range("1.10", r, ecosystem="Maven")  # numeric, not text, order
    assert osv.in_range("1.1.9", r, ecosystem="Maven")


def test_purls_map_to_osv_ecosystems_and_names() -> None:
    assert osv.component_of_purl("pkg:npm/%40types/node@20.1.0") == osv.Component(
        "npm", "@types/node", "20.1.0", "pkg:npm/%40types/node@20.1.0"
    )
    maven = osv.component_of_purl("pkg:maven/org.apache.logging.log4j/log4j-core@2.14.1?type=jar")
    assert maven is not None
    assert (maven.ecosystem, maven.name, maven.version) == (
        "Maven", "org.apache.logging.log4j:log4j-core", "2.14.1")  # fmt: skip
    assert osv.component_of_purl("pkg:generic/thing@1") is None
    assert osv.component_of_purl("pkg:npm/left-pad") is None  # no version


def test_sbom_matched_offline_against_zipped_database(tmp_path: Path) -> None:
    index = osv.load_database(write_osv_database(tmp_path / "osv"))
    assert index.advisories == 4  # the withdrawn one is left out
    sbom = parse_sbom(load("sbom.cdx.json"))
    assert sbom.subject_version == "2.4.0"
    assert sbom.skipped == 1  # the file component without a purl
    assert {(c.ecosystem, c.name) for c in sbom.components} >= {("npm", "@types/node")}
    found = {(f.vulnerability_id, f.package_name, f.package_version): f
             for f in match_findings(index, sbom.components)}  # fmt: skip
    assert set(found) == {
        ("GHSA-35jh-r3h4-6jhm", "lodash", "4.17.20"),
        ("GHSA-h5c8-rqwp-cp95", "jinja2", "3.1.2"),
        ("OSV-TEST-2026-0001", "requests", "2.31.0"),  # last_affected, name case-folded
    }  # minimist 1.2.6 is exactly the fixed version: just outside the range
    lodash = found[("GHSA-35jh-r3h4-6jhm", "lodash", "4.17.20")]
    assert (lodash.severity, lodash.cvss_score, lodash.fixed_version) == (Severity.HIGH, 7.2,
                                                                        "4.17.21")  # fmt: skip
    assert lodash.affected_range == ">=0 <4.17.21"
    assert lodash.aliases == ("CVE-2021-23337",)
    requests = found[("OSV-TEST-2026-0001", "requests", "2.31.0")]
    assert (requests.severity, requests.cvss_score) == (Severity.MEDIUM, None)  # the label
    # A loose JSON record in a directory is read too, and the digest follows the files.
    before = osv.database_digest(tmp_path / "osv")
    extra = dict(load("advisories/GHSA-xvch-5gv4-984h.json"), id="OSV-TEST-2026-0003")
    (tmp_path / "osv" / "extra.json").write_text(json.dumps(extra))
    assert osv.database_digest(tmp_path / "osv") != before
    assert osv.load_database(tmp_path / "osv").advisories == 5


def test_each_scanner_format_parses_to_findings() -> None:
    osv_findings = parse_findings(ReportFormat.OSV_SCANNER, load("osv-scanner.json"))
    assert [(f.vulnerability_id, f.package_name, f.package_version, f.severity, f.cvss_score,
             f.fixed_version) for f in osv_findings] == [
        ("GHSA-35jh-r3h4-6jhm", "lodash", "4.17.20", Severity.HIGH, 7.2, "4.17.21"),
        # no severity vector in the record: the group's max_severity score
        ("GHSA-xvch-5gv4-984h", "minimist", "1.2.5", Severity.CRITICAL, 9.8, "1.2.6"),
    ]  # fmt: skip
    trivy = parse_findings(ReportFormat.TRIVY, load("trivy.json"))
    assert [(f.vulnerability_id, f.package_name, f.severity, f.cvss_score, f.cvss_vector,
             f.fixed_version) for f in trivy] == [
        ("CVE-2021-23337", "lodash", Severity.HIGH, 7.2,
         "CVSS:3.1/AV:N/AC:L/PR:H/UI:N/S:U/C:H/I:H/A:H", "4.17.21"),
        ("CVE-2024-0001-TEST", "express", Severity.LOW, None, None, None),
    ]  # fmt: skip
    grype = parse_findings(ReportFormat.GRYPE, load("grype.json"))
    assert [(f.vulnerability_id, f.package_name, f.severity, f.cvss_score, f.fixed_version,
             f.aliases) for f in grype] == [
        ("GHSA-xvch-5gv4-984h", "minimist", Severity.CRITICAL, 9.8, "1.2.6", ("CVE-2021-44906",)),
        ("GHSA-35jh-r3h4-6jhm", "lodash", Severity.HIGH, None, "4.17.21", ("CVE-2021-23337",)),
    ]  # fmt: skip


def test_vex_statements_resolve_refs_to_packages() -> None:
    statements = parse_vex(load("vex.cdx.json"))
    assert [(s.vulnerability_id, s.package_name, s.state, s.justification) for s in statements] == [
        ("CVE-2021-44906", "minimist", "not_affected", "code_not_reachable"),
        ("GHSA-35jh-r3h4-6jhm", "lodash", "in_triage", None),
    ]


def test_malformed_reports_name_the_field() -> None:
    broken = load("trivy.json")
    del broken["Results"][0]["Vulnerabilities"][1]["PkgName"]
    with pytest.raises(ReportError) as caught:
        parse_findings(ReportFormat.TRIVY, broken)
    assert caught.value.field == "Results[0].Vulnerabilities[1].PkgName"
    with pytest.raises(ReportError) as caught:
        parse_findings(ReportFormat.GRYPE, {"results": []})
    assert caught.value.field == "matches"
    vex = load("vex.cdx.json")
    vex["vulnerabilities"][0]["analysis"]["state"] = "maybe"
    with pytest.raises(ReportError) as caught:
        parse_vex(vex)
    assert caught.value.field == "vulnerabilities[0].analysis.state"
    with pytest.raises(ReportError) as caught:
        parse_sbom({"bomFormat": "SPDX"})
    assert caught.value.field == "bomFormat"


def test_an_open_critical_caps_the_health_score() -> None:
    now = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    sample = PluginSample(
        key=PluginKey("acme", "resizer"), timestamp=now, up=True, cpu_percent=1.0,
        rss_bytes=1 << 20, vms_bytes=1 << 20, threads=1, process_count=1,
    )  # fmt: skip
    settings = HealthSettings()
    healthy = score_health(
        sample, settings=settings, now=now, metrics={VULNERABILITIES_CRITICAL: 0}
    )
    assert healthy.score == 100.0
    critical = score_health(
        sample, settings=settings, now=now, metrics={VULNERABILITIES_CRITICAL: 1}
    )
    assert critical.score == settings.vulnerability_critical_cap == 40.0
    component = critical.component("metric:" + VULNERABILITIES_CRITICAL)
    assert component is not None
    assert component.score == 0.0
