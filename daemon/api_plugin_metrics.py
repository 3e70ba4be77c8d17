"""The /api/v1 glue of a plugin's own metrics: the push route (parse under the scrape limits, store with its audit entry, then keep the series live for re-emission) and the read route, with their models.

Where pushed series go, in both deployments the same: the route writes the push's rows to
``plugin_metrics`` in the request's transaction, with its audit entry, so an acknowledged
push is stored and audited or neither. After the commit the series join the live set
(collectors.push.PushStore), from which they are written again every interval until
``ttl_seconds`` after their last push (the Pushgateway's stale-series pitfall): in
``pluginmon run`` the plugin-metrics service re-emits them (daemon.plugin_metrics, through
its writer and spool); ``pluginmon api``, which runs no sampler, re-emits them itself
(``reemit_job``, one COPY per interval). Each process re-emits what was pushed to it; a
restart forgets the live set (the rows already stored stay).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Final, Literal

import asyncpg
from pydantic import AwareDatetime, Field

from pluginmon.collectors.exposition import JSON_TYPE, Parsed, Rejected, RejectReason
from pluginmon.collectors.models import PluginKey
from pluginmon.collectors.push import PushStore, parse_push
from pluginmon.daemon.api_http import ApiError, Call, Route
from pluginmon.daemon.api_models import ENVIRONMENT_PATTERN, Query, Request, Response
from pluginmon.registry import plugin_metrics
from pluginmon.registry.plugins import DEFAULT_ENVIRONMENT
from pluginmon.registry.tokens import Role
from pluginmon.storage.errors import TRANSIENT_ERRORS
from pluginmon.storage.plugin_metrics import (
    PLUGIN_METRICS_COLUMNS,
    PLUGIN_METRICS_TABLE,
    metric_rows,
)
from pluginmon.storage.spool import Row

logger = logging.getLogger(__name__)

# How far back a read looks by default: the alert engine's max age for these values.
DEFAULT_READ_SECONDS: Final = 600.0


# -- models ---------------------------------------------------------------------------------


class PushQuery(Query):
    environment: str = Field(default=DEFAULT_ENVIRONMENT, pattern=ENVIRONMENT_PATTERN)
    ttl_seconds: float | None = Field(
        default=None,
        gt=0,
        description="Expiry of the pushed series after this push (default push_ttl_seconds, "
        "at most push_max_ttl_seconds)",
    )


class PushMetricDoc(Request):
    """One series family of a JSON push (documentation of the shape collectors.exposition
    parses; unknown fields are refused there, naming them)."""

    name: str
    kind: Literal["gauge", "counter", "histogram", "summary"]
    value: float | None = Field(default=None, description="gauge and counter")
    labels: dict[str, str] | None = None
    buckets: dict[str, float] | None = Field(
        default=None, description='histogram: cumulative count per upper bound ("+Inf" added)'
    )
    quantiles: dict[str, float] | None = Field(default=None, description="summary")
    sum: float | None = Field(default=None, description="histogram and summary")
    count: float | None = Field(default=None, description="histogram and summary")


class PushBodyDoc(Request):
    metrics: list[PushMetricDoc]


class PushOut(Response):
    plugin: str
    environment: str
    series: int
    pushed_at: datetime
    expires_at: datetime
    series_live: int = Field(description="the plugin's pushed series not expired yet")


class MetricsQuery(Query):
    limit: int = Field(default=1000, ge=1, le=plugin_metrics.MAX_SERIES_READ)
    environment: str = Field(default=DEFAULT_ENVIRONMENT, pattern=ENVIRONMENT_PATTERN)
    metric: str | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        description="a series name, or a histogram's or summary's family name (its _bucket, "
        "_sum and _count series too)",
    )
    since: AwareDatetime | None = Field(
        default=None, description="series with a point since then (default: 10 minutes ago)"
    )


class SeriesOut(Response):
    metric: str
    kind: str
    labels: dict[str, str]
    value: float
    timestamp: datetime
    rate_per_second: float | None = Field(
        description="counters and a histogram's or summary's _bucket/_sum/_count: the rate "
        "over the last 5 minutes, resets handled; null for gauges or with one point"
    )


class PluginMetricsOut(Response):
    plugin: str
    environment: str
    items: list[SeriesOut]
    derived: dict[str, float | None] = Field(
        description="as rules read them: gauges by name, counters as name/s, histograms and "
        "summaries as name:p50, :p95, :p99"
    )


# -- the push route -------------------------------------------------------------------------


class PluginMetricsHandlers:
    """The two routes; ``pushes`` is the live set of pushed series (shared with whoever
    re-emits them), its ``config`` the limits and TTLs (replaced by a reload)."""

    def __init__(self, pushes: PushStore) -> None:
        self._pushes = pushes
        # The plugin id of every key pushed to, for pluginmon api's re-emission.
        self.plugin_ids: dict[PluginKey, int] = {}

    def max_body_bytes(self) -> int:
        return self._pushes.config.limits.max_body_bytes

    async def push(self, call: Call) -> PushOut:
        query: PushQuery = call.query
        name = call.params["name"]
        key = PluginKey(tenant=call.tenant_id, plugin=name, environment=query.environment)
        try:
            ttl = self._pushes.ttl_seconds(query.ttl_seconds)
        except ValueError as exc:
            raise ApiError(422, "invalid_value", str(exc), field="ttl_seconds") from None
        # Refused before parsing: a token that may not write this plugin learns nothing more.
        await plugin_metrics.check_plugin(call.conn, name)
        limits = self._pushes.config.limits
        parsed = await asyncio.to_thread(
            parse_push, call.raw, content_type=call.content_type, limits=limits
        )
        if isinstance(parsed, Parsed):
            refused = self._pushes.check(key, parsed, now=call.now)
        else:
            refused = parsed
        if refused is not None:
            self._pushes.count(refused)
            raise _push_error(refused, content_type=call.content_type)
        assert isinstance(parsed, Parsed)
        stored = await plugin_metrics.store_push(
            call.conn,
            tenant_id=call.tenant_id,
            actor=call.actor,
            now=call.now,
            plugin_name=name,
            environment=query.environment,
            points=parsed.points,
            expires_at=call.now + timedelta(seconds=ttl),
            content_type=call.content_type,
        )
        accepted = parsed

        def keep_live() -> None:
            outcome = self._pushes.accept(key, accepted, now=call.now, ttl_seconds=ttl)
            self._pushes.count(outcome)
            self.plugin_ids[key] = stored.plugin_id

        call.after_commit.append(keep_live)
        return PushOut(
            plugin=name,
            environment=query.environment,
            series=stored.series,
            pushed_at=stored.pushed_at,
            expires_at=stored.expires_at,
            series_live=self._pushes.series_after(key, accepted, now=call.now),
        )

    async def read(self, call: Call) -> PluginMetricsOut:
        query: MetricsQuery = call.query
        since = query.since or call.now - timedelta(seconds=DEFAULT_READ_SECONDS)
        view = await plugin_metrics.latest_metrics(
            call.conn,
            call.params["name"],
            environment=query.environment,
            now=call.now,
            since=since,
            metric=query.metric,
        )
        return PluginMetricsOut(
            plugin=view.plugin_name,
            environment=view.environment,
            items=[
                SeriesOut(
                    metric=s.window.name,
                    kind=s.window.kind,
                    labels=dict(s.window.labels),
                    value=s.window.last_value,
                    timestamp=s.window.last_at,
                    rate_per_second=s.rate_per_second,
                )
                for s in view.series[: query.limit]
            ],
            derived=view.derived,
        )


def _push_error(refused: Rejected, *, content_type: str) -> ApiError:
    """413 for a body over the limit, 422 naming the problem otherwise. A text-format
    parser's complaint may quote the body (a value), so only its kind goes out; the JSON
    parser's name fields, never values."""
    reason = refused.reason
    if reason is RejectReason.TOO_LARGE:
        return ApiError(413, "body_too_large", refused.detail, field="body")
    detail = refused.detail
    is_json = content_type.split(";", 1)[0].strip().lower() == JSON_TYPE
    if reason is RejectReason.PARSE_ERROR and not is_json and ": " in detail:
        kind = detail.split(":", 1)[0]
        if kind.endswith(("Error", "Exception")):
            detail = f"the parser refused the body ({kind})"
    return ApiError(422, reason.value, f"{reason.value}: {detail}", field="body")


