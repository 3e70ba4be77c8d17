"""Plugins' own metrics for real: plugin processes serving /metrics with prometheus-client's own server, scraped over loopback into a real PostgreSQL, read back as rates and quantiles by the alert engine."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from pluginmon.alerts.engine import AlertEngine
from pluginmon.alerts.metric_values import plugin_metric_values
from pluginmon.collectors.exposition import ExpositionLimits, Rejected
from pluginmon.collectors.models import MetricKind, MetricPoint, PluginKey, PluginMetrics
from pluginmon.collectors.push import PushAccepted, PushConfig
from pluginmon.collectors.sampler import Sampler
from pluginmon.collectors.scrape import ScrapeConfig, Scraper, ScrapeTarget
from pluginmon.daemon.config_health import parse_health_config
from pluginmon.daemon.config_sections import parse_rules
from pluginmon.daemon.plugin_metrics import PluginMetricsService
from pluginmon.daemon.status import fetch_status, format_metrics
from tests.alerts_helpers import FakeClock, plugin_sample, snapshot
from tests.collector_helpers import IDLE, Spawner, unique_tag
from tests.metrics_helpers import (
    BIG_SERIES,
    REQUESTS_PER_SECOND,
    TRUE_P95,
    metric_storage,
    rows_of,
    scrapes_stored,
    start_plugin,
)
from tests.waiting import wait_until

pytestmark = pytest.mark.slow


@pytest.fixture
def spawner() -> Iterator[Spawner]:
    s = Spawner()
    try:
        yield s
    finally:
        s.close()


def target(key: PluginKey, url: str, **limits: object) -> ScrapeTarget:
    return ScrapeTarget(
        key=key,
        url=url,
        interval_seconds=0.5,
        timeout_seconds=0.4,
        limits=ExpositionLimits(**limits),  # type: ignore[arg-type]
    )


def key(name: str) -> PluginKey:
    return PluginKey(unique_tag("t").replace("-", "_")[:30], name, "staging")


async def plugin_id(pool: asyncpg.Pool, k: PluginKey) -> int:
    value = await pool.fetchval(
        "SELECT id FROM plugins WHERE tenant_id = $1 AND name = $2", k.tenant, k.plugin
    )
    assert value is not None, k
    return int(value)


async def test_scraped_series_keep_their_kinds_and_the_plugins_identity(
    migrated_db: str, spawner: Spawner
) -> None:
    _, url = start_plugin(spawner, "plugin")
    k = key("resizer")
    registry = CollectorRegistry()
    async with (
        metric_storage(migrated_db) as storage,
        Scraper(targets=lambda: [target(k, url)], consume=storage.sink.put) as scraper,
    ):
        registry.register(scraper.stats)

        async def three_scrapes() -> bool:
            await storage.writer.flush()
            return await scrapes_stored(storage.pool, k, "queue_depth") >= 3

        await wait_until(three_scrapes, timeout_seconds=30, what="three scrapes stored")
        labels = {"tenant": k.tenant, "plugin": k.plugin, "environment": k.environment}
        assert registry.get_sample_value("pluginmon_plugin_scrape_up", labels) == 1.0
        assert registry.get_sample_value("pluginmon_plugin_scrape_samples", labels) == 18.0
        duration = registry.get_sample_value("pluginmon_plugin_scrape_duration_seconds", labels)
        assert duration is not None
        assert 0 < duration < 0.4

        rows = await rows_of(storage.pool, k)
        pid = await plugin_id(storage.pool, k)
        # Every row carries the plugin's identity, whatever the plugin's labels say.
        assert {(r["tenant_id"], r["plugin_id"], r["environment"]) for r in rows} == {
            (k.tenant, pid, k.environment)
        }
        latest = max(r["timestamp"] for r in rows)
        newest = {
            (r["metric_name"], r["labels"]): (r["metric_kind"], r["value"])
            for r in rows
            if r["timestamp"] == latest
        }
        assert newest[("queue_depth", "{}")] == ("gauge", 7.0)
        assert newest[("workers", '{"pool": "a"}')] == ("gauge", 3.0)
        kind, requests = newest[("requests_total", '{"method": "GET"}')]
        assert kind == "counter"
        assert requests > 0
        assert newest[("request_duration_seconds_bucket", '{"le": "+Inf"}')][0] == "histogram"
        assert {name for name, _ in newest if name.startswith("request_duration")} == {
            "request_duration_seconds_bucket",
            "request_duration_seconds_sum",
            "request_duration_seconds_count",
        }
        assert not any(name.endswith("_created") for name, _ in newest)
        # Label injection: the plugin's tenant/plugin/environment labels are kept under
        # exported_*, and its health_score is not pluginmon's.
        forged = json.loads(next(lab for name, lab in newest if name == "forged_events_total"))
        assert forged == {
            "exported_exported_tenant": "other-tenant",
            "exported_tenant": "x",
            "exported_plugin": "victim",
            "exported_environment": "staging",
        }
        assert ("health_score", "{}") not in newest
        assert newest[("exported_health_score", "{}")] == ("gauge", 1.0)
        assert (
            await storage.pool.fetchval(
                "SELECT count(*) FROM plugin_metrics WHERE tenant_id = 'other-tenant'"
            )
            == 0
        )


async def test_rules_and_health_read_a_counters_rate_across_a_restart_and_a_histograms_p95(
    migrated_db: str, spawner: Spawner
) -> None:
    first, url = start_plugin(spawner, "plugin")
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    k = key("api")
    async with (
        metric_storage(migrated_db) as storage,
        Scraper(targets=lambda: [target(k, url)], consume=storage.sink.put) as scraper,
    ):

        async def scrapes(count: int) -> bool:
            await storage.writer.flush()
            return await scrapes_stored(storage.pool, k, "requests_total") >= count

        await wait_until(lambda: scrapes(5), timeout_seconds=30, what="five scrapes")
        # The plugin restarts on the same port: its counter starts again from 0.
        spawner.kill(first)
        start_plugin(spawner, "plugin", port)
        before = await scrapes_stored(storage.pool, k, "requests_total")
        await wait_until(lambda: scrapes(before + 5), timeout_seconds=30, what="five more")
        assert scraper.stats.up(k) is True

        values = [r["value"] for r in await rows_of(storage.pool, k, "requests_total")]
        assert any(b < a for a, b in itertools.pairwise(values)), values  # a reset
        pid = await plugin_id(storage.pool, k)
        now = datetime.now(UTC)
        names = ["requests_total", "request_duration_seconds:p95", "queue_depth"]
        async with storage.pool.acquire() as conn:
            got = await plugin_metric_values(
                conn, [(pid, k.environment)], names, now - timedelta(minutes=10), now=now
            )
        rate = got[(pid, k.environment, "requests_total")]
        # The raw counter would be tens; a reset taken as a drop would be negative or tiny.
        assert REQUESTS_PER_SECOND * 0.6 < rate < REQUESTS_PER_SECOND * 1.4, rate
        p95 = got[(pid, k.environment, "request_duration_seconds:p95")]
        assert abs(p95 - TRUE_P95) <= 0.1, p95  # within one bucket (0.1 wide) of the truth
        assert got[(pid, k.environment, "queue_depth")] == 7.0

        # The alert engine and the health score read the same values through the same call.
        rules = parse_rules(
            [
                {"name": "Busy", "metric": "requests_total", "op": ">", "threshold": 5},
                {"name": "Frantic", "metric": "requests_total", "op": ">", "threshold": 50},
                {
                    "name": "Slow",
                    "metric": "request_duration_seconds:p95",
                    "op": ">",
                    "threshold": 0.8,
                },
                {"name": "Backlog", "metric": "queue_depth", "op": ">=", "threshold": 7},
            ],
            include_builtins=False,
        )
        health = parse_health_config(
            {"metrics": [{"name": "requests_total", "warn": 5, "critical": 25}]}
        )
        engine = AlertEngine(storage.pool, rules, health_config=health)
        try:
            # Started on the migrated schema, as the daemon does: before start() the engine
            # evaluates without touching the database (its schema may not exist yet), so it
            # would read no plugin_metrics values.
            await engine.start()
            report = await engine.process(snapshot(now, [plugin_sample(k, now)]), {k: pid})
        finally:
            await engine.aclose()
    fired = {rule for rule, _, kind in report.transitions if kind == "firing"}
    assert fired == {"Busy", "Slow", "Backlog"}
    component = engine.latest_health()[k].component("metric:requests_total")
    assert component is not None
    assert component.value == pytest.approx(rate, rel=0.2)
    assert 0 < component.score < 100


async def test_a_hanging_and_a_huge_endpoint_do_not_hold_up_the_others(
    migrated_db: str, spawner: Spawner
) -> None:
    _, hang_url = start_plugin(spawner, "hang")
    _, huge_url = start_plugin(spawner, "huge")
    _, declared_url = start_plugin(spawner, "declared")
    _, a_url = start_plugin(spawner, "plugin")
    _, b_url = start_plugin(spawner, "plugin")
    hang, huge, declared = key("hangs"), key("huge"), key("declared")
    a, b = key("a"), key("b")
    limit = 1024 * 1024
    targets = [
        target(hang, hang_url, max_body_bytes=limit),
        target(huge, huge_url, max_body_bytes=limit),
        target(declared, declared_url, max_body_bytes=limit),
        target(a, a_url, max_body_bytes=limit),
        target(b, b_url, max_body_bytes=limit),
    ]
    registry = CollectorRegistry()
    async with (
        metric_storage(migrated_db) as storage,
        # Two slots for five targets: a hanging request holds one for one timeout at most.
        Scraper(targets=lambda: targets, consume=storage.sink.put, max_concurrent=2) as scraper,
    ):
        registry.register(scraper.stats)

        async def others_stored() -> bool:
            await storage.writer.flush()
            counts = [await scrapes_stored(storage.pool, k, "queue_depth") for k in (a, b)]
            refused = (
                scraper.stats.rejected(hang)["timeout"],
                scraper.stats.rejected(huge)["too_large"],
                scraper.stats.rejected(declared)["too_large"],
            )
            return min(counts) >= 4 and min(refused) >= 3

        await wait_until(
            others_stored, timeout_seconds=45, what="a and b stored, hang and huge refused"
        )
        for k, reason in ((hang, "timeout"), (huge, "too_large"), (declared, "too_large")):
            labels = {"tenant": k.tenant, "plugin": k.plugin, "environment": k.environment}
            assert registry.get_sample_value("pluginmon_plugin_scrape_up", labels) == 0.0
            refused = registry.get_sample_value(
                "pluginmon_plugin_scrape_rejected_total", {**labels, "reason": reason}
            )
            assert refused is not None
            assert refused >= 3
            assert not await rows_of(storage.pool, k)
            # The limits hold: the hanging request ends at its timeout, the huge body is
            # abandoned at its byte limit (10 MB through loopback is not read in full).
            seconds = registry.get_sample_value("pluginmon_plugin_scrape_duration_seconds", labels)
            assert seconds is not None
            assert seconds < 0.4 + 0.3, (k, seconds)
        for k in (a, b):
            labels = {"tenant": k.tenant, "plugin": k.plugin, "environment": k.environment}
            assert registry.get_sample_value("pluginmon_plugin_scrape_up", labels) == 1.0


async def test_a_counter_reset_is_an_increase_from_zero_in_sql(migrated_db: str) -> None:
    """The series query's reset rule on exact data: 0, 10, 20, then 5 (restarted), 15."""
    k = key("exact")
    at = datetime.now(UTC) - timedelta(seconds=40)
    async with metric_storage(migrated_db) as storage:
        for i, value in enumerate((0.0, 10.0, 20.0, 5.0, 15.0)):
            point = MetricPoint("jobs_total", MetricKind.COUNTER, "{}", value)
            await storage.sink.put(PluginMetrics(k, at + timedelta(seconds=10 * i), (point,)))
        await storage.writer.flush()
        pid = await plugin_id(storage.pool, k)
        async with storage.pool.acquire() as conn:
            got = await plugin_metric_values(
                conn,
                [(pid, k.environment)],
                ["jobs_total"],
                at - timedelta(seconds=1),
                now=at + timedelta(seconds=40),
            )
    # 10 + 10 + 5 (from 0 after the reset) + 10 over 40 s.
    assert got == {(pid, k.environment, "jobs_total"): pytest.approx(35 / 40)}


