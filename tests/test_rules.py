"""Rule parsing, templating, fingerprints and the pure state machine (injected clock)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from pluginmon.alerts.matchers import PluginMatcher
from pluginmon.alerts.rules import (
    AlertState,
    Phase,
    Rule,
    RuleEvaluator,
    TransitionKind,
    alert_labels,
    builtin_rules,
    fingerprint,
    render_annotations,
    step,
)
from pluginmon.collectors.models import PluginKey, PluginSample
from pluginmon.daemon.config_schema import ConfigError
from pluginmon.daemon.config_sections import parse_alertmanager, parse_rules, parse_webhooks

KEY = PluginKey("acme", "resizer", "production")


def sample(cpu: float, *, key: PluginKey = KEY, up: bool = True, t: float = 0.0) -> PluginSample:
    return PluginSample(
        key=key,
        timestamp=datetime.fromtimestamp(t, UTC),
        up=up,
        process_count=1 if up else 0,
        cpu_percent=cpu,
        rss_bytes=100 << 20,
        vms_bytes=200 << 20,
        threads=4,
    )


def test_parse_rules_merges_over_builtins() -> None:
    rules = parse_rules(
        [
            {
                "name": "PluginCpuHigh",
                "metric": "cpu_percent",
                "op": ">",
                "threshold": 50,
                "clear_threshold": 40,
                "for_seconds": 5,
                "severity": "critical",
                "labels": {"team": "imaging"},
                "annotations": {"summary": "{plugin} at {value:.1f}% > {threshold:g}"},
                "matchers": [{"tenant": "acme", "plugin": "resize*"}],
            },
            {"name": "QueueDeep", "metric": "queue_depth", "op": ">=", "threshold": 1000},
        ]
    )
    by_name = {r.name: r for r in rules}
    assert set(by_name) == {
        "PluginDown",
        "PluginCpuHigh",
        "PluginMemoryHigh",
        "PluginHealthLow",
        "PluginMemoryLeakForecast",
        "PluginOperationFailed",
        "PluginOperationStuck",
        "PluginDependencyUnsatisfied",
        "PluginBackupStale",
        "PluginBackupVerificationFailed",
        "PluginVulnerabilityCritical",
        "QueueDeep",
    }
    cpu = by_name["PluginCpuHigh"]
    assert (cpu.threshold, cpu.clear_threshold, cpu.for_seconds, cpu.severity) == (
        50.0,
        40.0,
        5.0,
        "critical",
    )
    assert cpu.applies_to(KEY)
    assert not cpu.applies_to(PluginKey("other", "resizer"))
    assert render_annotations(cpu, KEY, 73.25) == {"summary": "resizer at 73.2% > 50"}
    assert by_name["QueueDeep"].severity == "warning"


def test_parse_rules_lists_every_problem_by_rule_and_field() -> None:
    with pytest.raises(ConfigError) as info:
        parse_rules(
            [
                {"name": "Ok", "metric": "cpu_percent", "op": ">", "threshold": 1},
                {"name": "PluginCpuHigh", "metric": "cpu_percent", "op": "=>", "threshold": 80},
                {
                    "name": "Bad",
                    "metric": "cpu_percent",
                    "op": ">",
                    "threshold": 80,
                    "clear_threshold": 90,
                    "severity": "page",
                    "for_seconds": -1,
                    "labels": {"alertname": "x"},
                    "annotations": {"summary": "{value.__class__}", "d": "{secret}"},
                    "colour": "red",
                },
                {"metric": "cpu_percent", "op": ">", "threshold": "high"},
            ]
        )
    problems = dict(info.value.located)
    assert problems["alerts.rules[1] (PluginCpuHigh).op"] == "must be one of > >= < <= == !="
    assert problems["alerts.rules[2] (Bad).clear_threshold"] == "must be <= threshold (80) for op >"
    assert problems["alerts.rules[2] (Bad).severity"] == "must be one of info, warning, critical"
    assert "alerts.rules[2] (Bad).for_seconds" in problems
    assert "alerts.rules[2] (Bad).labels.alertname" in problems
    assert problems["alerts.rules[2] (Bad).annotations.summary"].startswith(
        "unknown placeholder {value.__class__}"
    )
    assert problems["alerts.rules[2] (Bad).annotations.d"].startswith(
        "unknown placeholder {secret}"
    )
    assert problems["alerts.rules[2] (Bad).colour"] == "unknown field"
    assert "alerts.rules[3].name" in problems
    assert problems["alerts.rules[3].threshold"] == "required number"
    assert not any(where.startswith("alerts.rules[0]") for where, _ in info.value.located)


def test_parse_webhooks_and_alertmanager() -> None:
    hooks = parse_webhooks(
        [
            {"url": "https://hooks.example/a", "secret": "s3cret", "timeout_seconds": 2},
            {"name": "ops", "url": "http://127.0.0.1:9/x", "send_resolved": False},
        ]
    )
    assert hooks[0].name == "webhook-0"
    assert hooks[0].secret == "s3cret"
    assert "s3cret" not in repr(hooks[0])
    assert hooks[0].timeout_seconds == 2.0
    assert hooks[1].send_resolved is False
    with pytest.raises(ConfigError) as info:
        parse_webhooks([{"url": "ftp://x", "secret": "zzz-never-shown", "max_attempts": 0}])
    problems = dict(info.value.located)
    assert problems["alerts.webhooks[0].url"] == "must be an http:// or https:// URL"
    assert "alerts.webhooks[0].max_attempts" in problems
    assert "zzz-never-shown" not in str(info.value)
    am = parse_alertmanager({"url": "http://127.0.0.1:9093/"})
    assert am is not None
    assert am.url == "http://127.0.0.1:9093"
    assert parse_alertmanager(None) is None


def test_give_up_policy_is_time_based_by_default() -> None:
    (default, never, capped) = parse_webhooks(
        [
            {"url": "http://127.0.0.1:9/a"},
            {"url": "http://127.0.0.1:9/b", "give_up_after_seconds": 0},
            {"url": "http://127.0.0.1:9/c", "give_up_after_seconds": 600, "max_attempts": 5},
        ]
    )
    assert (default.give_up_after_seconds, default.max_attempts) == (86400.0, None)
    assert (never.give_up_after_seconds, never.max_attempts) == (0.0, None)
    assert (capped.give_up_after_seconds, capped.max_attempts) == (600.0, 5)
    with pytest.raises(ConfigError) as info:
        parse_webhooks([{"url": "http://127.0.0.1:9/a", "give_up_after_seconds": -1}])
    assert dict(info.value.located) == {
        "alerts.webhooks[0].give_up_after_seconds": "must be a number >= 0 (0 = never)"
    }
    am = parse_alertmanager({"url": "http://127.0.0.1:9093", "give_up_after_seconds": 0})
    assert am is not None
    assert (am.give_up_after_seconds, am.max_attempts) == (0.0, None)
    with pytest.raises(ConfigError) as info:
        parse_alertmanager({"url": "http://127.0.0.1:9093", "give_up_after_seconds": "x"})
    assert "alerts.alertmanager.give_up_after_seconds" in dict(info.value.located)


def test_fingerprint_is_stable_and_label_order_free() -> None:
    rule = builtin_rules()[1]
    labels = alert_labels(rule, KEY)
    assert labels == {
        "alertname": "PluginCpuHigh",
        "environment": "production",
        "plugin": "resizer",
        "severity": "warning",
        "tenant": "acme",
    }
    fp = fingerprint(labels)
    assert fp == fingerprint(dict(reversed(list(labels.items()))))
    assert len(fp) == 16
    assert fp != fingerprint(alert_labels(rule, PluginKey("acme", "resizer", "staging")))
    on_a, on_b = alert_labels(rule, KEY, "host-a"), alert_labels(rule, KEY, "host-b")
    assert on_a["instance"] == "host-a"
    assert len({fp, fingerprint(on_a), fingerprint(on_b)}) == 3


def test_for_and_resolution() -> None:
    rule = Rule(name="CpuHigh", metric="cpu_percent", op=">", threshold=80, for_seconds=30)
    state, tr = step(rule, None, 90.0, 100.0)
    assert tr is not None
    assert tr.kind is TransitionKind.PENDING
    assert state == AlertState(Phase.PENDING, 100.0, 100.0, 90.0)
    state, tr = step(rule, state, 95.0, 120.0)
    assert tr is None
    assert state is not None
    assert state.phase is Phase.PENDING
    state, tr = step(rule, state, 95.0, 130.0)
    assert tr is not None
    assert tr.kind is TransitionKind.FIRING
    assert state is not None
    assert (state.phase, state.active_since, state.fired_at) == (Phase.FIRING, 100.0, 130.0)
    state, tr = step(rule, state, 10.0, 140.0)
    assert state is None
    assert tr is not None
    assert (tr.kind, tr.at, tr.value) == (TransitionKind.RESOLVED, 140.0, 10.0)
    # pending that clears before `for` never fires
    state, tr = step(rule, None, 90.0, 200.0)
    state, tr = step(rule, state, 50.0, 210.0)
    assert state is None
    assert tr is not None
    assert tr.kind is TransitionKind.CANCELLED


def test_keep_firing_for() -> None:
    rule = Rule(name="R", metric="cpu_percent", op=">", threshold=80, keep_firing_for_seconds=20)
    state, tr = step(rule, None, 90.0, 0.0)
    assert tr is not None
    assert tr.kind is TransitionKind.FIRING
    state, tr = step(rule, state, 10.0, 10.0)
    assert (state is not None, tr) == (True, None)
    state, tr = step(rule, state, 10.0, 19.9)
    assert (state is not None, tr) == (True, None)
    state, tr = step(rule, state, 10.0, 20.0)
    assert state is None
    assert tr is not None
    assert tr.kind is TransitionKind.RESOLVED


def test_hysteresis_stops_flapping_around_the_threshold() -> None:
    values = [79.0, 81.0, 79.5, 80.5, 79.0, 81.0, 78.0, 82.0, 79.0, 81.0]
    plain = Rule(name="R", metric="cpu_percent", op=">", threshold=80)
    damped = Rule(name="R", metric="cpu_percent", op=">", threshold=80, clear_threshold=70)

    def kinds(rule: Rule, series: list[float]) -> list[str]:
        state: AlertState | None = None
        out = []
        for i, v in enumerate(series):
            state, tr = step(rule, state, v, float(i))
            if tr is not None:
                out.append(tr.kind.value)
        return out

    assert kinds(plain, values) == ["firing", "resolved"] * 4 + ["firing"]
    assert kinds(damped, values) == ["firing"]
    assert kinds(damped, [*values, 65.0]) == ["firing", "resolved"]


def test_lower_is_worse_rule_and_missing_values() -> None:
    rule = Rule(name="Low", metric="health_score", op="<", threshold=50, clear_threshold=60)
    state, tr = step(rule, None, None, 0.0)
    assert (state, tr) == (None, None)
    state, _ = step(rule, None, 40.0, 0.0)
    state, tr = step(rule, state, 55.0, 1.0)
    assert tr is None  # 55 < 60 still holds
    state, tr = step(rule, state, None, 2.0)
    assert state is None
    assert tr is not None
    assert tr.kind is TransitionKind.RESOLVED


def test_evaluator_over_many_plugins() -> None:
    rules = [
        Rule(name="CpuHigh", metric="cpu_percent", op=">", threshold=80, for_seconds=10),
        Rule(name="Down", metric="up", op="==", threshold=0),
        Rule(
            name="OnlyAcme",
            metric="threads",
            op=">",
            threshold=1,
            matchers=(PluginMatcher(tenant="acme"),),
        ),
    ]
    ev = RuleEvaluator(rules)
    keys = [PluginKey("acme" if i % 2 else "beta", f"p{i}") for i in range(10)]
    samples = [sample(90.0 if i < 3 else 10.0, key=k, up=i != 9) for i, k in enumerate(keys)]
    changes = ev.evaluate(samples, 0.0)
    got = sorted((c.rule.name, c.key.plugin, c.transition.kind.value) for c in changes)
    assert ("CpuHigh", "p0", "pending") in got
    assert ("Down", "p9", "firing") in got
    assert sum(1 for g in got if g[0] == "OnlyAcme") == 5  # acme plugins: 1,3,5,7,9
    assert sum(1 for g in got if g[0] == "CpuHigh") == 3
    changes = ev.evaluate(samples, 10.0)
    assert sorted((c.rule.name, c.key.plugin) for c in changes) == [
        ("CpuHigh", "p0"),
        ("CpuHigh", "p1"),
        ("CpuHigh", "p2"),
    ]
    assert all(c.transition.kind is TransitionKind.FIRING for c in changes)


def test_plugin_metric_rules_see_only_the_plugins_that_have_the_metric() -> None:
    rules = [
        Rule(name="QueueDeep", metric="queue_depth", op=">", threshold=5),
        Rule(name="QueueEmpty", metric="queue_depth", op="==", threshold=0),
        Rule(name="ErrorsLow", metric="error_rate", op="<", threshold=1),
    ]
    ev = RuleEvaluator(rules)
    keys = [PluginKey("acme", f"p{i}") for i in range(6)]
    samples = [sample(1.0, key=k) for k in keys]
    metrics = {
        keys[1]: {"queue_depth": 9.0},
        keys[2]: {"queue_depth": 0.0, "error_rate": 0.5},
        keys[4]: {"queue_depth": 2.0},
        keys[5]: {},  # scraped, without these names
    }
    changes = ev.evaluate(samples, 0.0, metrics=metrics)
    assert sorted((c.rule.name, c.key.plugin, c.transition.kind.value) for c in changes) == [
        ("ErrorsLow", "p2", "firing"),
        ("QueueDeep", "p1", "firing"),
        ("QueueEmpty", "p2", "firing"),
    ]
    # A firing plugin whose metric went away resolves; one whose value drops clears; the
    # value a firing state keeps is its plugin's own.
    metrics = {keys[1]: {"queue_depth": 7.0}, keys[2]: {"error_rate": 0.25}}
    changes = ev.evaluate(samples, 1.0, metrics=metrics)
    assert sorted((c.rule.name, c.key.plugin, c.transition.kind.value) for c in changes) == [
        ("QueueEmpty", "p2", "resolved"),
    ]
    state = ev.state("QueueDeep", keys[1])
    assert state is not None
    assert state.value == 7.0
    # No metrics at all: every plugin-metric state resolves, nothing new fires.
    changes = ev.evaluate(samples, 2.0)
    assert sorted((c.rule.name, c.key.plugin, c.transition.kind.value) for c in changes) == [
        ("ErrorsLow", "p2", "resolved"),
        ("QueueDeep", "p1", "resolved"),
    ]
