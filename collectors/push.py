"""Metrics a plugin pushes (batch jobs that live shorter than a scrape interval): parsed under the scrape limits, kept until they expire, re-emitted each interval meanwhile (pure, clock injected).

The Pushgateway's known pitfall is a series that stays forever after the job that pushed it
is gone. Here every pushed series expires ``ttl_seconds`` after its last push (the push's
own ``ttl_seconds``, default ``PushConfig.default_ttl_seconds``, at most
``max_ttl_seconds``). Until then it is stored at the push and re-emitted at every interval
with its pushed value, so rules, health thresholds and Grafana see it like a scraped series
(a counter pushed again with the same value has a rate of 0, not a gap); after it, it is
gone from everything that reads recent values.

A push replaces the series it names (same name and labels); the plugin's other pushed series
keep their own expiry. A plugin holds at most ``limits.max_series`` live pushed series: a
push that would pass that is refused whole (``too_many_series``), like a scrape.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from pluginmon.collectors.exposition import (
    JSON_TYPE,
    ExpositionLimits,
    Parsed,
    Rejected,
    RejectReason,
    parse_exposition,
    parse_json_push,
)
from pluginmon.collectors.models import MetricPoint, PluginKey, PluginMetrics


@dataclass(frozen=True, slots=True)
class PushConfig:
    default_ttl_seconds: float = 600.0
    max_ttl_seconds: float = 86400.0
    limits: ExpositionLimits = field(default_factory=ExpositionLimits)


@dataclass(frozen=True, slots=True)
class PushAccepted:
    """A push taken: its points (stamped with the push time) to store now."""

    metrics: PluginMetrics
    expires_at: datetime
    series_live: int  # the plugin's live pushed series after this push


def parse_push(body: bytes, *, content_type: str, limits: ExpositionLimits) -> Parsed | Rejected:
    """A push body: JSON (``application/json``), OpenMetrics or the Prometheus text format,
    under the same limits as a scrape. Blocking (CPU): run it in a thread."""
    if len(body) > limits.max_body_bytes:
        return Rejected(
            RejectReason.TOO_LARGE,
            f"body of {len(body)} bytes over max_body_bytes {limits.max_body_bytes}",
        )
    if content_type.split(";", 1)[0].strip().lower() == JSON_TYPE:
        return parse_json_push(body, limits=limits)
    return parse_exposition(body, content_type=content_type, limits=limits)


@dataclass(slots=True)
class _Live:
    point: MetricPoint
    expires_at: datetime


class PushStore:
    """The live pushed series of every plugin. Thread-safe (a lock): pushes arrive on the
    event loop, re-emission and expiry run from the daemon's jobs."""

    def __init__(self, config: PushConfig) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._live: dict[PluginKey, dict[tuple[str, str], _Live]] = {}
        self.expired_series = 0  # series that expired since the start
        self.accepted = 0  # pushes taken since the start
        self.rejected = dict.fromkeys(RejectReason, 0)  # pushes refused, by reason

    def count(self, outcome: PushAccepted | Rejected) -> None:
        """Count one push's outcome (the pluginmon_plugin_push* metrics read them)."""
        with self._lock:
            if isinstance(outcome, Rejected):
                self.rejected[outcome.reason] += 1
            else:
                self.accepted += 1

    def counts(self) -> tuple[int, dict[RejectReason, int]]:
        """(accepted, rejected by reason) so far."""
        with self._lock:
            return self.accepted, dict(self.rejected)

    def check(self, key: PluginKey, parsed: Parsed, *, now: datetime) -> Rejected | None:
        """Why ``accept`` would refuse this push now (too many live series), without
        recording it: the API checks before it stores the rows, and records after commit."""
        with self._lock:
            live = self._drop_expired(key, now)
            new = {(p.name, p.labels_json) for p in parsed.points} - live.keys()
            return self._too_many(len(live), len(new))

    def _too_many(self, live: int, new: int) -> Rejected | None:
        if live + new > self.config.limits.max_series:
            return Rejected(
                RejectReason.TOO_MANY_SERIES,
                f"{live} live pushed series and {new} new ones pass max_series "
                f"{self.config.limits.max_series}",
            )
        return None

    def ttl_seconds(self, requested: float | None) -> float:
        """The TTL a push gets: ``requested`` (capped at max_ttl_seconds) or the default.
        ValueError for a TTL that is not a positive finite number."""
        if requested is None:
            return self.config.default_ttl_seconds
        if not (math.isfinite(requested) and requested > 0):
            raise ValueError("ttl_seconds must be a positive number of seconds")
        return min(requested, self.config.max_ttl_seconds)

    def accept(
        self,
        key: PluginKey,
        parsed: Parsed,
        *,
        now: datetime,
        ttl_seconds: float | None = None,
    ) -> PushAccepted | Rejected:
        """Record a parsed push of ``key`` at ``now``; its points are to be stored now.
        ValueError for a bad ``ttl_seconds``."""
        ttl = self.ttl_seconds(ttl_seconds)
        expires_at = now + timedelta(seconds=ttl)
        with self._lock:
            live = self._drop_expired(key, now)
            new = {(p.name, p.labels_json) for p in parsed.points} - live.keys()
            refused = self._too_many(len(live), len(new))
            if refused is not None:
                return refused
            for point in parsed.points:
                live[(point.name, point.labels_json)] = _Live(point, expires_at)
            if live:
                self._live[key] = live
            count = len(live)
        return PushAccepted(
            metrics=PluginMetrics(key=key, timestamp=now, points=parsed.points),
            expires_at=expires_at,
            series_live=count,
        )

    def _drop_expired(self, key: PluginKey, now: datetime) -> dict[tuple[str, str], _Live]:
        live = self._live.get(key, {})
        expired = [identity for identity, item in live.items() if item.expires_at <= now]
        for identity in expired:
            del live[identity]
        self.expired_series += len(expired)
        if not live:
            self._live.pop(key, None)
        return live

    def live(self, *, now: datetime) -> list[PluginMetrics]:
        """Every plugin's unexpired pushed series, stamped ``now`` (to re-emit); expired
        ones are forgotten."""
        out: list[PluginMetrics] = []
        with self._lock:
            for key in list(self._live):
                live = self._drop_expired(key, now)
                if live:
                    points = tuple(item.point for item in live.values())
                    out.append(PluginMetrics(key=key, timestamp=now, points=points))
        return out

    def series(self, key: PluginKey, *, now: datetime) -> int:
        """How many pushed series of ``key`` are live at ``now``."""
        with self._lock:
            return sum(1 for item in self._live.get(key, {}).values() if item.expires_at > now)

    def series_after(self, key: PluginKey, parsed: Parsed, *, now: datetime) -> int:
        """How many pushed series of ``key`` are live at ``now`` once ``parsed`` is taken."""
        with self._lock:
            live = {i for i, item in self._live.get(key, {}).items() if item.expires_at > now}
            return len(live | {(p.name, p.labels_json) for p in parsed.points})

    def live_series(self, *, now: datetime) -> int:
        """How many pushed series of all plugins are live at ``now``."""
        with self._lock:
            return sum(
                1 for live in self._live.values() for item in live.values() if item.expires_at > now
            )
