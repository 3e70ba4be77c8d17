"""The alert engine against the real database and a real HTTP receiver (injected clock)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import socket
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from pluginmon.alerts.engine import AlertEngine, EvaluationReport
from pluginmon.alerts.outbox import OutboxDeliverer
from pluginmon.alerts.rules import Rule, WebhookConfig
from pluginmon.collectors.models import PluginKey
from pluginmon.collectors.sampler import Sampler
from pluginmon.daemon.config_health import parse_health_config
from pluginmon.daemon.config_sections import parse_rules
from pluginmon.storage import alert_state
from tests.alerts_helpers import (
    T0,
    FakeClock,
    Receiver,
    TcpProxy,
    acknowledge_as,
    audit_actions,
    plugin_ids,
    plugin_sample,
    silence_as,
    snapshot,
)

KEY = PluginKey("acme", "resizer", "production")
RULES = parse_rules(
    [
        {
            "name": "CpuHigh",
            "metric": "cpu_percent",
            "op": ">",
            "threshold": 50,
            "clear_threshold": 30,
            "for_seconds": 10,
            "severity": "critical",
            "labels": {"team": "imaging"},
            "annotations": {"summary": "{plugin} cpu {value:.0f}% over {threshold:g}%"},
        },
        {"name": "Down", "metric": "up", "op": "==", "threshold": 0, "severity": "critical"},
    ],
    include_builtins=False,
)


@pytest.fixture
async def pool(migrated_db: str) -> AsyncIterator[asyncpg.Pool]:
    async with asyncpg.create_pool(migrated_db, min_size=1, max_size=4) as p:
        yield p


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver(secret="topsecret")
    await r.start()
    try:
        yield r
    finally:
        await r.stop()


def hook_for(receiver: Receiver, **kw: object) -> WebhookConfig:
    return WebhookConfig(name="ops", url=receiver.url, secret=receiver.secret, **kw)  # type: ignore[arg-type]


async def cycle(
    engine: AlertEngine, clock: FakeClock, ids: dict[PluginKey, int], **cpu: float
) -> list[str]:
    """One evaluation of KEY (and friends) at the clock's time; returns the transition kinds."""
    samples = [
        plugin_sample(PluginKey("acme", name, "production"), clock(), cpu=value)
        for name, value in cpu.items()
    ]
    report = await engine.process(snapshot(clock(), samples), ids)
    return [f"{rule}:{kind}" for rule, _, kind in report.transitions]


