"""Plugins' own metrics in the daemon: the scraper over configured and discovered endpoints, pushes (the domain call behind the push endpoint), re-emission of live pushed series, all into the plugin_metrics sink."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AsyncExitStack
from datetime import datetime
from types import TracebackType

import asyncpg
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from pluginmon.collectors.exposition import Rejected
from pluginmon.collectors.models import PluginKey, PluginMetrics
from pluginmon.collectors.push import PushAccepted, PushConfig, PushStore, parse_push
from pluginmon.collectors.scrape import ScrapeConfig, Scraper, ScrapeStats, utc_now
from pluginmon.daemon.config import DaemonConfig
from pluginmon.storage.plugin_metrics import (
    PLUGIN_METRICS_COLUMNS,
    PLUGIN_METRICS_TABLE,
    MetricSink,
)
from pluginmon.storage.reachability import DatabaseWatch
from pluginmon.storage.spool import Spool
from pluginmon.storage.writer import BatchWriter

logger = logging.getLogger(__name__)


class PluginMetricsService:
    """``async with PluginMetricsService(...)``: scrapes until closed, takes pushes.

    ``discovered`` gives the (plugin, URL) endpoints label-discovered plugins declare (the
    sampler's ``metrics_endpoints``); it is read every ``refresh_seconds``. Live pushed
    series are written again every ``scrape.interval_seconds`` until they expire
    (collectors.push).
    """

    def __init__(
        self,
        *,
        scrape: ScrapeConfig,
        push: PushConfig,
        sink: MetricSink,
        discovered: Callable[[], Iterable[tuple[PluginKey, str]]],
        refresh_seconds: float = 5.0,
        wall_clock: Callable[[], datetime] = utc_now,
        pushes: PushStore | None = None,
    ) -> None:
        self._scrape_config = scrape
        self._sink = sink
        self._wall_clock = wall_clock
        # Given when the management API shares the live set (its push route records into it).
        self.pushes = pushes if pushes is not None else PushStore(push)
        self.pushes.config = push
        self.scraper = Scraper(
            # Read at every refresh: a reload replaces _scrape_config (reconfigure()).
            targets=lambda: self._scrape_config.all_targets(discovered()),
            consume=sink.put,
            max_concurrent=scrape.max_concurrent,
            refresh_seconds=refresh_seconds,
            stats=ScrapeStats(),
            wall_clock=wall_clock,
        )
        self._reemit: asyncio.Task[None] | None = None

    async def __aenter__(self) -> PluginMetricsService:
        await self.scraper.__aenter__()
        self._reemit = asyncio.create_task(self._reemit_loop(), name="pushed-metrics")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._reemit is not None:
            self._reemit.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reemit
            self._reemit = None
        await self.scraper.aclose()

    # -- pushes ------------------------------------------------------------------------------

    async def accept_push(
        self,
        key: PluginKey,
        body: bytes,
        *,
        content_type: str,
        ttl_seconds: float | None = None,
    ) -> PushAccepted | Rejected:
        """A push of ``key``'s metrics (the push endpoint's domain call): parsed in a thread
        under the scrape limits (OpenMetrics, the text format, or JSON by ``content_type``),
        recorded with its expiry and stored now. Rejected says why it was refused (the API
        answers 413 for ``too_large``, 422 otherwise); ValueError for a bad ``ttl_seconds``.

        The caller authenticates, authorises and audits; ``key`` is the plugin the token
        may write, never a value read from the body.
        """
        limits = self.pushes.config.limits
        parsed = await asyncio.to_thread(parse_push, body, content_type=content_type, limits=limits)
        if isinstance(parsed, Rejected):
            self._count_push(parsed)
            return parsed
        outcome = self.pushes.accept(key, parsed, now=self._wall_clock(), ttl_seconds=ttl_seconds)
        self._count_push(outcome)
        if isinstance(outcome, PushAccepted):
            await self._sink.put(outcome.metrics)
        return outcome

    def _count_push(self, outcome: PushAccepted | Rejected) -> None:
        self.pushes.count(outcome)

    @property
    def scrape_config(self) -> ScrapeConfig:
        return self._scrape_config

    def reconfigure(self, *, scrape: ScrapeConfig, push: PushConfig) -> None:
        """A reload's scrape targets and push limits, applied now: targets that appeared,
        went or changed (URL, interval, timeout, limits) start, stop or restart at once
        (Scraper.refresh); pushed series keep their expiry, new pushes get the new limits.
        ``max_concurrent`` stays as built (the scraper's connection pool): a restart applies
        it, and the reload says so."""
        self._scrape_config = scrape
        self.pushes.config = push
        self.scraper.refresh()

    async def reemit_pushed(self) -> list[PluginMetrics]:
        """Write every live pushed series again, stamped now; expired ones are forgotten."""
        live = self.pushes.live(now=self._wall_clock())
        for metrics in live:
            await self._sink.put(metrics)
        return live

    async def _reemit_loop(self) -> None:
        interval = self._scrape_config.interval_seconds
        next_at = time.monotonic() + interval
        while True:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            next_at += interval
            try:
                await self.reemit_pushed()
            except Exception:  # the writer's trouble is counted there; go on
                logger.exception("re-emitting pushed metrics failed")

    # -- /metrics ----------------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        """The scrape counts per plugin, and the pushes' (prometheus-client Collector)."""
        yield from self.scraper.stats.collect()
        yield from push_families(self.pushes, now=self._wall_clock())


def push_families(pushes: PushStore, *, now: datetime) -> Iterator[Metric]:
    """The push counts of ``pushes`` (``pluginmon run`` and ``pluginmon api`` alike)."""
    accepted, rejected = pushes.counts()
    yield CounterMetricFamily(
        "pluginmon_plugin_pushes", "Pushes of plugin metrics accepted", value=accepted
    )
    family = CounterMetricFamily(
        "pluginmon_plugin_push_rejected",
        "Pushes of plugin metrics refused, by reason",
        labels=["reason"],
    )
    for reason, count in sorted(rejected.items()):
        family.add_metric([reason.value], count)
    yield family
    yield CounterMetricFamily(
        "pluginmon_plugin_push_expired_series",
        "Pushed series that expired (ttl_seconds after their last push)",
        value=pushes.expired_series,
    )
    yield GaugeMetricFamily(
        "pluginmon_plugin_push_live_series",
        "Pushed series not expired yet, re-emitted every interval",
        value=pushes.live_series(now=now),
    )


async def open_plugin_metrics(
    stack: AsyncExitStack,
    config: DaemonConfig,
    *,
    pool: asyncpg.Pool,
    database: DatabaseWatch,
    discovered: Callable[[], Sequence[tuple[PluginKey, str]]],
    writer_close_seconds: float,
    pushes: PushStore | None = None,
) -> tuple[Spool, MetricSink, PluginMetricsService]:
    """Plugins' own metrics on ``stack``: their writer (with its own spool) and the scraper
    and pushes, which stop before the writer closes (the exit stack unwinds in reverse)."""
    settings = config.settings
    spool = await asyncio.to_thread(
        Spool, settings.data_dir / "spool-metrics", max_bytes=settings.spool_max_bytes
    )
    stack.push_async_callback(asyncio.to_thread, spool.close)
    writer = await stack.enter_async_context(
        BatchWriter(
            pool,
            table=PLUGIN_METRICS_TABLE,
            columns=PLUGIN_METRICS_COLUMNS,
            max_rows=settings.flush_max_rows,
            max_delay_seconds=settings.flush_interval_seconds,
            max_queue_rows=max(settings.writer_queue_max_rows, 2 * settings.flush_max_rows),
            spool=spool,
            close_timeout_seconds=writer_close_seconds,
        )
    )
    sink = MetricSink(pool=pool, writer=writer, database=database)
    service = await stack.enter_async_context(
        PluginMetricsService(
            scrape=config.scrape,
            push=config.push,
            sink=sink,
            discovered=discovered,
            pushes=pushes,
        )
    )
    return spool, sink, service
