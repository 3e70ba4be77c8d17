"""Where a plugin's own metrics are stored and read back: plugin_metrics rows by column name through a BatchWriter, plugin ids, and per-series windows for rates and quantiles.

A scrape or push (collectors.models.PluginMetrics) becomes one plugin_metrics row per point:
tenant, plugin id and environment from the plugin (never from the scraped labels), the
point's name, kind, value and labels. Rows go through a ``BatchWriter`` (binary COPY; its
own disk spool while the database is away). A plugin whose id cannot be looked up now (the
database is away or not migrated yet) loses that scrape: its points are counted under
``plugin_unresolved``; the next scrape tries again. Scraped series are not replayed like
samples are: a plugin's counters and histograms are cumulative, so the next scrape after an
outage carries everything the lost one did.

Reading back, ``series_windows`` gives per series (plugin, environment, name, labels) the
newest value and the increase over a rate window with counter resets handled (a value lower
than the one before it starts again from 0, as Prometheus's ``increase()``); alerts.metric_values
turns those into the values rules and health thresholds compare.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Final, Protocol

import asyncpg
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from pluginmon.collectors.models import PluginKey, PluginMetrics
from pluginmon.storage.errors import TRANSIENT_ERRORS
from pluginmon.storage.queries import ensure_tenant_and_plugin, refused_value
from pluginmon.storage.spool import Row
from pluginmon.storage.writer import BatchWriter

logger = logging.getLogger(__name__)

PLUGIN_METRICS_TABLE: Final = "plugin_metrics"
PLUGIN_METRICS_COLUMNS: Final = (
    "timestamp",
    "tenant_id",
    "plugin_id",
    "environment",
    "metric_name",
    "metric_kind",
    "value",
    "labels",
)

# How long one id lookup may take, and how long after a failed one new plugins are not
# looked up again (their points are dropped meanwhile, counted).
RESOLVE_TIMEOUT_SECONDS: Final = 3.0
RESOLVE_RETRY_SECONDS: Final = 5.0


def metric_rows(metrics: PluginMetrics, *, plugin_id: int) -> list[Row]:
    """The plugin_metrics rows (PLUGIN_METRICS_COLUMNS order) of one scrape or push."""
    key, at = metrics.key, metrics.timestamp
    tenant, environment = key.tenant, key.environment
    return [
        (at, tenant, plugin_id, environment, p.name, p.kind.value, p.value, p.labels_json)
        for p in metrics.points
    ]


class MetricsDrop(StrEnum):
    """Why points of a scrape or push were not handed to the writer."""

    PLUGIN_UNRESOLVED = "plugin_unresolved"  # no plugin id yet: the database is away
    INVALID_PLUGIN = "invalid_plugin"  # the schema refuses the plugin (a bad tenant id)


class SchemaState(Protocol):
    """The database watch, as far as id lookups are concerned."""

    @property
    def schema_ready(self) -> bool: ...

    def failed(self, error: BaseException | None) -> None: ...


class MetricSink:
    """Stores scrapes and pushes: the plugin's id looked up (cached), rows to the writer.

    Built complete with the pool, the running writer (for ``plugin_metrics``) and the
    database watch; owns none of them. ``put`` never waits on a COPY; an id lookup is
    bounded by RESOLVE_TIMEOUT_SECONDS and made by one caller at a time.
    """

    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        writer: BatchWriter,
        database: SchemaState,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pool = pool
        self._writer = writer
        self._database = database
        self._clock = clock
        self._ids: dict[PluginKey, int] = {}
        self._invalid: set[PluginKey] = set()
        self._resolving = asyncio.Lock()
        self._retry_at = 0.0
        self._dropped = dict.fromkeys(MetricsDrop, 0)
        self.points_stored = 0

    async def put(self, metrics: PluginMetrics) -> None:
        """Queue one scrape's or push's rows; raises WriterFailedError/WriterClosedError when
        the writer cannot take rows any more."""
        if not metrics.points:
            return
        key = metrics.key
        plugin_id = self._ids.get(key)
        if plugin_id is None:
            plugin_id = await self._resolve(key)
        if plugin_id is None:
            reason = (
                MetricsDrop.INVALID_PLUGIN
                if key in self._invalid
                else MetricsDrop.PLUGIN_UNRESOLVED
            )
            self._dropped[reason] += len(metrics.points)
            return
        self._writer.put(metric_rows(metrics, plugin_id=plugin_id))
        self.points_stored += len(metrics.points)

    async def _resolve(self, key: PluginKey) -> int | None:
        if key in self._invalid:
            return None
        async with self._resolving:
            if key in self._ids:  # looked up by the caller we waited for
                return self._ids[key]
            if not self._database.schema_ready or self._clock() < self._retry_at:
                return None
            try:
                async with asyncio.timeout(RESOLVE_TIMEOUT_SECONDS), self._pool.acquire() as conn:
                    plugin_id = await ensure_tenant_and_plugin(
                        conn, key.tenant, key.plugin, key.environment
                    )
            except ValueError as exc:
                self._invalid.add(key)
                logger.warning(
                    "metrics of plugin %s/%s (%s) not stored: %s",
                    key.tenant,
                    key.plugin,
                    key.environment,
                    exc,
                )
                return None
            except (*TRANSIENT_ERRORS, asyncpg.PostgresError) as exc:
                if refused_value(exc):
                    # Refused for good (a value of the key itself): never asked again.
                    self._invalid.add(key)
                    logger.warning(
                        "metrics of plugin %r/%r (%r) not stored: the database refuses it: %s",
                        key.tenant,
                        key.plugin,
                        key.environment,
                        exc,
                    )
                    return None
                self._retry_at = self._clock() + RESOLVE_RETRY_SECONDS
                self._database.failed(exc)
                return None
            self._ids[key] = plugin_id
            return plugin_id

    def dropped(self) -> Mapping[str, int]:
        """Points lost so far by reason: the sink's own and the writer's (zeros included)."""
        out = {reason.value: count for reason, count in self._dropped.items()}
        for reason, count in self._writer.stats().dropped.items():
            out[reason.value] = out.get(reason.value, 0) + count
        return out

    def collect(self) -> Iterator[Metric]:
        """prometheus-client's Collector, read at scrape time (reads only)."""
        stats = self._writer.stats()
        yield CounterMetricFamily(
            "pluginmon_plugin_metrics_rows_written",
            "Rows of plugins' own metrics written to plugin_metrics",
            value=stats.rows_written,
        )
        dropped = CounterMetricFamily(
            "pluginmon_plugin_metrics_dropped_rows",
            "Rows of plugins' own metrics that will never be written, by reason",
            labels=["reason"],
        )
        for reason, count in sorted(self.dropped().items()):
            dropped.add_metric([reason], count)
        yield dropped
        yield GaugeMetricFamily(
            "pluginmon_plugin_metrics_spool_rows",
            "Rows of plugins' own metrics waiting in their disk spool for the database",
            value=stats.spool_rows,
        )