async def test_fire_persist_deliver_resolve(pool: asyncpg.Pool, receiver: Receiver) -> None:
    clock = FakeClock()
    hook = hook_for(receiver)
    engine = AlertEngine(
        pool, RULES, clock=clock, external_url="http://pluginmon.test:9464", webhooks=[hook]
    )
    await engine.start()
    ids = await plugin_ids(pool, [KEY])
    async with OutboxDeliverer(pool, [hook], None, clock=clock) as deliverer:
        assert await cycle(engine, clock, ids, resizer=90) == ["CpuHigh:pending"]
        assert engine.firing() == []
        clock.advance(10)
        assert await cycle(engine, clock, ids, resizer=95) == ["CpuHigh:firing"]
        firing = engine.firing()
        assert [(a.alertname, a.severity, a.value) for a in firing] == [
            ("CpuHigh", "critical", 95.0)
        ]

        async with pool.acquire() as conn:
            rows = await alert_state.load_alerts(conn)
            outbox = await conn.fetch("SELECT status, receiver FROM notification_outbox")
        assert [(r.status, r.value, r.fired_at, r.started_at) for r in rows] == [
            ("firing", 95.0, clock(), clock() - timedelta(seconds=10))
        ]
        assert rows[0].fingerprint == firing[0].fingerprint
        assert [(o["status"], o["receiver"]) for o in outbox] == [("pending", "ops")]

        report = await deliverer.deliver_due()
        assert (report.claimed, report.delivered) == (1, 1)
        clock.advance(10)
        assert await cycle(engine, clock, ids, resizer=40) == []  # above clear_threshold 30
        clock.advance(10)
        assert await cycle(engine, clock, ids, resizer=10) == ["CpuHigh:resolved"]
        assert engine.firing() == []
        report = await deliverer.deliver_due()
        assert report.delivered == 1
        assert deliverer.stats().notifications == {("ops", "delivered"): 2}
        assert deliverer.stats().pending == 0

    first, second = receiver.received
    assert first.signature_ok is True
    assert second.signature_ok is True
    assert first.idempotency_key != second.idempotency_key
    body = first.json
    assert body["version"] == "4"
    assert body["status"] == "firing"
    assert body["receiver"] == "ops"
    assert body["groupKey"] == '{}:{environment="production", plugin="resizer", tenant="acme"}'
    assert body["truncatedAlerts"] == 0
    assert body["groupLabels"] == {
        "environment": "production",
        "plugin": "resizer",
        "tenant": "acme",
    }
    assert body["externalURL"] == "http://pluginmon.test:9464"
    labels = {
        "alertname": "CpuHigh",
        "environment": "production",
        "instance": socket.gethostname(),  # the engine's default instance
        "plugin": "resizer",
        "severity": "critical",
        "team": "imaging",
        "tenant": "acme",
    }
    assert body["commonLabels"] == labels
    assert body["commonAnnotations"] == {"summary": "resizer cpu 95% over 50%"}
    (alert,) = body["alerts"]
    assert alert["status"] == "firing"
    assert alert["labels"] == labels
    assert alert["startsAt"] == "2026-03-01T12:00:00.000Z"
    assert alert["endsAt"] == "0001-01-01T00:00:00Z"
    assert alert["fingerprint"] == firing[0].fingerprint
    assert alert["generatorURL"] == "http://pluginmon.test:9464"
    resolved = second.json
    assert resolved["status"] == "resolved"
    assert resolved["alerts"][0]["status"] == "resolved"
    assert resolved["alerts"][0]["endsAt"] == "2026-03-01T12:00:30.000Z"
    assert resolved["alerts"][0]["fingerprint"] == alert["fingerprint"]

    async with pool.acquire() as conn:
        rows = await alert_state.load_alerts(conn)
        sent = await conn.fetch(
            "SELECT idempotency_key, receiver, status_code FROM alert_notifications_sent ORDER BY delivered_at"
        )
        outbox = await conn.fetch("SELECT status, attempts FROM notification_outbox ORDER BY id")
        health = await conn.fetchrow(
            "SELECT health_score, last_health_check FROM plugins WHERE id = $1", ids[KEY]
        )
        series = await conn.fetch(
            "SELECT value, labels::text AS labels FROM plugin_metrics "
            "WHERE plugin_id = $1 AND metric_name = 'health_score' ORDER BY \"timestamp\"",
            ids[KEY],
        )
    assert [(r.status, r.resolved_at is None) for r in rows] == [("resolved", False)]
    assert [s["idempotency_key"] for s in sent] == [first.idempotency_key, second.idempotency_key]
    assert {s["status_code"] for s in sent} == {200}
    assert [(o["status"], o["attempts"]) for o in outbox] == [("delivered", 1), ("delivered", 1)]
    # plugins.health_score is rewritten when the score moves by >= 0.5 or every 60 s: the
    # last cycle (100 -> 100) left it at the previous one
    assert health["last_health_check"] == clock() - timedelta(seconds=10)
    assert len(series) == 4
    # default cpu warn 80, critical 100: cpu 90 scores 50
    labels_first = json.loads(series[0]["labels"])
    assert labels_first["weakest"] == "cpu"
    assert labels_first["components"]["cpu"] == 50.0
    assert series[3]["value"] == 100.0
    assert health["health_score"] == 100.0


