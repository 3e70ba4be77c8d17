"""The maintenance job back-fills the rollups after rows come back from a spool (real PostgreSQL)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg

from pluginmon.storage.backend import Retention
from pluginmon.storage.ingest import SampleSpool
from pluginmon.storage.upkeep import Maintainer
from tests.schema_helpers import (
    add_plugin,
    assert_rollups_equal,
    group_by_rollup,
    insert_samples,
    rollup_rows,
    samples_series,
)


def test_spool_remembers_the_oldest_acked_row(tmp_path: Path) -> None:
    spool = SampleSpool(tmp_path / "spool", max_bytes=1 << 20)
    at = datetime(2026, 1, 1, tzinfo=UTC)
    spool.append([(at + timedelta(minutes=5), "x"), (at + timedelta(minutes=1), "y")])
    spool.append([(at + timedelta(minutes=9), "z")])
    assert spool.take_late_rows_since() is None  # appended, not yet replayed
    first = spool.peek()
    assert first is not None
    spool.ack(first)
    assert spool.take_late_rows_since() == at + timedelta(minutes=1)
    assert spool.take_late_rows_since() is None  # taken once
    spool.close()


async def test_maintenance_backfills_rollups_from_the_oldest_replayed_row(
    migrated_db: str, tmp_path: Path
) -> None:
    now = datetime.now(UTC)
    with psycopg.connect(migrated_db, autocommit=True) as conn:
        plugins = [("acme", add_plugin(conn, "acme", "resizer"))]
        insert_samples(
            conn,
            samples_series(now - timedelta(minutes=12), now, timedelta(seconds=10), plugins),
        )
    spool = SampleSpool(tmp_path / "spool", max_bytes=64 << 20)
    job = Maintainer(migrated_db, retention=Retention(), spools=[spool]).run
    await job()  # the regular refresh: the watermarks move up to now

    # Three hours of outage later, the spool gives back rows from then; the regular refresh
    # (10 minutes / 1 hour back) does not reach them.
    late = samples_series(
        now - timedelta(hours=3),
        now - timedelta(hours=2, minutes=40),
        timedelta(seconds=5),
        plugins,
    )
    with psycopg.connect(migrated_db, autocommit=True) as conn:
        insert_samples(conn, late)
    await job()
    # Compared: the hours before the last complete one. The regular rows of the last 12
    # minutes may fall in the previous hour (in the first minutes of an hour), whose 1-hour
    # bucket TimescaleDB's policy materialises only an hour after it ends; the late rows
    # (2h40m to 3h ago) are always in the compared range.
    complete = "\"timestamp\" < date_trunc('hour', now() - interval '1 hour')"
    settled = "bucket < date_trunc('hour', now() - interval '1 hour')"
    with psycopg.connect(migrated_db) as conn:
        assert rollup_rows(conn, "plugin_samples_1m", settled) != group_by_rollup(
            conn, "1 minute", complete
        )

    # The same rows as the writer replays them: appended while the database was away, then
    # acked once written.
    spool.append(late)
    batch = spool.peek()
    assert batch is not None
    spool.ack(batch)
    await job()
    assert spool.take_late_rows_since() is None  # consumed by the back-fill
    with psycopg.connect(migrated_db) as conn:
        for view, width in (("plugin_samples_1m", "1 minute"), ("plugin_samples_1h", "1 hour")):
            assert_rollups_equal(
                rollup_rows(conn, view, settled), group_by_rollup(conn, width, complete)
            )
        late_minutes = conn.execute(
            "SELECT count(*) FROM plugin_samples_1m WHERE bucket < now() - interval '2 hours'"
        ).fetchone()
    minutes = {row[0].replace(second=0, microsecond=0) for row in late}  # type: ignore[attr-defined]
    assert late_minutes == (len(minutes),)
    assert len(minutes) >= 20
    spool.close()
