"""The registry's gauges read at the rate the registry job writes them: the pure schedule
(injected times), and the engine on a real database (injected clock) still firing a rule
over such a gauge within that interval plus one cycle of the write."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime

import asyncpg
import pytest

from pluginmon.alerts.engine import AlertEngine
from pluginmon.alerts.metric_reads import MetricReads, is_registry_gauge
from pluginmon.collectors.models import PluginKey
from pluginmon.daemon.config_sections import parse_rules
from tests.alerts_helpers import FakeClock, plugin_ids, plugin_sample, snapshot

KEY = PluginKey("acme", "resizer", "production")
A, B = (1, "production"), (2, "production")


def test_registry_gauges_are_told_apart_from_a_plugins_own_metrics() -> None:
    assert is_registry_gauge("operations_failed")
    assert is_registry_gauge("vulnerabilities_critical")
    assert is_registry_gauge("backup_verified_age_seconds:p95")
    assert not is_registry_gauge("queue_depth")
    assert not is_registry_gauge("operations_failed_total")
    assert not is_registry_gauge("operations_failed:p100")  # not a valid reference


def test_registry_gauges_are_read_once_per_interval_and_for_new_plugins() -> None:
    reads = MetricReads(registry_interval_seconds=60)
    names = ("operations_failed", "queue_depth")

    plan = reads.plan(names, {A}, now=0)
    assert (plan.names, plan.registry, plan.cached) == (names[1:] + names[:1], names[:1], ())
    got = reads.take(
        plan,
        {(1, "production", "operations_failed"): 2.0, (1, "production", "queue_depth"): 5.0},
        {A},
        now=0,
    )
    assert got[(1, "production", "operations_failed")] == 2.0

    # Within the interval: the plugin's own metric is read, the gauge's last value is kept.
    plan = reads.plan(names, {A}, now=10)
    assert (plan.names, plan.registry, plan.cached) == (("queue_depth",), (), names[:1])
    got = reads.take(plan, {(1, "production", "queue_depth"): 6.0}, {A}, now=10)
    assert got == {
        (1, "production", "operations_failed"): 2.0,
        (1, "production", "queue_depth"): 6.0,
    }
    # Only registry gauges and not due: nothing to read at all.
    plan = reads.plan(names[:1], {A}, now=20)
    assert plan.names == ()
    assert reads.take(plan, {}, {A}, now=20) == {(1, "production", "operations_failed"): 2.0}
    # A plugin that was not read yet (new, or its id just resolved) makes it due.
    assert reads.plan(names[:1], {A, B}, now=30).registry == names[:1]
    # So does a registry name not read yet (a reload), the interval, and a clock stepped back.
    assert reads.plan(("operations_failed", "backup_stale"), {A}, now=30).registry != ()
    assert reads.plan(names[:1], {A}, now=59.9).registry == ()
    assert reads.plan(names[:1], {A}, now=60).registry == names[:1]
    assert reads.plan(names[:1], {A}, now=-1).registry == names[:1]
    # Statements counted: the two plans taken that read something (t=0 and t=10).
    assert reads.reads == 2


def test_a_gauge_no_longer_asked_for_is_not_returned_and_zero_reads_every_cycle() -> None:
    reads = MetricReads(registry_interval_seconds=60)
    plan = reads.plan(("operations_failed", "backup_stale"), {A}, now=0)
    reads.take(
        plan,
        {(1, "production", "operations_failed"): 1.0, (1, "production", "backup_stale"): 1.0},
        {A},
        now=0,
    )
    plan = reads.plan(("backup_stale",), {A}, now=5)
    assert reads.take(plan, {}, {A}, now=5) == {(1, "production", "backup_stale"): 1.0}
    # ... nor for a plugin not in this cycle
    assert reads.take(plan, {}, {B}, now=5) == {}
    every = MetricReads(registry_interval_seconds=0)
    for now in (0.0, 1.0, 2.0):
        assert every.plan(("operations_failed",), {A}, now=now).registry == ("operations_failed",)
        every.take(every.plan(("operations_failed",), {A}, now=now), {}, {A}, now=now)
    assert every.reads == 3
    with pytest.raises(ValueError, match="registry_interval_seconds must be >= 0, got -1"):
        MetricReads(registry_interval_seconds=-1)


@pytest.fixture
async def pool(migrated_db: str) -> AsyncIterator[asyncpg.Pool]:
    async with asyncpg.create_pool(migrated_db, min_size=1, max_size=4) as p:
        yield p


async def write_gauge(
    pool: asyncpg.Pool, plugin_id: int, at: datetime, name: str, value: float
) -> None:
    async with pool.acquire() as conn:
        await conn.execute(
            'INSERT INTO plugin_metrics ("timestamp", tenant_id, plugin_id, environment, '
            "metric_name, metric_kind, value) VALUES ($1, 'acme', $2, 'production', $3, "
            "'gauge', $4)",
            at,
            plugin_id,
            name,
            value,
        )


async def test_a_rule_over_a_registry_gauge_fires_within_its_interval_plus_a_cycle(
    pool: asyncpg.Pool,
) -> None:
    """The registry job writes operations_failed at t=5 s (its interval: 60 s); the engine
    cycles every 10 s and read the gauge at t=0. It fires at the first read after the
    interval, 55 s after the write (<= 60 + 10), having read plugin_metrics twice in seven
    cycles; a rule over the plugin's own metric sees its new value the next cycle."""
    clock = FakeClock()
    ids = await plugin_ids(pool, [KEY])
    rules = parse_rules(
        [
            {"name": "OpsFailed", "metric": "operations_failed", "op": ">", "threshold": 0},
            {"name": "QueueDeep", "metric": "queue_depth", "op": ">", "threshold": 500},
        ],
        include_builtins=False,
    )
    interval = 60.0
    registry_only = AlertEngine(
        pool, rules[:1], clock=clock, registry_metrics_interval_seconds=interval, instance="a"
    )
    mixed = AlertEngine(
        pool, rules, clock=clock, registry_metrics_interval_seconds=interval, instance="b"
    )
    await registry_only.start()
    await mixed.start()
    written_at: datetime | None = None
    fired: dict[str, datetime] = {}
    for step in range(8):
        now = clock()
        for engine in (registry_only, mixed):
            report = await engine.process(snapshot(now, [plugin_sample(KEY, now)]), ids)
            for rule, _, kind in report.transitions:
                if kind == "firing":
                    fired.setdefault(f"{id(engine)}:{rule}", now)
        if step == 0:
            written_at = clock.advance(5)
            await write_gauge(pool, ids[KEY], written_at, "operations_failed", 2.0)
            await write_gauge(pool, ids[KEY], written_at, "queue_depth", 900.0)
            clock.advance(5)
        else:
            clock.advance(10)
    assert written_at is not None
    ops_fired = fired[f"{id(registry_only)}:OpsFailed"]
    assert (ops_fired - written_at).total_seconds() == 55.0
    assert (ops_fired - written_at).total_seconds() <= interval + 10
    assert fired[f"{id(mixed)}:OpsFailed"] == ops_fired
    # The plugin's own metric: read every cycle, seen at the first cycle after the write.
    assert (fired[f"{id(mixed)}:QueueDeep"] - written_at).total_seconds() == 5.0
    # Eight cycles: the registry-only engine read at t=0 and t=60; the mixed one every cycle.
    assert registry_only.plugin_metrics_reads == 2
    assert mixed.plugin_metrics_reads == 8
    assert [a.value for a in registry_only.firing()] == [2.0]
    await registry_only.aclose()
    await mixed.aclose()