async def test_repeat_interval_and_acknowledge(pool: asyncpg.Pool, receiver: Receiver) -> None:
    clock = FakeClock()
    hook = hook_for(receiver, repeat_interval_seconds=60.0)
    rules = [Rule(name="CpuHigh", metric="cpu_percent", op=">", threshold=50)]
    engine = AlertEngine(pool, rules, clock=clock, webhooks=[hook])
    await engine.start()
    ids = await plugin_ids(pool, [KEY])
    queued = []
    for _ in range(8):  # 0..70 s firing: first notification at 0, one repeat at 60
        report = await engine.process(snapshot(clock(), [plugin_sample(KEY, clock(), cpu=90)]), ids)
        queued.append(report.notifications_queued)
        clock.advance(10)
    assert queued == [1, 0, 0, 0, 0, 0, 1, 0]
    (alert,) = engine.firing()
    assert await acknowledge_as(pool, alert.fingerprint, by="alice", now=clock())
    assert not await acknowledge_as(pool, alert.fingerprint, by="carol", now=clock())
    # The tenant and the plugin the engine created on first sight are audited too.
    assert await audit_actions(pool, discovered=True) == [
        ("acme", "daemon", "tenant.create"),
        ("acme", "daemon", "plugin.create"),
        ("acme", "alice", "alert.acknowledge"),
    ]
    for _ in range(8):
        report = await engine.process(snapshot(clock(), [plugin_sample(KEY, clock(), cpu=90)]), ids)
        assert report.notifications_queued == 0
        clock.advance(10)
    async with pool.acquire() as conn:
        (row,) = await alert_state.load_open_alerts(conn)
    assert (row.status, row.acknowledged_by) == ("acknowledged", "alice")
    report = await engine.process(snapshot(clock(), [plugin_sample(KEY, clock(), cpu=1)]), ids)
    assert report.notifications_queued == 1  # the resolution is still sent
    async with OutboxDeliverer(pool, [hook], clock=clock) as deliverer:
        for _ in range(3):
            await deliverer.deliver_due()
    assert [r.json["status"] for r in receiver.received] == ["firing", "firing", "resolved"]


async def test_restart_mid_alert_neither_duplicates_nor_loses(
    pool: asyncpg.Pool, receiver: Receiver
) -> None:
    clock = FakeClock()
    hook = hook_for(receiver)
    ids = await plugin_ids(pool, [KEY, PluginKey("acme", "thumbs", "production")])
    engine = AlertEngine(pool, RULES, clock=clock, webhooks=[hook])
    await engine.start()
    await cycle(engine, clock, ids, resizer=90, thumbs=90)
    clock.advance(10)
    assert sorted(await cycle(engine, clock, ids, resizer=90, thumbs=90)) == ["CpuHigh:firing"] * 2
    clock.advance(5)
    assert await cycle(engine, clock, ids, resizer=10, thumbs=90) == ["CpuHigh:resolved"]
    async with OutboxDeliverer(pool, [hook], clock=clock) as deliverer:
        await deliverer.deliver_due()  # firing(resizer), firing(thumbs) in parallel groups
        await deliverer.deliver_due()  # resolved(resizer)

        # "Restart": a new engine on the same database, thumbs still firing.
        engine2 = AlertEngine(pool, RULES, clock=clock, webhooks=[hook])
        await engine2.start()
        assert [(a.alertname, a.key.plugin, a.status) for a in engine2.alerts()] == [
            ("CpuHigh", "thumbs", "firing")
        ]
        clock.advance(10)
        assert await cycle(engine2, clock, ids, resizer=10, thumbs=95) == []
        await deliverer.deliver_due()
        assert len(receiver.received) == 3  # nothing re-sent after the restart
        clock.advance(10)
        assert await cycle(engine2, clock, ids, resizer=10, thumbs=5) == ["CpuHigh:resolved"]
        await deliverer.deliver_due()
    kinds = sorted((r.json["groupLabels"]["plugin"], r.json["status"]) for r in receiver.received)
    assert kinds == [
        ("resizer", "firing"),
        ("resizer", "resolved"),
        ("thumbs", "firing"),
        ("thumbs", "resolved"),
    ]
    assert len({r.idempotency_key for r in receiver.received}) == 4


async def test_restart_keeps_pending_start_time(pool: asyncpg.Pool) -> None:
    clock = FakeClock()
    ids = await plugin_ids(pool, [KEY])
    engine = AlertEngine(pool, RULES, clock=clock)
    await engine.start()
    assert await cycle(engine, clock, ids, resizer=90) == ["CpuHigh:pending"]
    clock.advance(6)
    engine2 = AlertEngine(pool, RULES, clock=clock)
    await engine2.start()
    assert await cycle(engine2, clock, ids, resizer=90) == []
    clock.advance(4)  # 10 s after the condition first held, across the restart
    assert await cycle(engine2, clock, ids, resizer=90) == ["CpuHigh:firing"]
    async with pool.acquire() as conn:
        rows = await alert_state.load_alerts(conn)
    assert [(r.status, r.started_at, r.fired_at) for r in rows] == [
        ("firing", clock() - timedelta(seconds=10), clock())
    ]


