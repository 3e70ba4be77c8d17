"""Several daemons on one database, one plugin in two environments, silenced resolutions and
Alertmanager endsAt at send time: real PostgreSQL, real aiohttp receivers."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from datetime import datetime, timedelta

import asyncpg
import pytest

from pluginmon.alerts.engine import AlertEngine
from pluginmon.alerts.outbox import OutboxDeliverer
from pluginmon.alerts.rules import AlertmanagerConfig, Rule, WebhookConfig
from pluginmon.collectors.models import PluginKey
from pluginmon.storage import alert_inputs, alert_state
from tests.alerts_helpers import (
    FakeClock,
    Receiver,
    plugin_ids,
    plugin_sample,
    silence_as,
    snapshot,
)

HOT = Rule(name="Hot", metric="cpu_percent", op=">", threshold=50, severity="warning")


@pytest.fixture
async def pool(migrated_db: str) -> AsyncIterator[asyncpg.Pool]:
    async with asyncpg.create_pool(migrated_db, min_size=1, max_size=6) as p:
        yield p


@pytest.fixture
async def receivers() -> AsyncIterator[tuple[Receiver, Receiver]]:
    a, b = Receiver(secret="secret-a"), Receiver(secret="secret-b")
    await a.start()
    await b.start()
    try:
        yield a, b
    finally:
        await a.stop()
        await b.stop()


def hook(url: str, secret: str, name: str = "webhook-0") -> WebhookConfig:
    return WebhookConfig(
        name=name,
        url=url,
        secret=secret,
        backoff_initial_seconds=0.05,
        backoff_max_seconds=0.2,
        timeout_seconds=2.0,
    )


async def drain(*deliverers: OutboxDeliverer, rounds: int = 5) -> None:
    for _ in range(rounds):
        for d in deliverers:
            await d.deliver_due()


async def test_two_daemons_deliver_only_their_own_notifications(
    pool: asyncpg.Pool, receivers: tuple[Receiver, Receiver]
) -> None:
    rx_a, rx_b = receivers
    clock = FakeClock()
    key_a, key_b = PluginKey("acme", "on-host-a"), PluginKey("acme", "on-host-b")
    ids = await plugin_ids(pool, [key_a, key_b])
    # Same receiver name (the default webhook-0) in both daemons, different URLs and secrets.
    hook_a, hook_b = hook(rx_a.url, "secret-a"), hook(rx_b.url, "secret-b")
    engine_a = AlertEngine(pool, [HOT], clock=clock, webhooks=[hook_a], instance="host-a")
    engine_b = AlertEngine(pool, [HOT], clock=clock, webhooks=[hook_b], instance="host-b")
    await engine_a.start()
    await engine_b.start()
    await engine_a.process(snapshot(clock(), [plugin_sample(key_a, clock(), cpu=90)]), ids)
    await engine_b.process(snapshot(clock(), [plugin_sample(key_b, clock(), cpu=90)]), ids)
    clock.advance(1)
    await engine_a.process(snapshot(clock(), [plugin_sample(key_a, clock(), cpu=1)]), ids)
    await engine_b.process(snapshot(clock(), [plugin_sample(key_b, clock(), cpu=1)]), ids)

    async with (
        OutboxDeliverer(pool, [hook_a], clock=clock, instance="host-a") as deliver_a,
        OutboxDeliverer(pool, [hook_b], clock=clock, instance="host-b") as deliver_b,
    ):
        await drain(deliver_a, deliver_b)
        stats_a, stats_b = deliver_a.stats(), deliver_b.stats()

    def seen(rx: Receiver) -> list[tuple[str, str]]:
        return [(r.json["groupLabels"]["plugin"], r.json["status"]) for r in rx.received]

    assert seen(rx_a) == [("on-host-a", "firing"), ("on-host-a", "resolved")]
    assert seen(rx_b) == [("on-host-b", "firing"), ("on-host-b", "resolved")]
    assert all(r.signature_ok for r in rx_a.received + rx_b.received)  # each its own secret
    assert stats_a.notifications == {("webhook-0", "delivered"): 2}
    assert stats_b.notifications == {("webhook-0", "delivered"): 2}
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT instance, status, body FROM notification_outbox ORDER BY id"
        )
    owners = {(r["instance"], json.loads(r["body"])["groupLabels"]["plugin"]) for r in rows}
    assert owners == {("host-a", "on-host-a"), ("host-b", "on-host-b")}
    assert {r["status"] for r in rows} == {"delivered"}


async def test_unconfigured_receiver_row_stays_pending_and_is_logged_once(
    pool: asyncpg.Pool,
    receivers: tuple[Receiver, Receiver],
    caplog: pytest.LogCaptureFixture,
) -> None:
    rx_a, _ = receivers
    clock = FakeClock()
    key = PluginKey("acme", "p")
    ids = await plugin_ids(pool, [key])
    old = hook(rx_a.url, "secret-a", name="oncall")
    engine = AlertEngine(pool, [HOT], clock=clock, webhooks=[old], instance="host-a")
    await engine.start()
    await engine.process(snapshot(clock(), [plugin_sample(key, clock(), cpu=90)]), ids)
    # The configuration changed: "oncall" is gone, another receiver took its place.
    new = hook(rx_a.url, "secret-a", name="pager")
    caplog.set_level(logging.WARNING, logger="pluginmon.alerts.outbox")
    async with OutboxDeliverer(
        pool, [new], clock=clock, instance="host-a", unconfigured_check_seconds=0
    ) as deliverer:
        reports = [await deliverer.deliver_due() for _ in range(3)]
        pending = deliverer.stats().pending
    assert [r.claimed for r in reports] == [0, 0, 0]
    assert rx_a.attempts == 0
    assert pending == 1
    async with pool.acquire() as conn:
        status, attempts = await conn.fetchrow("SELECT status, attempts FROM notification_outbox")
    assert (status, attempts) == ("pending", 0)
    waiting = [r for r in caplog.records if "not configured" in r.getMessage()]
    assert len(waiting) == 1
    assert "'oncall'" in waiting[0].getMessage()

    # Configured again: delivered.
    async with OutboxDeliverer(pool, [old], clock=clock, instance="host-a") as deliverer:
        report = await deliverer.deliver_due()
    assert report.delivered == 1
    assert [r.json["receiver"] for r in rx_a.received] == ["oncall"]


async def test_a_daemon_does_not_resolve_another_daemons_alerts(pool: asyncpg.Pool) -> None:
    clock = FakeClock()
    key_a, key_b = PluginKey("acme", "on-host-a"), PluginKey("acme", "on-host-b")
    ids = await plugin_ids(pool, [key_a, key_b])
    sink = WebhookConfig(name="ops", url="http://127.0.0.1:9/never")
    engine_a = AlertEngine(pool, [HOT], clock=clock, webhooks=[sink], instance="host-a")
    engine_b = AlertEngine(pool, [HOT], clock=clock, webhooks=[sink], instance="host-b")
    await engine_a.start()
    await engine_b.start()
    await engine_a.process(snapshot(clock(), [plugin_sample(key_a, clock(), cpu=90)]), ids)
    await engine_b.process(snapshot(clock(), [plugin_sample(key_b, clock(), cpu=90)]), ids)

    # Daemon A restarts: it loads only its own alert.
    restarted = AlertEngine(pool, [HOT], clock=clock, webhooks=[sink], instance="host-a")
    await restarted.start()
    assert [a.key for a in restarted.alerts()] == [key_a]
    # A keeps evaluating its plugin well past stale_after_seconds; B's alert is not its own.
    for _ in range(4):
        clock.advance(120)
        await restarted.process(snapshot(clock(), [plugin_sample(key_a, clock(), cpu=90)]), ids)
    async with pool.acquire() as conn:
        rows = await alert_state.load_alerts(conn)
        bodies = await conn.fetch("SELECT instance, body FROM notification_outbox ORDER BY id")
    assert sorted((r.instance, r.labels["plugin"], r.status) for r in rows) == [
        ("host-a", "on-host-a", "firing"),
        ("host-b", "on-host-b", "firing"),
    ]
    resolved = [
        (r["instance"], json.loads(r["body"])["groupLabels"]["plugin"])
        for r in bodies
        if json.loads(r["body"])["status"] == "resolved"
    ]
    assert resolved == []
    # B, restarted, still has its alert.
    engine_b2 = AlertEngine(pool, [HOT], clock=clock, webhooks=[sink], instance="host-b")
    await engine_b2.start()
    assert [a.key for a in engine_b2.alerts()] == [key_b]


async def test_unowned_rows_are_adopted_by_the_first_daemon(pool: asyncpg.Pool) -> None:
    clock = FakeClock()
    key = PluginKey("acme", "legacy")
    ids = await plugin_ids(pool, [key])
    engine = AlertEngine(pool, [HOT], clock=clock, instance="old")
    await engine.start()
    await engine.process(snapshot(clock(), [plugin_sample(key, clock(), cpu=90)]), ids)
    async with pool.acquire() as conn:  # as written before sql/022: no owner
        await conn.execute("UPDATE plugin_alerts SET instance = ''")
    adopter = AlertEngine(pool, [HOT], clock=clock, instance="host-a")
    await adopter.start()
    other = AlertEngine(pool, [HOT], clock=clock, instance="host-b")
    await other.start()
    assert [a.key for a in adopter.alerts()] == [key]
    assert other.alerts() == []


async def test_one_plugin_in_two_environments(pool: asyncpg.Pool) -> None:
    clock = FakeClock()
    staging, production = PluginKey("acme", "shop", "staging"), PluginKey("acme", "shop")
    db_staging, db_production = PluginKey("acme", "db", "staging"), PluginKey("acme", "db")
    ids = await plugin_ids(pool, [staging, production, db_staging, db_production])
    assert ids[staging] == ids[production]  # plugins is UNIQUE (tenant_id, name)
    async with pool.acquire() as conn:
        await conn.executemany(
            'INSERT INTO plugin_metrics ("timestamp", tenant_id, plugin_id, environment, '
            "metric_name, metric_kind, value) VALUES ($1, 'acme', $2, $3, 'queue_depth', 'gauge', $4)",
            [
                (clock() - timedelta(seconds=5), ids[production], "production", 900.0),
                (clock() - timedelta(seconds=2), ids[staging], "staging", 3.0),  # newer
            ],
        )
        await conn.execute(
            "INSERT INTO plugin_dependencies (tenant_id, plugin_id, depends_on_plugin_id, kind) "
            "VALUES ('acme', $1, $2, 'runtime')",
            ids[production],
            ids[db_production],
        )
    rules = [
        Rule(name="QueueDeep", metric="queue_depth", op=">", threshold=100),
        Rule(name="Down", metric="up", op="==", threshold=0),
    ]
    engine = AlertEngine(pool, rules, clock=clock, instance="host-a")
    await engine.start()

    async def run(*, db_staging_up: bool, db_production_up: bool) -> None:
        samples = [
            plugin_sample(staging, clock()),
            plugin_sample(production, clock()),
            plugin_sample(db_staging, clock(), up=db_staging_up),
            plugin_sample(db_production, clock(), up=db_production_up),
        ]
        await engine.process(snapshot(clock(), samples), ids)
        clock.advance(1)

    # Each environment reads its own series: only production's queue is deep.
    await run(db_staging_up=True, db_production_up=True)
    views = {(a.key.environment, a.key.plugin, a.alertname): a for a in engine.alerts()}
    assert set(views) == {("production", "shop", "QueueDeep")}
    assert views[("production", "shop", "QueueDeep")].value == 900.0

    # The staging db goes down: production's shop is not inhibited by it.
    await run(db_staging_up=False, db_production_up=True)
    views = {(a.key.environment, a.key.plugin, a.alertname): a for a in engine.alerts()}
    assert not views[("production", "shop", "QueueDeep")].inhibited
    # The production db goes down: now it is.
    await run(db_staging_up=False, db_production_up=False)
    views = {(a.key.environment, a.key.plugin, a.alertname): a for a in engine.alerts()}
    assert views[("production", "shop", "QueueDeep")].inhibited
    assert not views[("staging", "db", "Down")].inhibited


async def test_inhibition_stays_within_the_environment(pool: asyncpg.Pool) -> None:
    clock = FakeClock()
    app_staging, app_production = PluginKey("acme", "app", "staging"), PluginKey("acme", "app")
    db_staging, db_production = PluginKey("acme", "db", "staging"), PluginKey("acme", "db")
    ids = await plugin_ids(pool, [app_staging, app_production, db_staging, db_production])
    async with pool.acquire() as conn:  # app needs db: one edge, both environments
        await conn.execute(
            "INSERT INTO plugin_dependencies (tenant_id, plugin_id, depends_on_plugin_id, kind) "
            "VALUES ('acme', $1, $2, 'runtime')",
            ids[app_production],
            ids[db_production],
        )
    engine = AlertEngine(
        pool, [Rule(name="Down", metric="up", op="==", threshold=0)], clock=clock, instance="h"
    )
    await engine.start()
    samples = [
        plugin_sample(app_staging, clock(), up=False),
        plugin_sample(app_production, clock(), up=False),
        plugin_sample(db_staging, clock(), up=False),  # only staging's db is down
        plugin_sample(db_production, clock(), up=True),
    ]
    await engine.process(snapshot(clock(), samples), ids)
    inhibited = {(a.key.environment, a.key.plugin): a.inhibited for a in engine.alerts()}
    assert inhibited == {
        ("staging", "app"): True,
        ("production", "app"): False,
        ("staging", "db"): False,
    }


async def test_no_resolved_for_an_alert_silenced_when_it_resolves(
    pool: asyncpg.Pool, receivers: tuple[Receiver, Receiver]
) -> None:
    rx, _ = receivers
    clock = FakeClock()
    key = PluginKey("acme", "quiet")
    ids = await plugin_ids(pool, [key])
    webhook = hook(rx.url, "secret-a", name="ops")
    engine = AlertEngine(pool, [HOT], clock=clock, webhooks=[webhook], instance="h")
    await engine.start()
    async with OutboxDeliverer(pool, [webhook], clock=clock, instance="h") as deliverer:
        await engine.process(snapshot(clock(), [plugin_sample(key, clock(), cpu=90)]), ids)
        await drain(deliverer)
        assert [r.json["status"] for r in rx.received] == ["firing"]
        # Silenced while firing, and it resolves while the silence holds.
        await silence_as(
            pool,
            tenant="acme",
            matchers={"plugin": "quiet"},
            ends_at=clock() + timedelta(minutes=10),
            by="bob",
            now=clock(),
        )
        clock.advance(1)
        report = await engine.process(snapshot(clock(), [plugin_sample(key, clock(), cpu=1)]), ids)
        assert report.transitions == (("Hot", key, "resolved"),)
        assert report.notifications_queued == 0
        await drain(deliverer)
        # After the silence: a new alert notifies (and resolves) as usual.
        clock.advance(700)
        await engine.process(snapshot(clock(), [plugin_sample(key, clock(), cpu=95)]), ids)
        clock.advance(1)
        await engine.process(snapshot(clock(), [plugin_sample(key, clock(), cpu=1)]), ids)
        await drain(deliverer)
    assert [r.json["status"] for r in rx.received] == ["firing", "firing", "resolved"]
    async with pool.acquire() as conn:
        statuses = [r.status for r in await alert_state.load_alerts(conn)]
    assert statuses == ["resolved", "resolved"]


async def test_silence_added_in_the_resolving_cycle_also_mutes(
    pool: asyncpg.Pool, receivers: tuple[Receiver, Receiver]
) -> None:
    rx, _ = receivers
    clock = FakeClock()
    key = PluginKey("acme", "quiet")
    ids = await plugin_ids(pool, [key])
    webhook = hook(rx.url, "secret-a", name="ops")
    engine = AlertEngine(pool, [HOT], clock=clock, webhooks=[webhook], instance="h")
    await engine.start()
    await engine.process(snapshot(clock(), [plugin_sample(key, clock(), cpu=90)]), ids)
    async with pool.acquire() as conn:  # another process adds the silence
        await alert_inputs.add_silence(
            conn,
            tenant_id="acme",
            matchers={"alertname": "Hot"},
            ends_at=clock() + timedelta(minutes=5),
            created_by="alice",
            starts_at=clock(),
        )
    clock.advance(1)
    report = await engine.process(snapshot(clock(), [plugin_sample(key, clock(), cpu=1)]), ids)
    assert report.notifications_queued == 0
    async with pool.acquire() as conn:
        bodies = [
            json.loads(r["body"])["status"]
            for r in await conn.fetch("SELECT body FROM notification_outbox ORDER BY id")
        ]
    assert bodies == ["firing"]


async def test_retried_alertmanager_push_gets_endsat_from_send_time(
    pool: asyncpg.Pool, receivers: tuple[Receiver, Receiver]
) -> None:
    rx, _ = receivers
    clock = FakeClock()
    key = PluginKey("acme", "am")
    ids = await plugin_ids(pool, [key])
    # A real aiohttp server standing in for Alertmanager's POST /api/v2/alerts.
    am = AlertmanagerConfig(
        url=rx.url.removesuffix("/hook"),
        resend_interval_seconds=60,
        backoff_initial_seconds=1,
        backoff_max_seconds=60,
    )
    engine = AlertEngine(pool, [HOT], clock=clock, alertmanager=am, instance="h")
    await engine.start()
    queued_at = clock()
    await engine.process(snapshot(clock(), [plugin_sample(key, clock(), cpu=90)]), ids)
    rx.responses = [503] * 5  # Alertmanager down for a while
    async with OutboxDeliverer(pool, (), am, clock=clock, instance="h") as deliverer:
        for _ in range(5):
            report = await deliverer.deliver_due()
            assert report.retried == 1
            clock.advance(120)  # past any backoff
        sent_at = clock()
        report = await deliverer.deliver_due()
    assert report.delivered == 1
    assert rx.attempts == 6
    (push,) = rx.received
    (alert,) = push.json
    ends = alert["endsAt"].replace("Z", "+00:00")
    assert datetime.fromisoformat(ends) == sent_at + timedelta(seconds=240)
    assert sent_at - queued_at == timedelta(seconds=600)  # older than 4 resend intervals
    assert datetime.fromisoformat(ends) > sent_at
    async with pool.acquire() as conn:
        stored = json.loads(await conn.fetchval("SELECT body FROM notification_outbox"))
    assert "endsAt" not in stored[0]  # the queued body leaves it to the send time


async def test_one_plugin_on_two_hosts_gives_two_alerts(
    pool: asyncpg.Pool, receivers: tuple[Receiver, Receiver]
) -> None:
    # The same plugin runs on two hosts, each watched by its own daemon: one alert per host.
    rx_a, rx_b = receivers
    clock = FakeClock()
    key = PluginKey("acme", "everywhere")
    ids = await plugin_ids(pool, [key])
    hook_a, hook_b = hook(rx_a.url, "secret-a"), hook(rx_b.url, "secret-b")
    engine_a = AlertEngine(pool, [HOT], clock=clock, webhooks=[hook_a], instance="host-a")
    engine_b = AlertEngine(pool, [HOT], clock=clock, webhooks=[hook_b], instance="host-b")
    await engine_a.start()
    await engine_b.start()
    await engine_a.process(snapshot(clock(), [plugin_sample(key, clock(), cpu=90)]), ids)
    await engine_b.process(snapshot(clock(), [plugin_sample(key, clock(), cpu=95)]), ids)
    clock.advance(1)
    # Host a recovers, host b stays hot: only a's alert resolves.
    await engine_a.process(snapshot(clock(), [plugin_sample(key, clock(), cpu=1)]), ids)
    await engine_b.process(snapshot(clock(), [plugin_sample(key, clock(), cpu=96)]), ids)
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT instance, status, labels->>'instance' AS label FROM plugin_alerts"
            " ORDER BY instance"
        )
    assert [(r["instance"], r["status"], r["label"]) for r in rows] == [
        ("host-a", "resolved", "host-a"),
        ("host-b", "firing", "host-b"),
    ]
    async with (
        OutboxDeliverer(pool, [hook_a], clock=clock, instance="host-a") as deliver_a,
        OutboxDeliverer(pool, [hook_b], clock=clock, instance="host-b") as deliver_b,
    ):
        await drain(deliver_a, deliver_b)
    assert [r.json["status"] for r in rx_a.received] == ["firing", "resolved"]
    assert [r.json["status"] for r in rx_b.received] == ["firing"]
    assert rx_b.received[0].json["alerts"][0]["labels"]["instance"] == "host-b"