# -- reading back ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SeriesWindow:
    """One series of plugin_metrics over the recent past, as rates and quantiles need it.

    ``increase`` is the series' growth over the rate window with resets handled; it spans
    ``rate_seconds`` (first to last point in the window, ``rate_points`` of them).
    """

    plugin_id: int
    environment: str
    name: str
    kind: str
    labels: Mapping[str, str]
    last_value: float
    last_at: datetime
    rate_points: int
    increase: float
    rate_seconds: float


# One row per series: its newest value, and over the rate window ({rate_since} on) the increase
# with counter resets handled (a drop means the counter started again from 0) and its time
# span. The placeholders are filled from code below, never from input; values stay parameters.
_SERIES_SQL: Final = """
WITH points AS (
    SELECT m.plugin_id, m.environment, m.metric_name, m.metric_kind, m.labels,
           m."timestamp" AS at, m.value,
           lag(m.value) OVER series AS previous_value,
           lag(m."timestamp") OVER series AS previous_at
      FROM {source} m
      {join}
     WHERE {where}
    WINDOW series AS (PARTITION BY m.plugin_id, m.environment, m.metric_name, m.labels
                      ORDER BY m."timestamp")
)
SELECT plugin_id, environment, metric_name, labels::text AS labels,
       (array_agg(metric_kind ORDER BY at DESC))[1] AS kind,
       (array_agg(value ORDER BY at DESC))[1] AS last_value,
       max(at) AS last_at,
       count(*) FILTER (WHERE at >= {rate_since}) AS rate_points,
       COALESCE(sum(CASE WHEN value >= previous_value THEN value - previous_value
                         ELSE value END) FILTER (WHERE previous_at >= {rate_since}), 0) AS increase,
       COALESCE(extract(epoch FROM max(at) - min(at) FILTER (WHERE at >= {rate_since})), 0)
           AS rate_seconds
  FROM points
 GROUP BY plugin_id, environment, metric_name, labels
"""