async def test_hysteresis_sends_one_notification(pool: asyncpg.Pool, receiver: Receiver) -> None:
    clock = FakeClock()
    hook = hook_for(receiver)
    rules = [
        Rule(name="Flappy", metric="cpu_percent", op=">", threshold=80),
        Rule(name="Damped", metric="cpu_percent", op=">", threshold=80, clear_threshold=60),
    ]
    engine = AlertEngine(pool, rules, clock=clock, webhooks=[hook])
    await engine.start()
    ids = await plugin_ids(pool, [KEY])
    kinds: list[str] = []
    for value in [79, 81, 79, 82, 78, 81, 79, 83, 77, 81]:
        kinds += await cycle(engine, clock, ids, resizer=value)
        clock.advance(1)
    assert kinds.count("Damped:firing") == 1
    assert kinds.count("Damped:resolved") == 0
    assert kinds.count("Flappy:firing") == 5
    assert kinds.count("Flappy:resolved") == 4


async def test_inhibition_through_dependency(pool: asyncpg.Pool, receiver: Receiver) -> None:
    clock = FakeClock()
    hook = hook_for(receiver)
    db_key = PluginKey("acme", "database", "production")
    app_key = PluginKey("acme", "api", "production")
    ids = await plugin_ids(pool, [db_key, app_key])
    async with pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO plugin_dependencies (tenant_id, plugin_id, depends_on_plugin_id, kind) "
            "VALUES ('acme', $1, $2, 'runtime')",
            ids[app_key],
            ids[db_key],
        )
    rules = [
        Rule(name="Down", metric="up", op="==", threshold=0),
        Rule(name="Starved", metric="threads", op="<", threshold=1),
    ]
    engine = AlertEngine(pool, rules, clock=clock, webhooks=[hook])
    await engine.start()

    async def run(db_up: bool, app_up: bool) -> None:
        samples = [
            plugin_sample(db_key, clock(), up=db_up),
            plugin_sample(app_key, clock(), up=app_up),
        ]
        await engine.process(snapshot(clock(), samples), ids)
        clock.advance(1)

    await run(db_up=False, app_up=False)  # the database goes down, taking the api with it
    views = {(a.key.plugin, a.alertname): a for a in engine.alerts()}
    assert views[("api", "Down")].inhibited
    assert views[("api", "Starved")].inhibited
    assert not views[("database", "Down")].inhibited
    assert sorted((a.key.plugin, a.alertname) for a in engine.firing()) == [
        ("database", "Down"),
        ("database", "Starved"),
    ]
    async with pool.acquire() as conn:
        stored = {
            (r.labels["plugin"], r.rule_name): r.inhibited
            for r in await alert_state.load_open_alerts(conn)
        }
        outbox = await conn.fetch("SELECT body FROM notification_outbox")
    assert stored == {
        ("database", "Down"): False,
        ("database", "Starved"): False,
        ("api", "Down"): True,
        ("api", "Starved"): True,
    }
    assert [json.loads(o["body"])["groupLabels"]["plugin"] for o in outbox] == ["database"]

    await run(db_up=True, app_up=False)  # database back, api still down: now it is news
    views = {(a.key.plugin, a.alertname): a for a in engine.alerts()}
    assert not views[("api", "Down")].inhibited
    async with OutboxDeliverer(pool, [hook], clock=clock) as deliverer:
        for _ in range(3):
            await deliverer.deliver_due()
    got = sorted(
        (
            r.json["groupLabels"]["plugin"],
            r.json["status"],
            tuple(a["labels"]["alertname"] for a in r.json["alerts"]),
        )
        for r in receiver.received
    )
    assert got == [
        ("api", "firing", ("Down", "Starved")),
        ("database", "firing", ("Down", "Starved")),
        ("database", "resolved", ("Down", "Starved")),
    ]


