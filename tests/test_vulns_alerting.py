"""From an imported critical finding to an alert: the registry job's gauge, the built-in rule
PluginVulnerabilityCritical and the health cap in the real alert engine, and both clearing
when the finding is accepted."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import asyncpg
import pytest

from pluginmon.alerts.engine import AlertEngine
from pluginmon.collectors.models import PluginKey
from pluginmon.daemon.config_sections import parse_rules
from pluginmon.registry import maintenance, vulnerabilities, vulnerability_imports
from pluginmon.registry.actor import Actor
from pluginmon.registry.scan_reports import ReportFormat
from tests.alerts_helpers import FakeClock, plugin_ids, plugin_sample, snapshot
from tests.vulns_helpers import load

KEY = PluginKey("acme", "resizer", "production")


@pytest.fixture
async def pool(migrated_db: str) -> AsyncIterator[asyncpg.Pool]:
    created = await asyncpg.create_pool(migrated_db, min_size=1, max_size=3)
    try:
        yield created
    finally:
        await created.close()


async def _cycle(engine: AlertEngine, clock: FakeClock, ids: dict[PluginKey, int]) -> list[str]:
    sample = plugin_sample(KEY, clock(), cpu=1.0)
    report = await engine.process(snapshot(clock(), [sample]), ids)
    return [f"{rule}:{kind}" for rule, _, kind in report.transitions]


async def test_open_critical_fires_the_rule_and_caps_health_until_accepted(
    pool: asyncpg.Pool,
) -> None:
    clock = FakeClock()
    ids = await plugin_ids(pool, [KEY])
    async with pool.acquire() as conn, conn.transaction():
        await vulnerability_imports.import_report(
            conn,
            tenant_id="acme",
            actor=Actor(name="ci"),
            now=clock(),
            plugin_name="resizer",
            environment="production",
            report_format=ReportFormat.GRYPE,
            document=load("grype.json"),
        )
    async with pool.acquire() as conn:
        report = await maintenance.run(conn, now=clock())
    assert report.ran
    assert {(c.severity, c.count) for c in report.vulnerability_counts} == {
        ("critical", 1),
        ("high", 1),
    }
    engine = AlertEngine(pool, parse_rules([], include_builtins=True), clock=clock)
    await engine.start()
    clock.advance(5)
    assert "PluginVulnerabilityCritical:firing" in await _cycle(engine, clock, ids)
    score = engine.latest_health()[KEY]
    assert score.score == 40.0  # a healthy process, capped by the open critical
    component = score.component("metric:vulnerabilities_critical")
    assert component is not None
    assert (component.value, component.score) == (1.0, 0.0)

    # Accepted: no open critical left; the gauge says 0 and the alert resolves.
    async with pool.acquire() as conn, conn.transaction():
        finding_id = await conn.fetchval(
            "SELECT id FROM plugin_vulnerabilities WHERE severity = 'critical'"
        )
        await vulnerabilities.accept(
            conn,
            finding_id,
            tenant_id="acme",
            actor=Actor(name="admin"),
            now=clock(),
            reason="not reachable at run time",
            until=clock() + timedelta(days=30),
        )
    clock.advance(5)
    async with pool.acquire() as conn:
        await maintenance.run(conn, now=clock())
    clock.advance(5)
    assert "PluginVulnerabilityCritical:resolved" in await _cycle(engine, clock, ids)
    assert engine.latest_health()[KEY].score == 100.0
