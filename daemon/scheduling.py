"""Periodic jobs on APScheduler 3.x (the only module that imports it): run, count, log state changes."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from types import TracebackType

from apscheduler.events import EVENT_JOB_MAX_INSTANCES, EVENT_JOB_MISSED, JobEvent
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from pluginmon.storage.errors import is_transient

logger = logging.getLogger(__name__)

JobFunc = Callable[[], Awaitable[None]]

SKIP_LOG_INTERVAL_SECONDS = 300


class Scheduler:
    """Interval jobs with coalescing, one instance at a time and a misfire grace time.

    Each run is wrapped: an exception is logged with its traceback once when the job starts
    failing (then only counted) and "recovered" is logged when it succeeds again; cancellation
    is never swallowed. ``async with`` starts the scheduler; leaving pauses it, waits up to
    ``drain_seconds`` for running jobs (a callable is asked at that moment, so a shared
    shutdown deadline can decide), then cancels what is left.
    """

    def __init__(
        self,
        *,
        misfire_grace_seconds: float = 30.0,
        drain_seconds: float | Callable[[], float] = 5.0,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._scheduler = AsyncIOScheduler(timezone=UTC)
        self._misfire_grace_seconds = misfire_grace_seconds
        self._drain_seconds = drain_seconds
        self._wall_clock = wall_clock
        self._running: set[asyncio.Task[None]] = set()
        self._last_success: dict[str, float] = {}
        self._failures: dict[str, int] = {}
        self._consecutive_failures: dict[str, int] = {}
        self._skipped: dict[str, int] = {}
        self._skip_streak: dict[str, int] = {}
        self._skip_logged_at: dict[str, float] = {}
        self._started = False
        self._scheduler.add_listener(self._on_skip, EVENT_JOB_MAX_INSTANCES | EVENT_JOB_MISSED)

    def _on_skip(self, event: JobEvent) -> None:
        """A run skipped because the previous one still runs (or was missed): counted
        always, logged at most once per SKIP_LOG_INTERVAL_SECONDS per job (APScheduler's
        own warning on every skipped tick is silenced in daemon.logs)."""
        job = str(event.job_id)
        self._skipped[job] = self._skipped.get(job, 0) + 1
        self._skip_streak[job] = self._skip_streak.get(job, 0) + 1
        now = time.monotonic()
        last = self._skip_logged_at.get(job)
        if last is None or now - last >= SKIP_LOG_INTERVAL_SECONDS:
            self._skip_logged_at[job] = now
            logger.warning(
                "job %s: %d run(s) skipped, the previous run was still going (slow job or "
                "busy host); next report in %d s at the earliest",
                job,
                self._skip_streak.pop(job),
                SKIP_LOG_INTERVAL_SECONDS,
            )

    @property
    def skipped(self) -> Mapping[str, int]:
        return dict(self._skipped)

    def add_job(
        self,
        name: str,
        func: JobFunc,
        *,
        interval_seconds: float,
        first_run_in_seconds: float = 0.0,
    ) -> None:
        self._failures.setdefault(name, 0)
        self._scheduler.add_job(
            self._wrap(name, func),
            IntervalTrigger(seconds=interval_seconds, timezone=UTC),
            id=name,
            name=name,
            coalesce=True,
            max_instances=1,
            misfire_grace_time=max(1, round(self._misfire_grace_seconds)),
            next_run_time=datetime.now(UTC) + timedelta(seconds=first_run_in_seconds),
        )

    def _wrap(self, name: str, func: JobFunc) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            task = asyncio.current_task()
            if task is not None:
                self._running.add(task)
            try:
                await func()
            except Exception as exc:
                self._failures[name] = self._failures.get(name, 0) + 1
                streak = self._consecutive_failures.get(name, 0) + 1
                self._consecutive_failures[name] = streak
                if streak == 1 and is_transient(exc):
                    # An outage (database down, network gone) is weather, not a bug: one
                    # line, no traceback.
                    logger.warning(
                        "job %s failed on a transient error (%s: %s); further failures are counted",
                        name,
                        type(exc).__name__,
                        str(exc).strip().splitlines()[0] if str(exc).strip() else "no detail",
                    )
                elif streak == 1:
                    logger.exception("job %s failed; further failures are counted", name)
                else:
                    logger.debug("job %s failed again (%d in a row)", name, streak, exc_info=True)
            else:
                self._last_success[name] = self._wall_clock()
                streak = self._consecutive_failures.pop(name, 0)
                if streak:
                    logger.info("job %s recovered after %d failed runs", name, streak)
            finally:
                if task is not None:
                    self._running.discard(task)

        run.__name__ = f"job_{name}"
        return run

    def run_soon(self, name: str) -> None:
        """Bring a job's next run forward to now (no-op if it is unknown or not started)."""
        if not self._started:
            return
        job = self._scheduler.get_job(name)
        if job is not None:
            job.modify(next_run_time=datetime.now(UTC))
            self._scheduler.wakeup()

    async def run_now(self, name: str) -> None:
        """Run a job once outside its schedule (used on shutdown for a final flush)."""
        job = self._scheduler.get_job(name)
        if job is None:
            raise KeyError(name)
        await job.func()

    @property
    def last_success(self) -> Mapping[str, float]:
        return dict(self._last_success)

    @property
    def failures(self) -> Mapping[str, int]:
        return dict(self._failures)

    def collect(self) -> Iterator[Metric]:
        """prometheus-client's Collector: each job's last success and failures, read at
        scrape time (from the render thread: dict copies, which the GIL keeps whole)."""
        last = GaugeMetricFamily(
            "pluginmon_job_last_success_timestamp_seconds",
            "Unix time of each job's last successful run",
            # `task`, not `job`: Prometheus owns `job` and would rename ours to exported_job.
            labels=["task"],
        )
        for job, when in sorted(self.last_success.items()):
            last.add_metric([job], when)
        yield last
        failures = CounterMetricFamily(
            "pluginmon_job_failures", "Failed runs of each job", labels=["task"]
        )
        for job, count in sorted(self.failures.items()):
            failures.add_metric([job], count)
        yield failures

    def pause(self) -> None:
        if self._started:
            self._scheduler.pause()

    async def drain(self, timeout_seconds: float) -> bool:
        """Wait for running jobs; True when all finished in time."""
        pending = {t for t in self._running if not t.done()}
        if not pending:
            return True
        _done, still = await asyncio.wait(pending, timeout=timeout_seconds)
        return not still

    async def __aenter__(self) -> Scheduler:
        self._scheduler.start()
        self._started = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop scheduling, let running jobs finish within the drain time, cancel the rest.
        Idempotent."""
        if not self._started:
            return
        self._scheduler.pause()
        drain_seconds = (
            self._drain_seconds() if callable(self._drain_seconds) else self._drain_seconds
        )
        if not await asyncio.shield(self.drain(drain_seconds)):
            logger.warning("jobs still running after %.1f s; cancelling them", drain_seconds)
        self._scheduler.shutdown(wait=False)
        self._started = False
        leftovers = [t for t in self._running if not t.done()]
        for task in leftovers:
            task.cancel()
        if leftovers:
            await asyncio.gather(*leftovers, return_exceptions=True)