async def test_silence_mutes_until_it_ends(pool: asyncpg.Pool, receiver: Receiver) -> None:
    clock = FakeClock()
    hook = hook_for(receiver)
    engine = AlertEngine(pool, RULES, clock=clock, webhooks=[hook])
    await engine.start()
    ids = await plugin_ids(pool, [KEY])
    await silence_as(
        pool,
        tenant="acme",
        matchers={"alertname": "Cpu*", "plugin": "resizer"},
        ends_at=clock() + timedelta(seconds=30),
        by="bob",
        now=clock(),
        comment="deploying",
    )
    assert await audit_actions(pool) == [("acme", "bob", "silence.create")]
    await cycle(engine, clock, ids, resizer=90)
    clock.advance(10)
    report = await engine.process(snapshot(clock(), [plugin_sample(KEY, clock(), cpu=90)]), ids)
    assert report.notifications_queued == 0
    assert engine.firing() == []
    assert [a.status for a in engine.alerts()] == ["silenced"]
    async with pool.acquire() as conn:
        (row,) = await alert_state.load_open_alerts(conn)
    assert row.status == "silenced"
    assert row.silenced_until == clock() + timedelta(seconds=20)
    clock.advance(25)
    report = await engine.process(snapshot(clock(), [plugin_sample(KEY, clock(), cpu=90)]), ids)
    assert report.notifications_queued == 1
    assert [a.status for a in engine.alerts()] == ["firing"]


async def test_database_outage_keeps_state_and_outbox_in_memory(
    pool: asyncpg.Pool, migrated_db: str, receiver: Receiver
) -> None:
    parts = urlsplit(migrated_db)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    await proxy.up()
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{proxy.port}"
    proxied = urlunsplit(parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host))
    clock = FakeClock()
    hook = hook_for(receiver)
    ids = await plugin_ids(pool, [KEY])
    try:
        async with asyncpg.create_pool(proxied, min_size=1, max_size=2) as flaky:
            engine = AlertEngine(
                flaky, RULES, clock=clock, webhooks=[hook], database_timeout_seconds=3
            )
            await engine.start()
            await proxy.down()
            seen: list[str] = []
            for value in [90, 90, 10, 90, 90]:  # pending, firing, resolved, pending, firing
                report = await engine.process(
                    snapshot(clock(), [plugin_sample(KEY, clock(), cpu=value)]), ids
                )
                assert not report.persisted
                assert report.database_error is not None
                seen += [k for _, _, k in report.transitions]
                clock.advance(10)
            assert seen == ["pending", "firing", "resolved", "pending", "firing"]
            assert report.unpersisted_notifications == 3
            assert [a.status for a in engine.alerts()] == ["firing"]
            await proxy.up()
            report = await engine.process(
                snapshot(clock(), [plugin_sample(KEY, clock(), cpu=90)]), ids
            )
            assert report.persisted
            assert (report.unpersisted_alerts, report.unpersisted_notifications) == (0, 0)
    finally:
        await proxy.down()
    async with pool.acquire() as conn:
        rows = await alert_state.load_alerts(conn)
        outbox = await conn.fetch("SELECT body, created_at FROM notification_outbox ORDER BY id")
    assert [(r.status, r.started_at - T0) for r in rows] == [
        ("resolved", timedelta(0)),
        ("firing", timedelta(seconds=30)),
    ]
    assert [json.loads(o["body"])["status"] for o in outbox] == ["firing", "resolved", "firing"]
    async with OutboxDeliverer(pool, [hook], clock=clock) as deliverer:
        for _ in range(3):
            await deliverer.deliver_due()
    assert [r.json["status"] for r in receiver.received] == ["firing", "resolved", "firing"]


async def test_plugin_gone_for_good_resolves_its_alerts(
    pool: asyncpg.Pool, receiver: Receiver
) -> None:
    clock = FakeClock()
    hook = hook_for(receiver)
    other = PluginKey("acme", "other", "production")
    ids = await plugin_ids(pool, [KEY, other])
    engine = AlertEngine(pool, RULES, clock=clock, webhooks=[hook], stale_after_seconds=30)
    await engine.start()
    await cycle(engine, clock, ids, resizer=90)
    clock.advance(10)
    assert await cycle(engine, clock, ids, resizer=90) == ["CpuHigh:firing"]
    kinds: list[str] = []
    for _ in range(4):  # only `other` is sampled from now on
        clock.advance(10)
        kinds += await cycle(engine, clock, ids, other=1)
    assert kinds == ["CpuHigh:resolved"]
    assert engine.alerts() == []
    async with pool.acquire() as conn:
        (row,) = await alert_state.load_alerts(conn)
        bodies = [
            json.loads(b)
            for b in await conn.fetchval(
                "SELECT array_agg(body ORDER BY id) FROM notification_outbox"
            )
        ]
    assert row.status == "resolved"
    assert [b["status"] for b in bodies] == ["firing", "resolved"]


