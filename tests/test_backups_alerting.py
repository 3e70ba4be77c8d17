"""From a backup's verification to an alert: the registry job's backup gauges, the built-in
rules PluginBackupVerificationFailed and PluginBackupStale, and the backup health components
in the real alert engine, on a real file that is corrupted, repaired and then left to age."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from pluginmon.alerts.engine import AlertEngine
from pluginmon.collectors.models import PluginKey
from pluginmon.daemon.config_sections import parse_rules
from pluginmon.registry import backup_schedule, backups
from pluginmon.registry.actor import Actor
from pluginmon.registry.backup_readers import PathReader, Readers
from pluginmon.registry.backup_schedule import BackupSchedule
from tests.alerts_helpers import FakeClock, plugin_ids, plugin_sample, snapshot

KEY = PluginKey("acme", "resizer", "production")
STALE_AFTER_SECONDS = 3600.0


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


def _schedule(*, interval_seconds: float) -> BackupSchedule:
    return BackupSchedule(
        interval_seconds={"local": interval_seconds},
        default_interval_seconds=interval_seconds,
        stale_after_seconds=STALE_AFTER_SECONDS,
    )


async def test_failed_verification_and_staleness_fire_resolve_and_cost_health(
    pool: asyncpg.Pool, tmp_path: Path
) -> None:
    clock = FakeClock()
    ids = await plugin_ids(pool, [KEY])
    data = os.urandom(300_000)
    artifact = tmp_path / "resizer.tar"
    artifact.write_bytes(data)
    readers = Readers(by_provider={"local": PathReader("local", (tmp_path,))})
    async with pool.acquire() as conn, conn.transaction():
        await backups.register_backup(
            conn,
            tenant_id="acme",
            actor=Actor(name="ci"),
            now=clock(),
            plugin_name="resizer",
            provider=backups.Provider.LOCAL,
            location=str(artifact),
            size_bytes=len(data),
            checksum_sha256=hashlib.sha256(data).hexdigest(),
            environment="production",
            readers=readers,
        )
    corrupted = bytearray(data)
    corrupted[1234] ^= 0x01
    artifact.write_bytes(bytes(corrupted))

    often = _schedule(interval_seconds=60.0)
    report = await backup_schedule.run(pool, readers=readers, schedule=often, clock=clock)
    assert [v.result for v in report.verified] == ["checksum_mismatch"]

    engine = AlertEngine(pool, parse_rules([], include_builtins=True), clock=clock)
    await engine.start()
    clock.advance(5)
    transitions = await _cycle(engine, clock, ids)
    assert "PluginBackupVerificationFailed:firing" in transitions
    # Never verified at all: stale as well.
    assert "PluginBackupStale:firing" in transitions
    score = engine.latest_health()[KEY]
    failed = score.component("metric:backup_verification_failed")
    stale = score.component("metric:backup_stale")
    assert failed is not None
    assert stale is not None
    assert (failed.value, failed.score) == (1.0, 0.0)
    assert stale.value == 1.0
    assert stale.score < 100.0
    assert score.score < 100.0

    # Repaired: the next due verification succeeds, both gauges drop to 0, both resolve.
    artifact.write_bytes(data)
    clock.advance(120)
    report = await backup_schedule.run(pool, readers=readers, schedule=often, clock=clock)
    assert [v.result for v in report.verified] == ["verified"]
    clock.advance(5)
    transitions = await _cycle(engine, clock, ids)
    assert "PluginBackupVerificationFailed:resolved" in transitions
    assert "PluginBackupStale:resolved" in transitions
    assert engine.latest_health()[KEY].score == 100.0

    # No verified backup within the limit (nothing re-verified since): stale fires alone and
    # costs health; the verification failure stays resolved.
    clock.advance(STALE_AFTER_SECONDS + 60)
    rarely = _schedule(interval_seconds=30 * 86400.0)
    report = await backup_schedule.run(pool, readers=readers, schedule=rarely, clock=clock)
    assert report.verified == ()
    clock.advance(5)
    transitions = await _cycle(engine, clock, ids)
    assert "PluginBackupStale:firing" in transitions
    assert "PluginBackupVerificationFailed:firing" not in transitions
    score = engine.latest_health()[KEY]
    stale = score.component("metric:backup_stale")
    assert stale is not None
    assert stale.value == 1.0
    assert score.score < 100.0
    failed = score.component("metric:backup_verification_failed")
    assert failed is not None
    assert failed.value == 0.0
