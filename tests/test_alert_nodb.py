"""Alerting without the database: evaluation before start() and during outages, delivery from
the journal, and reconciliation into plugin_alerts / notification_outbox with nothing sent twice.

Real PostgreSQL behind a TCP proxy the test cuts, real HTTP receivers, an injected clock.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from pluginmon.alerts.delivery_rules import next_step
from pluginmon.alerts.engine import AlertEngine, EvaluationReport
from pluginmon.alerts.journal_delivery import JournalDeliverer
from pluginmon.alerts.notifiers import SendResult
from pluginmon.alerts.outbox import OutboxDeliverer
from pluginmon.alerts.persistence import NOT_STARTED
from pluginmon.alerts.rules import WebhookConfig
from pluginmon.collectors.models import PluginKey
from pluginmon.daemon.config_sections import parse_rules
from pluginmon.storage import alert_state
from pluginmon.storage.errors import TRANSIENT_ERRORS
from tests.alerts_helpers import (
    T0,
    FakeClock,
    Receiver,
    TcpProxy,
    plugin_ids,
    plugin_sample,
    snapshot,
)

KEY = PluginKey("acme", "resizer", "production")
SECRET = "journal-s3cret"
RULES = parse_rules(
    [
        {
            "name": "Down",
            "metric": "up",
            "op": "==",
            "threshold": 0,
            "for_seconds": 10,
            "severity": "critical",
            "annotations": {"summary": "{plugin} is down"},
        },
    ],
    include_builtins=False,
)


@pytest.fixture
async def pool(migrated_db: str) -> AsyncIterator[asyncpg.Pool]:
    async with asyncpg.create_pool(migrated_db, min_size=1, max_size=4) as p:
        yield p


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver(secret=SECRET)
    await r.start()
    try:
        yield r
    finally:
        await r.stop()


@pytest.fixture
async def proxy(migrated_db: str) -> AsyncIterator[TcpProxy]:
    """Down from the start: the database is not reachable until the test says so."""
    parts = urlsplit(migrated_db)
    p = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    await p.up()
    await p.down()
    yield p
    await p.down()


@pytest.fixture
async def flaky(migrated_db: str, proxy: TcpProxy) -> AsyncIterator[asyncpg.Pool]:
    parts = urlsplit(migrated_db)
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{proxy.port}"
    url = urlunsplit(parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host))
    async with asyncpg.create_pool(url, min_size=0, max_size=2) as p:
        yield p


def hook_for(url: str) -> WebhookConfig:
    return WebhookConfig(
        name="ops", url=url, secret=SECRET, backoff_initial_seconds=1, backoff_max_seconds=4
    )


def engine_for(
    pool: asyncpg.Pool, clock: FakeClock, hook: WebhookConfig, spool: Path
) -> AlertEngine:
    return AlertEngine(
        pool, RULES, clock=clock, webhooks=[hook], database_timeout_seconds=3, spool_dir=spool
    )


async def cycle(
    engine: AlertEngine, clock: FakeClock, *, up: bool, ids: dict[PluginKey, int] | None = None
) -> EvaluationReport:
    report = await engine.process(snapshot(clock(), [plugin_sample(KEY, clock(), up=up)]), ids)
    clock.advance(10)
    return report


async def deliver(deliverer: JournalDeliverer) -> int:
    started = await deliverer.deliver_due()
    await deliverer.drain()
    return started


async def stored(pool: asyncpg.Pool) -> tuple[list[alert_state.StoredAlert], list[asyncpg.Record]]:
    async with pool.acquire() as conn:
        alerts = await alert_state.load_alerts(conn)
        outbox = await conn.fetch(
            """SELECT o.status, o.attempts, o.idempotency_key, o.body, s.idempotency_key AS sent
                 FROM notification_outbox o
                 LEFT JOIN alert_notifications_sent s USING (tenant_id, idempotency_key)
                ORDER BY o.id"""
        )
    return alerts, outbox


def statuses(receiver: Receiver) -> list[str]:
    return [r.json["status"] for r in receiver.received]


def segments(spool: Path) -> list[Path]:
    return sorted(spool.glob("*.seg"))


async def test_fires_with_no_database_delivers_from_the_journal_and_reconciles_once(
    pool: asyncpg.Pool, flaky: asyncpg.Pool, proxy: TcpProxy, receiver: Receiver, tmp_path: Path
) -> None:
    spool = tmp_path / "alert-spool"
    clock = FakeClock()
    hook = hook_for(receiver.url)
    engine = engine_for(flaky, clock, hook, spool)
    async with JournalDeliverer(engine.journal_outbox, [hook], clock=clock) as deliverer:  # type: ignore[arg-type]
        # Never started (the schema may not exist): evaluated anyway, no plugin id either.
        first = await cycle(engine, clock, up=False)
        second = await cycle(engine, clock, up=False)
        assert [k for _, _, k in first.transitions + second.transitions] == ["pending", "firing"]
        assert (second.database_error, second.notifications_journaled) == (NOT_STARTED, 1)
        assert second.journal_batches == 2
        assert await deliver(deliverer) == 1

        (got,) = receiver.received
        assert got.signature_ok is True
        assert got.json["status"] == "firing"
        (alert,) = got.json["alerts"]
        assert {k: alert["labels"][k] for k in ("alertname", "tenant", "plugin", "severity")} == {
            "alertname": "Down",
            "tenant": "acme",
            "plugin": "resizer",
            "severity": "critical",
        }
        assert deliverer.stats().notifications == {("ops", "delivered"): 1}
        # Still firing, still no database: nothing new, nothing sent again.
        assert (await cycle(engine, clock, up=False)).notifications_queued == 0
        assert await deliver(deliverer) == 0

        # The database is there: started as the daemon does after migrating, ids resolved by
        # the ingest side.
        await proxy.up()
        ids = await plugin_ids(pool, [KEY])
        await engine.start()
        report = await cycle(engine, clock, up=False, ids=ids)
        assert report.persisted
        assert (report.unpersisted_alerts, report.unpersisted_notifications) == (0, 0)
        assert report.journal_batches == 0
        assert segments(spool) == []

    alerts, outbox = await stored(pool)
    assert [(a.rule_name, a.status, a.plugin_id, a.started_at) for a in alerts] == [
        ("Down", "firing", ids[KEY], T0)
    ]
    assert alerts[0].notified_at is not None
    assert [(o["status"], o["attempts"], o["idempotency_key"], o["sent"]) for o in outbox] == [
        ("delivered", 1, got.idempotency_key, got.idempotency_key)
    ]
    assert outbox[0]["body"].encode() == got.body  # the very bytes that were signed
    async with OutboxDeliverer(pool, [hook], clock=clock) as outbox_deliverer:
        for _ in range(3):
            assert (await outbox_deliverer.deliver_due()).claimed == 0
    assert len(receiver.received) == 1
    await engine.aclose()


async def test_restart_while_down_restores_alerts_from_the_journal(
    pool: asyncpg.Pool, flaky: asyncpg.Pool, proxy: TcpProxy, receiver: Receiver, tmp_path: Path
) -> None:
    spool = tmp_path / "alert-spool"
    clock = FakeClock()
    hook = hook_for(receiver.url)
    first = engine_for(flaky, clock, hook, spool)
    async with JournalDeliverer(first.journal_outbox, [hook], clock=clock) as deliverer:  # type: ignore[arg-type]
        await cycle(first, clock, up=False)
        await cycle(first, clock, up=False)
        assert await deliver(deliverer) == 1
    await first.aclose()  # a restart: nothing else written

    second = engine_for(flaky, clock, hook, spool)
    with pytest.raises(TRANSIENT_ERRORS):
        await second.start()  # the database is still down: the journal is read instead
    assert [(a.alertname, a.status, a.started_at) for a in second.alerts()] == [
        ("Down", "firing", T0)
    ]
    async with JournalDeliverer(second.journal_outbox, [hook], clock=clock) as deliverer:  # type: ignore[arg-type]
        report = await cycle(second, clock, up=False)
        assert (report.transitions, report.notifications_queued) == ((), 0)
        assert not report.persisted
        assert await deliver(deliverer) == 0  # delivered by the first run: marked so
        assert second.journal_outbox is not None
        assert second.journal_outbox.pending == 0

        await proxy.up()
        ids = await plugin_ids(pool, [KEY])
        report = await cycle(second, clock, up=False, ids=ids)  # start() is retried first
        assert report.persisted
        alerts, outbox = await stored(pool)
        assert [(a.status, a.started_at) for a in alerts] == [("firing", T0)]
        assert [(o["status"], o["attempts"]) for o in outbox] == [("delivered", 1)]

        # Back up: the resolution goes through the outbox table now.
        report = await cycle(second, clock, up=True, ids=ids)
        assert [k for _, _, k in report.transitions] == ["resolved"]
        assert report.notifications_journaled == 0
    async with OutboxDeliverer(pool, [hook], clock=clock) as outbox_deliverer:
        assert (await outbox_deliverer.deliver_due()).delivered == 1
        assert (await outbox_deliverer.deliver_due()).claimed == 0
    assert statuses(receiver) == ["firing", "resolved"]
    assert len({r.idempotency_key for r in receiver.received}) == 2
    alerts, outbox = await stored(pool)
    assert [a.status for a in alerts] == ["resolved"]
    assert [(o["status"], o["sent"] is not None) for o in outbox] == [
        ("delivered", True),
        ("delivered", True),
    ]
    assert segments(spool) == []
    await second.aclose()


async def test_journal_with_delivery_marks_replays_as_delivered_when_the_database_is_up(
    pool: asyncpg.Pool, flaky: asyncpg.Pool, receiver: Receiver, tmp_path: Path
) -> None:
    """The next run finds the database up: start() replays the journal, the plugin gets its
    id there, and the delivered notification is recorded as delivered, not queued."""
    spool = tmp_path / "alert-spool"
    clock = FakeClock()
    hook = hook_for(receiver.url)
    first = engine_for(flaky, clock, hook, spool)
    async with JournalDeliverer(first.journal_outbox, [hook], clock=clock) as deliverer:  # type: ignore[arg-type]
        await cycle(first, clock, up=False)
        await cycle(first, clock, up=False)
        assert await deliver(deliverer) == 1
    await first.aclose()

    second = engine_for(pool, clock, hook, spool)
    await second.start()
    assert segments(spool) == []
    alerts, outbox = await stored(pool)
    async with pool.acquire() as conn:
        plugin_id = await conn.fetchval(
            "SELECT id FROM plugins WHERE tenant_id = $1 AND name = $2", KEY.tenant, KEY.plugin
        )
    assert [(a.status, a.plugin_id) for a in alerts] == [("firing", plugin_id)]
    assert [(o["status"], o["attempts"], o["sent"]) for o in outbox] == [
        ("delivered", 1, receiver.received[0].idempotency_key)
    ]
    assert [a.status for a in second.alerts()] == ["firing"]
    report = await cycle(second, clock, up=False, ids={KEY: plugin_id})
    assert (report.persisted, report.notifications_queued) == (True, 0)
    async with OutboxDeliverer(pool, [hook], clock=clock) as outbox_deliverer:
        assert (await outbox_deliverer.deliver_due()).claimed == 0
    assert len(receiver.received) == 1
    await second.aclose()


async def test_receiver_down_through_the_outage_gets_it_once_from_the_outbox(
    pool: asyncpg.Pool, flaky: asyncpg.Pool, proxy: TcpProxy, tmp_path: Path
) -> None:
    """Retried from the journal with backoff; when the database is back the notification
    moves to the outbox table with its attempts, and the outbox deliverer finishes it."""
    receiver = Receiver(secret=SECRET, responses=[503, 503])
    await receiver.start()
    try:
        spool = tmp_path / "alert-spool"
        clock = FakeClock()
        hook = hook_for(receiver.url)
        engine = engine_for(flaky, clock, hook, spool)
        async with JournalDeliverer(engine.journal_outbox, [hook], clock=clock) as deliverer:  # type: ignore[arg-type]
            await cycle(engine, clock, up=False)
            await cycle(engine, clock, up=False)
            assert await deliver(deliverer) == 1
            assert await deliver(deliverer) == 0  # backing off (1 s at least)
            clock.advance(5)
            assert await deliver(deliverer) == 1
            assert receiver.attempts == 2
            assert deliverer.stats().notifications == {("ops", "retry"): 2}

            await proxy.up()
            ids = await plugin_ids(pool, [KEY])
            await engine.start()
            assert (await cycle(engine, clock, up=False, ids=ids)).persisted
            _, outbox = await stored(pool)
            assert [(o["status"], o["attempts"]) for o in outbox] == [("pending", 2)]
            assert deliverer.stats().pending == 0
            clock.advance(60)
            assert await deliver(deliverer) == 0  # the outbox table owns it now
        async with OutboxDeliverer(pool, [hook], clock=clock) as outbox_deliverer:
            assert (await outbox_deliverer.deliver_due()).delivered == 1
        _, outbox = await stored(pool)
        assert [(o["status"], o["attempts"]) for o in outbox] == [("delivered", 3)]
        assert receiver.attempts == 3
        assert statuses(receiver) == ["firing"]
        await engine.aclose()
    finally:
        await receiver.stop()


class GatedReceiver:
    """Answers 200 to every POST, but holds the first one until ``release()``."""

    def __init__(self) -> None:
        self.bodies: list[tuple[str, bytes]] = []  # (idempotency key, body) of 200s
        self.arrived = asyncio.Event()
        self._gate = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{port}/hook"

    def release(self) -> None:
        self._gate.set()

    async def stop(self) -> None:
        self._gate.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        first = not self.arrived.is_set()
        self.arrived.set()
        if first:
            await self._gate.wait()
        self.bodies.append((request.headers["Idempotency-Key"], body))
        return web.Response(text="ok")


async def test_a_post_in_flight_when_the_database_returns_is_not_sent_twice(
    pool: asyncpg.Pool, flaky: asyncpg.Pool, proxy: TcpProxy, tmp_path: Path
) -> None:
    """The firing POST is still in flight when the database answers: it stays with the
    journal, and so does the resolution queued behind it (a resolution never overtakes its
    firing, in the journal or in the table). Each is delivered once, in order."""
    gated = GatedReceiver()
    await gated.start()
    try:
        spool = tmp_path / "alert-spool"
        clock = FakeClock()
        hook = hook_for(gated.url)
        engine = engine_for(flaky, clock, hook, spool)
        async with JournalDeliverer(engine.journal_outbox, [hook], clock=clock) as deliverer:  # type: ignore[arg-type]
            await cycle(engine, clock, up=False)
            await cycle(engine, clock, up=False)
            assert await deliverer.deliver_due() == 1
            async with asyncio.timeout(10):
                await gated.arrived.wait()

            await proxy.up()
            ids = await plugin_ids(pool, [KEY])
            await engine.start()
            report = await cycle(engine, clock, up=True, ids=ids)  # resolved meanwhile
            assert report.persisted
            assert report.notifications_journaled == 1  # behind the firing one
            alerts, outbox = await stored(pool)
            assert [a.status for a in alerts] == ["resolved"]
            assert outbox == []  # the firing one is in flight, the resolution waits for it
            assert await deliverer.deliver_due() == 0  # one at a time per group

            gated.release()
            await deliverer.drain()
            assert await deliver(deliverer) == 1  # now the resolution
            report = await cycle(engine, clock, up=True, ids=ids)
            assert report.persisted
            assert report.unpersisted_notifications == 0
            assert report.journal_batches == 0
        _, outbox = await stored(pool)
        assert [(json.loads(o["body"])["status"], o["status"]) for o in outbox] == [
            ("firing", "delivered"),
            ("resolved", "delivered"),
        ]
        async with OutboxDeliverer(pool, [hook], clock=clock) as outbox_deliverer:
            assert (await outbox_deliverer.deliver_due()).claimed == 0
        assert [json.loads(b)["status"] for _, b in gated.bodies] == ["firing", "resolved"]
        assert len({k for k, _ in gated.bodies}) == 2
        await engine.aclose()
    finally:
        await gated.stop()


async def test_journal_attempts_count_in_pluginmon_notifications_total_and_a_reload_adds_one(
    pool: asyncpg.Pool, receiver: Receiver, tmp_path: Path
) -> None:
    """The database is up but the engine is not started yet (the daemon migrates meanwhile):
    the first notification goes out from the journal, and it is a notification like any
    other in pluginmon_notifications_total (the metric deploy/ alerts on and the CI run
    waited for). A receiver configured by a reload is used by the journal's deliverer."""
    clock = FakeClock()
    hook = hook_for(receiver.url)
    engine = engine_for(pool, clock, hook, tmp_path / "alert-spool")
    registry = CollectorRegistry()
    async with OutboxDeliverer(pool, [hook], clock=clock) as outbox:
        registry.register(outbox)
        async with JournalDeliverer(
            engine.journal_outbox,  # type: ignore[arg-type]
            [],  # configured by the "reload" below
            clock=clock,
            attempts=outbox.attempts,
        ) as deliverer:
            registry.register(deliverer)
            await cycle(engine, clock, up=False)
            report = await cycle(engine, clock, up=False)
            assert (report.database_error, report.notifications_journaled) == (NOT_STARTED, 1)
            assert not deliverer.receivers
            assert await deliver(deliverer) == 0  # its receiver is not configured: it waits
            deliverer.set_receivers([hook], None)
            assert deliverer.receivers == ("ops",)
            assert await deliver(deliverer) == 1
    assert [r.json["status"] for r in receiver.received] == ["firing"]
    labels = {"receiver": "ops", "outcome": "delivered"}
    assert registry.get_sample_value("pluginmon_notifications_total", labels) == 1
    assert registry.get_sample_value("pluginmon_journal_notifications_total", labels) == 1
    await engine.aclose()


