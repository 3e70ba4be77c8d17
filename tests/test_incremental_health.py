"""The per-cycle shortcuts of a 10,000-plugin daemon give exactly what a full pass gives: the
incremental health tracker, the health-row schedule, the evaluator's cached plugin index
(pure: injected times, no database)."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta

import pytest

from pluginmon.alerts.health import (
    HealthConfig,
    HealthOverride,
    HealthScore,
    HealthSettings,
    MetricThreshold,
    PluginHistory,
    least_squares_slope,
    score_health,
)
from pluginmon.alerts.health_rows import HealthDue, HealthWriteSchedule
from pluginmon.alerts.matchers import PluginMatcher
from pluginmon.alerts.rules import Rule, RuleEvaluator
from pluginmon.alerts.scoring import HealthTracker
from pluginmon.collectors.models import PluginKey, PluginSample
from tests.alerts_helpers import MIB, T0, plugin_sample


class FullPass:
    """The tracker before it was incremental: every sample scored, every cycle."""

    def __init__(self, config: HealthConfig) -> None:
        self._config = config
        self._history: dict[PluginKey, PluginHistory] = {}
        self._settings: dict[PluginKey, HealthSettings] = {}

    def score(
        self,
        samples: Sequence[PluginSample],
        now: datetime,
        metrics: Mapping[PluginKey, Mapping[str, float]],
    ) -> list[HealthScore]:
        out = []
        for sample in samples:
            settings = self._settings.setdefault(sample.key, self._config.settings_for(sample.key))
            history = self._history.setdefault(
                sample.key,
                PluginHistory(
                    window_seconds=settings.leak_window_seconds,
                    min_points=settings.leak_min_points,
                ),
            )
            history.add(sample, restart_window_seconds=settings.restart_window_seconds)
            out.append(
                score_health(
                    sample,
                    settings=settings,
                    now=now,
                    restart_events=history.restart_events,
                    metrics=metrics.get(sample.key),
                    leak_slope=history.leak_slope,
                )
            )
        return out

    def forget(self, key: PluginKey) -> None:
        self._history.pop(key, None)
        self._settings.pop(key, None)


def essence(score: HealthScore) -> tuple[object, ...]:
    """Everything in a score but the time it was computed."""
    return (
        score.key,
        score.score,
        score.components,
        score.leak_slope_bytes_per_second,
        score.leak_forecast_seconds,
        score.restarts_in_window,
    )


def test_incremental_scores_equal_a_full_pass_through_churn_restarts_leaks_and_metrics() -> None:
    rng = random.Random(1234)
    config = HealthConfig(
        defaults=HealthSettings(
            restarts_critical=3,
            restart_window_seconds=120.0,
            leak_window_seconds=300.0,
            leak_min_points=4,
            memory_limit_bytes=400 * MIB,
        ),
        overrides=(
            HealthOverride(
                PluginMatcher(plugin="p0*"), {"metrics": (MetricThreshold("queue", 10, 110),)}
            ),
        ),
    )
    tracker = HealthTracker(config, forget_after_seconds=90.0)
    reference = FullPass(config)
    keys = [PluginKey(f"t{i % 3}", f"p{i:02d}") for i in range(40)]
    rss = {k: 50 * MIB + i * MIB for i, k in enumerate(keys)}
    cpu = {k: 5.0 for k in keys}
    up = dict.fromkeys(keys, True)
    present = list(keys)
    metrics: dict[PluginKey, dict[str, float]] = {}
    last_seen: dict[PluginKey, float] = {}
    rescored_total = 0
    for cycle in range(400):
        now = T0 + timedelta(seconds=5 * cycle)
        t = now.timestamp()
        # The fleet moves a little every cycle, as a real one does.
        for key in rng.sample(keys, 3):
            cpu[key] = rng.choice([0.0, 5.0, 85.0, 95.0, 120.0])
        for key in keys[:5]:  # steady leakers
            rss[key] += 2 * MIB
        if cycle % 7 == 0:
            flip = rng.choice(keys)
            up[flip] = not up[flip]
        if cycle % 11 == 0:  # churn: one leaves, one comes back, the order moves
            gone = rng.choice(present)
            present.remove(gone)
            back = [k for k in keys if k not in present]
            if back and rng.random() < 0.7:
                present.insert(rng.randrange(len(present) + 1), rng.choice(back))
        if cycle % 13 == 0:
            metrics = {k: {"queue": rng.uniform(0, 150)} for k in keys[:12] if rng.random() < 0.5}
        restarted = set(rng.sample(present, 1)) if cycle % 9 == 0 else set()
        samples = [
            plugin_sample(
                k,
                now,
                cpu=cpu[k],
                rss=rss[k],
                up=up[k],
                restarts=1 if k in restarted and up[k] else 0,
            )
            for k in present
        ]
        for key in present:
            last_seen[key] = t
        for key, seen in list(last_seen.items()):
            if key not in present and t - seen >= 90.0:
                reference.forget(key)  # the tracker forgets it too (checked below)
                del last_seen[key]
        changed_before = len(tracker.take_changed()[0])
        got = tracker.score(samples, now=now, metrics=metrics)
        want = reference.score(samples, now, metrics)
        assert [essence(s) for s in got] == [essence(s) for s in want], f"cycle {cycle}"
        rescored_total += len(tracker.take_changed()[0]) + changed_before
    # The point of it: most plugins are not scored again every cycle.
    assert rescored_total < 40 * 400 / 2


def test_an_unchanged_plugin_keeps_its_score_object_and_changes_are_reported() -> None:
    tracker = HealthTracker(HealthConfig(), forget_after_seconds=60)
    api, db = PluginKey("acme", "api"), PluginKey("acme", "db")
    first = tracker.score([plugin_sample(api, T0), plugin_sample(db, T0)], now=T0, metrics={})
    changed, removed = tracker.take_changed()
    assert changed == {api: first[0], db: first[1]}
    assert removed == set()
    at = T0 + timedelta(seconds=10)
    again = tracker.score(
        [plugin_sample(api, at), plugin_sample(db, at, cpu=95.0)], now=at, metrics={}
    )
    assert again[0] is first[0]  # nothing moved: the same object
    assert again[1] is not first[1]
    assert again[1].score < first[1].score
    assert tracker.take_changed() == ({db: again[1]}, set())
    # db leaves; after the forget period it is reported as removed
    for seconds in (30, 60, 80):
        at = T0 + timedelta(seconds=seconds)
        tracker.score([plugin_sample(api, at)], now=at, metrics={})
    changed, removed = tracker.take_changed()
    assert removed == {db}
    assert set(tracker.latest()) == {api}


def test_a_restart_in_two_consecutive_cycles_counts_twice_and_expires() -> None:
    settings = HealthSettings(restart_window_seconds=30.0, restarts_critical=4)
    tracker = HealthTracker(HealthConfig(defaults=settings))
    key = PluginKey("acme", "flappy")
    counts = []
    for seconds, restarts in ((0, 1), (10, 1), (20, 0), (30, 0), (40, 0), (50, 0)):
        at = T0 + timedelta(seconds=seconds)
        (score,) = tracker.score([plugin_sample(key, at, restarts=restarts)], now=at, metrics={})
        counts.append(score.restarts_in_window)
    # the same inputs twice (restarts=1) are two restarts; they leave the 30 s window
    assert counts == [1, 2, 2, 1, 0, 0]


def scores_for(keys: Sequence[PluginKey], values: Sequence[float]) -> list[HealthScore]:
    settings = HealthSettings()
    return [
        score_health(
            plugin_sample(k, T0, cpu=80.0 + (100.0 - v) / 5.0 if v < 100 else 5.0),
            settings=settings,
            now=T0,
        )
        for k, v in zip(keys, values, strict=True)
    ]


def written_rows(due: Sequence[HealthDue]) -> list[int]:
    return [d.index for d in due if d.row]


def test_health_rows_on_change_else_at_the_interval_spread_over_it() -> None:
    schedule = HealthWriteSchedule(row_interval_seconds=60.0, plugin_interval_seconds=60.0)
    keys = [PluginKey("acme", f"p{i:03d}") for i in range(120)]
    scores = scores_for(keys, [100.0] * 120)
    t = T0.timestamp()
    due = schedule.due(scores, t)
    assert written_rows(due) == list(range(120))  # first cycle: every plugin
    assert all(d.plugin for d in due)
    schedule.written(due, t)
    per_cycle = []
    for cycle in range(1, 61):  # one minute at 1 s: the same score objects
        now = t + cycle
        due = schedule.due(scores, now)
        schedule.written(due, now)
        per_cycle.append(len(written_rows(due)))
    # every plugin got its periodic row within the interval, spread: never all at once
    assert sum(per_cycle) == 120
    assert max(per_cycle) <= 6
    # then a change is written at once, a wobble below 0.5 is not
    moved = scores_for(keys, [100.0] * 119 + [60.0])
    wobble = list(moved)
    wobble[0] = HealthScore(
        key=scores[0].key,
        timestamp=scores[0].timestamp,
        score=scores[0].score - 0.25,
        components=scores[0].components,
    )
    now = t + 61
    due = schedule.due([wobble[0], *scores[1:119], moved[119]], now)
    assert 119 in written_rows(due)
    assert 0 not in written_rows(due)


def test_health_rows_when_the_weakest_component_changes_and_after_a_failed_write() -> None:
    schedule = HealthWriteSchedule(row_interval_seconds=300.0, plugin_interval_seconds=60.0)
    key = PluginKey("acme", "api")
    settings = HealthSettings(memory_warn_bytes=100 * MIB, memory_critical_bytes=200 * MIB)
    cpu_weak = score_health(
        plugin_sample(key, T0, cpu=95.0, rss=125 * MIB), settings=settings, now=T0
    )
    mem_weak = score_health(
        plugin_sample(key, T0, cpu=85.0, rss=175 * MIB), settings=settings, now=T0
    )
    # cpu 25 + memory 75 + restarts 100, then cpu 75 + memory 25 + restarts 100
    assert cpu_weak.score == mem_weak.score
    assert (
        cpu_weak.weakest and cpu_weak.weakest.name,
        mem_weak.weakest and mem_weak.weakest.name,
    ) == ("cpu", "memory")
    t = T0.timestamp()
    schedule.written(schedule.due([cpu_weak], t), t)
    (due,) = schedule.due([mem_weak], t + 1)
    assert due.row  # same score, another weakest component
    # not recorded (the write failed): due again next cycle
    (again,) = schedule.due([mem_weak], t + 2)
    assert again.row
    schedule.written([again], t + 2)
    assert schedule.due([mem_weak], t + 3) == []


def test_health_rows_every_cycle_with_interval_zero_and_plugins_updates_keep_their_rule() -> None:
    schedule = HealthWriteSchedule(row_interval_seconds=0.0, plugin_interval_seconds=60.0)
    key = PluginKey("acme", "api")
    steady = scores_for([key], [100.0])
    t = T0.timestamp()
    flags = []
    for cycle in range(7):
        due = schedule.due(steady, t + 10 * cycle)
        schedule.written(due, t + 10 * cycle)
        flags.append([(d.row, d.plugin) for d in due])
    # a row every cycle; plugins.health_score at first, then not before 60 s (spread: the
    # first periodic rewrite comes within the interval, the next a full interval later)
    assert all(f and f[0][0] for f in flags)
    plugin_writes = [c for c, f in enumerate(flags) if f[0][1]]
    assert plugin_writes[0] == 0
    assert len(plugin_writes) == 2


def test_the_evaluator_follows_plugins_that_move_or_leave() -> None:
    rule = Rule(name="Hot", metric="cpu_percent", op=">", threshold=50, for_seconds=20)
    evaluator = RuleEvaluator([rule])
    a, b, c = (PluginKey("acme", n) for n in ("a", "b", "c"))
    kinds = []
    orders = [(a, b, c), (c, b, a), (b, a), (a, b, c)]
    for cycle, order in enumerate(orders):
        at = T0 + timedelta(seconds=10 * cycle)
        samples = [plugin_sample(k, at, cpu=90.0 if k == b else 5.0) for k in order]
        changes = evaluator.evaluate(samples, at.timestamp())
        kinds.append([(ch.key.plugin, ch.transition.kind.value) for ch in changes])
    # b is pending from the first cycle and fires 20 s later whatever its position
    assert kinds == [[("b", "pending")], [], [("b", "firing")], []]
    assert evaluator.index([plugin_sample(c, T0), plugin_sample(a, T0)]) == {c: 0, a: 1}


@pytest.mark.parametrize("interval", [-1.0])
def test_health_write_schedule_refuses_negative_intervals(interval: float) -> None:
    with pytest.raises(ValueError, match=">= 0"):
        HealthWriteSchedule(row_interval_seconds=interval, plugin_interval_seconds=60)


def test_history_slope_is_the_least_squares_slope_of_its_points_to_the_last_bit() -> None:
    rng = random.Random(99)
    history = PluginHistory(window_seconds=600.0, max_points=20, min_points=4)
    key = PluginKey("acme", "leaky")
    rss = 100 * MIB
    slopes = []
    for step in range(300):
        rss += int(rng.uniform(-0.5, 2.0) * MIB)
        up = step % 97 != 50  # a restart in between clears the points
        history.add(
            plugin_sample(key, T0 + timedelta(seconds=7 * step), rss=rss, up=up),
            restart_window_seconds=60.0,
        )
        points = history.rss_points
        assert len(points) <= 21
        want = least_squares_slope(points) if len(points) >= 4 else None
        assert history.leak_slope == want
        slopes.append(want)
    assert sum(s is not None and s > 0 for s in slopes) > 200