async def test_a_plugin_the_database_refuses_is_dropped_once_and_not_asked_again(
    migrated_db: str,
) -> None:
    """A key the database refuses for good (a NUL in the environment: SQLSTATE 22021) is
    counted invalid_plugin and never looked up again, and the database is not reported down;
    another plugin's points are stored."""
    bad = PluginKey("acme", "refused", "env\x00")
    good = key("alongside")
    at = datetime.now(UTC)
    point = MetricPoint("jobs_total", MetricKind.COUNTER, "{}", 1.0)
    async with metric_storage(migrated_db) as storage:
        for i in range(2):
            await storage.sink.put(PluginMetrics(bad, at + timedelta(seconds=i), (point,)))
        await storage.sink.put(PluginMetrics(good, at, (point,)))
        await storage.writer.flush()
        assert storage.sink.dropped()["invalid_plugin"] == 2
        assert storage.sink.dropped()["plugin_unresolved"] == 0
        assert storage.sink._database.up is not False  # type: ignore[attr-defined]
        assert len(await rows_of(storage.pool, good)) == 1


async def test_a_push_is_stored_reemitted_and_expires(migrated_db: str) -> None:
    k = key("nightly")
    clock = FakeClock(datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5))
    async with metric_storage(migrated_db) as storage:
        service = PluginMetricsService(
            scrape=ScrapeConfig(discovered=False, interval_seconds=3600),
            push=PushConfig(default_ttl_seconds=60, limits=ExpositionLimits(max_body_bytes=4096)),
            sink=storage.sink,
            discovered=lambda: (),
            wall_clock=clock,
        )
        async with service:
            body = json.dumps(
                {
                    "metrics": [
                        {"name": "rows_exported_total", "kind": "counter", "value": 1200},
                        {"name": "last_success_seconds", "kind": "gauge", "value": 1.7e9},
                        {"name": "x", "kind": "gauge", "value": 1, "labels": {"plugin": "victim"}},
                    ]
                }
            ).encode()
            accepted = await service.accept_push(k, body, content_type="application/json")
            assert isinstance(accepted, PushAccepted)
            assert accepted.series_live == 3
            clock.advance(30)
            assert len(await service.reemit_pushed()) == 1
            clock.advance(31)  # 61 s after the push: expired
            assert await service.reemit_pushed() == []
            too_big = await service.accept_push(k, b"x 1\n" * 2000, content_type="text/plain")
            assert isinstance(too_big, Rejected)
            assert too_big.reason.value == "too_large"
            text = await service.accept_push(
                k, b"# TYPE queue gauge\nqueue 4\n", content_type="text/plain; version=0.0.4"
            )
            assert isinstance(text, PushAccepted)
            registry = CollectorRegistry()
            registry.register(service)
            assert registry.get_sample_value("pluginmon_plugin_pushes_total") == 2.0
            assert (
                registry.get_sample_value(
                    "pluginmon_plugin_push_rejected_total", {"reason": "too_large"}
                )
                == 1.0
            )
            assert registry.get_sample_value("pluginmon_plugin_push_expired_series_total") == 3.0
            await storage.writer.flush()
        rows = await rows_of(storage.pool, k)
    got = [
        (r["timestamp"] - clock.now, r["metric_name"], r["metric_kind"], r["labels"]) for r in rows
    ]
    pushed_at, reemitted_at, text_at = timedelta(seconds=-61), timedelta(seconds=-31), timedelta(0)
    assert got == [
        (pushed_at, "last_success_seconds", "gauge", "{}"),
        (pushed_at, "rows_exported_total", "counter", "{}"),
        (pushed_at, "x", "gauge", '{"exported_plugin": "victim"}'),
        (reemitted_at, "last_success_seconds", "gauge", "{}"),
        (reemitted_at, "rows_exported_total", "counter", "{}"),
        (reemitted_at, "x", "gauge", '{"exported_plugin": "victim"}'),
        (text_at, "queue", "gauge", "{}"),
    ]
    assert {r["tenant_id"] for r in rows} == {k.tenant}


