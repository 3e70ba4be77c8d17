"""Generates pluginmon's Grafana dashboards (PostgreSQL and Prometheus variants) as JSON.

The JSON files next to this script are its output and are what Grafana provisions; edit this
script, run ``python dashboards/generate.py``, and commit both. ``--check`` exits 1 when a
committed file differs from what the script produces (the tests run it).
"""

# This module writes SQL for Grafana to run, from constants only; Grafana interpolates the
# dashboard variables with its `sqlstring` format (quoted, quotes doubled).
# ruff: noqa: S608

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

# Data source uids, fixed so that provisioned dashboards find the provisioned data sources
# (dashboards/provisioning/datasources/pluginmon.yml). Uids are per Grafana organisation, so
# one organisation per tenant can each have its own "pluginmon-postgres" with its own role.
POSTGRES = {"type": "grafana-postgresql-datasource", "uid": "pluginmon-postgres"}
PROMETHEUS = {"type": "prometheus", "uid": "pluginmon-prometheus"}

FLEET_PG_UID = "pluginmon-fleet-pg"
PLUGIN_PG_UID = "pluginmon-plugin-pg"
FLEET_PROM_UID = "pluginmon-fleet-prom"
PLUGIN_PROM_UID = "pluginmon-plugin-prom"

# -- SQL building blocks -------------------------------------------------------------------------
#
# Variables are interpolated with Grafana's `sqlstring` format: every value quoted, quotes
# doubled, so a tenant or environment name can never break out of its literal. Tenant and
# plugin are single-valued; environment is multi-valued (All = every environment).

TENANT = "${tenant:sqlstring}"
ENVIRONMENT = "${environment:sqlstring}"
PLUGIN = "${plugin:sqlstring}"
# How many plugins the fleet's per-plugin panels show (custom variable `top`); a quoted
# literal, which LIMIT accepts, so an edited URL cannot inject SQL.
TOP = "${top:sqlstring}"

# Ranges up to this long read the 1-minute rollup, longer ones the 1-hour rollup (which is
# also what remains once 1-minute buckets pass their retention, 30 days by default).
ROLLUP_SWITCH = "interval '3 days'"

ROLLUP_COLUMNS = (
    "bucket, tenant_id, plugin_id, environment, sample_count, cpu_percent_avg, cpu_percent_max, "
    "rss_bytes_avg, rss_bytes_max, vms_bytes_max, threads_max, process_count_max, up_ratio, "
    "restarts_sum, cpu_percent_p95, rss_bytes_p95"
)

# Prometheus keeps the scraped gauge, not the samples behind it: its p95 is over the scraped
# values in each window.
PROM_P95_NOTE = (
    "95th percentile of the values Prometheus scraped in each window ($__rate_interval); the "
    "PostgreSQL dashboards show it over every sample, from the rollups."
)

# A p95 cannot be combined from the p95s of smaller buckets: where Grafana's interval spans
# several rollup buckets the p95 panels show the highest bucket p95 in it (an upper bound of
# the interval's own p95, exact when the interval is one bucket).
P95_NOTE = (
    "95th percentile of the raw samples in each rollup bucket (1 minute up to 3 days, else 1 "
    "hour); where a point spans several buckets, the highest of their p95s."
)


def rollup_cte(where: str) -> str:
    """A CTE `rollup` over plugin_samples_1m or _1h, whichever suits the dashboard's range.

    Both branches carry the same constant range test with opposite signs, so PostgreSQL
    prunes one of them at plan time (a one-time filter) and reads a single rollup.
    """
    span = "$__timeTo()::timestamptz - $__timeFrom()::timestamptz"
    return (
        "WITH rollup AS (\n"
        f"  SELECT {ROLLUP_COLUMNS}\n"
        "  FROM plugin_samples_1m\n"
        f"  WHERE {span} <= {ROLLUP_SWITCH}\n"
        f"    AND $__timeFilter(bucket) AND {where}\n"
        "  UNION ALL\n"
        f"  SELECT {ROLLUP_COLUMNS}\n"
        "  FROM plugin_samples_1h\n"
        f"  WHERE {span} > {ROLLUP_SWITCH}\n"
        f"    AND $__timeFilter(bucket) AND {where}\n"
        ")\n"
    )


def weighted(column: str) -> str:
    """Average of per-bucket averages, weighted by each bucket's sample count."""
    return f"sum(r.{column} * r.sample_count) / nullif(sum(r.sample_count), 0)"


FLEET_WHERE = f"tenant_id = {TENANT} AND environment IN ({ENVIRONMENT})"
PLUGIN_WHERE = f"tenant_id = {TENANT} AND plugin_id = {PLUGIN}"

# The health engine writes one plugin_metrics row per evaluation: metric_name 'health_score',
# the score as value, and in labels the components ({"components": {"up": 100, "cpu": 80, ...},
# "weakest": "cpu", "weakest_score": 80, "weakest_detail": "..."}), see alerts/scoring.py health_labels_json().
HEALTH_METRIC = "health_score"
# The components object, or NULL (no rows from jsonb_each_text) when a row has none.
COMPONENTS = (
    "CASE WHEN jsonb_typeof({labels}->'components') = 'object' THEN {labels}->'components' END"
)

# The latest raw sample per plugin in the five minutes before the end of the range: "now"
# panels read raw samples because the PostgreSQL backend refreshes rollups only on its
# maintenance run, so the newest rollup bucket can be minutes old.
LATEST_WINDOW = "interval '5 minutes'"


def latest_samples(where: str) -> str:
    return (
        'SELECT DISTINCT ON (plugin_id) plugin_id, "timestamp", up, cpu_percent, rss_bytes\n'
        "  FROM plugin_samples\n"
        f"  WHERE {where}\n"
        f'    AND "timestamp" > $__timeTo()::timestamptz - {LATEST_WINDOW}\n'
        '    AND "timestamp" <= $__timeTo()::timestamptz\n'
        '  ORDER BY plugin_id, "timestamp" DESC'
    )


# -- Panel model ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Query:
    """One panel target: SQL (with format) for PostgreSQL, PromQL for Prometheus."""

    text: str
    format: str = "time_series"  # time_series | table
    legend: str = ""
    instant: bool = False


@dataclass(frozen=True, slots=True)
class Panel:
    title: str
    kind: str  # timeseries | stat | table | bargauge | row
    width: int
    height: int
    queries: tuple[Query, ...] = ()
    unit: str | None = None
    description: str = ""
    min_value: float | None = None
    max_value: float | None = None
    thresholds: tuple[tuple[float | None, str], ...] = ()
    options: dict[str, Any] = field(default_factory=dict)
    overrides: tuple[dict[str, Any], ...] = ()
    links: tuple[dict[str, Any], ...] = ()
    custom: dict[str, Any] = field(default_factory=dict)
    mappings: tuple[dict[str, Any], ...] = ()


def _thresholds(steps: Sequence[tuple[float | None, str]]) -> dict[str, Any]:
    return {
        "mode": "absolute",
        "steps": [{"color": color, "value": value} for value, color in steps],
    }


