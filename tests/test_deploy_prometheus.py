"""deploy/ rules on a real Prometheus scraping real `pluginmon run` daemons over HTTP.

Two daemons run as subprocesses (as in the end-to-end tests): one with a real database, a
plugin whose real process burns CPU and a configured plugin with no process (down), and one
whose database is unreachable. Prometheus runs deploy/prometheus.yml with only its targets,
timings and paths changed for the test. Also checks the contract from the other side: every
pluginmon metric the rules and the Prometheus dashboards name is one the daemon really serves.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from dashboards.grafana_queries import (
    dashboard_files,
    dashboard_queries,
    grafana_promql,
    prometheus_context,
)
from tests.daemon_helpers import BURNER, DaemonProcess, PluginProcesses, WebhookReceiver, wait_for
from tests.dashboards_helpers import (
    DEPLOY_DIR,
    PLUGIN_METRICS,
    iter_rules,
    load_yaml,
    promql_metric_names,
    rule_files,
)
from tests.dbutil import create_database, drop_database, with_database
from tests.net_helpers import free_port, stop_process

PROMETHEUS = shutil.which("prometheus")
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None, reason="prometheus is not installed (Debian package: prometheus)"
)

# The plugins the dashboards' test context selects (tenant acme, plugin resizer).
TENANT, ENVIRONMENT = "acme", "production"
UP_PLUGIN, DOWN_PLUGIN = "resizer", "thumbs"


@dataclass(frozen=True, slots=True)
class Daemons:
    main: DaemonProcess  # database up, one plugin up and burning, one down
    no_database: DaemonProcess  # database unreachable, no plugins
    receiver: WebhookReceiver


def _main_config(plugins: PluginProcesses, receiver: WebhookReceiver) -> str:
    plugin_tables = "".join(
        f"""
[[plugins]]
tenant = "{TENANT}"
name = "{name}"
environment = "{ENVIRONMENT}"
match = {{ cmdline = "{plugins.marker}-{name}$" }}
"""
        for name in (UP_PLUGIN, DOWN_PLUGIN)
    )
    # Every optional field, so every per-plugin family is served; the built-in PluginDown
    # without its 30 s `for`, so a firing alert and a delivered notification come quickly.
    return (
        'collect_fields = ["uss", "swap", "fds", "io", "ctx_switches"]\n'
        + plugin_tables
        + f"""
[[alerts.rules]]
name = "PluginDown"
metric = "up"
op = "=="
threshold = 0
for_seconds = 0
severity = "critical"