def metrics_routes(h: PluginMetricsHandlers) -> list[Route]:
    # fmt: off
    return [
        Route("POST", "/plugins/{name}/metrics",
              "Push a plugin's metrics (Prometheus text, OpenMetrics or JSON)", PushOut, h.push,
              role=Role.WRITER, query=PushQuery, tag="plugin_metrics",
              errors=(404, 413, 422), raw_body=True, max_body_bytes=h.max_body_bytes,
              body_doc=PushBodyDoc,
              description=(
                  "For batch jobs: the series are stored now and written again every interval "
                  "until ttl_seconds after their last push (default 600 s, "
                  "[plugin_metrics] push_ttl_seconds; at most push_max_ttl_seconds), then "
                  "they expire. The same limits as a scrape: 413 over max_body_bytes, 422 "
                  "with error.code too_many_series, parse_error or label_limit. "
                  "Content-Type application/openmetrics-text, application/json, or anything "
                  "else for the Prometheus text format. Audited as plugin_metrics.push.")),
        Route("GET", "/plugins/{name}/metrics",
              "A plugin's own metrics: the newest value of each series, with kind, labels "
              "and rates", PluginMetricsOut, h.read, query=MetricsQuery,
              tag="plugin_metrics", errors=(404, 422)),
    ]
    # fmt: on


# -- pluginmon api: re-emission without the daemon ------------------------------------------


def reemit_job(
    pool: Callable[[], asyncpg.Pool | None],
    pushes: PushStore,
    handlers: PluginMetricsHandlers,
    *,
    clock: Callable[[], datetime],
    timeout_seconds: float = 30.0,
) -> Callable[[], Awaitable[int]]:
    """``pluginmon api``'s re-emission: every live pushed series written again stamped now,
    in one COPY (as the daemon's writer would); returns the rows written. A database that is
    away loses this round only (the next one writes the current values again)."""

    async def run() -> int:
        source = pool()
        now = clock()
        live = pushes.live(now=now)
        rows: list[Row] = []
        for metrics in live:
            plugin_id = handlers.plugin_ids.get(metrics.key)
            if plugin_id is not None:
                rows.extend(metric_rows(metrics, plugin_id=plugin_id))
        if source is None or not rows:
            return 0
        try:
            async with source.acquire() as conn:
                await conn.copy_records_to_table(
                    PLUGIN_METRICS_TABLE,
                    records=rows,
                    columns=list(PLUGIN_METRICS_COLUMNS),
                    timeout=timeout_seconds,
                )
        except TRANSIENT_ERRORS as exc:
            logger.warning(
                "re-emitting %d pushed series skipped: database unavailable (%s)",
                len(rows),
                type(exc).__name__,
            )
            return 0
        return len(rows)

    return run
