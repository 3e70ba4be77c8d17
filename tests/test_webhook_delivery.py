"""Webhook delivery for real: a CPU-burning child sampled by the real Sampler, a real aiohttp
receiver that goes down and comes back, retries, idempotency keys, HMAC, shared outboxes."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest

from pluginmon.alerts.engine import AlertEngine
from pluginmon.alerts.notifiers import classify_status, sign, verify_signature
from pluginmon.alerts.outbox import OutboxDeliverer
from pluginmon.alerts.rules import Rule, WebhookConfig
from pluginmon.collectors.models import Match, PluginKey, PluginSpec
from pluginmon.collectors.sampler import Sampler
from pluginmon.daemon.scheduling import Scheduler
from pluginmon.storage import alert_state
from pluginmon.storage.errors import backoff_seconds
from tests.alerts_helpers import FakeClock, Receiver, plugin_ids, plugin_sample, snapshot
from tests.cpu_reference import read_cpu
from tests.waiting import wait_until

KEY = PluginKey("acme", "burner", "production")
SECRET = "whsec-7f3a9c-must-never-be-logged"


def fast_hook(
    name: str,
    url: str,
    *,
    secret: str | None = None,
    max_attempts: int | None = None,
    give_up_after_seconds: float = 86400.0,
) -> WebhookConfig:
    """A webhook with test-sized backoff (0.05 s doubling up to 0.3 s) and timeout; the
    give-up policy is the default one (retry for a day, no attempt cap) unless given."""
    return WebhookConfig(
        name=name,
        url=url,
        secret=secret,
        max_attempts=max_attempts,
        give_up_after_seconds=give_up_after_seconds,
        backoff_initial_seconds=0.05,
        backoff_max_seconds=0.3,
        timeout_seconds=2.0,
    )


@pytest.fixture
async def pool(migrated_db: str) -> AsyncIterator[asyncpg.Pool]:
    async with asyncpg.create_pool(migrated_db, min_size=1, max_size=6) as p:
        yield p


@pytest.fixture
def burner(tmp_path: Path) -> Iterator[tuple[Path, str, int]]:
    """A child that burns one core until ``stop`` exists, then idles; its command line
    carries a marker the sampler matches on. Yields (stop, marker, pid)."""
    marker = f"pluginmon-burn-{uuid.uuid4().hex[:8]}"
    stop = tmp_path / "stop-burning"
    code = (
        "import os, sys, time\n"
        "while not os.path.exists(sys.argv[1]):\n"
        "    for _ in range(100000): pass\n"
        "time.sleep(120)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code, str(stop), marker])
    try:
        yield stop, marker, child.pid
    finally:
        child.kill()
        child.wait()


@contextlib.asynccontextmanager
async def delivering(
    deliverer: OutboxDeliverer, *, interval_seconds: float = 0.05
) -> AsyncIterator[Scheduler]:
    """Deliver the way the daemon does (daemon/app.py, job_outbox): the real Scheduler runs
    ``deliver_due()`` every ``interval_seconds``, and ``scheduler.run_soon("outbox")`` after
    the engine queued something (as job_evaluate does). OutboxDeliverer.run() is not used by
    the daemon, so these tests do not drive it."""

    async def job_outbox() -> None:
        await deliverer.deliver_due()

    async with Scheduler(drain_seconds=5) as scheduler:
        scheduler.add_job("outbox", job_outbox, interval_seconds=interval_seconds)
        yield scheduler


async def test_real_cpu_burn_fires_then_resolves(
    pool: asyncpg.Pool, burner: tuple[Path, str, int]
) -> None:
    stop_file, marker, pid = burner
    # A busy loop gets what a loaded 2-core machine grants it, not a full core: measure its
    # share from /proc first and put the rule's threshold at half of it (at most 30%), so
    # the rule fires on the burn whatever the load, and clears once it idles.
    before = await asyncio.to_thread(read_cpu, pid)
    await asyncio.sleep(1.0)
    after = await asyncio.to_thread(read_cpu, pid)
    share = (
        100.0
        * (after.cpu_seconds - before.cpu_seconds)
        / (after.monotonic_seconds - before.monotonic_seconds)
    )
    assert share > 8.0, f"the burner got {share:.1f}% of a core: nothing to measure"
    threshold = min(30.0, share / 2)
    clear_threshold = threshold / 3
    receiver = Receiver(secret="hmac-key")
    await receiver.start()
    hook = fast_hook("oncall", receiver.url, secret="hmac-key")
    rule = Rule(
        name="BurnerCpuHigh",
        metric="cpu_percent",
        op=">",
        threshold=threshold,
        clear_threshold=clear_threshold,
        for_seconds=0.5,
        severity="warning",
        annotations={"summary": "{plugin} burns {value:.0f}% CPU"},
    )
    sampler = Sampler(
        [PluginSpec(KEY, Match(cmdline=marker))], label_discovery=False, host="test-host"
    )
    engine = AlertEngine(pool, [rule], external_url="http://127.0.0.1:9464", webhooks=[hook])
    await engine.start()
    ids = await plugin_ids(pool, [KEY])
    cpu_seen: list[float] = []
    async with OutboxDeliverer(pool, [hook], None) as deliverer:
        try:
            async with delivering(deliverer) as scheduler, asyncio.timeout(60):
                while len(receiver.received) < 2:
                    snap = await asyncio.to_thread(sampler.sample)
                    cpu_seen += [s.cpu_percent for s in snap.samples if s.key == KEY]
                    report = await engine.process(snap, ids)
                    if report.notifications_queued:
                        scheduler.run_soon("outbox")
                    if receiver.received and not stop_file.exists():
                        stop_file.touch()  # fired: stop burning, wait for the resolution
                    await asyncio.sleep(0.4)
        finally:
            await receiver.stop()
    firing, resolved = receiver.received
    assert max(cpu_seen) > threshold
    assert cpu_seen[-1] < clear_threshold
    for message in (firing, resolved):
        assert message.signature_ok is True
        body = message.json
        assert body["version"] == "4"
        assert body["receiver"] == "oncall"
        assert body["groupLabels"] == {
            "environment": "production",
            "plugin": "burner",
            "tenant": "acme",
        }
        assert body["externalURL"] == "http://127.0.0.1:9464"
        (alert,) = body["alerts"]
        assert alert["labels"]["alertname"] == "BurnerCpuHigh"
        assert alert["labels"]["severity"] == "warning"
        assert alert["fingerprint"]
    assert firing.json["status"] == "firing"
    assert firing.json["alerts"][0]["endsAt"] == "0001-01-01T00:00:00Z"
    assert firing.json["alerts"][0]["annotations"]["summary"].startswith("burner burns ")
    assert resolved.json["status"] == "resolved"
    assert resolved.json["alerts"][0]["status"] == "resolved"
    ends = datetime.fromisoformat(resolved.json["alerts"][0]["endsAt"].replace("Z", "+00:00"))
    starts = datetime.fromisoformat(resolved.json["alerts"][0]["startsAt"].replace("Z", "+00:00"))
    assert starts < ends <= datetime.now(UTC)
    assert firing.json["alerts"][0]["fingerprint"] == resolved.json["alerts"][0]["fingerprint"]
    assert firing.idempotency_key != resolved.idempotency_key


async def test_receiver_down_then_up_every_notification_arrives_once(
    pool: asyncpg.Pool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    receiver = Receiver(secret=SECRET)
    await receiver.start()
    port = receiver.port
    await receiver.stop()  # down: connection refused
    # The default give-up policy (no attempt cap, a day), only the backoff is test-sized.
    hook = fast_hook("ops", f"http://127.0.0.1:{port}/hook", secret=SECRET)
    clock = FakeClock(datetime.now(UTC))
    keys = [PluginKey("acme", f"p{i}") for i in range(5)]
    ids = await plugin_ids(pool, keys)
    rule = Rule(name="Hot", metric="cpu_percent", op=">", threshold=50)
    engine = AlertEngine(pool, [rule], webhooks=[hook], clock=clock)
    await engine.start()
    # every plugin fires, then resolves: 10 notifications, 2 per group, in order
    await engine.process(snapshot(clock(), [plugin_sample(k, clock(), cpu=90) for k in keys]), ids)
    clock.advance(1)
    await engine.process(snapshot(clock(), [plugin_sample(k, clock(), cpu=1) for k in keys]), ids)

    async with OutboxDeliverer(pool, [hook], None) as deliverer:
        try:
            async with delivering(deliverer):
                # Failed rounds against the closed port: more than the old cap of 10 attempts
                # per notification (60 retries over the 5 groups' first notifications), and
                # none is given up.
                await wait_until(
                    lambda: deliverer.stats().notifications.get(("ops", "retry"), 0) >= 60,
                    timeout_seconds=30,
                    what="60 failed delivery attempts against the closed port",
                )
                assert deliverer.stats().notifications.get(("ops", "failed"), 0) == 0
                assert receiver.received == []
                receiver.port = port
                await receiver.start()
                async with asyncio.timeout(20):
                    await receiver.wait_for(10)
                # Received is not yet recorded: the outcomes are written after the POSTs
                # return, and the pending count after that.
                stats = await wait_until(
                    lambda: (
                        stats
                        if (stats := deliverer.stats()).notifications.get(("ops", "delivered"))
                        == 10
                        and stats.pending == 0
                        else None
                    ),
                    timeout_seconds=20,
                    what="the 10 deliveries to be recorded",
                )
        finally:
            await receiver.stop()
    assert len(receiver.received) == 10
    assert len({r.idempotency_key for r in receiver.received}) == 10
    assert all(r.signature_ok for r in receiver.received)
    per_group: dict[str, list[str]] = {}
    for r in receiver.received:
        per_group.setdefault(r.json["groupLabels"]["plugin"], []).append(r.json["status"])
    assert per_group == {k.plugin: ["firing", "resolved"] for k in keys}
    assert stats.notifications[("ops", "delivered")] == 10
    assert ("ops", "failed") not in stats.notifications  # nothing given up
    assert stats.pending == 0
    async with pool.acquire() as conn:
        sent = await conn.fetch("SELECT idempotency_key FROM alert_notifications_sent")
        outbox = await conn.fetch(
            "SELECT status, attempts, idempotency_key FROM notification_outbox"
        )
    assert sorted(s["idempotency_key"] for s in sent) == sorted(
        r.idempotency_key for r in receiver.received
    )
    assert {o["status"] for o in outbox} == {"delivered"}
    assert max(o["attempts"] for o in outbox) > 10
    assert "retrying in" in caplog.text  # the retries were logged...
    assert SECRET not in caplog.text  # ...without the secret


async def test_retry_only_on_5xx_429_and_give_up_on_4xx(pool: asyncpg.Pool) -> None:
    receiver = Receiver(responses=[503, 429, 200, 400])
    await receiver.start()
    hook = fast_hook("ops", receiver.url)
    clock = FakeClock(datetime.now(UTC))
    a, b = PluginKey("acme", "a"), PluginKey("acme", "b")
    ids = await plugin_ids(pool, [a, b])
    engine = AlertEngine(
        pool,
        [Rule(name="Hot", metric="cpu_percent", op=">", threshold=50)],
        webhooks=[hook],
        clock=clock,
    )
    await engine.start()
    await engine.process(snapshot(clock(), [plugin_sample(a, clock(), cpu=90)]), ids)
    try:
        async with OutboxDeliverer(pool, [hook], None) as deliverer:

            async def delivered_once() -> bool:
                await deliverer.deliver_due()
                return bool(deliverer.stats().notifications.get(("ops", "delivered")))

            await wait_until(
                delivered_once,
                timeout_seconds=10,
                interval_seconds=0.05,
                what="the 503 and the 429 to be retried into a 200",
            )
            await engine.process(snapshot(clock(), [plugin_sample(b, clock(), cpu=90)]), ids)
            report = await deliverer.deliver_due()  # answered 400: given up at once
            stats = deliverer.stats()
    finally:
        await receiver.stop()
    assert receiver.attempts == 4
    assert report.failed == 1
    assert stats.notifications == {
        ("ops", "retry"): 2,
        ("ops", "delivered"): 1,
        ("ops", "failed"): 1,
    }
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT status, attempts, last_status_code, last_error FROM notification_outbox ORDER BY id"
        )
    assert [(r["status"], r["attempts"], r["last_status_code"]) for r in rows] == [
        ("delivered", 3, 200),
        ("failed", 1, 400),
    ]
    assert rows[1]["last_error"] == "rejected: HTTP 400"


async def test_retryable_failures_are_retried_until_give_up_after_seconds(
    pool: asyncpg.Pool,
) -> None:
    receiver = Receiver(responses=[503] * 40)
    await receiver.start()
    hook = WebhookConfig(name="ops", url=receiver.url, give_up_after_seconds=3600)
    forever = WebhookConfig(name="forever", url=receiver.url, give_up_after_seconds=0)
    clock = FakeClock(datetime.now(UTC))
    ids = await plugin_ids(pool, [KEY])
    rule = Rule(name="Hot", metric="cpu_percent", op=">", threshold=50)
    engine = AlertEngine(pool, [rule], webhooks=[hook, forever], clock=clock)
    await engine.start()
    await engine.process(snapshot(clock(), [plugin_sample(KEY, clock(), cpu=90)]), ids)
    try:
        async with OutboxDeliverer(pool, [hook, forever], None, clock=clock) as deliverer:
            # 15 rounds 301 s apart (past the 300 s backoff cap), 4515 s in all: "ops"
            # (give up after 1 h) gives up at the first attempt 3600 s after it was queued.
            outcomes: list[tuple[int, int, int]] = []
            for _ in range(15):
                report = await deliverer.deliver_due()
                outcomes.append((report.claimed, report.retried, report.failed))
                clock.advance(301)
            stats = deliverer.stats()
    finally:
        await receiver.stop()
    gave_up_at = next(i for i, o in enumerate(outcomes) if o[2])
    assert gave_up_at == 12  # 12 * 301 s = 3612 s >= 3600 s after it was queued
    assert all(o == (2, 2, 0) for o in outcomes[:12])  # beyond the old cap of 10 attempts
    assert outcomes[12] == (2, 1, 1)
    assert all(o == (1, 1, 0) for o in outcomes[13:])  # "forever" never gives up
    assert stats.notifications[("ops", "failed")] == 1
    assert ("forever", "failed") not in stats.notifications
    async with pool.acquire() as conn:
        rows = {
            r["receiver"]: r
            for r in await conn.fetch(
                "SELECT receiver, status, attempts, last_error FROM notification_outbox"
            )
        }
    assert (rows["ops"]["status"], rows["ops"]["attempts"]) == ("failed", 13)
    assert "give_up_after_seconds 3600" in rows["ops"]["last_error"]
    assert (rows["forever"]["status"], rows["forever"]["attempts"]) == ("pending", 15)


async def test_max_attempts_still_caps_when_set(pool: asyncpg.Pool) -> None:
    receiver = Receiver(responses=[503] * 5)
    await receiver.start()
    hook = fast_hook("ops", receiver.url, max_attempts=3)
    clock = FakeClock(datetime.now(UTC))
    ids = await plugin_ids(pool, [KEY])
    engine = AlertEngine(
        pool,
        [Rule(name="Hot", metric="cpu_percent", op=">", threshold=50)],
        webhooks=[hook],
        clock=clock,
    )
    await engine.start()
    await engine.process(snapshot(clock(), [plugin_sample(KEY, clock(), cpu=90)]), ids)
    try:
        async with OutboxDeliverer(pool, [hook], None, clock=clock) as deliverer:
            for _ in range(5):
                await deliverer.deliver_due()
                clock.advance(1)
            stats = deliverer.stats()
    finally:
        await receiver.stop()
    assert receiver.attempts == 3
    assert stats.notifications == {("ops", "retry"): 2, ("ops", "failed"): 1}


async def test_two_deliverers_share_the_outbox(pool: asyncpg.Pool) -> None:
    receiver = Receiver()
    await receiver.start()
    hook = fast_hook("ops", receiver.url)
    clock = FakeClock(datetime.now(UTC))
    keys = [PluginKey("acme", f"p{i}") for i in range(30)]
    ids = await plugin_ids(pool, keys)
    engine = AlertEngine(
        pool,
        [Rule(name="Hot", metric="cpu_percent", op=">", threshold=50)],
        webhooks=[hook],
        clock=clock,
    )
    await engine.start()
    await engine.process(snapshot(clock(), [plugin_sample(k, clock(), cpu=90) for k in keys]), ids)
    try:
        async with (
            OutboxDeliverer(pool, [hook], None, batch_size=4) as one,
            OutboxDeliverer(pool, [hook], None, batch_size=4) as two,
        ):
            for _ in range(10):
                await asyncio.gather(one.deliver_due(), two.deliver_due())
            shares = (
                one.stats().notifications.get(("ops", "delivered"), 0),
                two.stats().notifications.get(("ops", "delivered"), 0),
            )
    finally:
        await receiver.stop()
    assert sum(shares) == 30
    assert min(shares) > 0
    assert len({r.idempotency_key for r in receiver.received}) == len(receiver.received) == 30


async def test_recorded_key_is_never_posted_again(pool: asyncpg.Pool) -> None:
    receiver = Receiver()
    await receiver.start()
    hook = fast_hook("ops", receiver.url)
    clock = FakeClock(datetime.now(UTC))
    ids = await plugin_ids(pool, [KEY])
    engine = AlertEngine(
        pool,
        [Rule(name="Hot", metric="cpu_percent", op=">", threshold=50)],
        webhooks=[hook],
        clock=clock,
    )
    await engine.start()
    await engine.process(snapshot(clock(), [plugin_sample(KEY, clock(), cpu=90)]), ids)
    async with pool.acquire() as conn:
        # as if a deliverer got its 2xx and died before marking the row
        await conn.execute(
            "INSERT INTO alert_notifications_sent (idempotency_key, tenant_id, receiver, status_code, attempts) "
            "SELECT idempotency_key, tenant_id, receiver, 200, 1 FROM notification_outbox"
        )
    try:
        async with OutboxDeliverer(pool, [hook], None) as deliverer:
            report = await deliverer.deliver_due()
    finally:
        await receiver.stop()
    assert (report.claimed, report.already_delivered, report.delivered) == (1, 1, 0)
    assert receiver.attempts == 0
    async with pool.acquire() as conn:
        status = await conn.fetchval("SELECT status FROM notification_outbox")
    assert status == "delivered"


def test_backoff_is_capped_exponential_with_jitter() -> None:
    for attempt, ceiling in [(0, 1.0), (1, 2.0), (2, 4.0), (5, 30.0), (19, 30.0), (5000, 30.0)]:
        values = [
            backoff_seconds(attempt, initial_seconds=1.0, max_seconds=30.0) for _ in range(200)
        ]
        assert ceiling / 2 <= min(values) <= max(values) <= ceiling
        assert len(set(values)) > 100  # jittered
        # The jitter's two ends, injected: never below half the ceiling, never above it.
        low = backoff_seconds(
            attempt, initial_seconds=1.0, max_seconds=30.0, random_fraction=lambda: 0.0
        )
        high = backoff_seconds(
            attempt, initial_seconds=1.0, max_seconds=30.0, random_fraction=lambda: 1.0
        )
        assert (low, high) == (ceiling / 2, ceiling)
    with pytest.raises(ValueError, match="attempt"):
        backoff_seconds(-1, initial_seconds=1.0, max_seconds=30.0)


async def test_alert_store_acknowledge_unknown(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        assert not await alert_state.acknowledge(conn, "0" * 16, "x", datetime.now(UTC))


def test_signature_is_hmac_sha256_of_the_exact_body() -> None:
    body = b'{"version":"4","status":"firing"}'
    expected = hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
    assert sign("s3cret", body) == "sha256=" + expected
    assert verify_signature("s3cret", body, "sha256=" + expected)
    assert not verify_signature("s3cret", body + b" ", "sha256=" + expected)
    assert not verify_signature("other", body, "sha256=" + expected)
    assert not verify_signature("s3cret", body, None)


def test_status_classification() -> None:
    assert [classify_status(c) for c in (200, 202, 204)] == ["delivered"] * 3
    assert [classify_status(c) for c in (429, 500, 502, 503)] == ["retry"] * 4
    assert [classify_status(c) for c in (301, 400, 401, 403, 404, 410, 422)] == ["failed"] * 7
