"""Helpers for the dashboard and deploy tests: the metric contract, PromQL names, unit files."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

from dashboards.grafana_queries import QUOTED_STRING

REPO_ROOT = Path(__file__).resolve().parent.parent
DEPLOY_DIR = REPO_ROOT / "deploy"
DASHBOARDS_DIR = REPO_ROOT / "dashboards"

# The Prometheus metric contract (docs: /work/shared briefs, "Prometheus metric contract").
PLUGIN_METRICS = frozenset(
    {
        "pluginmon_plugin_up",
        "pluginmon_plugin_cpu_percent",
        "pluginmon_plugin_memory_rss_bytes",
        "pluginmon_plugin_memory_vms_bytes",
        "pluginmon_plugin_memory_uss_bytes",
        "pluginmon_plugin_memory_swap_bytes",
        "pluginmon_plugin_threads",
        "pluginmon_plugin_processes",
        "pluginmon_plugin_open_fds",
        "pluginmon_plugin_io_read_bytes_total",
        "pluginmon_plugin_io_write_bytes_total",
        "pluginmon_plugin_context_switches_total",
        "pluginmon_plugin_restarts_total",
        "pluginmon_plugin_start_time_seconds",
        "pluginmon_plugin_health_score",
        "pluginmon_plugin_health_component_score",
        "pluginmon_plugin_dependencies_unsatisfied",
        "pluginmon_alerts_firing",
    }
)
DAEMON_METRICS = frozenset(
    {
        "pluginmon_samples_total",
        "pluginmon_processes_seen",
        "pluginmon_process_read_errors_total",
        "pluginmon_rows_written_total",
        "pluginmon_spool_samples",
        "pluginmon_dropped_samples_total",
        "pluginmon_database_up",
        "pluginmon_notifications_total",
        "pluginmon_outbox_pending",
        "pluginmon_job_last_success_timestamp_seconds",
        "pluginmon_job_failures_total",
        "pluginmon_build_info",
    }
)
HISTOGRAMS = frozenset({"pluginmon_sample_duration_seconds", "pluginmon_write_duration_seconds"})
# Series Prometheus itself attaches to every scrape target.
SCRAPE_SYNTHETIC = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})
# prometheus-client's standard collectors are part of the contract by prefix.
STANDARD_PREFIXES = ("process_", "python_")

CONTRACT_METRICS = (
    PLUGIN_METRICS
    | DAEMON_METRICS
    | frozenset(
        f"{name}{suffix}" for name in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")
    )
)

# Label names that contract series (or Prometheus' target labels) carry.
CONTRACT_LABELS = frozenset(
    {
        "tenant",
        "plugin",
        "environment",
        "component",
        "kind",
        "alertname",
        "severity",
        "reason",
        "table",
        "receiver",
        "outcome",
        "version",
        "le",
        "task",  # pluginmon_job_*: the daemon's scheduler job
        # target labels added by Prometheus
        "job",
        "instance",
        "host",
        "__name__",
    }
)

_PROMQL_KEYWORDS = frozenset(
    {
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "and",
        "or",
        "unless",
        "offset",
        "atan2",
        "inf",
        "nan",
    }
)
_MATCHERS = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
_IDENT = re.compile(r"(?<![\w$:.])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?")
_MATCHER_LABEL = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")


def promql_metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (a small tokenizer, not a full PromQL parser).

    It relies on ``promtool`` having validated the syntax: strings, label matchers, ranges
    and grouping clauses are removed, then every identifier that is not a function call or a
    keyword is a metric name.
    """
    text = QUOTED_STRING.sub('""', expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    names: set[str] = set()
    for match in _IDENT.finditer(text):
        name, call = match.group(1), match.group(2)
        if call or name in _PROMQL_KEYWORDS:
            continue
        names.add(name)
    return names


def promql_label_names(expr: str) -> set[str]:
    """Label names used in matchers and grouping clauses."""
    text = QUOTED_STRING.sub('""', expr)
    labels: set[str] = set()
    for block in _MATCHERS.findall(text):
        labels.update(_MATCHER_LABEL.findall(block))
    for _keyword, inner in _GROUPING.findall(text):
        labels.update(part.strip() for part in inner.split(",") if part.strip())
    return labels


def is_contract_metric(name: str, recorded: Iterable[str] = ()) -> bool:
    return (
        name in CONTRACT_METRICS
        or name in SCRAPE_SYNTHETIC
        or name.startswith(STANDARD_PREFIXES)
        or name in set(recorded)
    )


def load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def rule_files() -> list[Path]:
    return sorted(DEPLOY_DIR.glob("*.rules.yml"))


def iter_rules() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in rule_files():
        for group in load_yaml(path)["groups"]:
            for rule in group["rules"]:
                yield path, rule


def recorded_names() -> set[str]:
    return {str(rule["record"]) for _path, rule in iter_rules() if "record" in rule}


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """A systemd unit as {section: {key: [values in order]}} (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"directive outside a section: {line!r}"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections
