"""A plugin's own metrics through the management API: storing a push (rows and its audit entry in the caller's transaction) and reading a plugin's latest series with their kinds.

Like every registry module, the queries run on a connection already scoped to one tenant
(the API role, ``pluginmon.tenant_id`` set): the plugin is looked up under row-level
security (another tenant's plugin is "not found"), rows are written by
``pluginmon_api_push_metrics()`` (sql/050), which stamps them with the session's tenant and
refuses another tenant's plugin id, and reads go through the tenant-checked view
``pluginmon_tenant.plugin_metrics``. Parsing the body belongs to the caller (the daemon's
HTTP glue, with collectors.push under the scrape limits): this module gets points.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

import asyncpg

from pluginmon.alerts.metric_values import (
    DEFAULT_RATE_WINDOW_SECONDS,
    describe,
    is_cumulative,
    rate_per_second,
)
from pluginmon.collectors.models import MetricPoint
from pluginmon.registry import audit
from pluginmon.registry.actor import Actor
from pluginmon.registry.errors import InvalidError
from pluginmon.registry.plugins import ENVIRONMENT_RE, plugin_id
from pluginmon.storage.plugin_metrics import TENANT_SERIES_SQL, SeriesWindow, series_window

PUSH_ACTION: Final = "plugin_metrics.push"
# The most series one read returns (the scrape limit's own maximum is far higher; a reader
# narrows with ``metric``).
MAX_SERIES_READ: Final = 10_000
_FAMILY_SUFFIXES: Final = ("_bucket", "_sum", "_count")


async def check_plugin(conn: asyncpg.Connection, name: str) -> int:
    """The id of this tenant's plugin ``name`` (NotFoundError for an unknown one or another
    tenant's: row-level security hides it)."""
    return await plugin_id(conn, name)


@dataclass(frozen=True, slots=True)
class StoredPush:
    """A push written: how many series, for which plugin, kept alive until ``expires_at``."""

    plugin_id: int
    plugin_name: str
    environment: str
    series: int
    pushed_at: datetime
    expires_at: datetime


def check_environment(environment: str) -> str:
    if not ENVIRONMENT_RE.fullmatch(environment):
        raise InvalidError(
            "environment must be 1-63 letters, digits, '_', '.' or '-' (starting with a letter "
            "or digit)",
            field="environment",
        )
    return environment


async def store_push(
    conn: asyncpg.Connection,
    *,
    tenant_id: str,
    actor: Actor,
    now: datetime,
    plugin_name: str,
    environment: str,
    points: Sequence[MetricPoint],
    expires_at: datetime,
    content_type: str,
) -> StoredPush:
    """Write one push's points stamped ``now`` and its audit entry (action
    ``plugin_metrics.push``: the plugin, the environment, the series count, names and
    kinds, never a value) in the caller's transaction."""
    check_environment(environment)
    found = await plugin_id(conn, plugin_name)
    stored = await conn.fetchval(
        "SELECT pluginmon_api_push_metrics($1, $2, $3, $4::text[], $5::text[],"
        " $6::float8[], $7::jsonb[])",
        found,
        environment,
        now,
        [p.name for p in points],
        [p.kind.value for p in points],
        [p.value for p in points],
        [p.labels_json for p in points],
    )
    names = sorted({p.name for p in points})
    await audit.append(
        conn,
        tenant_id=tenant_id,
        actor=actor,
        action=PUSH_ACTION,
        entity_type="plugin",
        entity_id=plugin_name,
        plugin_id=found,
        plugin_name=plugin_name,
        environment=environment,
        occurred_at=now,
        details={
            "series": int(stored),
            "metric_names": names[:50],
            "metric_names_omitted": max(0, len(names) - 50),
            "kinds": sorted({p.kind.value for p in points}),
            "content_type": content_type.split(";", 1)[0].strip().lower()[:100],
            "expires_at": expires_at.isoformat(),
        },
    )
    return StoredPush(
        plugin_id=found,
        plugin_name=plugin_name,
        environment=environment,
        series=int(stored),
        pushed_at=now,
        expires_at=expires_at,
    )


@dataclass(frozen=True, slots=True)
class SeriesView:
    """One series as the API shows it: its newest value, and its rate when it is cumulative
    (counters, histogram and summary _bucket/_sum/_count), None until it has two points."""

    window: SeriesWindow
    rate_per_second: float | None


@dataclass(frozen=True, slots=True)
class PluginMetricsView:
    plugin_name: str
    environment: str
    series: tuple[SeriesView, ...]
    # As `pluginmon status --metrics` shows them: gauges by name, counters as ``name/s``,
    # histograms and summaries as ``name:p50``, ``:p95``, ``:p99``.
    derived: dict[str, float | None]


def family_names(metric: str) -> list[str]:
    """The stored series names a ``metric`` filter reads: the name itself and, for a
    histogram or summary family, its _bucket/_sum/_count series."""
    return [metric, *(metric + suffix for suffix in _FAMILY_SUFFIXES)]


async def latest_metrics(
    conn: asyncpg.Connection,
    plugin_name: str,
    *,
    environment: str,
    now: datetime,
    since: datetime,
    metric: str | None = None,
    rate_window_seconds: float = DEFAULT_RATE_WINDOW_SECONDS,
    timeout_seconds: float = 10.0,
) -> PluginMetricsView:
    """The plugin's series with a point since ``since`` (its own metrics, not pluginmon's
    health_score unless ``metric`` names it), newest value each, sorted by name and labels."""
    check_environment(environment)
    if since > now:
        raise InvalidError("since must not be in the future", field="since")
    found = await plugin_id(conn, plugin_name)
    rate_since = max(since, now - timedelta(seconds=rate_window_seconds))
    rows = await conn.fetch(
        TENANT_SERIES_SQL,
        found,
        environment,
        None if metric is None else family_names(metric),
        since,
        rate_since,
        timeout=timeout_seconds,
    )
    windows = sorted(
        (series_window(row) for row in rows),
        key=lambda s: (s.name, json.dumps(dict(s.labels), sort_keys=True)),
    )[:MAX_SERIES_READ]
    views = tuple(
        SeriesView(
            window=s,
            rate_per_second=rate_per_second([s]) if is_cumulative(s.kind, s.name) else None,
        )
        for s in windows
    )
    return PluginMetricsView(
        plugin_name=plugin_name,
        environment=environment,
        series=views,
        derived=describe(windows) if windows else {},
    )