async def test_finished_outbox_rows_are_pruned(pool: asyncpg.Pool, receiver: Receiver) -> None:
    clock = FakeClock()
    hook = hook_for(receiver)
    ids = await plugin_ids(pool, [KEY])
    engine = AlertEngine(pool, RULES, clock=clock, webhooks=[hook])
    await engine.start()
    await cycle(engine, clock, ids, resizer=90)
    clock.advance(10)
    await cycle(engine, clock, ids, resizer=90)
    async with OutboxDeliverer(pool, [hook], clock=clock, keep_finished_seconds=60) as deliverer:
        await deliverer.deliver_due()
        clock.advance(61)
        await cycle(engine, clock, ids, resizer=5)  # resolved: a new pending row
        clock.advance(3600)
        await deliverer.deliver_due()  # delivers the resolution, then prunes the old firing
    async with pool.acquire() as conn:
        left = await conn.fetch("SELECT status, body FROM notification_outbox")
        sent = await conn.fetchval("SELECT count(*) FROM alert_notifications_sent")
    assert [(r["status"], json.loads(r["body"])["status"]) for r in left] == [
        ("delivered", "resolved")
    ]
    assert sent == 1
    assert len(receiver.received) == 2


INSERT_GAUGE = (
    'INSERT INTO plugin_metrics ("timestamp", tenant_id, plugin_id, environment, metric_name, metric_kind, value) '
    "VALUES ($1, 'acme', $2, 'production', $3, 'gauge', $4)"
)


async def test_rules_and_health_read_plugin_metrics(pool: asyncpg.Pool) -> None:
    clock = FakeClock()
    ids = await plugin_ids(pool, [KEY])
    async with pool.acquire() as conn:
        await conn.executemany(
            INSERT_GAUGE,
            [
                (clock() - timedelta(seconds=60), ids[KEY], "queue_depth", 50.0),
                (clock() - timedelta(seconds=5), ids[KEY], "queue_depth", 700.0),  # newest wins
                (clock() - timedelta(hours=2), ids[KEY], "error_rate", 9.0),  # too old: ignored
            ],
        )
    rules = parse_rules(
        [
            {"name": "QueueDeep", "metric": "queue_depth", "op": ">", "threshold": 500},
            {"name": "Errors", "metric": "error_rate", "op": ">", "threshold": 1},
        ],
        include_builtins=False,
    )
    health = parse_health_config(
        {"metrics": [{"name": "queue_depth", "warn": 100, "critical": 1100}]}
    )
    engine = AlertEngine(pool, rules, clock=clock, health_config=health)
    await engine.start()
    assert await cycle(engine, clock, ids, resizer=1) == ["QueueDeep:firing"]
    score = engine.latest_health()[KEY]
    component = score.component("metric:queue_depth")
    assert component is not None
    assert (component.value, component.score) == (700.0, 40.0)
    assert engine.firing()[0].value == 700.0