HEALTH_STEPS: tuple[tuple[float | None, str], ...] = ((None, "red"), (50, "orange"), (80, "green"))
UP_MAPPING = {
    "type": "value",
    "options": {
        "0": {"text": "down", "color": "red", "index": 0},
        "1": {"text": "up", "color": "green", "index": 1},
    },
}
UP_STEPS: tuple[tuple[float | None, str], ...] = ((None, "red"), (1, "green"))
ALERT_STEPS: tuple[tuple[float | None, str], ...] = ((None, "green"), (1, "red"))


def _target(datasource: dict[str, str], query: Query, ref_id: str) -> dict[str, Any]:
    target: dict[str, Any] = {"refId": ref_id, "datasource": datasource}
    if datasource["type"] == POSTGRES["type"]:
        target.update(
            {"editorMode": "code", "format": query.format, "rawQuery": True, "rawSql": query.text}
        )
    else:
        target.update(
            {
                "editorMode": "code",
                "expr": query.text,
                "legendFormat": query.legend or "__auto",
                "range": not query.instant,
                "instant": query.instant,
            }
        )
        if query.format == "table":
            target["format"] = "table"
    return target


def _layout(panels: Sequence[Panel]) -> Iterator[tuple[Panel, dict[str, int]]]:
    """Left-to-right, top-to-bottom placement on Grafana's 24-column grid."""
    x = y = row_height = 0
    for panel in panels:
        if panel.kind == "row" or x + panel.width > 24:
            y += row_height
            x = row_height = 0
        yield panel, {"h": panel.height, "w": panel.width, "x": x, "y": y}
        if panel.kind == "row":
            y += panel.height
            continue
        x += panel.width
        row_height = max(row_height, panel.height)


def _panel_json(
    panel: Panel, datasource: dict[str, str], panel_id: int, grid: dict[str, int]
) -> dict[str, Any]:
    if panel.kind == "row":
        return {
            "id": panel_id,
            "type": "row",
            "title": panel.title,
            "collapsed": False,
            "gridPos": grid,
            "panels": [],
        }
    defaults: dict[str, Any] = {}
    if panel.unit:
        defaults["unit"] = panel.unit
    if panel.min_value is not None:
        defaults["min"] = panel.min_value
    if panel.max_value is not None:
        defaults["max"] = panel.max_value
    if panel.thresholds:
        defaults["thresholds"] = _thresholds(panel.thresholds)
        defaults["color"] = {"mode": "thresholds"}
    if panel.links:
        defaults["links"] = list(panel.links)
    if panel.custom:
        defaults["custom"] = panel.custom
    if panel.mappings:
        defaults["mappings"] = list(panel.mappings)
    options = dict(panel.options)
    if panel.kind == "stat":
        options.setdefault(
            "reduceOptions", {"calcs": ["lastNotNull"], "fields": "", "values": False}
        )
        options.setdefault("colorMode", "value")
        options.setdefault("graphMode", "none")
    if panel.kind == "timeseries":
        options.setdefault(
            "legend", {"displayMode": "table", "placement": "right", "calcs": ["mean", "max"]}
        )
        options.setdefault("tooltip", {"mode": "multi", "sort": "desc"})
    result: dict[str, Any] = {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "datasource": datasource,
        "gridPos": grid,
        "fieldConfig": {"defaults": defaults, "overrides": list(panel.overrides)},
        "options": options,
        "targets": [
            _target(datasource, query, chr(ord("A") + index))
            for index, query in enumerate(panel.queries)
        ],
    }
    if panel.description:
        result["description"] = panel.description
    if panel.kind == "timeseries" and datasource["type"] == POSTGRES["type"]:
        # The finest rollup is one minute: a smaller $__interval only adds empty work.
        result["interval"] = "1m"
    return result


def _variable(
    datasource: dict[str, str],
    name: str,
    label: str,
    query: str,
    *,
    multi: bool = False,
    all_value: str | None = None,
) -> dict[str, Any]:
    variable: dict[str, Any] = {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": datasource,
        "query": query,
        "definition": query,
        "refresh": 1,  # on dashboard load
        "sort": 1,
        "multi": multi,
        "includeAll": multi,
        "current": {},
        "options": [],
        "hide": 0,
    }
    if multi and all_value is not None:
        variable["allValue"] = all_value
    return variable


def _top_variable() -> dict[str, Any]:
    choices = ("5", "10", "20", "50")
    return {
        "name": "top",
        "label": "Top",
        "type": "custom",
        "description": "How many plugins the per-plugin panels show",
        "query": ",".join(choices),
        "current": {"selected": True, "text": "10", "value": "10"},
        "options": [
            {"selected": choice == "10", "text": choice, "value": choice} for choice in choices
        ],
        "multi": False,
        "includeAll": False,
        "hide": 0,
    }


def dashboard(
    *,
    uid: str,
    title: str,
    description: str,
    datasource: dict[str, str],
    variables: Sequence[dict[str, Any]],
    panels: Sequence[Panel],
    annotations: Sequence[dict[str, Any]] = (),
    links: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    panel_json = [
        _panel_json(panel, datasource, index, grid)
        for index, (panel, grid) in enumerate(_layout(panels), start=1)
    ]
    builtin = {
        "builtIn": 1,
        "datasource": {"type": "grafana", "uid": "-- Grafana --"},
        "enable": True,
        "hide": True,
        "iconColor": "rgba(0, 211, 255, 1)",
        "name": "Annotations & Alerts",
        "type": "dashboard",
    }
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": [
            "pluginmon",
            "postgresql" if datasource["type"] == POSTGRES["type"] else "prometheus",
        ],
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "timezone": "browser",
        "time": {"from": "now-6h", "to": "now"},
        "refresh": "1m",
        "links": list(links),
        "annotations": {"list": [builtin, *annotations]},
        "templating": {"list": list(variables)},
        "panels": panel_json,
    }


# -- PostgreSQL dashboards -----------------------------------------------------------------------

PG_TENANT_VARIABLE = _variable(
    POSTGRES,
    "tenant",
    "Tenant",
    # Under the per-tenant reader role, row-level security leaves exactly one tenant here.
    "SELECT id FROM tenants ORDER BY id",
)
PG_ENVIRONMENT_VARIABLE = _variable(
    POSTGRES,
    "environment",
    "Environment",
    f"SELECT DISTINCT environment FROM plugins WHERE tenant_id = {TENANT} ORDER BY 1",
    multi=True,
)
PG_PLUGIN_VARIABLE = _variable(
    POSTGRES,
    "plugin",
    "Plugin",
    "SELECT name AS __text, id AS __value FROM plugins\n"
    f"WHERE tenant_id = {TENANT} AND environment IN ({ENVIRONMENT})\n"
    "ORDER BY name",
)

DETAIL_LINK = {
    "title": "Plugin detail",
    "url": f"/d/{PLUGIN_PG_UID}/pluginmon-plugin?var-tenant=${{tenant}}&var-environment=${{__data.fields.environment}}"
    "&var-plugin=${__data.fields.plugin_id}&${__url_time_range}",
}


