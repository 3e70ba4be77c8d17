"""deploy/ rules on a real Prometheus scraping the daemon's real exporter over HTTP.

The exporter is pluginmon's own (daemon.exporter) fed with a synthetic snapshot; Prometheus
runs deploy/prometheus.yml with only its target, timings and paths changed for the test.
Also checks the contract from the other side: every pluginmon metric the rules and the
Prometheus dashboards name is one the exporter really serves.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.parser import text_string_to_metric_families

from dashboards.grafana_queries import (
    dashboard_files,
    dashboard_queries,
    grafana_promql,
    prometheus_context,
)
from pluginmon.collectors.models import PluginKey, PluginSample, Snapshot
from pluginmon.daemon.exporter import (
    DaemonMetrics,
    ExporterState,
    FiringAlert,
    HealthView,
    MetricsRenderer,
    PluginCollector,
)
from tests.dashboards_helpers import (
    DEPLOY_DIR,
    PLUGIN_METRICS,
    iter_rules,
    load_yaml,
    promql_metric_names,
    rule_files,
)
from tests.net_helpers import ServerThread, free_port, stop_process

PROMETHEUS = shutil.which("prometheus")
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None, reason="prometheus is not installed (Debian package: prometheus)"
)

RESIZER = PluginKey("acme", "resizer", "production")
THUMBS = PluginKey("acme", "thumbs", "production")


def _sample(key: PluginKey, *, up: bool, cpu: float, rss: int, restarts: int = 0) -> PluginSample:
    return PluginSample(
        key=key,
        timestamp=datetime.now(UTC),
        up=up,
        process_count=1 if up else 0,
        cpu_percent=cpu,
        rss_bytes=rss,
        vms_bytes=rss * 4,
        threads=4 if up else 0,
        restarts=restarts,
        oldest_start_time=datetime.now(UTC) - timedelta(hours=1) if up else None,
        # every optional field collected, so every family appears
        uss_bytes=rss // 2,
        swap_bytes=0,
        fds=12,
        read_bytes=1000,
        write_bytes=2000,
        ctx_switches_voluntary=50,
        ctx_switches_involuntary=5,
        pids=(4242,) if up else (),
    )


class _ComponentCounters:
    """Stand-in for the collectors the daemon's components register (writer, sink, database
    watch, outbox, scheduler), with the same families and fixed values: a database down, a
    failed flush, drops and notifications, so that every rule has something to evaluate."""

    def collect(self) -> Iterable[Metric]:
        rows = CounterMetricFamily(
            "pluginmon_rows_written", "Rows written to the database", labels=["table"]
        )
        rows.add_metric(["plugin_samples"], 100)
        yield rows
        yield GaugeMetricFamily(
            "pluginmon_spool_samples", "Rows waiting in the disk spool for the database", value=10
        )
        dropped = CounterMetricFamily(
            "pluginmon_dropped_samples", "Samples dropped, by reason", labels=["reason"]
        )
        dropped.add_metric(["spool_full"], 3)
        yield dropped
        yield GaugeMetricFamily(
            "pluginmon_database_up", "1 when the database answered the last write or probe", value=0
        )
        notifications = CounterMetricFamily(
            "pluginmon_notifications",
            "Notification attempts by receiver and outcome",
            labels=["receiver", "outcome"],
        )
        notifications.add_metric(["ops", "delivered"], 1)
        notifications.add_metric(["ops", "failed"], 1)
        yield notifications
        yield GaugeMetricFamily(
            "pluginmon_outbox_pending", "Notifications waiting in the outbox", value=2
        )
        last = GaugeMetricFamily(
            "pluginmon_job_last_success_timestamp_seconds",
            "Unix time of each job's last successful run",
            labels=["task"],
        )
        last.add_metric(["sample"], time.time())
        yield last
        failures = CounterMetricFamily(
            "pluginmon_job_failures", "Failed runs of each job", labels=["task"]
        )
        failures.add_metric(["flush"], 1)
        yield failures
        yield HistogramMetricFamily(
            "pluginmon_write_duration_seconds",
            "Duration of one COPY batch",
            buckets=[("0.1", 1), ("+Inf", 1)],
            sum_value=0.05,
        )


class _Exporter:
    """pluginmon's registry and per-plugin collector behind a real HTTP server."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.metrics = DaemonMetrics(self.registry, version="0.0.test")
        self.state = ExporterState(grace_seconds=300)
        self.renderer = MetricsRenderer(self.registry, PluginCollector(self.state))
        snapshot = Snapshot(
            timestamp=datetime.now(UTC),
            host="test-host",
            samples=(
                _sample(RESIZER, up=False, cpu=0.0, rss=0, restarts=2),
                _sample(THUMBS, up=True, cpu=50.0, rss=200_000_000),
            ),
            duration_seconds=0.02,
            processes_seen=10,
            errors=(("access_denied", 1),),
        )
        self.state.update_snapshot(snapshot)
        self.metrics.observe_snapshot(snapshot)
        self.state.update_health(
            {
                RESIZER: HealthView(score=30.0, components=(("up", 0.0), ("cpu", 80.0))),
                THUMBS: HealthView(score=95.0, components=(("up", 100.0), ("cpu", 90.0))),
            }
        )
        self.state.update_alerts([FiringAlert(RESIZER, "PluginDown", "critical")])
        self.registry.register(_ComponentCounters())
        renderer = self.renderer

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path != "/metrics":
                    self.send_error(404)
                    return
                body, content_type = renderer.render(self.headers.get("Accept"))
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._serving = ServerThread(Handler)
        self.port = self._serving.port

    def __enter__(self) -> _Exporter:
        self._serving.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._serving.stop()

    def text(self) -> str:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.port}/metrics", timeout=10
        ) as response:
            return str(response.read().decode("utf-8"))