# asyncpg: the named series of the given plugins since $3 in the environments $5, in one scan
# of the index (plugin_id, metric_name, "timestamp") with the plugin ids and the names as
# arrays (= ANY), the environments filtered; series_windows keeps the series of the
# (plugin, environment) pairs asked for (a series is grouped by its environment, so the
# pairs' cross product read beyond them is dropped whole). The forms before it: a plain join
# with the pairs read the whole day's plugin_metrics partition (36 ms a call at 50 agents of
# 1,000 plugins, docs/BENCHMARKS.md "Fleet"); a LATERAL subquery per pair ran one index scan
# per pair (20.8 ms a call at 100 agents; 19-26 ms on a PostgreSQL 15 scratch table where
# this form takes 9-14 ms); the pairs matched in SQL (IN over unnest) were planned on
# PostgreSQL 15 as an index scan per pair with the names only filtered (74 ms a call there).
SERIES_WINDOWS_SQL: Final = _SERIES_SQL.format(
    source="plugin_metrics",
    join="",
    where="m.plugin_id = ANY($1::bigint[]) AND m.metric_name = ANY($2::text[])"
    ' AND m."timestamp" >= $3 AND m.environment = ANY($5::text[])',
    rate_since="$4",
)

# psycopg (`pluginmon status`): every series of every plugin (of one tenant) but pluginmon's
# own health_score.
STATUS_SERIES_SQL: Final = _SERIES_SQL.format(
    source="plugin_metrics",
    join="JOIN plugins p ON p.id = m.plugin_id AND p.tenant_id = m.tenant_id",
    where="""m."timestamp" >= %(since)s AND m.metric_name <> 'health_score'
       AND (%(tenant)s::text IS NULL OR p.tenant_id = %(tenant)s::text)""",
    rate_since="%(rate_since)s",
)


# asyncpg, as the API role (registry.plugin_metrics): one plugin's series in one environment
# through the tenant-checked view (sql/003, granted in sql/050), so row-level security (or,
# on TimescaleDB, the view's tenant check) decides what is seen. $3: the metric_name values
# wanted, NULL for all but pluginmon's own health_score.
TENANT_SERIES_SQL: Final = _SERIES_SQL.format(
    source="pluginmon_tenant.plugin_metrics",
    join="",
    where="""m.plugin_id = $1 AND m.environment = $2 AND m."timestamp" >= $4
       AND ($3::text[] IS NULL AND m.metric_name <> 'health_score'
            OR m.metric_name = ANY($3::text[]))""",
    rate_since="$5",
)


def series_window(record: Any) -> SeriesWindow:
    """A SeriesWindow from a row of SERIES_WINDOWS_SQL (or a query with the same columns):
    an asyncpg Record or a dict."""
    labels = record["labels"]
    return SeriesWindow(
        plugin_id=int(record["plugin_id"]),
        environment=str(record["environment"]),
        name=str(record["metric_name"]),
        kind=str(record["kind"]),
        labels=json.loads(labels) if isinstance(labels, str) else dict(labels),
        last_value=float(record["last_value"]),
        last_at=record["last_at"],
        rate_points=int(record["rate_points"]),
        increase=float(record["increase"]),
        rate_seconds=float(record["rate_seconds"]),
    )


async def series_windows(
    conn: asyncpg.Connection,
    plugins: Sequence[tuple[int, str]],
    names: Sequence[str],
    *,
    since: datetime,
    rate_since: datetime,
    timeout_seconds: float = 10.0,
) -> list[SeriesWindow]:
    """Every series named ``names`` of the (plugin id, environment) pairs with a point since
    ``since``; increases over ``rate_since`` onwards."""
    if not plugins or not names:
        return []
    wanted = set(plugins)
    rows = await conn.fetch(
        SERIES_WINDOWS_SQL,
        sorted({plugin_id for plugin_id, _ in wanted}),
        list(names),
        since,
        rate_since,
        sorted({environment for _, environment in wanted}),
        timeout=timeout_seconds,
    )
    return [series_window(row) for row in rows if (row["plugin_id"], row["environment"]) in wanted]