async def test_a_discovered_plugin_is_scraped_where_its_labels_say(
    migrated_db: str, spawner: Spawner
) -> None:
    _, url = start_plugin(spawner, "plugin")
    port = url.rsplit(":", 1)[1].split("/")[0]
    tenant = unique_tag("t").replace("-", "_")[:30]
    declares, refused = (
        PluginKey(tenant, "declares", "production"),
        PluginKey(tenant, "refused", "production"),
    )
    base = {"PLUGINMON_TENANT": tenant}
    spawner.python(
        IDLE, env={**base, "PLUGINMON_PLUGIN": "declares", "PLUGINMON_METRICS_PORT": port}
    )
    spawner.python(
        IDLE,
        env={**base, "PLUGINMON_PLUGIN": "refused", "PLUGINMON_METRICS_PORT": "9100; curl evil"},
    )
    sampler = Sampler([], label_discovery=True)
    taken = await asyncio.to_thread(sampler.sample)
    # The refused endpoint costs only the endpoint: the plugin is sampled all the same.
    assert {declares, refused} <= {s.key for s in taken.samples}
    assert dict(sampler.metrics_endpoints)[declares] == url
    assert refused not in dict(sampler.metrics_endpoints)
    assert sampler.stats.rejected["too_long"] >= 1

    config = ScrapeConfig(interval_seconds=0.5, timeout_seconds=0.4)
    async with (
        metric_storage(migrated_db) as storage,
        Scraper(
            targets=lambda: config.all_targets(sampler.metrics_endpoints),
            consume=storage.sink.put,
        ),
    ):

        async def stored() -> bool:
            await storage.writer.flush()
            return await scrapes_stored(storage.pool, declares, "queue_depth") >= 1

        await wait_until(stored, timeout_seconds=30, what="the discovered plugin's metrics")