async def test_plugin_metrics_are_read_for_a_plugin_once_its_id_is_known(
    pool: asyncpg.Pool,
) -> None:
    # The engine keeps the (id, environment) pairs of a cycle whose ids were all known; a
    # plugin without an id yet must be looked up again each cycle until it has one.
    clock = FakeClock()
    other = PluginKey("acme", "thumbnailer", "production")
    ids = await plugin_ids(pool, [KEY, other])
    async with pool.acquire() as conn:
        await conn.executemany(
            INSERT_GAUGE,
            [(clock() - timedelta(seconds=5), ids[KEY], "queue_depth", 700.0)]
            + [
                (clock() - timedelta(seconds=s), ids[other], "queue_depth", 900.0)
                for s in (4, 3, 2)
            ],
        )
    rules = parse_rules(
        [{"name": "QueueDeep", "metric": "queue_depth", "op": ">", "threshold": 500}],
        include_builtins=False,
    )
    engine = AlertEngine(pool, rules, clock=clock)
    await engine.start()
    first = {KEY: ids[KEY]}  # the thumbnailer's id is not known yet
    assert await cycle(engine, clock, first, resizer=1, thumbnailer=1) == ["QueueDeep:firing"]
    assert [a.key for a in engine.firing()] == [KEY]
    clock.advance(1)
    assert await cycle(engine, clock, ids, resizer=1, thumbnailer=1) == ["QueueDeep:firing"]
    assert sorted((a.key.plugin, a.value) for a in engine.firing()) == [
        ("resizer", 700.0),
        ("thumbnailer", 900.0),
    ]
    # The same plugins again: the values still come from the database.
    async with pool.acquire() as conn:
        await conn.execute(INSERT_GAUGE, clock(), ids[other], "queue_depth", 950.0)
    clock.advance(1)
    assert await cycle(engine, clock, ids, resizer=1, thumbnailer=1) == []
    assert sorted((a.key.plugin, a.value) for a in engine.firing()) == [
        ("resizer", 700.0),
        ("thumbnailer", 950.0),
    ]
    # The same plugins, one under another id (its row deleted and created again, say): the
    # values are those of the id given now.
    spare = (await plugin_ids(pool, [PluginKey("acme", "spare", "production")])).popitem()[1]
    async with pool.acquire() as conn:
        await conn.execute(INSERT_GAUGE, clock(), spare, "queue_depth", 100.0)
    clock.advance(1)
    assert await cycle(engine, clock, {KEY: ids[KEY], other: spare}, resizer=1, thumbnailer=1) == [
        "QueueDeep:resolved"
    ]
    assert [(a.key.plugin, a.value) for a in engine.firing()] == [("resizer", 700.0)]


async def test_refused_row_does_not_block_the_others(
    pool: asyncpg.Pool, receiver: Receiver
) -> None:
    clock = FakeClock()
    hook = hook_for(receiver)
    other = PluginKey("acme", "other", "production")
    ids = await plugin_ids(pool, [KEY, other])
    engine = AlertEngine(pool, RULES, clock=clock, webhooks=[hook])
    await engine.start()
    await cycle(engine, clock, ids, resizer=90, other=90)  # both pending, stored
    async with pool.acquire() as conn:
        await conn.execute("DELETE FROM plugins WHERE id = $1", ids[KEY])  # cascades its alerts
    clock.advance(10)
    report = await engine.process(
        snapshot(
            clock(), [plugin_sample(KEY, clock(), cpu=90), plugin_sample(other, clock(), cpu=90)]
        ),
        ids,
    )
    assert report.persisted
    assert report.unpersisted_alerts == report.unpersisted_notifications == 0
    async with pool.acquire() as conn:
        rows = await alert_state.load_alerts(conn)
        outbox = await conn.fetch("SELECT body FROM notification_outbox")
    assert [(r.labels["plugin"], r.status) for r in rows] == [("other", "firing")]
    assert [json.loads(o["body"])["groupLabels"]["plugin"] for o in outbox] == ["other"]


