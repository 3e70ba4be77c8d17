"""Scheduler wrapper on a real AsyncIOScheduler: runs, failures counted, cancellation propagates."""

from __future__ import annotations

import asyncio
import logging

import pytest
from prometheus_client import CollectorRegistry

from pluginmon.daemon.scheduling import Scheduler
from tests.net_helpers import free_port
from tests.waiting import wait_until


async def test_jobs_run_and_failures_are_counted_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    runs: list[str] = []
    fail_times = 3

    async def good() -> None:
        runs.append("good")

    async def flaky() -> None:
        nonlocal fail_times
        runs.append("flaky")
        if fail_times:
            fail_times -= 1
            raise RuntimeError("boom")

    caplog.set_level(logging.DEBUG, logger="pluginmon.daemon.scheduling")
    async with Scheduler(drain_seconds=1) as scheduler:
        scheduler.add_job("good", good, interval_seconds=0.05)
        scheduler.add_job("flaky", flaky, interval_seconds=0.05)
        await wait_until(
            lambda: runs.count("flaky") >= 5,
            timeout_seconds=10,
            what="the flaky job to run 5 times (3 failures, then successes)",
        )
    assert runs.count("good") >= 2
    assert scheduler.failures["flaky"] == 3
    assert scheduler.failures["good"] == 0
    assert "good" in scheduler.last_success
    assert "flaky" in scheduler.last_success
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1  # once ...
    assert errors[0].exc_info is not None  # ... with its traceback
    assert any("recovered after 3 failed runs" in r.getMessage() for r in caplog.records)
    # The same counters as prometheus-client families, read from the scheduler at scrape time.
    registry = CollectorRegistry()
    registry.register(scheduler)
    get = registry.get_sample_value
    assert get("pluginmon_job_failures_total", {"task": "flaky"}) == 3
    assert get("pluginmon_job_failures_total", {"task": "good"}) == 0
    last_good = get("pluginmon_job_last_success_timestamp_seconds", {"task": "good"})
    assert last_good == scheduler.last_success["good"]


async def test_exit_drains_running_job() -> None:
    finished = asyncio.Event()
    started = asyncio.Event()

    async def slow() -> None:
        started.set()
        await asyncio.sleep(0.3)
        finished.set()

    async with Scheduler(drain_seconds=5) as scheduler:
        scheduler.add_job("slow", slow, interval_seconds=60)
        await asyncio.wait_for(started.wait(), 5)
    assert finished.is_set()


async def test_exit_cancels_job_past_the_drain_deadline() -> None:
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def stuck() -> None:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async with Scheduler(drain_seconds=0.2) as scheduler:
        scheduler.add_job("stuck", stuck, interval_seconds=60)
        await asyncio.wait_for(started.wait(), 5)
    assert cancelled.is_set()
    assert scheduler.failures["stuck"] == 0  # a cancellation is not a job failure


async def test_cancellation_propagates_through_job_wrapper() -> None:
    """STYLE: cancellation is never swallowed, even by the catch-all job wrapper."""
    started = asyncio.Event()

    async def waits() -> None:
        started.set()
        await asyncio.sleep(60)

    scheduler = Scheduler()
    scheduler.add_job("waits", waits, interval_seconds=60)
    task = asyncio.create_task(scheduler.run_now("waits"))
    await asyncio.wait_for(started.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()
    assert scheduler.failures["waits"] == 0


async def test_skipped_runs_are_counted_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    runs = 0

    async def slow() -> None:
        nonlocal runs
        runs += 1
        await asyncio.sleep(0.35)

    caplog.set_level(logging.INFO, logger="pluginmon.daemon.scheduling")
    async with Scheduler(drain_seconds=2) as scheduler:
        scheduler.add_job("slow", slow, interval_seconds=0.05)
        for _ in range(100):
            await asyncio.sleep(0.05)
            if scheduler.skipped.get("slow", 0) >= 5:
                break
    assert scheduler.skipped["slow"] >= 5
    warnings = [r for r in caplog.records if "run(s) skipped" in r.getMessage()]
    assert len(warnings) == 1  # rate-limited, not once per skipped tick
    assert runs >= 1


async def test_run_soon_brings_the_next_run_forward() -> None:
    runs: list[float] = []
    ran = asyncio.Event()

    async def job() -> None:
        runs.append(asyncio.get_running_loop().time())
        ran.set()

    async with Scheduler() as scheduler:
        scheduler.add_job("job", job, interval_seconds=3600)
        await asyncio.wait_for(ran.wait(), 5)
        ran.clear()
        scheduler.run_soon("job")
        await asyncio.wait_for(ran.wait(), 5)  # not an hour later
    assert len(runs) == 2


async def test_a_transient_failure_is_one_warning_line_without_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A maintenance run during an outage fails with the admin plane's psycopg error: that is
    logged once as a warning naming the error, not as a traceback."""
    import psycopg

    closed_port = free_port()
    runs = 0

    async def maintenance() -> None:
        nonlocal runs
        runs += 1
        # A real connection attempt to a closed loopback port: psycopg.OperationalError.
        await psycopg.AsyncConnection.connect(
            f"postgresql://nobody@127.0.0.1:{closed_port}/x", connect_timeout=2
        )

    caplog.set_level(logging.DEBUG, logger="pluginmon.daemon.scheduling")
    async with Scheduler(drain_seconds=1) as scheduler:
        scheduler.add_job("maintenance", maintenance, interval_seconds=0.05)
        await wait_until(
            lambda: runs >= 3, timeout_seconds=20, what="three failed maintenance runs"
        )
    assert scheduler.failures["maintenance"] >= 3
    first = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(first) == 1, [r.getMessage() for r in first]
    assert first[0].levelno == logging.WARNING
    assert first[0].exc_info is None
    message = first[0].getMessage()
    assert "job maintenance failed on a transient error (OperationalError:" in message