def fleet_postgres() -> dict[str, Any]:
    plugins_where = f"p.tenant_id = {TENANT} AND p.environment IN ({ENVIRONMENT})"

    def per_plugin(value: str, rank: str) -> str:
        """One series (named by the `metric` column) for each of the $top plugins by ``rank``."""
        return (
            rollup_cte(FLEET_WHERE) + ", top AS (\n"
            "  SELECT r.plugin_id FROM rollup r GROUP BY r.plugin_id\n"
            f"  ORDER BY {rank}, r.plugin_id LIMIT {TOP}\n"
            ")\n"
            "SELECT $__timeGroupAlias(r.bucket, $__interval), p.name AS metric,\n"
            f"  {value}\n"
            "FROM rollup r JOIN top t ON t.plugin_id = r.plugin_id\n"
            f"JOIN plugins p ON p.id = r.plugin_id AND p.tenant_id = {TENANT}\n"
            "GROUP BY 1, 2\n"
            "ORDER BY 1, 2"
        )

    panels = [
        Panel(
            "Plugins",
            "stat",
            4,
            4,
            (Query(f"SELECT count(*) AS plugins FROM plugins p WHERE {plugins_where}", "table"),),
        ),
        Panel(
            "Up now",
            "stat",
            4,
            4,
            (
                Query(
                    f"SELECT count(*) FILTER (WHERE up) AS up, count(*) FILTER (WHERE NOT up) AS down\n"
                    f"FROM ({latest_samples(FLEET_WHERE)}) latest",
                    "table",
                ),
            ),
            description="Plugins by their latest sample in the 5 minutes before the end of the range.",
            overrides=(
                {
                    "matcher": {"id": "byName", "options": "down"},
                    "properties": [{"id": "thresholds", "value": _thresholds(ALERT_STEPS)}],
                },
            ),
            thresholds=((None, "green"),),
        ),
        Panel(
            "Average health",
            "stat",
            4,
            4,
            (
                Query(
                    f"SELECT avg(health_score) AS health_score FROM plugins p WHERE {plugins_where}",
                    "table",
                ),
            ),
            min_value=0,
            max_value=100,
            thresholds=HEALTH_STEPS,
        ),
        Panel(
            "Lowest health",
            "stat",
            4,
            4,
            (
                Query(
                    f"SELECT min(health_score) AS health_score FROM plugins p WHERE {plugins_where}",
                    "table",
                ),
            ),
            min_value=0,
            max_value=100,
            thresholds=HEALTH_STEPS,
        ),
        Panel(
            "Firing alerts",
            "stat",
            4,
            4,
            (
                Query(
                    "SELECT count(*) AS firing FROM plugin_alerts\n"
                    f"WHERE {FLEET_WHERE} AND status = 'firing' AND NOT inhibited",
                    "table",
                ),
            ),
            thresholds=ALERT_STEPS,
        ),
        Panel(
            "Restarts",
            "stat",
            4,
            4,
            (
                Query(
                    rollup_cte(FLEET_WHERE)
                    + "SELECT coalesce(sum(r.restarts_sum), 0) AS restarts FROM rollup r",
                    "table",
                ),
            ),
            description="Process restarts across the tenant's plugins in the selected range.",
            thresholds=((None, "green"), (1, "orange")),
        ),
        Panel(
            "Plugin overview",
            "table",
            24,
            9,
            (
                Query(
                    rollup_cte(FLEET_WHERE) + ", usage AS (\n"
                    "  SELECT r.plugin_id,\n"
                    f"    {weighted('cpu_percent_avg')} AS cpu_percent_avg,\n"
                    "    max(r.cpu_percent_max) AS cpu_percent_max,\n"
                    "    max(r.rss_bytes_max) AS rss_bytes_max,\n"
                    f"    {weighted('up_ratio')} AS up_ratio,\n"
                    "    sum(r.restarts_sum) AS restarts\n"
                    "  FROM rollup r GROUP BY r.plugin_id\n"
                    "), firing AS (\n"
                    "  SELECT plugin_id, count(*) AS firing_alerts FROM plugin_alerts\n"
                    f"  WHERE {FLEET_WHERE} AND status = 'firing' AND NOT inhibited\n"
                    "  GROUP BY plugin_id\n"
                    ")\n"
                    "SELECT p.id AS plugin_id, p.name AS plugin, p.environment, p.status, p.health_score,\n"
                    "  u.cpu_percent_avg, u.cpu_percent_max, u.rss_bytes_max, u.up_ratio,\n"
                    "  coalesce(u.restarts, 0) AS restarts, coalesce(f.firing_alerts, 0) AS firing_alerts,\n"
                    "  p.last_health_check\n"
                    "FROM plugins p\n"
                    "LEFT JOIN usage u ON u.plugin_id = p.id\n"
                    "LEFT JOIN firing f ON f.plugin_id = p.id\n"
                    f"WHERE {plugins_where}\n"
                    "ORDER BY p.health_score ASC NULLS FIRST, p.name",
                    "table",
                ),
            ),
            description="Every plugin of the tenant over the selected range, least healthy first. "
            "Click a name for its detail dashboard.",
            overrides=(
                {
                    "matcher": {"id": "byName", "options": "plugin"},
                    "properties": [{"id": "links", "value": [DETAIL_LINK]}],
                },
                {
                    "matcher": {"id": "byName", "options": "plugin_id"},
                    "properties": [{"id": "custom.hidden", "value": True}],
                },
                {
                    "matcher": {"id": "byName", "options": "health_score"},
                    "properties": [
                        {"id": "thresholds", "value": _thresholds(HEALTH_STEPS)},
                        {"id": "custom.cellOptions", "value": {"type": "color-background"}},
                        {"id": "decimals", "value": 0},
                    ],
                },
                {
                    "matcher": {"id": "byRegexp", "options": "cpu_percent_.*"},
                    "properties": [
                        {"id": "unit", "value": "percent"},
                        {"id": "decimals", "value": 1},
                    ],
                },
                {
                    "matcher": {"id": "byName", "options": "rss_bytes_max"},
                    "properties": [{"id": "unit", "value": "bytes"}],
                },
                {
                    "matcher": {"id": "byName", "options": "up_ratio"},
                    "properties": [{"id": "unit", "value": "percentunit"}],
                },
            ),
        ),
        Panel(
            "CPU by plugin",
            "timeseries",
            12,
            8,
            (
                Query(
                    per_plugin(
                        f"{weighted('cpu_percent_avg')} AS cpu_percent",
                        f"{weighted('cpu_percent_avg')} DESC NULLS LAST",
                    )
                ),
            ),
            unit="percent",
            description="Average CPU (100% = one core) of the $top busiest plugins in the range.",
            min_value=0,
        ),
        Panel(
            "Resident memory by plugin",
            "timeseries",
            12,
            8,
            (
                Query(
                    per_plugin(
                        f"{weighted('rss_bytes_avg')} AS rss_bytes",
                        "max(r.rss_bytes_max) DESC NULLS LAST",
                    )
                ),
            ),
            unit="bytes",
            description="Average resident memory of the $top largest plugins in the range.",
            min_value=0,
        ),
        Panel(
            "CPU p95 by plugin",
            "timeseries",
            12,
            8,
            (
                Query(
                    per_plugin(
                        "max(r.cpu_percent_p95) AS cpu_percent_p95",
                        "max(r.cpu_percent_p95) DESC NULLS LAST",
                    )
                ),
            ),
            unit="percent",
            description="CPU (100% = one core) of the $top plugins with the highest p95 in the "
            "range. " + P95_NOTE,
            min_value=0,
        ),
        Panel(
            "Resident memory p95 by plugin",
            "timeseries",
            12,
            8,
            (
                Query(
                    per_plugin(
                        "max(r.rss_bytes_p95) AS rss_bytes_p95",
                        "max(r.rss_bytes_p95) DESC NULLS LAST",
                    )
                ),
            ),
            unit="bytes",
            description="Resident memory of the $top plugins with the highest p95 in the "
            "range. " + P95_NOTE,
            min_value=0,
        ),
        Panel(
            "Availability by plugin",
            "timeseries",
            12,
            8,
            (
                Query(
                    per_plugin(
                        f"{weighted('up_ratio')} AS up_ratio",
                        f"{weighted('up_ratio')} ASC NULLS FIRST",
                    )
                ),
            ),
            unit="percentunit",
            description="Share of samples with a running process, for the $top least available "
            "plugins in the range.",
            min_value=0,
            max_value=1,
        ),
        Panel(
            "Health score by plugin",
            "timeseries",
            12,
            8,
            (
                Query(
                    "WITH top AS (\n"
                    "  SELECT p.id, p.name FROM plugins p\n"
                    f"  WHERE {plugins_where} AND p.health_score IS NOT NULL\n"
                    f"  ORDER BY p.health_score, p.name LIMIT {TOP}\n"
                    ")\n"
                    'SELECT $__timeGroupAlias(m."timestamp", $__interval), t.name AS metric,\n'
                    "  avg(m.value) AS health_score\n"
                    "FROM top t JOIN plugin_metrics m ON m.plugin_id = t.id\n"
                    f"WHERE m.tenant_id = {TENANT} AND m.metric_name = '{HEALTH_METRIC}'\n"
                    '  AND $__timeFilter(m."timestamp")\n'
                    "GROUP BY 1, 2\n"
                    "ORDER BY 1, 2"
                ),
            ),
            description="Health score history of the $top least healthy plugins now. Health is "
            "not rolled up: limiting the plugins keeps this to an index scan per plugin.",
            min_value=0,
            max_value=100,
        ),
        Panel(
            "Top CPU",
            "bargauge",
            12,
            8,
            (
                Query(
                    rollup_cte(FLEET_WHERE)
                    + f"SELECT p.name AS plugin, {weighted('cpu_percent_avg')} AS cpu_percent\n"
                    f"FROM rollup r JOIN plugins p ON p.id = r.plugin_id AND p.tenant_id = {TENANT}\n"
                    "GROUP BY p.name\n"
                    "ORDER BY cpu_percent DESC NULLS LAST, plugin\n"
                    f"LIMIT {TOP}",
                    "table",
                ),
            ),
            unit="percent",
            options={
                "orientation": "horizontal",
                "displayMode": "gradient",
                "reduceOptions": {"calcs": [], "fields": "", "values": True},
            },
        ),
        Panel(
            "Open alerts",
            "table",
            12,
            8,
            (
                Query(
                    "SELECT a.fired_at, a.started_at, p.name AS plugin, a.environment, a.rule_name,\n"
                    "  a.severity, a.status, a.value, a.annotations->>'summary' AS summary\n"
                    "FROM plugin_alerts a JOIN plugins p ON p.id = a.plugin_id AND p.tenant_id = a.tenant_id\n"
                    f"WHERE a.tenant_id = {TENANT} AND a.environment IN ({ENVIRONMENT})\n"
                    "  AND a.status IN ('pending', 'firing', 'acknowledged') AND NOT a.inhibited\n"
                    "ORDER BY CASE a.severity WHEN 'critical' THEN 0 WHEN 'warning' THEN 1 ELSE 2 END,\n"
                    "  a.started_at DESC",
                    "table",
                ),
            ),
            overrides=(
                {
                    "matcher": {"id": "byName", "options": "plugin"},
                    "properties": [{"id": "links", "value": [DETAIL_LINK]}],
                },
            ),
        ),
    ]
    return dashboard(
        uid=FLEET_PG_UID,
        title="pluginmon / Fleet (PostgreSQL)",
        description="All plugins of one tenant: availability, CPU, memory, health and alerts, "
        "from pluginmon's rollup tables.",
        datasource=POSTGRES,
        variables=[PG_TENANT_VARIABLE, PG_ENVIRONMENT_VARIABLE, _top_variable()],
        panels=panels,
        links=[_dashboard_link("Plugin detail", PLUGIN_PG_UID)],
    )