async def test_vanished_label_discovered_plugin_leaves_no_pending_alert(pool: asyncpg.Pool) -> None:
    """Issue 15: a label-discovered plugin that went away left its pending alerts pending in
    plugin_alerts. A real process declares a plugin with PLUGINMON_* labels, the real sampler
    discovers it, the process dies: the plugin is down (pending, for_seconds is long) for the
    sampler's grace cycles, then gone from the snapshots, and its pending alert is cancelled
    in the first cycle without it."""
    name = f"vanishing-{uuid.uuid4().hex[:8]}"
    key = PluginKey("acme", name, "production")
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "import time; time.sleep(120)",
        env={**os.environ, "PLUGINMON_TENANT": "acme", "PLUGINMON_PLUGIN": name},
    )
    try:
        sampler = Sampler([], label_discovery=True, host="test-host", label_grace_cycles=2)
        rule = Rule(name="Down", metric="up", op="==", threshold=0, for_seconds=600)
        engine = AlertEngine(pool, [rule], instance="h")  # the real clock
        await engine.start()
        ids = await plugin_ids(pool, [key])

        async def run() -> tuple[bool | None, list[tuple[str, str]]]:
            """One sample and one evaluation of our plugin only (other processes on the
            machine may carry labels too): (its up, or None when absent; transitions)."""
            snap = await asyncio.to_thread(sampler.sample)
            mine = tuple(s for s in snap.samples if s.key == key)
            report = await engine.process(dataclasses.replace(snap, samples=mine), ids)
            assert report.persisted, report.database_error
            kinds = [(rule_name, kind) for rule_name, k, kind in report.transitions if k == key]
            return (mine[0].up if mine else None), kinds

        async with asyncio.timeout(30):
            while (seen := await run()) != (True, []):  # discovered, running
                assert seen[0] is None, seen  # not discovered yet
                await asyncio.sleep(0.1)
        child.kill()
        await child.wait()
        assert await run() == (False, [("Down", "pending")])
        async with pool.acquire() as conn:
            rows = await alert_state.load_alerts(conn, plugin_id=ids[key])
        assert [(r.rule_name, r.status) for r in rows] == [("Down", "pending")]
        states: list[tuple[bool | None, list[tuple[str, str]]]] = []
        for _ in range(5):  # grace cycles, then gone
            states.append(await run())
            if states[-1][0] is None:
                break
        assert states[-1] == (None, [("Down", "cancelled")]), states
        assert all(up is False and kinds == [] for up, kinds in states[:-1]), states
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    assert [a for a in engine.alerts() if a.key == key] == []
    async with pool.acquire() as conn:
        rows = await alert_state.load_alerts(conn, plugin_id=ids[key])
        outbox = await conn.fetchval("SELECT count(*) FROM notification_outbox")
    assert [(r.rule_name, r.status, r.fired_at) for r in rows] == [("Down", "resolved", None)]
    assert outbox == 0


async def test_a_plugin_without_an_id_is_evaluated_and_written_once_it_has_one(
    pool: asyncpg.Pool, receiver: Receiver
) -> None:
    """Scoring and evaluation are keyed by plugin key; database ids matter only to
    persistence. Here the ids come from a source given to the constructor (a dict the
    "ingest side" fills in later), and process() is called without ids."""
    clock = FakeClock()
    hook = hook_for(receiver)
    known: dict[PluginKey, int] = {}
    engine = AlertEngine(pool, RULES, clock=clock, webhooks=[hook], plugin_ids=known)
    await engine.start()

    async def run(cpu: float) -> EvaluationReport:
        report = await engine.process(snapshot(clock(), [plugin_sample(KEY, clock(), cpu=cpu)]))
        clock.advance(10)
        return report

    report = await run(90)
    assert report.transitions == (("CpuHigh", KEY, "pending"),)
    assert report.persisted  # nothing failed: the alert waits for its plugin's id
    assert (report.unpersisted_alerts, report.unpersisted_notifications) == (1, 0)
    assert KEY in engine.latest_health()
    report = await run(95)
    assert report.transitions == (("CpuHigh", KEY, "firing"),)
    assert report.notifications_queued == 1
    assert (report.unpersisted_alerts, report.unpersisted_notifications) == (1, 1)
    assert [a.status for a in engine.firing()] == ["firing"]
    async with pool.acquire() as conn:
        assert await alert_state.load_alerts(conn) == []
        assert await conn.fetchval("SELECT count(*) FROM notification_outbox") == 0

    known.update(await plugin_ids(pool, [KEY]))
    report = await run(96)
    assert report.transitions == ()
    assert report.persisted
    assert (report.unpersisted_alerts, report.unpersisted_notifications) == (0, 0)
    async with pool.acquire() as conn:
        rows = await alert_state.load_alerts(conn)
    assert [(r.plugin_id, r.status, r.started_at, r.value) for r in rows] == [
        (known[KEY], "firing", T0, 96.0)
    ]
    async with OutboxDeliverer(pool, [hook], clock=clock) as deliverer:
        for _ in range(2):
            await deliverer.deliver_due()
    assert [r.json["status"] for r in receiver.received] == ["firing"]
    assert receiver.received[0].json["alerts"][0]["fingerprint"] == rows[0].fingerprint
