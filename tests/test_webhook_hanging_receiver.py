"""A webhook receiver that accepts the connection and never answers delays no other receiver and no other alert.

A real TCP server that accepts and then says nothing, next to a real receiver that answers:
the answering one gets every notification in time (also ones queued while the silent one is
still waited for), and the silent one times out after its own timeout_seconds and is retried.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import pytest

from pluginmon.alerts.engine import AlertEngine
from pluginmon.alerts.outbox import OutboxDeliverer
from pluginmon.alerts.rules import Rule, WebhookConfig
from pluginmon.collectors.models import PluginKey
from pluginmon.daemon.scheduling import Scheduler
from pluginmon.storage.pool import pool_context
from tests.alerts_helpers import FakeClock, Receiver, plugin_ids, plugin_sample, snapshot
from tests.waiting import wait_until

HANG_TIMEOUT_SECONDS = 4.0
# A notification to the answering receiver arrives within this of being queued; far less
# than the silent one's timeout, which is what it would wait behind with head-of-line blocking.
IN_TIME_SECONDS = 2.0


class SilentServer:
    """Accepts TCP connections, reads what comes, never writes a byte."""

    def __init__(self) -> None:
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._open: list[asyncio.StreamWriter] = []
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._open.append(writer)
        while await reader.read(65536):
            pass  # the request arrives; the answer never does

    async def stop(self) -> None:
        for writer in self._open:
            writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"


@pytest.fixture
async def pool(migrated_db: str) -> AsyncIterator[asyncpg.Pool]:
    # The daemon's pool (storage.pool): on a Citus node its connections see the shards, so
    # asyncpg's type introspection on each new connection is not slowed by Citus's shard
    # hiding (0.3-0.9 s per array type with it; the first notification rides on new
    # connections and once took 2.5 s, over IN_TIME_SECONDS).
    async with pool_context(migrated_db, min_size=1, max_size=6) as p:
        yield p


async def test_a_silent_receiver_delays_no_other_receiver_and_no_other_alert(
    pool: asyncpg.Pool,
) -> None:
    silent = SilentServer()
    await silent.start()
    answering = Receiver()
    await answering.start()
    hooks = [
        WebhookConfig(
            name="silent",
            url=silent.url,
            timeout_seconds=HANG_TIMEOUT_SECONDS,
            backoff_initial_seconds=0.1,
            backoff_max_seconds=0.2,
        ),
        WebhookConfig(name="answering", url=answering.url, timeout_seconds=HANG_TIMEOUT_SECONDS),
    ]
    clock = FakeClock(datetime.now(UTC))
    first, second = PluginKey("acme", "first"), PluginKey("acme", "second")
    ids = await plugin_ids(pool, [first, second])
    engine = AlertEngine(
        pool,
        [Rule(name="Hot", metric="cpu_percent", op=">", threshold=50)],
        webhooks=hooks,
        clock=clock,
    )
    await engine.start()
    try:
        async with OutboxDeliverer(pool, hooks, None) as deliverer:

            async def job_outbox() -> None:
                await deliverer.deliver_due()

            # As the daemon delivers (daemon/app.py job_outbox): a scheduled job, one run at
            # a time, plus run_soon after the engine queued something.
            async with Scheduler(drain_seconds=5) as scheduler:
                scheduler.add_job("outbox", job_outbox, interval_seconds=0.2)

                queued = time.monotonic()
                await engine.process(
                    snapshot(clock(), [plugin_sample(first, clock(), cpu=90)]), ids
                )
                scheduler.run_soon("outbox")
                async with asyncio.timeout(IN_TIME_SECONDS):
                    await answering.wait_for(1)
                first_after = time.monotonic() - queued
                await wait_until(
                    lambda: silent.connections >= 1,
                    timeout_seconds=IN_TIME_SECONDS,
                    what="the silent receiver to be sent the first alert",
                )

                # Another alert while the silent receiver is still waited for ("first"
                # stays firing: nothing new to send for it).
                clock.advance(1)
                queued = time.monotonic()
                both = [plugin_sample(k, clock(), cpu=90) for k in (first, second)]
                await engine.process(snapshot(clock(), both), ids)
                scheduler.run_soon("outbox")
                async with asyncio.timeout(IN_TIME_SECONDS):
                    await answering.wait_for(2)
                second_after = time.monotonic() - queued
                assert silent.connections <= 2  # nobody has timed out yet...
                assert time.monotonic() - queued < HANG_TIMEOUT_SECONDS  # ...nor could have

                # The silent one times out on its own clock and is tried again.
                await wait_until(
                    lambda: silent.connections >= 3,
                    timeout_seconds=3 * HANG_TIMEOUT_SECONDS,
                    what="the silent receiver's notifications to be retried after a timeout",
                )
                stats = await wait_until(
                    lambda: (
                        s
                        if (s := deliverer.stats()).notifications.get(("silent", "retry"), 0) >= 1
                        else None
                    ),
                    timeout_seconds=3 * HANG_TIMEOUT_SECONDS,
                    what="the timed-out attempt to be recorded as a retry",
                )
    finally:
        await engine.aclose()
        await answering.stop()
        await silent.stop()

    assert first_after < IN_TIME_SECONDS
    assert second_after < IN_TIME_SECONDS
    assert [r.json["groupLabels"]["plugin"] for r in answering.received] == ["first", "second"]
    assert stats.notifications[("answering", "delivered")] == 2
    assert ("answering", "retry") not in stats.notifications
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT receiver, status, attempts, last_error FROM notification_outbox"
            " WHERE receiver = 'silent' ORDER BY id"
        )
    assert [r["status"] for r in rows] == ["pending", "pending"]
    errors = {r["last_error"] for r in rows if r["last_error"]}
    assert errors <= {f"timed out after {HANG_TIMEOUT_SECONDS:g}s"}
    assert errors  # at least one timeout recorded for the silent receiver
    assert max(r["attempts"] for r in rows) >= 2
