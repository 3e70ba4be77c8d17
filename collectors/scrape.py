"""Scraping each plugin's own /metrics endpoint: one loop per target on its own interval, bounded concurrency, limits on time and size, results to a consumer.

How one slow or huge endpoint is kept from hurting the others:

* every target runs in its own task, on its own interval, at a fixed offset inside it (a
  hash of the target, as Prometheus spreads its targets), so a target that takes long only
  delays its own next scrape;
* at most ``max_concurrent`` requests are open at once; a request holds its slot for at
  most ``timeout_seconds`` (the whole request: connect, headers, body), so a hanging
  endpoint costs one slot for one timeout;
* the body is read in chunks and the request abandoned as soon as it passes
  ``max_body_bytes`` (a ``Content-Length`` over the limit is refused before reading), so a
  10 MB answer never sits in memory whole; compressed bodies are counted decompressed;
* parsing (collectors.exposition) runs in a worker thread: never on the event loop;
* redirects are not followed (a redirect could leave loopback) and proxies from the
  environment are not used.

Every outcome is counted per plugin in ``ScrapeStats`` (a prometheus-client collector):
``pluginmon_plugin_scrape_up``, ``..._duration_seconds``, ``..._samples`` and
``..._rejected_total{reason}``. A target going down or coming back is logged once per change.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Final
from urllib.parse import urlsplit, urlunsplit

import aiohttp
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pluginmon.collectors.exposition import (
    ExpositionLimits,
    Parsed,
    Rejected,
    RejectReason,
    parse_exposition,
)
from pluginmon.collectors.models import PluginKey, PluginMetrics
from pluginmon.collectors.stats import LogRateLimit

logger = logging.getLogger(__name__)

# As Prometheus asks: OpenMetrics first, the text format as the fallback.
ACCEPT: Final = (
    "application/openmetrics-text;version=1.0.0;q=0.9,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)
_CHUNK_BYTES: Final = 64 * 1024
# A consumer that fails is logged at most this often (the failures are the writer's to count).
_CONSUMER_LOG_SECONDS: Final = 60.0

LABELS: Final = ("tenant", "plugin", "environment")


@dataclass(frozen=True, slots=True)
class ScrapeTarget:
    """One plugin's metrics endpoint and how to scrape it."""

    key: PluginKey
    url: str
    interval_seconds: float
    timeout_seconds: float
    limits: ExpositionLimits = field(default_factory=ExpositionLimits)

    def offset_seconds(self) -> float:
        """Where in each interval this target is scraped: stable for a target, spread over
        targets."""
        digest = hashlib.blake2b(
            f"{self.key.tenant}/{self.key.plugin}/{self.key.environment}/{self.url}".encode(),
            digest_size=8,
        ).digest()
        return int.from_bytes(digest, "big") / 2**64 * self.interval_seconds


@dataclass(frozen=True, slots=True)
class ScrapeConfig:
    """What to scrape: the configured plugins' endpoints, and how to scrape the endpoints
    that label-discovered plugins declare (PLUGINMON_METRICS_PORT/PATH)."""

    targets: tuple[ScrapeTarget, ...] = ()
    discovered: bool = True
    interval_seconds: float = 10.0
    timeout_seconds: float = 5.0
    limits: ExpositionLimits = field(default_factory=ExpositionLimits)
    max_concurrent: int = 32

    def discovered_target(self, key: PluginKey, url: str) -> ScrapeTarget:
        return ScrapeTarget(
            key=key,
            url=url,
            interval_seconds=self.interval_seconds,
            timeout_seconds=min(self.timeout_seconds, self.interval_seconds),
            limits=self.limits,
        )

    def all_targets(self, discovered: Iterable[tuple[PluginKey, str]]) -> Iterator[ScrapeTarget]:
        """The configured targets, then the discovered ones (a configured plugin's own
        metrics_url wins over what its processes declare)."""
        yield from self.targets
        if self.discovered:
            for key, url in discovered:
                yield self.discovered_target(key, url)


