"""dashboards/: generated JSON is current and well-formed, data sources match provisioning, and
the Prometheus variant's queries parse with promtool, use only contract metrics and return the
expected values on synthetic series."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from dashboards.grafana_queries import (
    GrafanaContext,
    Variable,
    dashboard_files,
    dashboard_queries,
    expand_macros,
    go_float,
    grafana_promql,
    interpolate_variables,
    iter_panels,
    load_dashboard,
    prometheus_context,
)
from tests.dashboards_helpers import (
    CONTRACT_LABELS,
    DASHBOARDS_DIR,
    DEPLOY_DIR,
    is_contract_metric,
    load_yaml,
    promql_label_names,
    promql_metric_names,
    recorded_names,
    rule_files,
)

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (Debian package: prometheus)"
)
ALL_DASHBOARDS = dashboard_files("postgres") + dashboard_files("prometheus")
PROVISIONING = DASHBOARDS_DIR / "provisioning"


def test_generated_dashboards_are_current() -> None:
    result = subprocess.run(
        [sys.executable, str(DASHBOARDS_DIR / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_the_four_dashboards_exist() -> None:
    assert [path.relative_to(DASHBOARDS_DIR).as_posix() for path in ALL_DASHBOARDS] == [
        "postgres/pluginmon-fleet.json",
        "postgres/pluginmon-plugin.json",
        "prometheus/pluginmon-fleet.json",
        "prometheus/pluginmon-plugin.json",
    ]


@pytest.mark.parametrize("path", ALL_DASHBOARDS, ids=lambda path: f"{path.parent.name}/{path.name}")
def test_dashboard_structure(path: Path) -> None:
    data = load_dashboard(path)
    panels = list(iter_panels(data["panels"]))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert all(isinstance(panel_id, int) and panel_id > 0 for panel_id in ids)
    titles = [panel["title"] for panel in panels]
    assert len(titles) == len(set(titles)), "panel titles must be unique"
    # Panels stay on Grafana's 24-column grid and do not overlap.
    occupied: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0, panel["title"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & occupied, f"{panel['title']} overlaps another panel"
        occupied |= cells
        for target in panel.get("targets", []):
            assert target["refId"]
    variables = [variable["name"] for variable in data["templating"]["list"]]
    assert variables[:2] == ["tenant", "environment"]
    if path.name == "pluginmon-plugin.json":
        assert variables == ["tenant", "environment", "plugin"]
    assert data["uid"].startswith("pluginmon-")
    assert "pluginmon" in data["tags"]


def test_dashboard_uids_are_unique_and_links_resolve() -> None:
    uids = {load_dashboard(path)["uid"] for path in ALL_DASHBOARDS}
    assert len(uids) == len(ALL_DASHBOARDS)
    for path in ALL_DASHBOARDS:
        text = path.read_text()
        for linked in re.findall(r"/d/([A-Za-z0-9_-]+)", text):
            assert linked in uids, f"{path.name} links to unknown dashboard {linked}"


def test_dashboards_cover_the_brief() -> None:
    def titles(kind: str, name: str) -> set[str]:
        data = load_dashboard(DASHBOARDS_DIR / kind / name)
        return {panel["title"] for panel in iter_panels(data["panels"])}

    for kind in ("postgres", "prometheus"):
        fleet = titles(kind, "pluginmon-fleet.json")
        assert {
            "CPU by plugin",
            "Resident memory by plugin",
            "Health score by plugin",
            "Firing alerts",
        } <= fleet
        detail = titles(kind, "pluginmon-plugin.json")
        assert {
            "CPU",
            "Memory",
            "Health score",
            "Health score and components",
            "Health components now",
        } <= detail
        assert any("alert" in title.lower() for title in detail - {"Firing alerts"})
        assert {"CPU p95 by plugin", "Resident memory p95 by plugin"} <= fleet
        assert {"CPU p95", "Resident memory p95"} <= detail


def _provisioned_datasources() -> dict[str, dict[str, Any]]:
    config = load_yaml(PROVISIONING / "datasources" / "pluginmon.yml")
    assert config["apiVersion"] == 1
    return {source["uid"]: source for source in config["datasources"]}


def _datasource_refs(value: Any) -> list[dict[str, Any]]:
    refs: list[dict[str, Any]] = []
    if isinstance(value, dict):
        source = value.get("datasource")
        if isinstance(source, dict):
            refs.append(source)
        for item in value.values():
            refs.extend(_datasource_refs(item))
    elif isinstance(value, list):
        for item in value:
            refs.extend(_datasource_refs(item))
    return refs


@pytest.mark.parametrize("path", ALL_DASHBOARDS, ids=lambda path: f"{path.parent.name}/{path.name}")
def test_dashboards_use_the_provisioned_datasources(path: Path) -> None:
    provisioned = _provisioned_datasources()
    expected_uid = (
        "pluginmon-postgres" if path.parent.name == "postgres" else "pluginmon-prometheus"
    )
    refs = [ref for ref in _datasource_refs(load_dashboard(path)) if ref.get("type") != "grafana"]
    assert refs
    for ref in refs:
        assert ref["uid"] == expected_uid
        assert ref["type"] == provisioned[expected_uid]["type"]


def test_provisioning_files() -> None:
    sources = _provisioned_datasources()
    assert set(sources) == {"pluginmon-postgres", "pluginmon-prometheus"}
    postgres = sources["pluginmon-postgres"]
    assert postgres["jsonData"]["timescaledb"] is False  # the expander and tests assume this
    assert "password" not in postgres  # only in secureJsonData, from the environment
    assert postgres["secureJsonData"]["password"].startswith("${")
    providers = load_yaml(PROVISIONING / "dashboards" / "pluginmon.yml")["providers"]
    assert len(providers) == 1
    assert providers[0]["type"] == "file"
    assert providers[0]["options"]["foldersFromFilesStructure"] is True


# -- Prometheus variant --------------------------------------------------------------------------


def _prometheus_queries() -> list[Any]:
    return [query for path in dashboard_files("prometheus") for query in dashboard_queries(path)]


_LABEL_VALUES = re.compile(r"^label_values\((?:(?P<selector>.+),\s*)?(?P<label>\w+)\)$")


def _context() -> GrafanaContext:
    return prometheus_context()


def _as_promql(query: Any) -> str:
    """A dashboard query as PromQL: label_values(selector, label) is checked as its selector."""
    text = grafana_promql(query.text, _context())
    if query.format == "variable":
        match = _LABEL_VALUES.match(text)
        assert match, f"{query.location}: not a label_values() query: {text}"
        assert match["label"] in CONTRACT_LABELS
        assert match["selector"], f"{query.location}: label_values() without a metric selector"
        return str(match["selector"])
    return text


def test_prometheus_queries_use_only_contract_metrics_and_labels() -> None:
    recorded = recorded_names()
    queries = _prometheus_queries()
    assert len(queries) >= 40
    used: set[str] = set()
    for query in queries:
        expr = _as_promql(query)
        names = promql_metric_names(expr)
        assert names, f"{query.location}: no metric in {expr}"
        unknown = sorted(name for name in names if not is_contract_metric(name, recorded))
        assert not unknown, f"{query.dashboard} {query.location}: {unknown}"
        assert promql_label_names(expr) <= CONTRACT_LABELS, f"{query.location}: {expr}"
        used |= names
    # Recording rules used by the dashboards exist in deploy/.
    assert {name for name in used if ":" in name} <= recorded


@needs_promtool
def test_prometheus_queries_parse_with_promtool(tmp_path: Path) -> None:
    rules = [
        {"record": f"dashboard:query_{index}:check", "expr": _as_promql(query)}
        for index, query in enumerate(_prometheus_queries())
    ]
    path = tmp_path / "dashboard_queries.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = subprocess.run(
        ["promtool", "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def _prom_query(dashboard: str, title: str) -> str:
    path = DASHBOARDS_DIR / "prometheus" / dashboard
    matches = [query for query in dashboard_queries(path) if query.title == title]
    assert len(matches) == 1, (dashboard, title, len(matches))
    return grafana_promql(matches[0].text, replace_range(_context(), "30m"))


def replace_range(context: GrafanaContext, span: str) -> GrafanaContext:
    minutes = int(span.rstrip("m"))
    return GrafanaContext(
        time_from=context.time_to - timedelta(minutes=minutes),
        time_to=context.time_to,
        interval=context.interval,
        rate_interval=context.rate_interval,
        variables=context.variables,
    )


@needs_promtool
def test_prometheus_dashboard_values_on_synthetic_series(tmp_path: Path) -> None:
    """Main panels evaluated by promtool's rule-test engine on known series at t = 30m."""
    labels = 'tenant="acme",environment="production",instance="h1:9464",job="pluginmon"'
    other = 'tenant="zeta",environment="production",instance="h1:9464",job="pluginmon"'
    series = [
        (f'pluginmon_plugin_up{{{labels},plugin="resizer"}}', "1x20 0x20"),
        (f'pluginmon_plugin_up{{{labels},plugin="thumbs"}}', "1x40"),
        (f'pluginmon_plugin_up{{{other},plugin="resizer"}}', "0x40"),
        (f'pluginmon_plugin_cpu_percent{{{labels},plugin="resizer"}}', "20x20 0x20"),
        (f'pluginmon_plugin_cpu_percent{{{labels},plugin="thumbs"}}', "50x40"),
        (f'pluginmon_plugin_cpu_percent{{{other},plugin="resizer"}}', "99x40"),
        (f'pluginmon_plugin_health_score{{{labels},plugin="resizer"}}', "90x20 40x20"),
        (f'pluginmon_plugin_health_score{{{labels},plugin="thumbs"}}', "95x40"),
        (
            f'pluginmon_plugin_health_component_score{{{labels},plugin="resizer",component="up"}}',
            "100x20 0x20",
        ),
        (
            f'pluginmon_plugin_health_component_score{{{labels},plugin="resizer",component="cpu"}}',
            "80x40",
        ),
        (f'pluginmon_plugin_restarts_total{{{labels},plugin="resizer"}}', "0x10 1x10 3x20"),
        (
            f'pluginmon_alerts_firing{{{labels},plugin="resizer",alertname="PluginDown",severity="critical"}}',
            "_x21 1x19",
        ),
        (
            f'pluginmon_alerts_firing{{{other},plugin="resizer",alertname="PluginDown",severity="critical"}}',
            "1x40",
        ),
    ]
    at = "30m"
    fleet, plugin = "pluginmon-fleet.json", "pluginmon-plugin.json"
    expectations: list[tuple[str, list[tuple[str, float]]]] = [
        (_prom_query(fleet, "Plugins"), [("{}", 2)]),
        (_prom_query(fleet, "Down now"), [("{}", 1)]),
        (_prom_query(fleet, "Average health"), [("{}", 67.5)]),
        (_prom_query(fleet, "Lowest health"), [("{}", 40)]),
        (_prom_query(fleet, "Firing alerts"), [("{}", 1)]),
        (_prom_query(fleet, "Restarts"), [("{}", 3)]),
        (
            _prom_query(fleet, "Top CPU"),
            [
                (f'{{{labels},plugin="thumbs"}}', 50),
                # avg_over_time over the 30-minute range: samples at 0..30m, 21 of them at 20%.
                (f'{{{labels},plugin="resizer"}}', 20 * 21 / 31),
            ],
        ),
        (
            _prom_query(plugin, "Health score"),
            [(f'pluginmon_plugin_health_score{{{labels},plugin="resizer"}}', 40)],
        ),
        (_prom_query(plugin, "Up"), [(f'pluginmon_plugin_up{{{labels},plugin="resizer"}}', 0)]),
        (
            _prom_query(plugin, "Health components now"),
            [
                (
                    f'pluginmon_plugin_health_component_score{{{labels},plugin="resizer",component="up"}}',
                    0,
                ),
                (
                    f'pluginmon_plugin_health_component_score{{{labels},plugin="resizer",component="cpu"}}',
                    80,
                ),
            ],
        ),
        (_prom_query(plugin, "Restarts"), [("{}", 3)]),
    ]
    tests = {
        "rule_files": [str(path) for path in rule_files()],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": name, "values": values} for name, values in series],
                "promql_expr_test": [
                    {
                        "expr": expr,
                        "eval_time": at,
                        "exp_samples": [
                            {"labels": labels_, "value": value} for labels_, value in samples
                        ],
                    }
                    for expr, samples in expectations
                ],
            }
        ],
    }
    path = tmp_path / "dashboard_values_test.yml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    result = subprocess.run(
        ["promtool", "test", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_prometheus_p95_panels_on_synthetic_series(tmp_path: Path) -> None:
    """quantile_over_time over a 10-minute $__rate_interval, evaluated by promtool, against
    percentile_cont's arithmetic done by hand. The series are chosen so that the answer does
    not depend on whether the window includes its left edge (Prometheus 3 excludes it,
    earlier releases include it)."""
    labels = 'tenant="acme",environment="production",instance="h1:9464",job="pluginmon"'
    series = [
        (f'pluginmon_plugin_cpu_percent{{{labels},plugin="resizer"}}', "20x20 0x20"),
        (f'pluginmon_plugin_cpu_percent{{{labels},plugin="thumbs"}}', "50x40"),
        (f'pluginmon_plugin_memory_rss_bytes{{{labels},plugin="resizer"}}', "100+10x25 350x15"),
        (f'pluginmon_plugin_memory_rss_bytes{{{labels},plugin="thumbs"}}', "7x40"),
    ]
    context = replace(prometheus_context(), rate_interval="10m")

    def query(dashboard: str, title: str) -> str:
        path = DASHBOARDS_DIR / "prometheus" / dashboard
        (match,) = [q for q in dashboard_queries(path) if q.title == title]
        return grafana_promql(match.text, context)

    resizer, thumbs = f'{{{labels},plugin="resizer"}}', f'{{{labels},plugin="thumbs"}}'
    fleet, plugin = "pluginmon-fleet.json", "pluginmon-plugin.json"
    # CPU at 25m: five or six samples of 20 (16 or 15..20m) and five of 0 (21..25m); the
    # 0.95 rank (8.55 of 10, 9.5 of 11) falls among the 20s: 20, where the mean is about 10.
    # Memory at 30m: 300 or 310 .. 350, then 350 from 25m; the rank falls on the 350s.
    expectations: list[tuple[str, str, list[tuple[str, float]]]] = [
        (query(plugin, "CPU p95"), "25m", [(resizer, 20)]),
        (query(plugin, "CPU p95"), "35m", [(resizer, 0)]),
        (query(plugin, "Resident memory p95"), "30m", [(resizer, 350)]),
        (query(fleet, "CPU p95 by plugin"), "25m", [(resizer, 20), (thumbs, 50)]),
        (query(fleet, "Resident memory p95 by plugin"), "30m", [(resizer, 350), (thumbs, 7)]),
    ]
    tests = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": name, "values": values} for name, values in series],
                "promql_expr_test": [
                    {
                        "expr": expr,
                        "eval_time": at,
                        "exp_samples": [{"labels": l_, "value": v} for l_, v in samples],
                    }
                    for expr, at, samples in expectations
                ],
            }
        ],
    }
    path = tmp_path / "p95_test.yml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    result = subprocess.run(
        ["promtool", "test", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_deploy_rule_files_exist_for_recorded_dashboard_series() -> None:
    # The fleet dashboard's tenant totals come from deploy/pluginmon.rules.yml.
    assert (DEPLOY_DIR / "pluginmon.rules.yml").exists()
    assert "tenant:pluginmon_plugin_cpu_percent:sum" in recorded_names()


# -- the expander itself, against Grafana's documented expansions ---------------------------------


def test_macro_expander_matches_grafana() -> None:
    context = GrafanaContext(
        time_from=datetime(2017, 4, 21, 5, 1, 17, tzinfo=UTC),
        time_to=datetime(2017, 4, 21, 5, 6, 17, 500000, tzinfo=UTC),
        variables={
            "host": Variable(("a'b",)),
            "envs": Variable(("prod", "stage"), multi=True),
        },
    )
    # pkg/tsdb/grafana-postgresql-datasource/macros.go, timescaledb off
    assert (
        expand_macros("$__timeFilter(time)", context)
        == "time BETWEEN '2017-04-21T05:01:17Z' AND '2017-04-21T05:06:17.5Z'"
    )
    assert expand_macros("$__timeGroup(dateColumn,'5m')", context) == (
        "floor(extract(epoch from dateColumn)/300)*300"
    )
    assert expand_macros("SELECT $__timeGroupAlias(c, 1h)", context) == (
        'SELECT floor(extract(epoch from c)/3600)*3600 AS "time"'
    )
    # pre-5.3 use: a $__timeGroup followed by ',' gets the alias
    assert expand_macros("SELECT $__timeGroup(c,'1m'), v", context) == (
        'SELECT floor(extract(epoch from c)/60)*60 AS "time", v'
    )
    assert expand_macros("$__timeFrom() $__timeTo()", context) == (
        "'2017-04-21T05:01:17Z' '2017-04-21T05:06:17.5Z'"
    )
    assert (
        expand_macros("$__timeGroup(c,'1m')", replace_tsdb(context)) == "time_bucket('60.000s',c)"
    )
    assert go_float(1209600.0) == "1.2096e+06"  # Go's %v, as Grafana prints a 2-week interval
    with pytest.raises(ValueError, match="unknown macro"):
        expand_macros("$__nope(x)", context)
    # Variables: sqlstring quotes and doubles quotes; SQL default quotes multi-values only.
    assert interpolate_variables("${host:sqlstring}", context, dialect="sql") == "'a''b'"
    assert interpolate_variables("$envs", context, dialect="sql") == "'prod','stage'"
    assert interpolate_variables("${envs:csv}", context, dialect="sql") == "prod,stage"
    assert interpolate_variables("$envs", context, dialect="prometheus") == "(prod|stage)"
    assert interpolate_variables("$__interval_ms", context, dialect="sql") == "60000"
    # Unknown names are left for the macro engine, as Grafana does.
    assert interpolate_variables("$__timeFilter(x) $nope", context, dialect="sql") == (
        "$__timeFilter(x) $nope"
    )


def replace_tsdb(context: GrafanaContext) -> GrafanaContext:
    return replace(context, timescaledb=True)
