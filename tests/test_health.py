"""Health scores move with injected samples exactly as docs/alerts.md says (injected clock)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from pluginmon.alerts.health import (
    CPU,
    LEAK,
    MEMORY,
    MEMORY_LIMIT,
    RESTARTS,
    HealthSettings,
    HealthWeights,
    MetricThreshold,
    PluginHistory,
    least_squares_slope,
    linear_score,
    score_health,
)
from pluginmon.collectors.models import PluginKey, PluginSample
from pluginmon.daemon.config_health import parse_health_config
from pluginmon.daemon.config_schema import ConfigError

KEY = PluginKey("acme", "resizer", "production")
T0 = datetime(2026, 1, 1, tzinfo=UTC)
MIB = 1 << 20


def sample(
    *, cpu: float = 10.0, rss: int = 100 * MIB, up: bool = True, restarts: int = 0, t: float = 0.0
) -> PluginSample:
    return PluginSample(
        key=KEY,
        timestamp=T0 + timedelta(seconds=t),
        up=up,
        process_count=1 if up else 0,
        cpu_percent=cpu,
        rss_bytes=rss if up else 0,
        vms_bytes=2 * rss,
        threads=3,
        restarts=restarts,
    )


SETTINGS = HealthSettings(
    cpu_warn_percent=50,
    cpu_critical_percent=100,
    memory_warn_bytes=200 * MIB,
    memory_critical_bytes=400 * MIB,
)


def test_linear_score_and_slope() -> None:
    assert linear_score(40, 50, 100) == 100.0
    assert linear_score(75, 50, 100) == 50.0
    assert linear_score(120, 50, 100) == 0.0
    assert linear_score(0.5, 0.9, 0.1) == 50.0  # lower is worse
    assert least_squares_slope([(0, 1), (1, 3), (2, 5)]) == pytest.approx(2.0)
    assert least_squares_slope([(1, 1), (1, 2)]) is None


def test_healthy_plugin_scores_100() -> None:
    score = score_health(sample(), settings=SETTINGS, now=T0)
    assert score.score == 100.0
    assert {c.name for c in score.components} == {"up", CPU, MEMORY, RESTARTS}


def test_cpu_moves_the_score_as_documented() -> None:
    # cpu 75% is halfway from warn 50 to critical 100: cpu component 50; the others are 100,
    # weights cpu=memory=restarts=1 -> (50 + 100 + 100) / 3
    score = score_health(sample(cpu=75), settings=SETTINGS, now=T0)
    cpu = score.component(CPU)
    assert cpu is not None
    assert cpu.score == 50.0
    assert score.score == pytest.approx(83.33, abs=0.01)
    assert score.weakest is not None
    assert score.weakest.name == CPU
    assert score.weakest.detail == "cpu 75.0% (warn 50%, critical 100%)"
    heavier = HealthSettings(
        cpu_warn_percent=50,
        cpu_critical_percent=100,
        memory_warn_bytes=200 * MIB,
        memory_critical_bytes=400 * MIB,
        weights=HealthWeights(cpu=2.0),
    )
    assert score_health(sample(cpu=75), settings=heavier, now=T0).score == pytest.approx(75.0)
    assert score_health(sample(cpu=150), settings=SETTINGS, now=T0).score == pytest.approx(
        66.67, abs=0.01
    )


def test_down_is_a_gate_and_memory_limit_counts() -> None:
    down = score_health(sample(up=False), settings=SETTINGS, now=T0)
    assert down.score == 0.0
    assert down.weakest is not None
    assert down.weakest.name == "up"
    limited = HealthSettings(
        memory_warn_bytes=None,
        memory_critical_bytes=None,
        memory_limit_bytes=1000 * MIB,
        memory_limit_warn_ratio=0.5,
        memory_limit_critical_ratio=1.0,
    )
    score = score_health(sample(rss=750 * MIB), settings=limited, now=T0)
    lim = score.component(MEMORY_LIMIT)
    assert lim is not None
    assert lim.value == pytest.approx(0.75)
    assert lim.score == pytest.approx(50.0)
    assert score.component(MEMORY) is None


def test_restarts_in_window_only() -> None:
    settings = HealthSettings(restart_window_seconds=600, restarts_critical=4)
    history = PluginHistory(window_seconds=1800)
    for t, restarts in [(0, 2), (400, 1), (900, 1)]:
        history.add(sample(restarts=restarts, t=t), restart_window_seconds=600)
    score = score_health(
        sample(t=900),
        settings=settings,
        now=T0 + timedelta(seconds=900),
        restart_events=history.restart_events,
    )
    # the restarts at t=0 fell out of the 600 s window: 1 + 1 = 2 of critical 4 -> 50
    assert score.restarts_in_window == 2
    component = score.component(RESTARTS)
    assert component is not None
    assert component.score == 50.0


def test_leak_slope_and_forecast() -> None:
    settings = HealthSettings(
        memory_warn_bytes=None,
        memory_critical_bytes=None,
        memory_limit_bytes=1000 * MIB,
        leak_window_seconds=600,
        leak_min_points=5,
        leak_warn_seconds=2000,
        leak_critical_seconds=1000,
    )
    history = PluginHistory(window_seconds=600, max_points=61)
    # +1 MiB every 10 s = 0.1 MiB/s; at t=600 rss = 160 MiB -> 840 MiB left -> 8400 s
    last = None
    for i in range(61):
        last = sample(rss=(100 + i) * MIB, t=i * 10.0)
        history.add(last, restart_window_seconds=3600)
    assert last is not None
    now = T0 + timedelta(seconds=600)
    score = score_health(last, settings=settings, now=now, rss_points=history.rss_points)
    assert score.leak_slope_bytes_per_second == pytest.approx(0.1 * MIB)
    assert history.leak_slope == pytest.approx(0.1 * MIB)
    assert score_health(last, settings=settings, now=now, leak_slope=history.leak_slope) == score
    assert score.leak_forecast_seconds == pytest.approx(8400.0)
    leak = score.component(LEAK)
    assert leak is not None
    assert leak.score == 100.0  # 8400 s is beyond leak_warn_seconds
    # closer to the limit: forecast 1500 s is halfway between warn 2000 and critical 1000
    near = sample(rss=1000 * MIB - int(1500 * 0.1 * MIB), t=600)
    points = [(t, y + (near.rss_bytes - 160 * MIB)) for t, y in history.rss_points]
    score = score_health(near, settings=settings, now=now, rss_points=points)
    assert score.leak_forecast_seconds == pytest.approx(1500.0)
    leak = score.component(LEAK)
    assert leak is not None
    assert leak.score == pytest.approx(50.0)
    # flat memory: no forecast, full leak score
    flat = [(T0.timestamp() + t, float(100 * MIB)) for t in range(0, 610, 10)]
    score = score_health(sample(t=600), settings=settings, now=now, rss_points=flat)
    assert score.leak_forecast_seconds is None
    leak = score.component(LEAK)
    assert leak is not None
    assert leak.score == 100.0


def test_history_is_bounded() -> None:
    history = PluginHistory(window_seconds=100, max_points=11)
    for i in range(1000):
        history.add(sample(t=i * 0.5), restart_window_seconds=60)
    assert len(history.rss_points) <= 13
    # one point per 10 s slot (100 s / (11 - 1)); the slope is refitted per new point
    assert history.rss_points[-1][0] == (T0 + timedelta(seconds=490)).timestamp()
    assert history.leak_slope == 0.0


def test_plugin_metric_thresholds() -> None:
    settings = HealthSettings(
        memory_warn_bytes=None,
        memory_critical_bytes=None,
        metrics=(MetricThreshold("queue_depth", warn=100, critical=300, weight=2),),
    )
    score = score_health(sample(), settings=settings, now=T0, metrics={"queue_depth": 200})
    # cpu 100 (weight 1), restarts 100 (1), metric:queue_depth 50 (2) -> 300 / 4
    assert score.score == 75.0
    assert score.weakest is not None
    assert score.weakest.name == "metric:queue_depth"


def test_parse_health_config_with_overrides() -> None:
    config = parse_health_config(
        {
            "cpu_warn_percent": 60,
            "weights": {"cpu": 2},
            "metrics": [{"name": "queue_depth", "warn": 10, "critical": 20}],
            "plugins": [
                {
                    "tenant": "acme",
                    "plugin": "resizer",
                    "memory_limit_bytes": 512 * MIB,
                    "weights": {"memory": 3},
                },
            ],
        }
    )
    base = config.settings_for(PluginKey("beta", "x"))
    assert base.cpu_warn_percent == 60
    assert base.weights.cpu == 2
    assert base.memory_limit_bytes is None
    special = config.settings_for(KEY)
    assert special.memory_limit_bytes == 512 * MIB
    assert (special.weights.cpu, special.weights.memory) == (2, 3)
    with pytest.raises(ConfigError) as info:
        parse_health_config(
            {
                "cpu_warn_percent": -1,
                "weights": {"disk": 1},
                "plugins": [{"memory_limit_bytes": "lots"}],
            }
        )
    problems = dict(info.value.located)
    assert problems["health.cpu_warn_percent"] == "must be a number >= 0"
    assert problems["health.weights.disk"].startswith("unknown component")
    assert "health.plugins[0]" in problems
    assert "health.plugins[0].memory_limit_bytes" in problems