@dataclass(frozen=True, slots=True)
class ScrapeOutcome:
    """One scrape: the metrics (None when refused) or why it was refused, and how long it took."""

    target: ScrapeTarget
    metrics: PluginMetrics | None
    rejected: Rejected | None
    duration_seconds: float
    series_dropped: int = 0  # left out by the allow-list


# The consumer of successful scrapes (the daemon's plugin_metrics sink).
MetricsConsumer = Callable[[PluginMetrics], Awaitable[None]]


def utc_now() -> datetime:
    return datetime.now(UTC)


def display_url(url: str) -> str:
    """``url`` as a log line may show it: no user:password, no query string."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        port = f":{parts.port}" if parts.port is not None else ""
    except ValueError:
        return "<invalid URL>"
    return urlunsplit((parts.scheme, host + port, parts.path, "", ""))


async def fetch(
    session: aiohttp.ClientSession, target: ScrapeTarget
) -> tuple[bytes, str] | Rejected:
    """The body and Content-Type of ``target``'s endpoint, or why not (timeout, connection,
    status, size). Bounded by the target's timeout as a whole."""
    limit = target.limits.max_body_bytes
    try:
        async with (
            asyncio.timeout(target.timeout_seconds),
            session.get(target.url, headers={"Accept": ACCEPT}, allow_redirects=False) as response,
        ):
            if response.status != 200:
                return Rejected(RejectReason.HTTP_STATUS, f"HTTP {response.status}")
            length = response.content_length
            if length is not None and length > limit:
                return Rejected(
                    RejectReason.TOO_LARGE,
                    f"Content-Length {length} bytes over max_body_bytes {limit}",
                )
            body = bytearray()
            async for chunk in response.content.iter_chunked(_CHUNK_BYTES):
                body += chunk
                if len(body) > limit:
                    return Rejected(
                        RejectReason.TOO_LARGE,
                        f"body over max_body_bytes {limit}, not read further",
                    )
            return bytes(body), response.headers.get("Content-Type", "")
    except TimeoutError:
        return Rejected(
            RejectReason.TIMEOUT, f"no complete answer within {target.timeout_seconds:g} s"
        )
    except (aiohttp.ClientError, OSError) as exc:
        # ClientPayloadError (a broken or badly compressed body) is one of these too: the
        # endpoint did not deliver.
        return Rejected(RejectReason.CONNECTION, f"{type(exc).__name__}: {exc}"[:200])


async def scrape_once(
    session: aiohttp.ClientSession,
    target: ScrapeTarget,
    *,
    slots: asyncio.Semaphore | None = None,
    clock: Callable[[], float] = time.monotonic,
    wall_clock: Callable[[], datetime] = utc_now,
) -> ScrapeOutcome:
    """Fetch (holding one of ``slots``) and parse (in a worker thread) one target."""
    started = clock()
    at = wall_clock()
    if slots is None:
        fetched = await fetch(session, target)
    else:
        async with slots:
            fetched = await fetch(session, target)
    if isinstance(fetched, Rejected):
        return ScrapeOutcome(target, None, fetched, clock() - started)
    body, content_type = fetched
    parsed = await asyncio.to_thread(
        parse_exposition, body, content_type=content_type, limits=target.limits
    )
    elapsed = clock() - started
    if isinstance(parsed, Rejected):
        return ScrapeOutcome(target, None, parsed, elapsed)
    assert isinstance(parsed, Parsed)
    return ScrapeOutcome(
        target,
        PluginMetrics(key=target.key, timestamp=at, points=parsed.points),
        None,
        elapsed,
        parsed.series_dropped,
    )


# -- the exported counts -----------------------------------------------------------------------


@dataclass(slots=True)
class _TargetCounts:
    up: bool = False
    duration_seconds: float = 0.0
    samples: int = 0
    rejected: dict[RejectReason, int] = field(
        default_factory=lambda: dict.fromkeys(RejectReason, 0)
    )
    scraped: bool = False  # at least one scrape finished