async def test_status_shows_each_kind_as_rules_read_it(migrated_db: str) -> None:
    k = key("shown")
    now = datetime.now(UTC)
    async with metric_storage(migrated_db) as storage:
        for i in range(4):
            at = now - timedelta(seconds=30 - 10 * i)
            points = (
                MetricPoint("jobs_total", MetricKind.COUNTER, "{}", 100.0 + 20 * i),
                MetricPoint("depth", MetricKind.GAUGE, "{}", 3.0),
                *(
                    MetricPoint("lat_bucket", MetricKind.HISTOGRAM, json.dumps({"le": le}), n * i)
                    for le, n in (("0.5", 5.0), ("1.0", 10.0), ("+Inf", 10.0))
                ),
            )
            await storage.sink.put(PluginMetrics(k, at, points))
        await storage.writer.flush()
    (row,) = fetch_status(migrated_db, tenant=k.tenant, metrics=True)
    assert row.metrics is not None
    assert row.metrics["jobs_total/s"] == pytest.approx(2.0)
    assert row.metrics["depth"] == 3.0
    assert row.metrics["lat:p50"] == pytest.approx(0.5)
    assert row.as_dict()["metrics"]["depth"] == 3.0
    text = format_metrics([row])
    assert "jobs_total/s" in text
    assert "2" in text