def _dashboard_link(title: str, uid: str) -> dict[str, Any]:
    return {
        "title": title,
        "type": "link",
        "url": f"/d/{uid}",
        "includeVars": True,
        "keepTime": True,
        "icon": "dashboard",
        "targetBlank": False,
        "asDropdown": False,
        "tags": [],
    }


def own_metrics_sql() -> str:
    """A plugin's own plugin_metrics series (not pluginmon's health_score): gauges as values,
    cumulative series as per-second rates between points, a drop counted from 0 (a restart)."""
    where = (
        f"m.{PLUGIN_WHERE.replace(' AND ', ' AND m.')}\n"
        f"    AND m.metric_name <> '{HEALTH_METRIC}' AND $__timeFilter(m.\"timestamp\")"
    )
    series_name = (
        "m.metric_name || CASE WHEN m.labels = '{}'::jsonb THEN '' ELSE ' ' || m.labels::text END"
    )
    return (
        "SELECT $__timeGroupAlias(p.at, $__interval), p.metric, avg(p.value) AS value\n"
        "FROM (\n"
        f'  SELECT m."timestamp" AS at, {series_name} AS metric, m.value\n'
        "  FROM plugin_metrics m\n"
        f"  WHERE {where}\n"
        "    AND m.metric_kind = 'gauge'\n"
        "  UNION ALL\n"
        "  SELECT r.at, r.metric || ' /s', r.rate FROM (\n"
        f'    SELECT m."timestamp" AS at, {series_name} AS metric,\n'
        "      (CASE WHEN m.value >= lag(m.value) OVER w THEN m.value - lag(m.value) OVER w\n"
        "            ELSE m.value END)\n"
        '        / nullif(extract(epoch FROM m."timestamp" - lag(m."timestamp") OVER w), 0) AS rate\n'
        "    FROM plugin_metrics m\n"
        f"    WHERE {where}\n"
        "      AND (m.metric_kind = 'counter' OR (m.metric_kind IN ('histogram', 'summary')\n"
        "           AND m.metric_name LIKE '%\\_count'))\n"
        '    WINDOW w AS (PARTITION BY m.environment, m.metric_name, m.labels ORDER BY m."timestamp")\n'
        "  ) r\n"
        "  WHERE r.rate IS NOT NULL\n"
        ") p\n"
        "GROUP BY 1, 2\n"
        "ORDER BY 1, 2"
    )


