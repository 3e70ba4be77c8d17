"""Push to a real Alertmanager (Debian's prometheus-alertmanager) and read the alerts back."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from pluginmon.alerts.engine import AlertEngine
from pluginmon.alerts.outbox import OutboxDeliverer
from pluginmon.alerts.rules import AlertmanagerConfig, Rule
from pluginmon.collectors.models import PluginKey
from tests.alerts_helpers import FakeClock, plugin_ids, plugin_sample, snapshot
from tests.net_helpers import free_port, stop_process

BINARY = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
KEY = PluginKey("acme", "resizer", "production")


@pytest.fixture
def alertmanager(tmp_path: Path) -> Iterator[str]:
    if BINARY is None:
        pytest.skip(
            "prometheus-alertmanager is not installed (Debian: apt install prometheus-alertmanager)"
        )
    config = tmp_path / "alertmanager.yml"
    config.write_text("route:\n  receiver: blackhole\nreceivers:\n  - name: blackhole\n")
    port = free_port()
    proc = subprocess.Popen(
        [
            BINARY,
            f"--config.file={config}",
            f"--storage.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(proc, grace_seconds=10, kill_wait_seconds=None)


@pytest.fixture
async def pool(migrated_db: str) -> AsyncIterator[asyncpg.Pool]:
    async with asyncpg.create_pool(migrated_db, min_size=1, max_size=4) as p:
        yield p


async def get_alerts(session: aiohttp.ClientSession, base: str) -> list[dict[str, Any]]:
    async with session.get(f"{base}/api/v2/alerts") as response:
        response.raise_for_status()
        alerts: list[dict[str, Any]] = await response.json()
        return alerts


async def wait_ready(session: aiohttp.ClientSession, base: str) -> None:
    async with asyncio.timeout(20):
        while True:
            try:
                async with session.get(f"{base}/-/ready") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)


async def test_push_to_real_alertmanager_and_read_back(
    pool: asyncpg.Pool, alertmanager: str
) -> None:
    # a minute in the past, so that the resolve time below is already over for Alertmanager
    clock = FakeClock(datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=60))
    am = AlertmanagerConfig(url=alertmanager, resend_interval_seconds=30)
    rule = Rule(
        name="PluginCpuHigh",
        metric="cpu_percent",
        op=">",
        threshold=50,
        severity="critical",
        labels={"team": "imaging"},
        annotations={"summary": "{plugin} at {value:.0f}%"},
    )
    ids = await plugin_ids(pool, [KEY])
    engine = AlertEngine(pool, [rule], clock=clock, alertmanager=am, external_url="http://pm.test")
    await engine.start()
    async with (
        aiohttp.ClientSession() as session,
        OutboxDeliverer(pool, (), am, clock=clock) as deliverer,
    ):
        await wait_ready(session, alertmanager)
        report = await engine.process(snapshot(clock(), [plugin_sample(KEY, clock(), cpu=90)]), ids)
        assert report.notifications_queued == 1
        assert (await deliverer.deliver_due()).delivered == 1
        (alert,) = await get_alerts(session, alertmanager)
        assert alert["labels"] == {
            "alertname": "PluginCpuHigh",
            "environment": "production",
            "instance": socket.gethostname(),  # the engine's default instance
            "plugin": "resizer",
            "severity": "critical",
            "team": "imaging",
            "tenant": "acme",
        }
        assert alert["annotations"] == {"summary": "resizer at 90%"}
        assert alert["status"]["state"] == "active"
        assert alert["generatorURL"] == "http://pm.test"
        starts = datetime.fromisoformat(alert["startsAt"].replace("Z", "+00:00"))
        ends = datetime.fromisoformat(alert["endsAt"].replace("Z", "+00:00"))
        assert starts == clock()
        assert ends == clock() + timedelta(seconds=120)  # 4 resend intervals

        # re-sent while firing, pushing endsAt forward
        clock.advance(31)
        report = await engine.process(snapshot(clock(), [plugin_sample(KEY, clock(), cpu=91)]), ids)
        assert report.notifications_queued == 1
        assert (await deliverer.deliver_due()).delivered == 1
        (alert,) = await get_alerts(session, alertmanager)
        ends = datetime.fromisoformat(alert["endsAt"].replace("Z", "+00:00"))
        assert ends == clock() + timedelta(seconds=120)

        # resolved: sent with endsAt = the resolve time, so Alertmanager drops it
        clock.advance(1)
        report = await engine.process(snapshot(clock(), [plugin_sample(KEY, clock(), cpu=1)]), ids)
        assert report.notifications_queued == 1
        assert (await deliverer.deliver_due()).delivered == 1
        for _ in range(50):
            remaining = await get_alerts(session, alertmanager)
            if not remaining:
                break
            await asyncio.sleep(0.2)
        assert remaining == []
