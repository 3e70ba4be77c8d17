"""deploy/: Prometheus config and rules, Alertmanager config, the systemd unit, checked by the real tools."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.dashboards_helpers import (
    CONTRACT_LABELS,
    DEPLOY_DIR,
    is_contract_metric,
    iter_rules,
    load_yaml,
    parse_unit,
    promql_label_names,
    promql_metric_names,
    recorded_names,
    rule_files,
)

PROMTOOL = shutil.which("promtool")
AMTOOL = shutil.which("amtool")
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")

needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (Debian package: prometheus)"
)
needs_amtool = pytest.mark.skipif(
    AMTOOL is None, reason="amtool is not installed (Debian package: prometheus-alertmanager)"
)
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed (Debian package: systemd)"
)


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, cwd=cwd, timeout=60, check=False)


# -- Prometheus ------------------------------------------------------------------------------


@needs_promtool
def test_prometheus_config_passes_promtool() -> None:
    result = _run("promtool", "check", "config", str(DEPLOY_DIR / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    # check config also checks every rule file it names: both must be found.
    assert "2 rule files found" in result.stdout


def test_prometheus_config_scrapes_pluginmon_on_9464() -> None:
    config = load_yaml(DEPLOY_DIR / "prometheus.yml")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    job = jobs["pluginmon"]
    targets = [target for group in job["static_configs"] for target in group["targets"]]
    assert targets == ["127.0.0.1:9464"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    # pluginmon_job_* carry a `job` label: honouring it would rename the scrape job.
    assert job.get("honor_labels", False) is False
    assert sorted(config["rule_files"]) == sorted(path.name for path in rule_files())


@needs_promtool
def test_rule_files_pass_promtool() -> None:
    paths = rule_files()
    assert {path.name for path in paths} == {"pluginmon.rules.yml", "pluginmon-alerts.rules.yml"}
    result = _run("promtool", "check", "rules", *map(str, paths))
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_reference_only_contract_metrics() -> None:
    recorded = recorded_names()
    checked = 0
    for path, rule in iter_rules():
        expr = str(rule["expr"])
        names = promql_metric_names(expr)
        assert names, f"{path.name}: no metric found in {expr!r}"
        unknown = sorted(name for name in names if not is_contract_metric(name, recorded))
        assert not unknown, f"{path.name}: {rule.get('record') or rule.get('alert')}: {unknown}"
        bad_labels = sorted(promql_label_names(expr) - CONTRACT_LABELS)
        assert not bad_labels, (
            f"{path.name}: {rule.get('record') or rule.get('alert')}: {bad_labels}"
        )
        checked += 1
    assert checked >= 30


def test_recording_rule_names_follow_convention() -> None:
    for name in recorded_names():
        level, metric, operation = name.split(":")
        assert level in {"tenant", "plugin", "instance"}
        assert metric.startswith("pluginmon_")
        assert operation


def test_metric_name_extractor_on_known_expressions() -> None:
    # The tokenizer the contract test relies on, checked against hand-read expressions.
    assert promql_metric_names(
        'histogram_quantile(0.99, sum by (instance, le) (rate(pluginmon_write_duration_seconds_bucket{job="x"}[5m])))'
    ) == {"pluginmon_write_duration_seconds_bucket"}
    assert promql_metric_names(
        "pluginmon_spool_samples > 0 and deriv(pluginmon_spool_samples[10m]) > 0"
    ) == {"pluginmon_spool_samples"}
    assert promql_metric_names('absent(up{job="pluginmon"})') == {"up"}
    assert promql_metric_names(
        'sum without (kind) (rate(other_metric{plugin=~"$plugin"}[$__rate_interval])) / on (tenant) group_left foo_total'
    ) == {"other_metric", "foo_total"}
    assert promql_label_names('sum by (tenant, plugin) (x{environment="p", kind!~"v"})') == {
        "tenant",
        "plugin",
        "environment",
        "kind",
    }


def _promtool_unit_tests() -> dict[str, Any]:
    acme = 'tenant="acme",environment="production",instance="h1:9464",job="pluginmon"'
    return {
        "rule_files": [str(path) for path in rule_files()],
        "evaluation_interval": "30s",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    # resizer: up for 2 minutes, then no process for the rest of the run.
                    {
                        "series": f'pluginmon_plugin_up{{{acme},plugin="resizer"}}',
                        "values": "1 1 0x30",
                    },
                    {"series": f'pluginmon_plugin_up{{{acme},plugin="thumbs"}}', "values": "1x32"},
                    {
                        "series": f'pluginmon_plugin_cpu_percent{{{acme},plugin="resizer"}}',
                        "values": "0x32",
                    },
                    {
                        "series": f'pluginmon_plugin_cpu_percent{{{acme},plugin="thumbs"}}',
                        "values": "95x32",
                    },
                    {
                        "series": f'pluginmon_plugin_memory_rss_bytes{{{acme},plugin="thumbs"}}',
                        "values": "1000+1000x32",
                    },
                    {
                        "series": f'pluginmon_plugin_health_score{{{acme},plugin="resizer"}}',
                        "values": "90 90 20x30",
                    },
                    {
                        "series": f'pluginmon_plugin_health_score{{{acme},plugin="thumbs"}}',
                        "values": "60x32",
                    },
                    {
                        "series": f'pluginmon_plugin_restarts_total{{{acme},plugin="thumbs"}}',
                        "values": "0 0 0 2 4 6 8 8x26",
                    },
                    {
                        "series": 'pluginmon_alerts_firing{tenant="acme",environment="production",plugin="thumbs",alertname="PluginCpuHigh",severity="warning",instance="h1:9464",job="pluginmon"}',
                        "values": "1x32",
                    },
                    {"series": 'up{instance="h1:9464",job="pluginmon"}', "values": "1 1 1 0x30"},
                    {
                        "series": 'pluginmon_database_up{instance="h1:9464",job="pluginmon"}',
                        "values": "1 0x31",
                    },
                    {
                        "series": 'pluginmon_spool_samples{instance="h1:9464",job="pluginmon"}',
                        "values": "0 0+100x31",
                    },
                    {
                        "series": 'pluginmon_dropped_samples_total{instance="h1:9464",job="pluginmon",reason="spool_full"}',
                        "values": "0x20 5 10x11",
                    },
                    {
                        "series": 'pluginmon_samples_total{instance="h1:9464",job="pluginmon"}',
                        "values": "0+60x32",
                    },
                    {
                        "series": 'pluginmon_job_failures_total{instance="h1:9464",job="pluginmon",task="flush"}',
                        "values": "0x25 1x6",
                    },
                ],
                "promql_expr_test": [
                    {
                        "expr": 'tenant:pluginmon_plugin_cpu_percent:sum{tenant="acme"}',
                        "eval_time": "5m",
                        "exp_samples": [
                            {
                                "labels": 'tenant:pluginmon_plugin_cpu_percent:sum{tenant="acme",environment="production"}',
                                "value": 95,
                            }
                        ],
                    },
                    {
                        "expr": "tenant:pluginmon_plugin_up:ratio",
                        "eval_time": "10m",
                        "exp_samples": [
                            {
                                "labels": 'tenant:pluginmon_plugin_up:ratio{tenant="acme",environment="production"}',
                                "value": 0.5,
                            }
                        ],
                    },
                    {
                        "expr": "tenant:pluginmon_plugin_health_score:min",
                        "eval_time": "10m",
                        "exp_samples": [
                            {
                                "labels": 'tenant:pluginmon_plugin_health_score:min{tenant="acme",environment="production"}',
                                "value": 20,
                            }
                        ],
                    },
                    {
                        "expr": "tenant:pluginmon_alerts_firing:sum",
                        "eval_time": "10m",
                        "exp_samples": [
                            {
                                "labels": 'tenant:pluginmon_alerts_firing:sum{tenant="acme",environment="production",severity="warning"}',
                                "value": 1,
                            }
                        ],
                    },
                    {
                        "expr": "instance:pluginmon_samples:rate5m",
                        "eval_time": "10m",
                        "exp_samples": [
                            {
                                "labels": 'instance:pluginmon_samples:rate5m{instance="h1:9464",job="pluginmon"}',
                                "value": 1,
                            }
                        ],
                    },
                ],
                "alert_rule_test": [
                    {
                        "eval_time": "10m",
                        "alertname": "PluginDown",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    "severity": "critical",
                                    "tenant": "acme",
                                    "plugin": "resizer",
                                    "environment": "production",
                                    "instance": "h1:9464",
                                    "job": "pluginmon",
                                },
                                "exp_annotations": {
                                    "summary": "Plugin resizer (acme/production) has no running process",
                                    "description": "pluginmon finds no process for plugin resizer on h1:9464.",
                                },
                            }
                        ],
                    },
                    # Not yet: the process has been gone for less than `for: 1m` at 2m30s.
                    {"eval_time": "2m30s", "alertname": "PluginDown", "exp_alerts": []},
                    {
                        "eval_time": "20m",
                        "alertname": "PluginCpuHigh",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    "severity": "warning",
                                    "tenant": "acme",
                                    "plugin": "thumbs",
                                    "environment": "production",
                                    "instance": "h1:9464",
                                    "job": "pluginmon",
                                },
                                "exp_annotations": {
                                    "summary": "Plugin thumbs (acme) uses 95% CPU",
                                    "description": "Average CPU over 5 minutes has been above 80% of one core for 10 minutes.",
                                },
                            }
                        ],
                    },
                    {
                        "eval_time": "20m",
                        "alertname": "PluginHealthLow",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    "severity": "warning",
                                    "tenant": "acme",
                                    "plugin": "resizer",
                                    "environment": "production",
                                    "instance": "h1:9464",
                                    "job": "pluginmon",
                                },
                                "exp_annotations": {
                                    "summary": "Plugin resizer (acme) health score is 20",
                                    "description": "See pluginmon_plugin_health_component_score for the weakest component.",
                                },
                            }
                        ],
                    },
                    {
                        "eval_time": "8m",
                        "alertname": "PluginRestarting",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    "severity": "warning",
                                    "tenant": "acme",
                                    "plugin": "thumbs",
                                    "environment": "production",
                                    "instance": "h1:9464",
                                    "job": "pluginmon",
                                },
                                "exp_annotations": {
                                    "summary": "Plugin thumbs (acme) restarted 8 times in 15 minutes"
                                },
                            }
                        ],
                    },
                    {
                        "eval_time": "10m",
                        "alertname": "PluginmonScrapeDown",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    "severity": "critical",
                                    "instance": "h1:9464",
                                    "job": "pluginmon",
                                },
                                "exp_annotations": {
                                    "summary": "Prometheus cannot scrape pluginmon on h1:9464"
                                },
                            }
                        ],
                    },
                    {
                        "eval_time": "10m",
                        "alertname": "PluginmonDatabaseDown",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    "severity": "critical",
                                    "instance": "h1:9464",
                                    "job": "pluginmon",
                                },
                                "exp_annotations": {
                                    "summary": "pluginmon on h1:9464 cannot reach its database; samples go to the disk spool"
                                },
                            }
                        ],
                    },
                    {
                        "eval_time": "15m",
                        "alertname": "PluginmonSpoolGrowing",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    "severity": "warning",
                                    "instance": "h1:9464",
                                    "job": "pluginmon",
                                },
                                "exp_annotations": {
                                    "summary": "pluginmon on h1:9464 has 1.4k samples waiting in its spool",
                                    "description": "The spool has grown for 10 minutes; when it reaches its size cap, samples are dropped.",
                                },
                            }
                        ],
                    },
                    {"eval_time": "15m", "alertname": "PluginmonDroppingSamples", "exp_alerts": []},
                    {
                        "eval_time": "25m",
                        "alertname": "PluginmonDroppingSamples",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    "severity": "critical",
                                    "instance": "h1:9464",
                                    "job": "pluginmon",
                                    "reason": "spool_full",
                                },
                                "exp_annotations": {
                                    "summary": "pluginmon on h1:9464 dropped samples (reason spool_full)"
                                },
                            }
                        ],
                    },
                    {
                        "eval_time": "28m",
                        "alertname": "PluginmonJobFailing",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    "severity": "warning",
                                    "instance": "h1:9464",
                                    "job": "pluginmon",
                                    "task": "flush",
                                },
                                "exp_annotations": {
                                    "summary": "pluginmon job flush failed on h1:9464"
                                },
                            }
                        ],
                    },
                    # Samples are being taken: no false alarm.
                    {"eval_time": "20m", "alertname": "PluginmonNotSampling", "exp_alerts": []},
                ],
            }
        ],
    }


@needs_promtool
def test_rules_behave_under_promtool_unit_tests(tmp_path: Path) -> None:
    tests_file = tmp_path / "pluginmon_rules_test.yml"
    tests_file.write_text(yaml.safe_dump(_promtool_unit_tests(), sort_keys=False))
    result = _run("promtool", "test", "rules", str(tests_file))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


# -- Alertmanager ----------------------------------------------------------------------------


@needs_amtool
def test_alertmanager_config_passes_amtool() -> None:
    result = _run("amtool", "check-config", str(DEPLOY_DIR / "alertmanager.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@needs_amtool
@pytest.mark.parametrize(
    ("labels", "receivers"),
    [
        (
            ["alertname=PluginDown", "severity=critical", "tenant=acme"],
            "platform-webhook,acme-webhook",
        ),
        (["alertname=PluginCpuHigh", "severity=warning", "tenant=acme"], "acme-webhook"),
        (["alertname=PluginCpuHigh", "severity=warning", "tenant=zeta"], "platform-webhook"),
        (
            ["alertname=PluginmonDatabaseDown", "severity=critical", "instance=h1:9464"],
            "platform-webhook",
        ),
    ],
)
def test_alertmanager_routes(labels: list[str], receivers: str) -> None:
    result = _run(
        "amtool", "config", "routes", "test",
        "--config.file", str(DEPLOY_DIR / "alertmanager.yml"), *labels,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == receivers


def test_alertmanager_sends_to_a_webhook_with_resolved() -> None:
    config = load_yaml(DEPLOY_DIR / "alertmanager.yml")
    webhooks = [
        hook for receiver in config["receivers"] for hook in receiver.get("webhook_configs", [])
    ]
    assert webhooks
    assert all(hook["send_resolved"] is True for hook in webhooks)


# -- systemd ---------------------------------------------------------------------------------

UNIT_PATH = DEPLOY_DIR / "pluginmon.service"


def _service() -> dict[str, list[str]]:
    return parse_unit(UNIT_PATH.read_text())["Service"]


def test_unit_is_hardened() -> None:
    service = _service()

    def one(key: str) -> str:
        assert len(service.get(key, [])) == 1, f"{key} must be set exactly once"
        return service[key][0]

    assert one("User") == "pluginmon"
    assert one("StateDirectory") == "pluginmon"
    assert one("NoNewPrivileges") == "yes"
    assert one("ProtectSystem") == "strict"
    assert one("ReadWritePaths") == "/var/lib/pluginmon"
    assert one("ProtectHome") == "yes"
    assert one("PrivateTmp") == "yes"
    assert set(one("AmbientCapabilities").split()) == {"CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH"}
    assert set(one("CapabilityBoundingSet").split()) == {"CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH"}
    assert one("Restart") == "on-failure"
    assert one("EnvironmentFile").lstrip("-") == "/etc/pluginmon/pluginmon.env"
    assert one("KillMode") == "mixed"
    # Nothing that would hide other users' processes from the daemon.
    for hiding in ("ProtectProc", "ProcSubset", "PrivatePIDs", "PrivateUsers", "DynamicUser"):
        assert hiding not in service
    # The data directory the daemon is told about is the one systemd makes writable.
    assert "PLUGINMON_DATA_DIR=%S/pluginmon" in service["Environment"]


def test_unit_explains_its_capabilities() -> None:
    text = UNIT_PATH.read_text()
    before = text.split("AmbientCapabilities=")[0].splitlines()[-6:]
    comment = " ".join(line for line in before if line.startswith("#"))
    assert "CAP_SYS_PTRACE" in comment
    assert "CAP_DAC_READ_SEARCH" in comment


def test_unit_stop_timeout_exceeds_shutdown_deadline() -> None:
    from pluginmon.daemon.settings import Settings

    deadline = Settings.model_fields["shutdown_deadline_seconds"].default
    timeout = _service()["TimeoutStopSec"][0]
    match = re.fullmatch(r"(\d+)(s?)", timeout)
    assert match, f"TimeoutStopSec={timeout} should be plain seconds"
    assert int(match.group(1)) >= deadline + 10


def _verifiable_copy(tmp_path: Path) -> Path:
    # verify insists that ExecStart exists; the daemon is not installed at /opt/pluginmon on a
    # test machine, so only that path is swapped for a binary that exists.
    text = UNIT_PATH.read_text()
    exec_start = "ExecStart=/opt/pluginmon/bin/pluginmon "
    assert exec_start in text
    copy = tmp_path / "pluginmon.service"
    copy.write_text(text.replace(exec_start, "ExecStart=/bin/true "))
    return copy


@needs_systemd_analyze
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    result = _run("systemd-analyze", "verify", str(_verifiable_copy(tmp_path)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr.strip() == "", result.stderr


@needs_systemd_analyze
def test_unit_security_exposure_is_low(tmp_path: Path) -> None:
    result = _run(
        "systemd-analyze", "security", "--offline=true", "--no-pager",
        str(_verifiable_copy(tmp_path)),
    )  # fmt: skip
    if "--offline" in result.stderr and "unrecognized" in result.stderr:
        pytest.skip("this systemd-analyze has no offline security analysis (systemd < 250)")
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout[-2000:] + result.stderr
    exposure = float(match.group(1))
    print(f"systemd-analyze security exposure: {exposure}")
    # 0 is fully locked down, 10 unprotected; the two capabilities cost a little.
    assert exposure < 4.0


def test_unit_and_env_file_name_real_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from pluginmon.daemon.settings import ENV_PREFIX, Settings

    assignments: dict[str, str] = {}
    for value in _service()["Environment"]:
        key, _, setting = value.partition("=")
        assignments[key] = setting.replace("%S", "/var/lib")
    for line in (DEPLOY_DIR / "pluginmon.env.example").read_text().splitlines():
        line = line.lstrip("# ")
        if re.match(r"^[A-Z_]+=", line):
            key, _, setting = line.partition("=")
            assignments[key] = setting
    assert {"PLUGINMON_DATA_DIR", "PLUGINMON_DATABASE_URL"} <= assignments.keys()
    for key in assignments:
        assert key.startswith(ENV_PREFIX)
        assert key.removeprefix(ENV_PREFIX).lower() in Settings.model_fields, key
    # The daemon accepts them as they are written.
    for key, value in assignments.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert str(settings.data_dir) == "/var/lib/pluginmon"
    assert settings.database_url is not None