[[alerts.webhooks]]
name = "ops"
url = "{receiver.url}"
"""
    )


@pytest.fixture(scope="module")
def daemons(pg_admin_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemons]:
    tmp_path = tmp_path_factory.mktemp("deploy-prometheus")
    database = create_database(pg_admin_url, prefix="deployprom")
    plugins = PluginProcesses()
    started: list[DaemonProcess] = []
    try:
        plugins.start(UP_PLUGIN, BURNER)  # DOWN_PLUGIN has no process
        with WebhookReceiver() as receiver:
            main = DaemonProcess(
                tmp_path=tmp_path,
                database_url=with_database(pg_admin_url, database),
                config_text=_main_config(plugins, receiver),
                data_dir=tmp_path / "main-data",
                name="main",
            )
            unreachable = f"postgresql://pluginmon:x@127.0.0.1:{free_port()}/pluginmon"
            no_database = DaemonProcess(
                tmp_path=tmp_path,
                database_url=unreachable + "?connect_timeout=2",
                config_text="",
                data_dir=tmp_path / "no-database-data",
                name="no-database",
            )
            for daemon in (main, no_database):
                started.append(daemon.start())
            main.wait_ready()
            # Everything the tests look at has happened once: samples, health, the firing
            # alert and its delivered notification, a write.
            wait_for(
                "the daemon to deliver its first notification",
                lambda: main.metric(
                    "pluginmon_notifications_total", receiver="ops", outcome="delivered"
                ),
                timeout=60,
            )
            wait_for(
                "the daemon without a database to serve metrics",
                lambda: no_database.get("/metrics")[0] == 200,
            )
            yield Daemons(main, no_database, receiver)
    finally:
        for daemon in started:
            daemon.kill()
        plugins.stop()
        drop_database(pg_admin_url, database)


def _served_names(text: str) -> set[str]:
    """Sample names on the page, and the names of families declared (HELP/TYPE) without
    series yet: a per-plugin gauge of the registry (dependencies, backups) has none until a
    plugin has such data, but the daemon serves it and a rule or panel may name it."""
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(sample.name for sample in family.samples)
        if not family.samples:
            names.add(family.name + "_total" if family.type == "counter" else family.name)
    return names


def test_rules_and_dashboards_name_only_served_metrics(daemons: Daemons) -> None:
    status, text = daemons.main.get("/metrics")
    assert status == 200, text
    served = _served_names(text)
    # Sanity: the daemon serves every per-plugin family of the contract here.
    assert served >= PLUGIN_METRICS, sorted(PLUGIN_METRICS - served)
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


def _test_config(tmp_path: Path, target_ports: list[int]) -> Path:
    """deploy/prometheus.yml and its rules with the targets, timings and paths made local."""
    config = load_yaml(DEPLOY_DIR / "prometheus.yml")
    config["global"]["scrape_interval"] = "1s"
    config["global"]["evaluation_interval"] = "1s"
    config.pop("alerting", None)
    job = next(job for job in config["scrape_configs"] if job["job_name"] == "pluginmon")
    job["scrape_interval"] = "1s"
    job["scrape_timeout"] = "1s"
    job["static_configs"][0]["targets"] = [f"127.0.0.1:{port}" for port in target_ports]
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


def _or_none(probe: Any) -> Any:
    """``probe()``, or None while Prometheus is not answering yet."""
    try:
        return probe()
    except OSError:
        return None


@needs_prometheus
def test_real_prometheus_scrapes_and_evaluates_the_rules(daemons: Daemons, tmp_path: Path) -> None:
    assert PROMETHEUS is not None
    main, no_database = daemons.main, daemons.no_database
    instance = f"127.0.0.1:{main.port}"
    cut_off = f"127.0.0.1:{no_database.port}"
    config = _test_config(tmp_path, [main.port, no_database.port])
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

        def ready() -> bool:
            url = f"http://127.0.0.1:{port}/-/ready"
            with urllib.request.urlopen(url, timeout=2) as response:
                return bool(response.status == 200)

        wait_for("Prometheus to be ready", lambda: _or_none(ready))

        def query(expr: str) -> list[dict[str, Any]]:
            answer = _get(f"{api}/query?query={urllib.parse.quote(expr)}")
            assert answer["status"] == "success", answer
            result: list[dict[str, Any]] = answer["data"]["result"]
            return result

        def up_targets() -> dict[str, dict[str, Any]] | None:
            active = _get(f"{api}/targets")["data"]["activeTargets"]
            up = {t["labels"]["instance"]: t for t in active if t["health"] == "up"}
            return up if len(up) == 2 else None

        targets = wait_for("both daemons to be scraped", lambda: _or_none(up_targets))
        assert set(targets) == {instance, cut_off}
        assert {t["labels"]["job"] for t in targets.values()} == {"pluginmon"}

        # Recording rules on the scraped series.
        plugins_count = wait_for(
            "tenant:pluginmon_plugins:count", lambda: query("tenant:pluginmon_plugins:count")
        )
        assert plugins_count[0]["metric"] == {
            "__name__": "tenant:pluginmon_plugins:count",
            "tenant": TENANT,
            "environment": ENVIRONMENT,
        }
        assert float(plugins_count[0]["value"][1]) == 2
        ratio = wait_for("the up ratio", lambda: query("tenant:pluginmon_plugin_up:ratio"))
        assert float(ratio[0]["value"][1]) == pytest.approx(0.5)  # resizer up, thumbs down
        cpu = wait_for("tenant CPU", lambda: query("tenant:pluginmon_plugin_cpu_percent:sum"))
        assert cpu[0]["metric"]["tenant"] == TENANT
        # The burner is the only process: more than nothing, at most one core (it is
        # single-threaded). Its exact share is the sampler tests' business.
        assert 0 < float(cpu[0]["value"][1]) <= 100
        low = wait_for(
            "the lowest health", lambda: query("tenant:pluginmon_plugin_health_score:min")
        )
        assert float(low[0]["value"][1]) == 0.0  # a down plugin scores 0
        firing = wait_for("firing alerts", lambda: query("tenant:pluginmon_alerts_firing:sum"))
        assert [(f["metric"]["severity"], float(f["value"][1])) for f in firing] == [
            ("critical", 1.0)
        ]
        # The daemon's scheduler job is the `task` label; Prometheus's own `job` is untouched.
        successes = wait_for(
            "job successes", lambda: query("pluginmon_job_last_success_timestamp_seconds")
        )
        assert {"sample", "flush"} <= {s["metric"]["task"] for s in successes}
        assert all(s["metric"]["job"] == "pluginmon" for s in successes)
        assert not any("exported_job" in s["metric"] for s in successes)

        # Alerting rules: those whose condition holds are at least pending (their `for:`
        # clauses are minutes long and kept as shipped).
        def alerts() -> dict[tuple[str, str, str], str]:
            found = _get(f"{api}/alerts")["data"]["alerts"]
            return {
                (
                    a["labels"]["alertname"],
                    a["labels"].get("plugin", ""),
                    a["labels"].get("instance", ""),
                ): a["state"]
                for a in found
            }

        expected = {
            ("PluginDown", DOWN_PLUGIN, instance),
            ("PluginHealthLow", DOWN_PLUGIN, instance),
            ("PluginHealthCritical", DOWN_PLUGIN, instance),
            ("PluginmonDatabaseDown", "", cut_off),
        }
        state = wait_for(
            "the rules whose condition holds to be pending",
            lambda: a if expected <= (a := alerts()).keys() else None,
        )
        assert all(value in {"pending", "firing"} for value in state.values())
        assert ("PluginDown", UP_PLUGIN, instance) not in state
        assert ("PluginHealthLow", UP_PLUGIN, instance) not in state
        assert ("PluginmonDatabaseDown", "", instance) not in state
        assert not any(name == "PluginmonScrapeDown" for name, _, _ in state)

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

        results = wait_for("every main panel to have data", dashboard_results)
        components = {
            r["metric"]["component"]: float(r["value"][1])
            for r in results["pluginmon-plugin Health components now"]
        }
        # The selected plugin is the one that runs: its `up` gate is 100, and each
        # component is a score.
        assert components["up"] == 100.0
        assert "cpu" in components
        assert all(0.0 <= value <= 100.0 for value in components.values()), components
    finally:
        stop_process(process)
        log.close()