def plugin_postgres() -> dict[str, Any]:

    def series(values: str) -> str:
        """The plugin's rollup grouped by Grafana's interval, one column per series."""
        return (
            rollup_cte(PLUGIN_WHERE) + "SELECT $__timeGroupAlias(r.bucket, $__interval),\n"
            f"  {values}\n"
            "FROM rollup r\n"
            "GROUP BY 1\n"
            "ORDER BY 1"
        )

    latest = latest_samples(PLUGIN_WHERE)
    panels = [
        Panel(
            "Health score",
            "stat",
            4,
            4,
            (
                Query(
                    f"SELECT health_score, last_health_check FROM plugins WHERE tenant_id = {TENANT} AND id = {PLUGIN}",
                    "table",
                ),
            ),
            min_value=0,
            max_value=100,
            thresholds=HEALTH_STEPS,
            options={
                "reduceOptions": {
                    "calcs": ["lastNotNull"],
                    "fields": "/^health_score$/",
                    "values": False,
                }
            },
        ),
        Panel(
            "Up",
            "stat",
            4,
            4,
            (Query(f"SELECT up::int AS up FROM ({latest}) latest", "table"),),
            thresholds=UP_STEPS,
            mappings=(UP_MAPPING,),
            options={"colorMode": "background"},
            description="Whether the latest sample (at most 5 minutes old) found a running process.",
        ),
        Panel(
            "CPU now",
            "stat",
            4,
            4,
            (Query(f"SELECT cpu_percent FROM ({latest}) latest", "table"),),
            unit="percent",
        ),
        Panel(
            "Resident memory now",
            "stat",
            4,
            4,
            (Query(f"SELECT rss_bytes FROM ({latest}) latest", "table"),),
            unit="bytes",
        ),
        Panel(
            "Restarts",
            "stat",
            4,
            4,
            (
                Query(
                    rollup_cte(PLUGIN_WHERE)
                    + "SELECT coalesce(sum(r.restarts_sum), 0) AS restarts FROM rollup r",
                    "table",
                ),
            ),
            thresholds=((None, "green"), (1, "orange")),
            description="Process restarts in the selected range.",
        ),
        Panel(
            "Firing alerts",
            "stat",
            4,
            4,
            (
                Query(
                    "SELECT count(*) AS firing FROM plugin_alerts\n"
                    f"WHERE {PLUGIN_WHERE} AND status = 'firing' AND NOT inhibited",
                    "table",
                ),
            ),
            thresholds=ALERT_STEPS,
        ),
        Panel(
            "CPU",
            "timeseries",
            12,
            8,
            (
                Query(
                    series(
                        values=f"{weighted('cpu_percent_avg')} AS cpu_percent_avg,\n"
                        "  max(r.cpu_percent_max) AS cpu_percent_max"
                    )
                ),
            ),
            unit="percent",
            min_value=0,
            description="100% = one core.",
        ),
        Panel(
            "Memory",
            "timeseries",
            12,
            8,
            (
                Query(
                    series(
                        values=f"{weighted('rss_bytes_avg')} AS rss_bytes_avg,\n"
                        "  max(r.rss_bytes_max) AS rss_bytes_max,\n"
                        "  max(r.vms_bytes_max) AS vms_bytes_max"
                    )
                ),
            ),
            unit="bytes",
            min_value=0,
        ),
        Panel(
            "CPU p95",
            "timeseries",
            12,
            8,
            (Query(series(values="max(r.cpu_percent_p95) AS cpu_percent_p95")),),
            unit="percent",
            min_value=0,
            description="100% = one core. " + P95_NOTE,
        ),
        Panel(
            "Resident memory p95",
            "timeseries",
            12,
            8,
            (Query(series(values="max(r.rss_bytes_p95) AS rss_bytes_p95")),),
            unit="bytes",
            min_value=0,
            description=P95_NOTE,
        ),
        Panel(
            "Health score and components",
            "timeseries",
            12,
            8,
            (
                Query(
                    "SELECT $__timeGroupAlias(m.\"timestamp\", $__interval), 'score' AS metric,\n"
                    "  avg(m.value) AS value\n"
                    "FROM plugin_metrics m\n"
                    f"WHERE m.{PLUGIN_WHERE.replace(' AND ', ' AND m.')}\n"
                    f"  AND m.metric_name = '{HEALTH_METRIC}' AND $__timeFilter(m.\"timestamp\")\n"
                    "GROUP BY 1, 2\n"
                    "UNION ALL\n"
                    'SELECT $__timeGroupAlias(m."timestamp", $__interval), c.key AS metric,\n'
                    "  avg(c.value::double precision) AS value\n"
                    "FROM plugin_metrics m\n"
                    f"CROSS JOIN LATERAL jsonb_each_text({COMPONENTS.format(labels='m.labels')}) c\n"
                    f"WHERE m.{PLUGIN_WHERE.replace(' AND ', ' AND m.')}\n"
                    f"  AND m.metric_name = '{HEALTH_METRIC}' AND $__timeFilter(m.\"timestamp\")\n"
                    "GROUP BY 1, 2\n"
                    "ORDER BY 1, 2"
                ),
            ),
            min_value=0,
            max_value=100,
            overrides=(
                {
                    "matcher": {"id": "byName", "options": "score"},
                    "properties": [{"id": "custom.lineWidth", "value": 3}],
                },
            ),
        ),
        Panel(
            "Health components now",
            "bargauge",
            8,
            8,
            (
                Query(
                    "SELECT c.key AS component, c.value::double precision AS score\n"
                    "FROM (\n"
                    "  SELECT labels FROM plugin_metrics\n"
                    f"  WHERE {PLUGIN_WHERE} AND metric_name = '{HEALTH_METRIC}'\n"
                    '    AND $__timeFilter("timestamp")\n'
                    '  ORDER BY "timestamp" DESC LIMIT 1\n'
                    ") latest\n"
                    f"CROSS JOIN LATERAL jsonb_each_text({COMPONENTS.format(labels='latest.labels')}) c\n"
                    "ORDER BY score, component",
                    "table",
                ),
            ),
            min_value=0,
            max_value=100,
            thresholds=HEALTH_STEPS,
            description="Each component of the latest health evaluation in the range, lowest "
            "(the one pulling the score down) first.",
            options={
                "orientation": "horizontal",
                "displayMode": "basic",
                "reduceOptions": {"calcs": [], "fields": "", "values": True},
            },
        ),
        Panel(
            "Weakest component",
            "stat",
            4,
            8,
            (
                Query(
                    "SELECT labels->>'weakest' AS weakest,\n"
                    "  (labels->>'weakest_score')::double precision AS weakest_score,\n"
                    "  labels->>'weakest_detail' AS detail\n"
                    "FROM plugin_metrics\n"
                    f"WHERE {PLUGIN_WHERE} AND metric_name = '{HEALTH_METRIC}'\n"
                    '  AND $__timeFilter("timestamp")\n'
                    'ORDER BY "timestamp" DESC LIMIT 1',
                    "table",
                ),
            ),
            description="What costs the plugin most of its health score, as of the latest evaluation.",
            options={
                "reduceOptions": {
                    "calcs": ["lastNotNull"],
                    "fields": "/^(weakest|detail)$/",
                    "values": False,
                },
                "textMode": "value",
                "colorMode": "none",
            },
        ),
        Panel(
            "Plugin's own metrics",
            "timeseries",
            24,
            8,
            (Query(own_metrics_sql()),),
            description="What the plugin exposes on its own /metrics endpoint or pushes "
            "(plugin_metrics): gauges as their value, counters (and histogram/summary "
            "_count series) as their rate per second ('/s'), counter resets handled. "
            "Histogram quantiles are in `pluginmon status --metrics` and in alert rules "
            '(metric = "name:p95").',
        ),
        Panel(
            "Availability",
            "timeseries",
            12,
            8,
            (Query(series(f"{weighted('up_ratio')} AS up_ratio")),),
            unit="percentunit",
            min_value=0,
            max_value=1,
        ),
        Panel(
            "Threads, processes and restarts",
            "timeseries",
            12,
            8,
            (
                Query(
                    series(
                        values="max(r.threads_max) AS threads_max,\n"
                        "  max(r.process_count_max) AS process_count_max,\n"
                        "  sum(r.restarts_sum) AS restarts"
                    )
                ),
            ),
            overrides=(
                {
                    "matcher": {"id": "byName", "options": "restarts"},
                    "properties": [{"id": "custom.drawStyle", "value": "bars"}],
                },
            ),
        ),
        Panel(
            "Dependencies",
            "table",
            24,
            6,
            (
                Query(
                    "SELECT s.environment, d.name AS dependency, x.version_range, x.kind,\n"
                    "  s.installed_version, s.satisfied, s.conflict, s.problem, s.reason,\n"
                    "  s.changed_at\n"
                    "FROM plugin_dependencies x\n"
                    "JOIN plugins d ON d.id = x.depends_on_plugin_id AND d.tenant_id = x.tenant_id\n"
                    "JOIN plugin_dependency_states s\n"
                    "  ON s.dependency_id = x.id AND s.tenant_id = x.tenant_id\n"
                    f"WHERE x.tenant_id = {TENANT} AND x.plugin_id = {PLUGIN}\n"
                    f"  AND s.environment IN ({ENVIRONMENT})\n"
                    "ORDER BY s.satisfied, x.kind DESC, s.environment, d.name",
                    "table",
                ),
            ),
            description="The plugin's declared dependencies in each environment: the npm semver "
            "range, what is installed, and why a dependency is not satisfied (ERESOLVE-style). "
            "Runtime problems lower health and raise PluginDependencyUnsatisfied; dev ones "
            "never do.",
        ),
        Panel(
            "Alerts",
            "table",
            24,
            8,
            (
                Query(
                    "SELECT started_at, fired_at, resolved_at, rule_name, severity, status, inhibited,\n"
                    "  value, annotations->>'summary' AS summary, acknowledged_by\n"
                    "FROM plugin_alerts\n"
                    f"WHERE {PLUGIN_WHERE}\n"
                    "  AND (status <> 'resolved' OR resolved_at >= $__timeFrom()::timestamptz)\n"
                    "  AND started_at <= $__timeTo()::timestamptz\n"
                    "ORDER BY started_at DESC",
                    "table",
                ),
            ),
            description="Alerts open now or active at some point in the selected range.",
        ),
    ]
    alert_annotation = {
        "name": "pluginmon alerts",
        "datasource": POSTGRES,
        "enable": True,
        "iconColor": "red",
        "target": {
            "refId": "Anno",
            "editorMode": "code",
            "format": "table",
            "rawQuery": True,
            "rawSql": "SELECT fired_at AS time, resolved_at AS timeend,\n"
            "  rule_name || ' (' || severity || ')' AS text, severity AS tags\n"
            "FROM plugin_alerts\n"
            f"WHERE {PLUGIN_WHERE} AND fired_at IS NOT NULL\n"
            "  AND fired_at <= $__timeTo()::timestamptz\n"
            "  AND (resolved_at IS NULL OR resolved_at >= $__timeFrom()::timestamptz)\n"
            "ORDER BY fired_at",
        },
    }
    return dashboard(
        uid=PLUGIN_PG_UID,
        title="pluginmon / Plugin (PostgreSQL)",
        description="One plugin: CPU, memory, availability, health score with its components, "
        "and alerts, from pluginmon's rollup tables.",
        datasource=POSTGRES,
        variables=[PG_TENANT_VARIABLE, PG_ENVIRONMENT_VARIABLE, PG_PLUGIN_VARIABLE],
        panels=panels,
        annotations=[alert_annotation],
        links=[_dashboard_link("Fleet", FLEET_PG_UID)],
    )