async def test_parsing_a_large_body_leaves_the_event_loop_free(spawner: Spawner) -> None:
    """60,000 series take a good part of a second to parse: in a worker thread, so a ticker
    on the event loop keeps running meanwhile (late by a GIL switch or two, not by the parse)."""
    _, url = start_plugin(spawner, "big")
    k = key("big")
    big = ScrapeTarget(
        key=k,
        url=url,
        interval_seconds=3600,
        timeout_seconds=60,
        limits=ExpositionLimits(max_body_bytes=4 * 1024 * 1024, max_series=100_000),
    )
    stored: list[PluginMetrics] = []

    async def consume(metrics: PluginMetrics) -> None:
        stored.append(metrics)

    late: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        while not done.is_set():
            before = time.perf_counter()
            await asyncio.sleep(0.01)
            late.append(time.perf_counter() - before - 0.01)

    async with Scraper(targets=lambda: [], consume=consume) as scraper:
        ticking = asyncio.create_task(ticker())
        outcome = await scraper.scrape(big)
        done.set()
        await ticking
    assert outcome.rejected is None, outcome.rejected
    assert len(stored[0].points) == BIG_SERIES
    assert outcome.duration_seconds > 0.2, outcome.duration_seconds  # a real parse happened
    # Parsed on the loop, one tick would be late by the whole parse.
    assert len(late) >= 5
    assert max(late) < outcome.duration_seconds / 2, (max(late), outcome.duration_seconds)
