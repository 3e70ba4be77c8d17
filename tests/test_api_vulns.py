"""Vulnerability tracking through /api/v1, the registry job and `pluginmon vulns`, against a
real database and a real HTTP server: each import format, an SBOM matched offline (a version
just outside a fixed range), VEX suppression, acceptance with expiry, the health gauge, the
metric, and tenant isolation."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from pluginmon.alerts.health import VULNERABILITIES_CRITICAL
from pluginmon.daemon.api_wiring import registry_job
from pluginmon.registry.tokens import Role
from pluginmon.storage.queries import detect_tenant_scope
from tests.api_helpers import ApiHarness, api_server
from tests.daemon_helpers import run_cli
from tests.vulns_helpers import FIXTURES, load, write_osv_database

BASE = "/api/v1/plugins/resizer"


@pytest.fixture
async def api(migrated_db: str) -> AsyncIterator[ApiHarness]:
    async with api_server(migrated_db, max_body_bytes=1024 * 1024) as harness:
        for tenant in ("acme", "globex"):
            await harness.token(f"writer-{tenant}", tenant=tenant)
            await harness.token(f"reader-{tenant}", tenant=tenant, role=Role.READER)
            await harness.token(f"admin-{tenant}", tenant=tenant, role=Role.ADMIN)
            reply = await harness.call(
                "POST",
                "/api/v1/plugins",
                token=f"writer-{tenant}",
                body={"name": "resizer", "version": "2.4.0"},
            )
            assert reply.status == 201, reply.body
        yield harness


async def _import(api: ApiHarness, fmt: str, doc: Any, *, tenant: str = "acme") -> dict[str, Any]:
    reply = await api.call(
        "POST", f"{BASE}/vulnerabilities/import?format={fmt}", token=f"writer-{tenant}", body=doc
    )
    assert reply.status == 200, reply.body
    body: dict[str, Any] = reply.body
    return body


async def _findings(api: ApiHarness, query: str = "", *, tenant: str = "acme") -> list[Any]:
    reply = await api.call("GET", f"{BASE}/vulnerabilities{query}", token=f"reader-{tenant}")
    assert reply.status == 200, reply.body
    items: list[Any] = reply.body["items"]
    return items


def _key(items: list[Any]) -> set[tuple[str, str, str, str]]:
    return {(f["vulnerability_id"], f["package_name"], f["status"], f["scanner"]) for f in items}


async def test_each_import_format_records_findings_and_an_audit_entry(api: ApiHarness) -> None:
    assert await _import(api, "osv-scanner", load("osv-scanner.json")) == {
        "format": "osv-scanner", "findings": 2, "opened": 2, "fixed": 0, "suppressed": 0,
    }  # fmt: skip
    assert (await _import(api, "trivy", load("trivy.json")))["opened"] == 2
    assert (await _import(api, "grype", load("grype.json")))["opened"] == 2
    items = await _findings(api)
    assert _key(items) == {
        ("GHSA-35jh-r3h4-6jhm", "lodash", "open", "osv-scanner"),
        ("GHSA-xvch-5gv4-984h", "minimist", "open", "osv-scanner"),
        ("CVE-2021-23337", "lodash", "open", "trivy"),
        ("CVE-2024-0001-TEST", "express", "open", "trivy"),
        ("GHSA-xvch-5gv4-984h", "minimist", "open", "grype"),
        ("GHSA-35jh-r3h4-6jhm", "lodash", "open", "grype"),
    }
    # Critical first; the severity computed from the vector, the fix and the package version.
    first = items[0]
    assert (first["severity"], first["cvss_score"], first["fixed_version"]) == (
        "critical", 9.8, "1.2.6")  # fmt: skip
    trivy = next(f for f in items if f["scanner"] == "trivy" and f["package_name"] == "lodash")
    assert (trivy["severity"], trivy["cvss_score"], trivy["package_version"]) == (
        "high", 7.2, "4.17.20")  # fmt: skip
    assert trivy["cvss_vector"] == "CVSS:3.1/AV:N/AC:L/PR:H/UI:N/S:U/C:H/I:H/A:H"
    rows = await api.fetch(
        "SELECT actor, action, entity_id, details FROM audit_log "
        "WHERE action = 'vulnerability.import' ORDER BY id"
    )
    assert [(r["actor"], r["entity_id"]) for r in rows] == [
        ("writer-acme", "osv-scanner"), ("writer-acme", "trivy"), ("writer-acme", "grype")]  # fmt: skip
    assert json.loads(rows[0]["details"])["opened"] == 2


async def test_a_finding_no_longer_reported_is_fixed_and_a_regression_reopens(
    api: ApiHarness,
) -> None:
    report = load("grype.json")
    await _import(api, "grype", report)
    only_lodash = dict(report, matches=report["matches"][1:])
    api.clock.advance(60)
    assert (await _import(api, "grype", only_lodash))["fixed"] == 1
    by_package = {f["package_name"]: f for f in await _findings(api)}
    assert by_package["minimist"]["status"] == "fixed"
    assert by_package["minimist"]["resolved_at"] is not None
    assert by_package["lodash"]["status"] == "open"
    api.clock.advance(60)
    assert (await _import(api, "grype", report))["fixed"] == 0
    again = {f["package_name"]: f for f in await _findings(api)}
    assert (again["minimist"]["status"], again["minimist"]["resolved_at"]) == ("open", None)


async def test_vex_not_affected_suppresses_and_survives_a_reimport(api: ApiHarness) -> None:
    await _import(api, "grype", load("grype.json"))
    result = await _import(api, "cyclonedx-vex", load("vex.cdx.json"))
    assert (result["findings"], result["suppressed"]) == (2, 1)
    by_package = {f["package_name"]: f for f in await _findings(api)}
    # The statement names the CVE; the finding is the GHSA with that CVE as an alias.
    assert by_package["minimist"]["status"] == "suppressed"
    assert by_package["minimist"]["suppression"] == "vex:not_affected (code_not_reachable)"
    assert by_package["lodash"]["status"] == "open"  # in_triage changes nothing
    await _import(api, "grype", load("grype.json"))
    assert {f["package_name"]: f["status"] for f in await _findings(api)} == {
        "minimist": "suppressed", "lodash": "open"}  # fmt: skip
    # resolved closes a finding; a later exploitable statement opens it again.
    vex = load("vex.cdx.json")
    vex["vulnerabilities"][1]["analysis"] = {"state": "resolved"}
    await _import(api, "cyclonedx-vex", vex)
    assert {f["package_name"]: f["status"] for f in await _findings(api)}["lodash"] == "fixed"
    vex["vulnerabilities"][0]["analysis"] = {"state": "exploitable"}
    await _import(api, "cyclonedx-vex", vex)
    assert {f["package_name"]: f["status"] for f in await _findings(api)}["minimist"] == "open"


async def test_sbom_is_matched_offline_by_the_registry_job(api: ApiHarness, tmp_path: Path) -> None:
    db = write_osv_database(tmp_path / "osv")
    reply = await api.call("PUT", f"{BASE}/sbom", token="writer-acme", body=load("sbom.cdx.json"))
    assert reply.status == 200, reply.body
    assert (reply.body["component_count"], reply.body["skipped_components"]) == (6, 1)
    job = registry_job(lambda: api.pool, metrics=None, clock=api.clock, vulnerability_db=db)
    await job()
    items = await _findings(api)
    assert {(f["vulnerability_id"], f["package_name"], f["package_version"]) for f in items} == {
        ("GHSA-35jh-r3h4-6jhm", "lodash", "4.17.20"),
        ("GHSA-h5c8-rqwp-cp95", "jinja2", "3.1.2"),
        ("OSV-TEST-2026-0001", "requests", "2.31.0"),
    }  # minimist 1.2.6 is the first fixed version: not matched
    assert {f["scanner"] for f in items} == {"osv-offline"}
    lodash = next(f for f in items if f["package_name"] == "lodash")
    assert (lodash["severity"], lodash["cvss_score"], lodash["affected_range"]) == (
        "high", 7.2, ">=0 <4.17.21")  # fmt: skip
    (sbom,) = await api.fetch("SELECT scanned_at, scanned_db_digest FROM plugin_sboms")
    assert sbom["scanned_at"] == api.clock.now

    # Nothing changed: the next run scans nothing (no new audit entry).
    scans = "SELECT count(*) AS n FROM audit_log WHERE action = 'vulnerability.scan'"
    assert (await api.fetch(scans))[0]["n"] == 1
    await job()
    assert (await api.fetch(scans))[0]["n"] == 1

    # A new SBOM (lodash upgraded to the fixed version, minimist downgraded) is re-scanned.
    sbom_doc = load("sbom.cdx.json")
    sbom_doc["components"][0].update(version="4.17.21", purl="pkg:npm/lodash@4.17.21")
    sbom_doc["components"][1].update(version="1.2.5", purl="pkg:npm/minimist@1.2.5")
    api.clock.advance(60)
    reply = await api.call("PUT", f"{BASE}/sbom", token="writer-acme", body=sbom_doc)
    assert reply.status == 200, reply.body
    await job()
    status = {f["package_name"]: (f["status"], f["severity"]) for f in await _findings(api)}
    assert status["lodash"] == ("fixed", "high")
    assert status["minimist"] == ("open", "critical")

    # The critical gauge the health component and PluginVulnerabilityCritical read.
    gauge = await api.fetch(
        "SELECT value FROM plugin_metrics WHERE metric_name = $1 AND tenant_id = 'acme' "
        'ORDER BY "timestamp" DESC LIMIT 1',
        VULNERABILITIES_CRITICAL,
    )
    assert gauge[0]["value"] == 1.0

    # A changed database (a new advisory file) re-scans every SBOM.
    extra = dict(load("advisories/GHSA-35jh-r3h4-6jhm.json"), id="OSV-TEST-2026-0004")
    extra["affected"][0]["package"]["name"] = "express"
    extra["affected"][0]["ranges"][0]["events"] = [{"introduced": "4.0.0"}, {"fixed": "4.19.2"}]
    (db / "npm" / "OSV-TEST-2026-0004.json").write_text(json.dumps(extra))
    await job()
    assert "express" in {f["package_name"] for f in await _findings(api, "?status=open")}


async def test_accepted_finding_returns_to_open_at_expiry(api: ApiHarness) -> None:
    await _import(api, "grype", load("grype.json"))
    (minimist,) = [f for f in await _findings(api) if f["package_name"] == "minimist"]
    until = (api.clock.now + timedelta(hours=1)).isoformat()
    path = f"/api/v1/vulnerabilities/{minimist['id']}/accept"
    body = {"reason": "build-time only dependency", "until": until}
    assert (await api.call("POST", path, token="writer-acme", body=body)).status == 403
    missing = await api.call("POST", path, token="admin-acme", body={"until": until})
    assert (missing.status, missing.error["field"]) == (422, "reason")
    past = await api.call("POST", path, token="admin-acme", body={**body, "until": "2020-01-01T00:00:00Z"})  # fmt: skip
    assert (past.status, past.error["field"]) == (422, "until")
    accepted = await api.call("POST", path, token="admin-acme", body=body)
    assert accepted.status == 200, accepted.body
    assert (accepted.body["status"], accepted.body["accepted_by"], accepted.body["accepted_reason"]) == (
        "accepted", "admin-acme", "build-time only dependency")  # fmt: skip
    again = await api.call("POST", path, token="admin-acme", body=body)
    assert again.status == 409
    # A re-import keeps the acceptance.
    await _import(api, "grype", load("grype.json"))
    assert (await api.call("GET", f"/api/v1/vulnerabilities/{minimist['id']}", token="reader-acme")).body["status"] == "accepted"  # fmt: skip
    api.clock.advance(3601)
    reopened = await api.call("GET", f"/api/v1/vulnerabilities/{minimist['id']}", token="reader-acme")  # fmt: skip
    assert reopened.body["status"] == "open"
    # Reads are read-only: the status in effect is open, in the list and its filter too, but
    # nothing is written until the registry job runs.
    assert minimist["id"] in {f["id"] for f in await _findings(api, "?status=open")}
    assert minimist["id"] not in {f["id"] for f in await _findings(api, "?status=accepted")}
    stored = await api.fetch("SELECT status FROM plugin_vulnerabilities WHERE id = $1", minimist["id"])  # fmt: skip
    assert stored[0]["status"] == "accepted"
    assert [r["action"] for r in await api.fetch(
        "SELECT action FROM audit_log WHERE entity_type = 'vulnerability' ORDER BY id")] == [
        "vulnerability.accept"]  # fmt: skip
    await registry_job(lambda: api.pool, metrics=None, clock=api.clock)()
    stored = await api.fetch("SELECT status FROM plugin_vulnerabilities WHERE id = $1", minimist["id"])  # fmt: skip
    assert stored[0]["status"] == "open"
    rows = await api.fetch(
        "SELECT actor, action, before_state, after_state FROM audit_log "
        "WHERE entity_type = 'vulnerability' ORDER BY id"
    )
    assert [(r["actor"], r["action"]) for r in rows] == [
        ("admin-acme", "vulnerability.accept"), ("daemon", "vulnerability.acceptance_expired")]  # fmt: skip
    assert json.loads(rows[0]["after_state"])["reason"] == "build-time only dependency"


async def test_another_tenant_sees_none_of_it(api: ApiHarness) -> None:
    await _import(api, "grype", load("grype.json"))
    acme = await _findings(api)
    assert len(acme) == 2
    # globex has a plugin of the same name, and no findings; acme's ids are not found.
    assert await _findings(api, tenant="globex") == []
    other = await api.call("GET", f"/api/v1/vulnerabilities/{acme[0]['id']}", token="reader-globex")
    assert other.status == 404
    accept = await api.call(
        "POST", f"/api/v1/vulnerabilities/{acme[0]['id']}/accept", token="admin-globex",
        body={"reason": "x", "until": (api.clock.now + timedelta(hours=1)).isoformat()},
    )  # fmt: skip
    assert accept.status == 404
    # In the database itself: the API role with globex's tenant sees no acme rows.
    async with api.pool.acquire() as conn, conn.transaction():
        # As the API enters a tenant (on Citus the tenant must also reach the workers).
        await (await detect_tenant_scope(conn)).enter(conn, "globex", role="pluginmon_api")
        assert await conn.fetchval("SELECT count(*) FROM plugin_vulnerabilities") == 0
    rows = await api.fetch("SELECT DISTINCT tenant_id FROM plugin_vulnerabilities")
    assert [r["tenant_id"] for r in rows] == ["acme"]


async def test_bad_input_is_named(api: ApiHarness) -> None:
    bad_format = await api.call(
        "POST", f"{BASE}/vulnerabilities/import?format=snyk", token="writer-acme", body={}
    )
    assert (bad_format.status, bad_format.error["field"]) == (422, "format")
    broken = load("trivy.json")
    del broken["Results"][0]["Vulnerabilities"][0]["InstalledVersion"]
    reply = await api.call(
        "POST", f"{BASE}/vulnerabilities/import?format=trivy", token="writer-acme", body=broken
    )
    assert (reply.status, reply.error["field"]) == (422, "Results[0].Vulnerabilities[0].InstalledVersion")  # fmt: skip
    sbom = await api.call("PUT", f"{BASE}/sbom", token="writer-acme", body={"bomFormat": "SPDX"})
    assert (sbom.status, sbom.error["field"]) == (422, "bomFormat")
    reader = await api.call("PUT", f"{BASE}/sbom", token="reader-acme", body=load("sbom.cdx.json"))
    assert reader.status == 403
    unknown = await api.call("PUT", "/api/v1/plugins/nope/sbom", token="writer-acme", body=load("sbom.cdx.json"))  # fmt: skip
    assert unknown.status == 404
    assert await api.fetch("SELECT * FROM plugin_vulnerabilities") == []


async def test_metric_counts_open_findings_by_severity(api: ApiHarness) -> None:
    from prometheus_client import CollectorRegistry

    from pluginmon.daemon.api_metrics import ApiMetrics

    await _import(api, "trivy", load("trivy.json"))
    registry = CollectorRegistry()
    job = registry_job(lambda: api.pool, metrics=ApiMetrics(registry), clock=api.clock)
    await job()
    labels = {"tenant": "acme", "plugin": "resizer", "environment": "production"}
    value = registry.get_sample_value
    assert value("pluginmon_plugin_vulnerabilities", {**labels, "severity": "high"}) == 1.0
    assert value("pluginmon_plugin_vulnerabilities", {**labels, "severity": "low"}) == 1.0
    assert value("pluginmon_plugin_vulnerabilities", {**labels, "severity": "critical"}) is None


def test_cli_imports_a_report_and_scans_offline(migrated_db: str, tmp_path: Path) -> None:
    env = {"PLUGINMON_DATABASE_URL": migrated_db}
    import psycopg

    with psycopg.connect(migrated_db, autocommit=True) as conn:
        conn.execute("INSERT INTO tenants (id) VALUES ('acme')")
        conn.execute("INSERT INTO plugins (tenant_id, name) VALUES ('acme', 'resizer')")
    imported = run_cli(
        "vulns", "import", "--tenant", "acme", "--plugin", "resizer", "--format", "osv-scanner",
        str(FIXTURES / "osv-scanner.json"), env=env,
    )  # fmt: skip
    assert imported.returncode == 0, imported.stderr
    assert "2 item(s), 2 new" in imported.stdout
    other = run_cli(
        "vulns", "import", "--tenant", "globex", "--plugin", "resizer", "--format", "grype",
        str(FIXTURES / "grype.json"), env=env,
    )  # fmt: skip
    assert other.returncode == 1
    assert "no plugin named 'resizer'" in other.stderr
    sbom = load("sbom.cdx.json")
    with psycopg.connect(migrated_db, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO plugin_sboms (tenant_id, plugin_id, environment, document, sha256, "
            "components, component_count, uploaded_at, uploaded_by) SELECT 'acme', id, "
            "'production', %s, repeat('a', 64), %s, 1, now(), 'test' FROM plugins",
            (json.dumps(sbom), json.dumps([{"ecosystem": "npm", "name": "lodash",
             "version": "4.17.20", "purl": "pkg:npm/lodash@4.17.20"}])),
        )  # fmt: skip
    db = write_osv_database(tmp_path / "osv")
    scanned = run_cli("vulns", "scan", "--db", str(db), env=env)
    assert scanned.returncode == 0, scanned.stderr
    assert "4 advisories, 1 SBOM(s) scanned" in scanned.stdout
    assert "resizer/production: 1 finding(s), 1 new" in scanned.stdout
    # One tenant's plugin, as in the README: re-matched (forced), nothing new.
    again = run_cli(
        "vulns", "scan", "--tenant", "acme", "--plugin", "resizer", "--db", str(db), env=env
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert "resizer/production: 1 finding(s), 0 new, 0 fixed" in again.stdout
    elsewhere = run_cli(
        "vulns", "scan", "--tenant", "globex", "--plugin", "resizer", "--db", str(db), env=env
    )  # fmt: skip
    assert elsewhere.returncode == 1
    assert "no plugin named 'resizer'" in elsewhere.stderr
    listed = run_cli("vulns", "list", "--tenant", "acme", "--plugin", "resizer", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    found = {(f["vulnerability_id"], f["scanner"]) for f in json.loads(listed.stdout)}
    assert found == {
        ("GHSA-35jh-r3h4-6jhm", "osv-scanner"), ("GHSA-xvch-5gv4-984h", "osv-scanner"),
        ("GHSA-35jh-r3h4-6jhm", "osv-offline")}  # fmt: skip
    no_db = run_cli("vulns", "scan", env=env)
    assert no_db.returncode == 2
    assert "--db" in no_db.stderr
    offline_id = next(f["id"] for f in json.loads(listed.stdout) if f["scanner"] == "osv-offline")
    no_zone = run_cli(
        "vulns", "accept", "--tenant", "acme", str(offline_id), "--reason", "r",
        "--until", "2030-01-01T00:00:00", env=env,
    )  # fmt: skip
    assert no_zone.returncode == 2
    assert "--until" in no_zone.stderr
    accepted = run_cli(
        "vulns", "accept", "--tenant", "acme", str(offline_id), "--reason", "vendored, patched",
        "--until", "2030-01-01T00:00:00Z", env=env,
    )  # fmt: skip
    assert accepted.returncode == 0, accepted.stderr
    with psycopg.connect(migrated_db) as conn:
        row = conn.execute(
            "SELECT v.status, v.accepted_reason, a.actor FROM plugin_vulnerabilities v "
            "JOIN audit_log a ON a.entity_id = v.id::text AND a.action = 'vulnerability.accept' "
            "WHERE v.id = %s",
            (offline_id,),
        ).fetchone()
    assert row is not None
    assert row[:2] == ("accepted", "vendored, patched")
    assert row[2].startswith("cli:")
