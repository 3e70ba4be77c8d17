"""The maintenance job runs once per interval for the whole database, however many daemons run it (storage.upkeep.Maintainer, sql/062)."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime

import psycopg
import pytest

from pluginmon.storage.backend import MAINTENANCE_LOCK_KEY, Retention, admin_connection
from pluginmon.storage.upkeep import MAINTENANCE_JOB, RUN_SPACING_SHARE, Maintainer

HOUR = 3600.0


def _maintainer(url: str, *, interval_seconds: float | None, instance: str = "") -> Maintainer:
    return Maintainer(
        url,
        retention=Retention(),
        spools=[],
        interval_seconds=interval_seconds,
        instance=instance,
    )


def _last_run(url: str) -> tuple[datetime, datetime | None, str] | None:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT started_at, finished_at, instance FROM maintenance_runs WHERE job = %s",
            (MAINTENANCE_JOB,),
        ).fetchone()
    return None if row is None else (row[0], row[1], str(row[2]))


async def test_five_maintainers_in_one_interval_do_the_work_once(migrated_db: str) -> None:
    maintainers = [
        _maintainer(migrated_db, interval_seconds=HOUR, instance=f"agent-{i}") for i in range(5)
    ]
    # All at once: one holds the lock, or runs first and records it; the others skip.
    reports = await asyncio.gather(*(m.run() for m in maintainers))
    assert sum(r.ran for r in reports) == 1
    last = _last_run(migrated_db)
    assert last is not None
    started, finished, instance = last
    assert finished is not None
    assert finished >= started
    assert instance == f"agent-{[r.ran for r in reports].index(True)}"
    # One after another inside the interval, the lock free each time: none repeats the work.
    for maintainer in maintainers:
        report = await maintainer.run()
        assert not report.ran
        assert report.partitions_created == ()
    assert _last_run(migrated_db) == last


async def test_a_run_inside_the_interval_is_skipped_and_says_so_at_debug(
    migrated_db: str, caplog: pytest.LogCaptureFixture
) -> None:
    first = await _maintainer(migrated_db, interval_seconds=HOUR).run()
    assert first.ran
    with caplog.at_level(logging.DEBUG, logger="pluginmon.storage.upkeep"):
        second = await _maintainer(migrated_db, interval_seconds=HOUR).run()
    assert not second.ran
    skips = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(skips) == 1
    assert "the last run started" in skips[0]
    assert f"less than {RUN_SPACING_SHARE * HOUR:.1f} s" in skips[0]
    assert all(r.levelno == logging.DEBUG for r in caplog.records if "skipping" in r.getMessage())


async def test_a_daemon_alone_maintains_on_its_interval(migrated_db: str) -> None:
    maintainer = _maintainer(migrated_db, interval_seconds=1.0)
    assert (await maintainer.run()).ran
    first = _last_run(migrated_db)
    assert first is not None
    await asyncio.sleep(1.0)  # one interval later: due again, on the server's clock too
    assert (await maintainer.run()).ran
    second = _last_run(migrated_db)
    assert second is not None
    assert second[0] > first[0]


async def test_without_an_interval_every_run_does_the_work(migrated_db: str) -> None:
    maintainer = _maintainer(migrated_db, interval_seconds=None)
    assert (await maintainer.run()).ran
    assert (await maintainer.run()).ran
    assert _last_run(migrated_db) is None  # nothing recorded, nothing held back


async def test_a_run_whose_daemon_died_does_not_hold_the_work_back(migrated_db: str) -> None:
    # A daemon takes the lock, records its start, and dies before finishing.
    async with admin_connection(migrated_db) as dying:
        cur = await dying.execute("SELECT pg_try_advisory_lock(%s)", (MAINTENANCE_LOCK_KEY,))
        assert await cur.fetchone() == (True,)
        await dying.execute(
            "INSERT INTO maintenance_runs (job, started_at, finished_at, instance)"
            " VALUES (%s, now(), NULL, 'dead')",
            (MAINTENANCE_JOB,),
        )
        # While it holds the lock, the others skip.
        assert not (await _maintainer(migrated_db, interval_seconds=HOUR).run()).ran
    # Its session is gone (lock released, run unfinished): the next daemon runs at once.
    report = await _maintainer(migrated_db, interval_seconds=HOUR, instance="next").run()
    assert report.ran
    last = _last_run(migrated_db)
    assert last is not None
    assert last[2] == "next"
    assert last[1] is not None
    assert last[1] >= last[0]


async def test_a_last_run_in_the_future_does_not_hold_the_work_back(migrated_db: str) -> None:
    # The server's clock stepped back after the last run.
    with psycopg.connect(migrated_db, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO maintenance_runs (job, started_at, finished_at)"
            " VALUES (%s, now() + interval '1 hour', now() + interval '1 hour')",
            (MAINTENANCE_JOB,),
        )
    assert (await _maintainer(migrated_db, interval_seconds=HOUR).run()).ran


def test_the_interval_is_validated(migrated_db: str) -> None:
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="interval_seconds must be positive"):
            _maintainer(migrated_db, interval_seconds=bad)
