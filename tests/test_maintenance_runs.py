"""The maintenance job, the registry job and the backups duty each run once per interval for the whole database, however many daemons run them (storage.upkeep.Maintainer, storage.job_runs, sql/062)."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

import asyncpg
import psycopg
import pytest

from pluginmon.registry import backup_schedule
from pluginmon.registry import maintenance as registry_maintenance
from pluginmon.registry.backup_readers import Readers
from pluginmon.registry.backup_schedule import BackupSchedule
from pluginmon.storage import job_runs
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


# -- the registry job and the backups duty (asyncpg, storage.job_runs) ---------------------------


def _job_row(url: str, job: str) -> tuple[datetime, datetime | None, str] | None:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT started_at, finished_at, instance FROM maintenance_runs WHERE job = %s",
            (job,),
        ).fetchone()
    return None if row is None else (row[0], row[1], str(row[2]))


async def test_five_daemons_registry_duties_run_once_an_interval(migrated_db: str) -> None:
    """Five daemons' registry jobs on one database: at once, one does the duties (the lock);
    one after another inside the interval, the lock free each time, none repeats them."""
    now = datetime.now(UTC)
    conns = [await asyncpg.connect(migrated_db) for _ in range(5)]
    try:
        reports = await asyncio.gather(
            *(
                registry_maintenance.run(c, now=now, interval_seconds=HOUR, instance=f"agent-{i}")
                for i, c in enumerate(conns)
            )
        )
        assert sum(r.ran for r in reports) == 1
        last = _job_row(migrated_db, registry_maintenance.REGISTRY_JOB)
        assert last is not None
        started, finished, instance = last
        assert finished is not None
        assert finished >= started
        assert instance == f"agent-{[r.ran for r in reports].index(True)}"
        for c in conns:
            assert not (await registry_maintenance.run(c, now=now, interval_seconds=HOUR)).ran
        assert _job_row(migrated_db, registry_maintenance.REGISTRY_JOB) == last
        # Without an interval (tests, one-off calls): every run does the duties.
        assert (await registry_maintenance.run(conns[0], now=now)).ran
        # Its own row: the storage maintenance is not held back by it, nor it by that.
        assert _last_run(migrated_db) is None
    finally:
        for c in conns:
            await c.close()


async def test_a_registry_run_rolled_back_does_not_count(migrated_db: str) -> None:
    """The start is recorded in the run's transaction: a daemon whose run fails (or dies:
    the server rolls its transaction back) leaves nothing behind, and the next one runs the
    duties at once."""
    now = datetime.now(UTC)
    dying = await asyncpg.connect(migrated_db)
    tx = dying.transaction()
    await tx.start()
    assert await dying.fetchval(
        "SELECT pg_try_advisory_xact_lock($1)", registry_maintenance.REGISTRY_LOCK_KEY
    )
    assert await job_runs.start_if_due(
        dying, registry_maintenance.REGISTRY_JOB, interval_seconds=HOUR, instance="dead"
    )
    other = await asyncpg.connect(migrated_db)
    try:
        # While it holds the lock, the others skip.
        assert not (await registry_maintenance.run(other, now=now, interval_seconds=HOUR)).ran
        # It fails: its transaction rolls back (as the server does for a daemon that died).
        await tx.rollback()
        await dying.close()
        report = await registry_maintenance.run(
            other, now=now, interval_seconds=HOUR, instance="next"
        )
        assert report.ran
        last = _job_row(migrated_db, registry_maintenance.REGISTRY_JOB)
        assert last is not None
        assert last[2] == "next"
    finally:
        await other.close()
        if not dying.is_closed():
            await dying.close()


async def test_backups_duty_runs_once_an_interval_and_a_dead_run_does_not_count(
    migrated_db: str,
) -> None:
    pool = await asyncpg.create_pool(migrated_db, min_size=1, max_size=3)
    assert pool is not None
    try:

        async def run(instance: str) -> bool:
            report = await backup_schedule.run(
                pool,
                readers=Readers(),
                schedule=BackupSchedule(),
                clock=lambda: datetime.now(UTC),
                interval_seconds=HOUR,
                instance=instance,
            )
            return report.ran

        assert [await run(f"agent-{i}") for i in range(3)] == [True, False, False]
        first = _job_row(migrated_db, backup_schedule.BACKUPS_JOB)
        assert first is not None
        assert first[2] == "agent-0"
        assert first[1] is not None
        # A daemon that recorded its start and died before the end: due again at once.
        async with pool.acquire() as conn:
            await conn.execute(
                "UPDATE maintenance_runs SET finished_at = NULL, instance = 'dead' WHERE job = $1",
                backup_schedule.BACKUPS_JOB,
            )
        assert await run("next")
        assert not await run("late")
        last = _job_row(migrated_db, backup_schedule.BACKUPS_JOB)
        assert last is not None
        assert last[2] == "next"
        assert last[0] > first[0]
    finally:
        await pool.close()