# -- Prometheus dashboards -----------------------------------------------------------------------

PROM_TENANT = 'tenant="$tenant"'
PROM_FLEET = 'tenant="$tenant", environment=~"$environment"'
PROM_PLUGIN = 'tenant="$tenant", environment=~"$environment", plugin="$plugin"'

PROM_TENANT_VARIABLE = _variable(
    PROMETHEUS, "tenant", "Tenant", "label_values(pluginmon_plugin_up, tenant)"
)
PROM_ENVIRONMENT_VARIABLE = _variable(
    PROMETHEUS,
    "environment",
    "Environment",
    f"label_values(pluginmon_plugin_up{{{PROM_TENANT}}}, environment)",
    multi=True,
    all_value=".*",
)
PROM_PLUGIN_VARIABLE = _variable(
    PROMETHEUS,
    "plugin",
    "Plugin",
    f"label_values(pluginmon_plugin_up{{{PROM_FLEET}}}, plugin)",
)


def fleet_prometheus() -> dict[str, Any]:
    panels = [
        Panel(
            "Plugins",
            "stat",
            4,
            4,
            (Query(f"count(pluginmon_plugin_up{{{PROM_FLEET}}})", instant=True),),
        ),
        Panel(
            "Down now",
            "stat",
            4,
            4,
            (Query(f"count(pluginmon_plugin_up{{{PROM_FLEET}}} == 0) or vector(0)", instant=True),),
            thresholds=ALERT_STEPS,
        ),
        Panel(
            "Average health",
            "stat",
            4,
            4,
            (Query(f"avg(pluginmon_plugin_health_score{{{PROM_FLEET}}})", instant=True),),
            min_value=0,
            max_value=100,
            thresholds=HEALTH_STEPS,
        ),
        Panel(
            "Lowest health",
            "stat",
            4,
            4,
            (Query(f"min(pluginmon_plugin_health_score{{{PROM_FLEET}}})", instant=True),),
            min_value=0,
            max_value=100,
            thresholds=HEALTH_STEPS,
        ),
        Panel(
            "Firing alerts",
            "stat",
            4,
            4,
            (Query(f"sum(pluginmon_alerts_firing{{{PROM_FLEET}}}) or vector(0)", instant=True),),
            thresholds=ALERT_STEPS,
        ),
        Panel(
            "Restarts",
            "stat",
            4,
            4,
            (
                Query(
                    f"sum(increase(pluginmon_plugin_restarts_total{{{PROM_FLEET}}}[$__range])) or vector(0)",
                    instant=True,
                ),
            ),
            thresholds=((None, "green"), (1, "orange")),
        ),
        Panel(
            "Tenant CPU",
            "timeseries",
            12,
            8,
            (
                Query(
                    f"tenant:pluginmon_plugin_cpu_percent:sum{{{PROM_FLEET}}}",
                    legend="{{environment}}",
                ),
            ),
            unit="percent",
            description="Sum over the tenant's plugins (recording rule tenant:pluginmon_plugin_cpu_percent:sum).",
        ),
        Panel(
            "Tenant resident memory",
            "timeseries",
            12,
            8,
            (
                Query(
                    f"tenant:pluginmon_plugin_memory_rss_bytes:sum{{{PROM_FLEET}}}",
                    legend="{{environment}}",
                ),
            ),
            unit="bytes",
        ),
        Panel(
            "CPU by plugin",
            "timeseries",
            12,
            8,
            (
                Query(
                    f"topk($top, pluginmon_plugin_cpu_percent{{{PROM_FLEET}}})",
                    legend="{{plugin}} {{environment}}",
                ),
            ),
            unit="percent",
            min_value=0,
        ),
        Panel(
            "Resident memory by plugin",
            "timeseries",
            12,
            8,
            (
                Query(
                    f"topk($top, pluginmon_plugin_memory_rss_bytes{{{PROM_FLEET}}})",
                    legend="{{plugin}} {{environment}}",
                ),
            ),
            unit="bytes",
            min_value=0,
        ),
        Panel(
            "CPU p95 by plugin",
            "timeseries",
            12,
            8,
            (
                Query(
                    "topk($top, quantile_over_time(0.95, "
                    f"pluginmon_plugin_cpu_percent{{{PROM_FLEET}}}[$__rate_interval]))",
                    legend="{{plugin}} {{environment}}",
                ),
            ),
            unit="percent",
            min_value=0,
            description=PROM_P95_NOTE,
        ),
        Panel(
            "Resident memory p95 by plugin",
            "timeseries",
            12,
            8,
            (
                Query(
                    "topk($top, quantile_over_time(0.95, "
                    f"pluginmon_plugin_memory_rss_bytes{{{PROM_FLEET}}}[$__rate_interval]))",
                    legend="{{plugin}} {{environment}}",
                ),
            ),
            unit="bytes",
            min_value=0,
            description=PROM_P95_NOTE,
        ),
        Panel(
            "Availability by plugin",
            "timeseries",
            12,
            8,
            (
                Query(
                    f"bottomk($top, avg_over_time(pluginmon_plugin_up{{{PROM_FLEET}}}[$__rate_interval]))",
                    legend="{{plugin}} {{environment}}",
                ),
            ),
            unit="percentunit",
            min_value=0,
            max_value=1,
        ),
        Panel(
            "Health score by plugin",
            "timeseries",
            12,
            8,
            (
                Query(
                    f"bottomk($top, pluginmon_plugin_health_score{{{PROM_FLEET}}})",
                    legend="{{plugin}} {{environment}}",
                ),
            ),
            min_value=0,
            max_value=100,
        ),
        Panel(
            "Top CPU",
            "bargauge",
            12,
            8,
            (
                Query(
                    f"topk($top, avg_over_time(pluginmon_plugin_cpu_percent{{{PROM_FLEET}}}[$__range]))",
                    legend="{{plugin}}",
                    instant=True,
                ),
            ),
            unit="percent",
            options={"orientation": "horizontal", "displayMode": "gradient"},
        ),
        Panel(
            "Alerts firing now",
            "table",
            12,
            8,
            (
                Query(
                    f"pluginmon_alerts_firing{{{PROM_FLEET}}} > 0",
                    format="table",
                    instant=True,
                ),
            ),
            options={"showHeader": True},
        ),
        Panel("pluginmon daemons", "row", 24, 1),
        Panel(
            "Samples per second",
            "timeseries",
            8,
            7,
            (Query("instance:pluginmon_samples:rate5m", legend="{{instance}}"),),
            unit="ops",
        ),
        Panel(
            "Spool backlog",
            "timeseries",
            8,
            7,
            (Query("pluginmon_spool_samples", legend="{{instance}}"),),
            description="Samples waiting on disk while the database is unreachable.",
        ),
        Panel(
            "Dropped samples",
            "timeseries",
            8,
            7,
            (
                Query(
                    "sum by (instance, reason) (rate(pluginmon_dropped_samples_total[$__rate_interval]))",
                    legend="{{instance}} {{reason}}",
                ),
            ),
            unit="ops",
        ),
        Panel(
            "Database reachable",
            "timeseries",
            8,
            7,
            (Query("pluginmon_database_up", legend="{{instance}}"),),
            min_value=0,
            max_value=1,
        ),
        Panel(
            "Sampling and write latency (p99)",
            "timeseries",
            8,
            7,
            (
                Query(
                    "instance:pluginmon_sample_duration_seconds:p99_5m",
                    legend="sample {{instance}}",
                ),
                Query(
                    "instance:pluginmon_write_duration_seconds:p99_5m", legend="write {{instance}}"
                ),
            ),
            unit="s",
        ),
        Panel(
            "Daemon resident memory",
            "timeseries",
            8,
            7,
            (Query('process_resident_memory_bytes{job="pluginmon"}', legend="{{instance}}"),),
            unit="bytes",
        ),
    ]
    return dashboard(
        uid=FLEET_PROM_UID,
        title="pluginmon / Fleet (Prometheus)",
        description="All plugins of one tenant and the pluginmon daemons themselves, from "
        "Prometheus (deploy/prometheus.yml and deploy/pluginmon.rules.yml).",
        datasource=PROMETHEUS,
        variables=[PROM_TENANT_VARIABLE, PROM_ENVIRONMENT_VARIABLE, _top_variable()],
        panels=panels,
        links=[_dashboard_link("Plugin detail", PLUGIN_PROM_UID)],
    )