@pytest.fixture
def exporter() -> Iterator[_Exporter]:
    with _Exporter() as running:
        yield running


def _served_names(text: str) -> set[str]:
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(sample.name for sample in family.samples)
    return names


def test_rules_and_dashboards_name_only_served_metrics(exporter: _Exporter) -> None:
    served = _served_names(exporter.text())
    # Sanity: the exporter serves every per-plugin family of the contract here.
    assert served >= PLUGIN_METRICS
    named: set[str] = set()
    for _path, rule in iter_rules():
        named |= promql_metric_names(str(rule["expr"]))
    for path in dashboard_files("prometheus"):
        for query in dashboard_queries(path):
            if query.format != "variable":
                named |= promql_metric_names(grafana_promql(query.text, prometheus_context()))
    own = {name for name in named if name.startswith("pluginmon_")}
    assert own, "no pluginmon metric named at all"
    missing = sorted(own - served)
    assert not missing, f"named by rules/dashboards but not served: {missing}"


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 (http://127.0.0.1 only)
        return json.loads(response.read())


def _test_config(tmp_path: Path, target_port: int) -> Path:
    """deploy/prometheus.yml and its rules with the target, timings and paths made local."""
    config = load_yaml(DEPLOY_DIR / "prometheus.yml")
    config["global"]["scrape_interval"] = "1s"
    config["global"]["evaluation_interval"] = "1s"
    config.pop("alerting", None)
    job = next(job for job in config["scrape_configs"] if job["job_name"] == "pluginmon")
    job["scrape_interval"] = "1s"
    job["scrape_timeout"] = "1s"
    job["static_configs"][0]["targets"] = [f"127.0.0.1:{target_port}"]
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    for path in rule_files():
        rules = load_yaml(path)
        for group in rules["groups"]:
            group["interval"] = "1s"
        (rules_dir / path.name).write_text(yaml.safe_dump(rules))
    config["rule_files"] = [str(rules_dir / name) for name in config["rule_files"]]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def _wait_for(check: Any, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except OSError as error:
            last = error
        time.sleep(0.25)
    raise AssertionError(f"gave up waiting; last result: {last!r}")


@needs_prometheus
def test_real_prometheus_scrapes_and_evaluates_the_rules(
    exporter: _Exporter, tmp_path: Path
) -> None:
    assert PROMETHEUS is not None
    config = _test_config(tmp_path, exporter.port)
    port = free_port()
    api = f"http://127.0.0.1:{port}/api/v1"
    log = (tmp_path / "prometheus.log").open("w")
    process = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    try:
        _wait_for(
            lambda: (
                urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2).status == 200
            )
        )

        def query(expr: str) -> list[dict[str, Any]]:
            answer = _get(f"{api}/query?query={urllib.parse.quote(expr)}")
            assert answer["status"] == "success", answer
            result: list[dict[str, Any]] = answer["data"]["result"]
            return result

        targets = _wait_for(
            lambda: [
                t for t in _get(f"{api}/targets")["data"]["activeTargets"] if t["health"] == "up"
            ]
        )
        assert targets[0]["labels"]["job"] == "pluginmon"
        # Recording rules on the scraped series.
        cpu = _wait_for(lambda: query("tenant:pluginmon_plugin_cpu_percent:sum"))
        assert cpu[0]["metric"] == {
            "__name__": "tenant:pluginmon_plugin_cpu_percent:sum",
            "tenant": "acme",
            "environment": "production",
        }
        assert float(cpu[0]["value"][1]) == pytest.approx(50.0)  # resizer is down: 0 %
        ratio = _wait_for(lambda: query("tenant:pluginmon_plugin_up:ratio"))
        assert float(ratio[0]["value"][1]) == pytest.approx(0.5)
        low = _wait_for(lambda: query("tenant:pluginmon_plugin_health_score:min"))
        assert float(low[0]["value"][1]) == pytest.approx(30.0)
        firing = _wait_for(lambda: query("tenant:pluginmon_alerts_firing:sum"))
        assert firing[0]["metric"]["severity"] == "critical"
        # The daemon's scheduler job is the `task` label; Prometheus's own `job` is untouched.
        failures = _wait_for(lambda: query("pluginmon_job_failures_total"))
        assert failures[0]["metric"]["task"] == "flush"
        assert "exported_job" not in failures[0]["metric"]
        assert failures[0]["metric"]["job"] == "pluginmon"

        # Alerting rules: those whose condition holds are at least pending (their `for:`
        # clauses are minutes long and kept as shipped).
        def alerts() -> dict[tuple[str, str], str]:
            found = _get(f"{api}/alerts")["data"]["alerts"]
            return {
                (a["labels"]["alertname"], a["labels"].get("plugin", "")): a["state"] for a in found
            }

        expected = {
            ("PluginDown", "resizer"),
            ("PluginHealthLow", "resizer"),
            ("PluginmonDatabaseDown", ""),
        }
        state = _wait_for(lambda: (a := alerts()) and expected <= a.keys() and a)
        assert ("PluginDown", "thumbs") not in state
        assert ("PluginHealthLow", "thumbs") not in state
        assert ("PluginmonScrapeDown", "") not in state
        assert all(value in {"pending", "firing"} for value in state.values())

        # Every Prometheus dashboard query runs on the real scrape; the main panels have data
        # (rates need two scrapes in their window, hence the wait).
        main_panels = (
            "pluginmon-fleet CPU by plugin",
            "pluginmon-fleet Health score by plugin",
            "pluginmon-fleet Tenant CPU",
            "pluginmon-fleet Alerts firing now",
            "pluginmon-plugin Health components now",
            "pluginmon-plugin Memory",
            "pluginmon-plugin Disk I/O",
        )

        def dashboard_results() -> dict[str, list[dict[str, Any]]] | None:
            results: dict[str, list[dict[str, Any]]] = {}
            for path in dashboard_files("prometheus"):
                for dashboard_query in dashboard_queries(path):
                    if dashboard_query.format == "variable":
                        continue
                    expr = grafana_promql(dashboard_query.text, prometheus_context())
                    key = f"{path.stem} {dashboard_query.title}"
                    results.setdefault(key, []).extend(query(expr))
            return results if all(results[panel] for panel in main_panels) else None

        results = _wait_for(dashboard_results)
        components = {
            r["metric"]["component"]: float(r["value"][1])
            for r in results["pluginmon-plugin Health components now"]
        }
        assert components == {"up": 0.0, "cpu": 80.0}
    finally:
        stop_process(process)
        log.close()
