"""Health tracking on its own: per-plugin history, settings per plugin, forgetting vanished
plugins, the health_score row labels (no database; injected times)."""

from __future__ import annotations

import json
from datetime import timedelta

from pluginmon.alerts.health import (
    CPU,
    RESTARTS,
    HealthConfig,
    HealthOverride,
    HealthSettings,
    MetricThreshold,
)
from pluginmon.alerts.matchers import PluginMatcher
from pluginmon.alerts.scoring import HealthTracker, health_labels_json
from pluginmon.collectors.models import PluginKey
from tests.alerts_helpers import T0, plugin_sample

API = PluginKey("acme", "api")
DB = PluginKey("acme", "db")
STAGING_DB = PluginKey("acme", "db", "staging")


def test_scores_follow_the_samples_and_keep_each_plugins_history() -> None:
    tracker = HealthTracker(HealthConfig(defaults=HealthSettings(restarts_critical=2)))
    first = tracker.score(
        [plugin_sample(API, T0, cpu=90), plugin_sample(DB, T0, restarts=1)], now=T0, metrics={}
    )
    assert [s.key for s in first] == [API, DB]
    cpu = first[0].component(CPU)
    assert cpu is not None
    assert (cpu.value, cpu.score) == (90.0, 50.0)  # warn 80, critical 100
    later = T0 + timedelta(seconds=10)
    (db,) = tracker.score([plugin_sample(DB, later, restarts=1)], now=later, metrics={})
    # the restart of the first sample is remembered: 2 in the window, critical 2
    assert db.restarts_in_window == 2
    restarts = db.component(RESTARTS)
    assert restarts is not None
    assert restarts.score == 0.0
    assert tracker.latest() == {API: first[0], DB: db}


def test_settings_per_plugin_and_the_metric_names_they_score() -> None:
    config = HealthConfig(
        defaults=HealthSettings(metrics=(MetricThreshold("queue_depth", 100, 1100),)),
        overrides=(
            HealthOverride(
                PluginMatcher(environment="staging"),
                {"cpu_warn_percent": 10.0, "metrics": (MetricThreshold("lag", 1, 2),)},
            ),
        ),
    )
    tracker = HealthTracker(config)
    assert tracker.metric_names == ("lag", "queue_depth")
    prod, staging = tracker.score(
        [plugin_sample(DB, T0, cpu=20), plugin_sample(STAGING_DB, T0, cpu=20)],
        now=T0,
        metrics={DB: {"queue_depth": 700.0}, STAGING_DB: {"queue_depth": 700.0, "lag": 1.5}},
    )
    assert prod.score == 85.0  # cpu, memory and restarts 100, queue_depth 40, equal weights
    queue = prod.component("metric:queue_depth")
    assert queue is not None
    assert (queue.value, queue.score) == (700.0, 40.0)
    assert prod.component("metric:lag") is None
    staging_cpu = staging.component(CPU)
    assert staging_cpu is not None
    assert staging_cpu.warn == 10.0
    lag = staging.component("metric:lag")
    assert lag is not None
    assert lag.score == 50.0


def test_a_plugin_gone_for_the_forget_period_is_forgotten() -> None:
    tracker = HealthTracker(HealthConfig(), forget_after_seconds=60)
    tracker.score([plugin_sample(API, T0), plugin_sample(DB, T0)], now=T0, metrics={})
    for seconds in (20, 40, 59):
        at = T0 + timedelta(seconds=seconds)
        tracker.score([plugin_sample(API, at)], now=at, metrics={})
    assert set(tracker.latest()) == {API, DB}
    at = T0 + timedelta(seconds=75)
    tracker.score([plugin_sample(API, at)], now=at, metrics={})
    assert set(tracker.latest()) == {API}
    # back again: scored from scratch (no restart history carried over)
    (db,) = tracker.score([plugin_sample(DB, at, restarts=1)], now=at, metrics={})
    assert db.restarts_in_window == 1


def test_health_labels_json_is_json_with_components_and_the_weakest() -> None:
    tracker = HealthTracker(HealthConfig())
    (score,) = tracker.score([plugin_sample(API, T0, cpu=90)], now=T0, metrics={})
    labels = json.loads(health_labels_json(score))
    assert labels["components"]["cpu"] == 50.0
    assert labels["components"]["up"] == 100.0
    assert labels["weakest"] == "cpu"
    assert labels["weakest_score"] == 50.0
    assert labels["weakest_detail"] == "cpu 90.0% (warn 80%, critical 100%)"
