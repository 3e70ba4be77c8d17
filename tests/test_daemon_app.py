"""The composition root's own behaviour, on a real database: a dead writer stops the daemon."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry

from collectors.models import PluginKey, PluginSample, Snapshot
from daemon.app import Daemon, sample_row
from daemon.config import resolve
from daemon.settings import Settings
from storage.pool import close_pool, open_pool
from storage.writer import PLUGIN_SAMPLES_COLUMNS, PLUGIN_SAMPLES_TABLE, BatchWriter

KEY = PluginKey("apptest", "worker", "test")


def snapshot() -> Snapshot:
    now = datetime.now(UTC)
    sample = PluginSample(
        key=KEY,
        timestamp=now,
        up=True,
        process_count=1,
        cpu_percent=-0.0,
        rss_bytes=10,
        vms_bytes=20,
        threads=1,
        restarts=-1,
    )
    return Snapshot(timestamp=now, host="h", samples=(sample,), duration_seconds=0.01)


def test_sample_row_matches_the_writer_columns() -> None:
    row = sample_row(snapshot().samples[0], 7, "h")
    assert len(row) == len(PLUGIN_SAMPLES_COLUMNS)
    named = dict(zip(PLUGIN_SAMPLES_COLUMNS, row, strict=True))
    assert named["plugin_id"] == 7
    assert named["tenant_id"] == "apptest"
    assert named["environment"] == "test"
    assert named["restarts"] == 0  # never negative (CHECK restarts >= 0)
    assert named["cpu_percent"] == 0.0


async def test_dead_writer_stops_the_daemon(migrated_db: str) -> None:
    daemon = Daemon(resolve(Settings()), version="test", registry=CollectorRegistry())
    stop = asyncio.Event()
    daemon._stop = stop
    pool = await open_pool(migrated_db, min_size=0)
    try:
        writer = BatchWriter(pool, table=PLUGIN_SAMPLES_TABLE, columns=PLUGIN_SAMPLES_COLUMNS)
        await writer.close()  # closed before use: put() raises WriterClosedError
        daemon.pool = pool
        daemon.schema_ready = True
        daemon.writer = writer
        await daemon._write(snapshot())  # resolves the plugin id for real, then put()
        assert KEY in daemon._plugin_ids
        assert stop.is_set()
        assert daemon._failure is not None
    finally:
        await close_pool(pool)