def plugin_prometheus() -> dict[str, Any]:
    panels = [
        Panel(
            "Health score",
            "stat",
            4,
            4,
            (Query(f"pluginmon_plugin_health_score{{{PROM_PLUGIN}}}", instant=True),),
            min_value=0,
            max_value=100,
            thresholds=HEALTH_STEPS,
        ),
        Panel(
            "Up",
            "stat",
            4,
            4,
            (Query(f"pluginmon_plugin_up{{{PROM_PLUGIN}}}", instant=True),),
            thresholds=UP_STEPS,
            mappings=(UP_MAPPING,),
            options={"colorMode": "background"},
        ),
        Panel(
            "CPU now",
            "stat",
            4,
            4,
            (Query(f"pluginmon_plugin_cpu_percent{{{PROM_PLUGIN}}}", instant=True),),
            unit="percent",
        ),
        Panel(
            "Resident memory now",
            "stat",
            4,
            4,
            (Query(f"pluginmon_plugin_memory_rss_bytes{{{PROM_PLUGIN}}}", instant=True),),
            unit="bytes",
        ),
        Panel(
            "Restarts",
            "stat",
            4,
            4,
            (
                Query(
                    f"sum(increase(pluginmon_plugin_restarts_total{{{PROM_PLUGIN}}}[$__range])) or vector(0)",
                    instant=True,
                ),
            ),
            thresholds=((None, "green"), (1, "orange")),
        ),
        Panel(
            "Firing alerts",
            "stat",
            4,
            4,
            (Query(f"sum(pluginmon_alerts_firing{{{PROM_PLUGIN}}}) or vector(0)", instant=True),),
            thresholds=ALERT_STEPS,
        ),
        Panel(
            "CPU",
            "timeseries",
            12,
            8,
            (
                Query(
                    f"pluginmon_plugin_cpu_percent{{{PROM_PLUGIN}}}", legend="cpu {{environment}}"
                ),
            ),
            unit="percent",
            min_value=0,
        ),
        Panel(
            "Memory",
            "timeseries",
            12,
            8,
            (
                Query(f"pluginmon_plugin_memory_rss_bytes{{{PROM_PLUGIN}}}", legend="rss"),
                Query(f"pluginmon_plugin_memory_vms_bytes{{{PROM_PLUGIN}}}", legend="vms"),
                Query(f"pluginmon_plugin_memory_uss_bytes{{{PROM_PLUGIN}}}", legend="uss"),
                Query(f"pluginmon_plugin_memory_swap_bytes{{{PROM_PLUGIN}}}", legend="swap"),
            ),
            unit="bytes",
            min_value=0,
            description="USS and swap appear only when collected (collect_fields).",
        ),
        Panel(
            "CPU p95",
            "timeseries",
            12,
            8,
            (
                Query(
                    "quantile_over_time(0.95, "
                    f"pluginmon_plugin_cpu_percent{{{PROM_PLUGIN}}}[$__rate_interval])",
                    legend="p95 {{environment}}",
                ),
            ),
            unit="percent",
            min_value=0,
            description="100% = one core. " + PROM_P95_NOTE,
        ),
        Panel(
            "Resident memory p95",
            "timeseries",
            12,
            8,
            (
                Query(
                    "quantile_over_time(0.95, "
                    f"pluginmon_plugin_memory_rss_bytes{{{PROM_PLUGIN}}}[$__rate_interval])",
                    legend="p95 {{environment}}",
                ),
            ),
            unit="bytes",
            min_value=0,
            description=PROM_P95_NOTE,
        ),
        Panel(
            "Health score and components",
            "timeseries",
            12,
            8,
            (
                Query(f"pluginmon_plugin_health_score{{{PROM_PLUGIN}}}", legend="score"),
                Query(
                    f"pluginmon_plugin_health_component_score{{{PROM_PLUGIN}}}",
                    legend="{{component}}",
                ),
            ),
            min_value=0,
            max_value=100,
            overrides=(
                {
                    "matcher": {"id": "byName", "options": "score"},
                    "properties": [{"id": "custom.lineWidth", "value": 3}],
                },
            ),
        ),
        Panel(
            "Health components now",
            "bargauge",
            8,
            8,
            (
                Query(
                    f"pluginmon_plugin_health_component_score{{{PROM_PLUGIN}}}",
                    legend="{{component}}",
                    instant=True,
                ),
            ),
            min_value=0,
            max_value=100,
            thresholds=HEALTH_STEPS,
            options={"orientation": "horizontal", "displayMode": "basic"},
        ),
        Panel(
            "Weakest component",
            "stat",
            4,
            8,
            (
                Query(
                    f"bottomk(1, pluginmon_plugin_health_component_score{{{PROM_PLUGIN}}})",
                    legend="{{component}}",
                    instant=True,
                ),
            ),
            description="The component with the lowest score right now.",
            min_value=0,
            max_value=100,
            thresholds=HEALTH_STEPS,
            options={"textMode": "value_and_name"},
        ),
        Panel(
            "Availability",
            "timeseries",
            12,
            8,
            (
                Query(
                    f"avg_over_time(pluginmon_plugin_up{{{PROM_PLUGIN}}}[$__rate_interval])",
                    legend="up",
                ),
            ),
            unit="percentunit",
            min_value=0,
            max_value=1,
        ),
        Panel(
            "Threads, processes, file descriptors",
            "timeseries",
            12,
            8,
            (
                Query(f"pluginmon_plugin_threads{{{PROM_PLUGIN}}}", legend="threads"),
                Query(f"pluginmon_plugin_processes{{{PROM_PLUGIN}}}", legend="processes"),
                Query(f"pluginmon_plugin_open_fds{{{PROM_PLUGIN}}}", legend="open fds"),
            ),
        ),
        Panel(
            "Disk I/O",
            "timeseries",
            12,
            8,
            (
                Query(
                    f"rate(pluginmon_plugin_io_read_bytes_total{{{PROM_PLUGIN}}}[$__rate_interval])",
                    legend="read",
                ),
                Query(
                    f"rate(pluginmon_plugin_io_write_bytes_total{{{PROM_PLUGIN}}}[$__rate_interval])",
                    legend="write",
                ),
            ),
            unit="Bps",
            description="Only when io fields are collected.",
        ),
        Panel(
            "Context switches and restarts",
            "timeseries",
            12,
            8,
            (
                Query(
                    f"rate(pluginmon_plugin_context_switches_total{{{PROM_PLUGIN}}}[$__rate_interval])",
                    legend="{{kind}} switches/s",
                ),
                Query(
                    f"increase(pluginmon_plugin_restarts_total{{{PROM_PLUGIN}}}[$__rate_interval])",
                    legend="restarts",
                ),
            ),
        ),
        Panel(
            "Unsatisfied runtime dependencies",
            "timeseries",
            12,
            6,
            (
                Query(
                    f"pluginmon_plugin_dependencies_unsatisfied{{{PROM_PLUGIN}}}",
                    legend="{{environment}}",
                ),
            ),
            min_value=0,
            description="Runtime dependencies missing, disabled, out of their npm semver range, "
            "conflicting or on a cycle (dev ones never count); details: the PostgreSQL "
            "dashboard's Dependencies table or `pluginmon deps check`.",
        ),
        Panel(
            "Dependencies unsatisfied now",
            "stat",
            12,
            6,
            (
                Query(
                    f"sum(pluginmon_plugin_dependencies_unsatisfied{{{PROM_PLUGIN}}}) or vector(0)",
                    instant=True,
                ),
            ),
            thresholds=ALERT_STEPS,
        ),
        Panel(
            "Alerts firing now",
            "table",
            24,
            6,
            (Query(f"pluginmon_alerts_firing{{{PROM_PLUGIN}}} > 0", format="table", instant=True),),
        ),
    ]
    alert_annotation = {
        "name": "pluginmon alerts",
        "datasource": PROMETHEUS,
        "enable": True,
        "iconColor": "red",
        "expr": f"pluginmon_alerts_firing{{{PROM_PLUGIN}}} > 0",
        "step": "60s",
        "titleFormat": "{{alertname}}",
        "textFormat": "{{severity}}",
        "tagKeys": "severity",
        "useValueForTime": False,
    }
    return dashboard(
        uid=PLUGIN_PROM_UID,
        title="pluginmon / Plugin (Prometheus)",
        description="One plugin: CPU, memory, I/O, availability, health score with its "
        "components, and alerts, from Prometheus.",
        datasource=PROMETHEUS,
        variables=[PROM_TENANT_VARIABLE, PROM_ENVIRONMENT_VARIABLE, PROM_PLUGIN_VARIABLE],
        panels=panels,
        annotations=[alert_annotation],
        links=[_dashboard_link("Fleet", FLEET_PROM_UID)],
    )


# -- Output --------------------------------------------------------------------------------------

OUTPUTS = {
    Path("postgres/pluginmon-fleet.json"): fleet_postgres,
    Path("postgres/pluginmon-plugin.json"): plugin_postgres,
    Path("prometheus/pluginmon-fleet.json"): fleet_prometheus,
    Path("prometheus/pluginmon-plugin.json"): plugin_prometheus,
}


def render(build: Any) -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if any file is out of date")
    parser.add_argument("--out", type=Path, default=HERE, help="output directory")
    args = parser.parse_args(argv)
    stale = []
    for relative, build in OUTPUTS.items():
        path = args.out / relative
        text = render(build)
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(str(relative))
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    if stale:
        print(
            "out of date (run python dashboards/generate.py): " + ", ".join(stale), file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