def test_retry_rules_are_the_outboxes() -> None:
    """next_step: 2xx delivered, 4xx failed at once, 5xx/429/timeouts retried with capped
    backoff (Retry-After up to the cap) until give_up_after_seconds or max_attempts."""
    hook = WebhookConfig(
        name="ops",
        url="http://127.0.0.1:9/x",
        backoff_initial_seconds=2,
        backoff_max_seconds=30,
        give_up_after_seconds=600,
        max_attempts=5,
    )

    def step(result: SendResult, attempts: int, age: float) -> tuple[str, float | None]:
        s = next_step(
            result,
            receiver=hook,
            attempts=attempts,
            created_at=T0,
            now=T0 + timedelta(seconds=age),
            random_fraction=lambda: 1.0,  # the top of the jitter range
        )
        delay = (
            None if s.next_attempt_at is None else (s.next_attempt_at - T0).total_seconds() - age
        )
        return s.outcome, delay

    ok, busy, gone = (
        SendResult("delivered", 200),
        SendResult("retry", 503, "HTTP 503"),
        SendResult("failed", 404, "HTTP 404"),
    )
    assert step(ok, 1, 0) == ("delivered", None)
    assert step(gone, 1, 0) == ("failed", None)
    assert step(busy, 1, 0) == ("retry", 2.0)
    assert step(busy, 3, 0) == ("retry", 8.0)
    assert step(busy, 4, 0) == ("retry", 16.0)
    assert step(SendResult("retry", 429, "HTTP 429", retry_after_seconds=25), 1, 0) == (
        "retry",
        25.0,
    )
    assert step(SendResult("retry", 429, "HTTP 429", retry_after_seconds=900), 1, 0) == (
        "retry",
        30.0,
    )
    assert step(busy, 5, 0) == ("failed", None)  # max_attempts
    assert step(busy, 2, 600) == ("failed", None)  # give_up_after_seconds