class ScrapeStats(Collector):
    """Per-plugin scrape outcomes, updated on the event loop and read by /metrics renders in
    another thread (a lock guards both). A plugin that is no longer a target leaves."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._targets: dict[PluginKey, _TargetCounts] = {}

    def record(self, outcome: ScrapeOutcome) -> None:
        key = outcome.target.key
        with self._lock:
            counts = self._targets.setdefault(key, _TargetCounts())
            counts.scraped = True
            counts.duration_seconds = outcome.duration_seconds
            counts.up = outcome.metrics is not None
            counts.samples = 0 if outcome.metrics is None else len(outcome.metrics.points)
            if outcome.rejected is not None:
                counts.rejected[outcome.rejected.reason] += 1

    def keep_only(self, keys: Iterable[PluginKey]) -> None:
        wanted = set(keys)
        with self._lock:
            for key in [k for k in self._targets if k not in wanted]:
                del self._targets[key]
            for key in wanted:
                self._targets.setdefault(key, _TargetCounts())

    def up(self, key: PluginKey) -> bool | None:
        with self._lock:
            counts = self._targets.get(key)
            return None if counts is None or not counts.scraped else counts.up

    def rejected(self, key: PluginKey) -> dict[str, int]:
        with self._lock:
            counts = self._targets.get(key)
            return {} if counts is None else {r.value: n for r, n in counts.rejected.items()}

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            rows = [
                (
                    key,
                    counts.scraped,
                    counts.up,
                    counts.duration_seconds,
                    counts.samples,
                    dict(counts.rejected),
                )
                for key, counts in sorted(self._targets.items())
            ]
        up = GaugeMetricFamily(
            "pluginmon_plugin_scrape_up",
            "1 if the last scrape of the plugin's own metrics endpoint succeeded",
            labels=LABELS,
        )
        duration = GaugeMetricFamily(
            "pluginmon_plugin_scrape_duration_seconds",
            "Duration of the last scrape of the plugin's metrics endpoint (fetch and parse)",
            labels=LABELS,
        )
        samples = GaugeMetricFamily(
            "pluginmon_plugin_scrape_samples",
            "Series kept from the last scrape of the plugin's metrics endpoint",
            labels=LABELS,
        )
        rejected = CounterMetricFamily(
            "pluginmon_plugin_scrape_rejected",
            "Scrapes of a plugin's metrics endpoint refused, by reason",
            labels=[*LABELS, "reason"],
        )
        for key, scraped, is_up, seconds, count, by_reason in rows:
            values = [key.tenant, key.plugin, key.environment]
            if scraped:  # no up=0 for a target not scraped yet
                up.add_metric(values, 1.0 if is_up else 0.0)
                duration.add_metric(values, seconds)
                samples.add_metric(values, count)
            # Every reason at 0 from the start, so that rate() works from the first refusal.
            for reason, refused in sorted(by_reason.items()):
                rejected.add_metric([*values, reason.value], refused)
        yield up
        yield duration
        yield samples
        yield rejected


# -- the scraper -----------------------------------------------------------------------------


class Scraper:
    """``async with Scraper(targets=..., consume=...)``: scrapes every target until closed.

    ``targets`` is read at start and every ``refresh_seconds`` (configured plugins with a
    ``metrics_url``, plus the endpoints discovered plugins declare): a new target starts its
    loop, a vanished one stops, a changed one restarts. ``consume`` gets every successful
    scrape; its failures are logged (rate-limited) and scraping goes on.
    """

    def __init__(
        self,
        *,
        targets: Callable[[], Iterable[ScrapeTarget]],
        consume: MetricsConsumer,
        max_concurrent: int = 32,
        refresh_seconds: float = 5.0,
        stats: ScrapeStats | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = utc_now,
    ) -> None:
        if max_concurrent < 1:
            raise ValueError("max_concurrent must be at least 1")
        if refresh_seconds <= 0:
            raise ValueError("refresh_seconds must be positive")
        self._targets = targets
        self._consume = consume
        self._max_concurrent = max_concurrent
        self._refresh_seconds = refresh_seconds
        self.stats = stats if stats is not None else ScrapeStats()
        self._clock = clock
        self._wall_clock = wall_clock
        self._slots = asyncio.Semaphore(max_concurrent)
        self._running: dict[PluginKey, tuple[ScrapeTarget, asyncio.Task[None]]] = {}
        self._session: aiohttp.ClientSession | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._consumer_log = LogRateLimit(interval_seconds=_CONSUMER_LOG_SECONDS)
        self.scrapes = 0  # finished scrapes, successful or not

    async def __aenter__(self) -> Scraper:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self._max_concurrent, force_close=False),
            # Per request: scrape_once bounds each one by its target's timeout.
            timeout=aiohttp.ClientTimeout(total=None),
            trust_env=False,
        )
        self.refresh()
        self._refresher = asyncio.create_task(self._refresh_loop(), name="scrape-targets")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        tasks = [task for _, task in self._running.values()]
        if self._refresher is not None:
            tasks.append(self._refresher)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._running.clear()
        self._refresher = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def targets(self) -> tuple[ScrapeTarget, ...]:
        return tuple(target for target, _ in self._running.values())

    def refresh(self) -> None:
        """Start, stop and restart target loops to match ``targets()`` now."""
        wanted: dict[PluginKey, ScrapeTarget] = {}
        for target in self._targets():
            wanted.setdefault(target.key, target)  # the first one (configured before discovered)
        for key, (target, task) in list(self._running.items()):
            if wanted.get(key) != target:
                task.cancel()
                del self._running[key]
        for key, target in wanted.items():
            if key not in self._running:
                task = asyncio.create_task(self._loop(target), name=f"scrape-{key.plugin}")
                self._running[key] = (target, task)
        self.stats.keep_only(wanted)

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_seconds)
            try:
                self.refresh()
            except Exception:  # a bug in the provider must not end scraping
                logger.exception("cannot refresh the scrape targets; keeping the current ones")

    async def scrape(self, target: ScrapeTarget) -> ScrapeOutcome:
        """One scrape of ``target`` now, counted in ``stats`` and handed to the consumer."""
        session = self._session
        if session is None:
            raise RuntimeError("Scraper is not running: use `async with Scraper(...)`")
        outcome = await scrape_once(
            session, target, slots=self._slots, clock=self._clock, wall_clock=self._wall_clock
        )
        was_up = self.stats.up(target.key)
        self.stats.record(outcome)
        self.scrapes += 1
        self._log_change(target, was_up, outcome)
        if outcome.metrics is not None:
            try:
                await self._consume(outcome.metrics)
            except asyncio.CancelledError:
                raise
            except Exception:
                held_back = self._consumer_log.allow(self._clock())
                if held_back is not None:
                    logger.exception(
                        "storing the scraped metrics of %s/%s failed (%d failures not logged "
                        "since the previous line)",
                        target.key.tenant,
                        target.key.plugin,
                        held_back,
                    )
        return outcome

    async def _loop(self, target: ScrapeTarget) -> None:
        interval = target.interval_seconds
        next_at = self._clock() + target.offset_seconds()
        while True:
            delay = next_at - self._clock()
            if delay > 0:
                await asyncio.sleep(delay)
            try:
                await self.scrape(target)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("scraping %s failed unexpectedly", display_url(target.url))
            next_at += interval
            now = self._clock()
            if next_at < now:  # took longer than its interval: skip the missed slots
                next_at += ((now - next_at) // interval + 1) * interval

    def _log_change(
        self, target: ScrapeTarget, was_up: bool | None, outcome: ScrapeOutcome
    ) -> None:
        key = target.key
        if outcome.rejected is not None and was_up is not False:
            logger.warning(
                "scrape of %s/%s (%s) at %s refused: %s (%s); counted in "
                "pluginmon_plugin_scrape_rejected_total, logged again when it changes",
                key.tenant,
                key.plugin,
                key.environment,
                display_url(target.url),
                outcome.rejected.reason.value,
                outcome.rejected.detail,
            )
        elif outcome.rejected is None and was_up is False:
            logger.info(
                "scrape of %s/%s (%s) at %s succeeds again",
                key.tenant,
                key.plugin,
                key.environment,
                display_url(target.url),
            )
