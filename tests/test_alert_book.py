"""The alert book on its own: states, vanished plugins, inhibition, silences, acknowledgements
(no database; ``now`` is injected as unix seconds)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

from pluginmon.alerts.book import AlertBook, AlertRecord, SilenceRule
from pluginmon.alerts.rules import Rule
from pluginmon.collectors.models import PluginKey, PluginSample
from tests.alerts_helpers import T0, plugin_sample

T = T0.timestamp()
API = PluginKey("acme", "api", "production")
DB = PluginKey("acme", "db", "production")
DB_STAGING = PluginKey("acme", "db", "staging")
API_STAGING = PluginKey("acme", "api", "staging")
HOT = Rule(name="Hot", metric="cpu_percent", op=">", threshold=50, for_seconds=10)
DOWN = Rule(name="Down", metric="up", op="==", threshold=0)


def at(seconds: float) -> float:
    return T + seconds


def when(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def restore(
    book: AlertBook,
    key: PluginKey,
    fingerprint: str,
    *,
    started: float,
    fired: float | None,
    notified: bool,
    rule_name: str = "Hot",
    severity: str = "warning",
) -> AlertRecord:
    """An open alert as a previous process stored it (restored at T0)."""
    return book.restore(
        rule_name=rule_name,
        key=key,
        labels={"alertname": rule_name, "plugin": key.plugin},
        fingerprint_=fingerprint,
        severity=severity,
        started_at=at(started),
        last_active_at=at(-1),
        fired_at=None if fired is None else at(fired),
        value=90.0,
        annotations={},
        inhibited=False,
        silenced_until=None,
        acknowledged=False,
        notified=notified,
        now=at(0),
    )


def cycle(
    book: AlertBook, seconds: float, **cpu: float
) -> tuple[list[tuple[str, str, str]], list[AlertRecord]]:
    """Evaluate plugins of tenant acme (production) at T0 + ``seconds``; returns the
    transitions as (rule, plugin, kind) and what changed."""
    samples = [
        plugin_sample(PluginKey("acme", name), when(seconds), cpu=v) for name, v in cpu.items()
    ]
    return run(book, seconds, samples)


def run(
    book: AlertBook, seconds: float, samples: Sequence[PluginSample]
) -> tuple[list[tuple[str, str, str]], list[AlertRecord]]:
    changes = book.evaluate(samples, [None] * len(samples), {}, now=at(seconds))
    kinds = [(c.rule.name, c.key.plugin, c.transition.kind.value) for c in changes]
    return kinds, book.take_changed()


def test_pending_then_firing_then_resolved_and_what_changed() -> None:
    book = AlertBook([HOT], instance="host-a")
    kinds, changed = cycle(book, 0, api=90)
    assert kinds == [("Hot", "api", "pending")]
    (alert,) = changed
    assert (alert.status, alert.started_at, alert.value) == ("pending", at(0), 90.0)
    assert alert.labels == {
        "alertname": "Hot",
        "environment": "production",
        "instance": "host-a",
        "plugin": "api",
        "severity": "warning",
        "tenant": "acme",
    }
    kinds, changed = cycle(book, 5, api=95)
    assert (kinds, changed) == ([], [])  # still pending: nothing to write
    assert book.alerts()[0].value == 95.0  # the value moves without a change to write
    kinds, changed = cycle(book, 10, api=96)
    assert kinds == [("Hot", "api", "firing")]
    assert changed == [alert]
    assert (alert.status, alert.fired_at) == ("firing", at(10))
    assert [a.fingerprint for a in book.firing()] == [alert.fingerprint]
    kinds, changed = cycle(book, 20, api=1)
    assert kinds == [("Hot", "api", "resolved")]
    assert changed == [alert]
    assert (alert.status, alert.resolved_at) == ("resolved", at(20))
    assert book.alerts() == []
    # never notified: no resolution to announce
    assert book.take_resolutions(at(20)) == {}


def test_changes_come_in_creation_order() -> None:
    book = AlertBook([HOT, DOWN], instance="h")
    cycle(book, 0, api=90, db=90)
    samples = [
        plugin_sample(API, when(10), cpu=90),
        plugin_sample(DB, when(10), up=False),
    ]
    _, changed = run(book, 10, samples)
    assert [(a.rule.name, a.key.plugin) for a in changed] == [
        ("Hot", "api"),  # seq 1: fired
        ("Hot", "db"),  # seq 2: cancelled (a down plugin's cpu is 0)
        ("Down", "db"),  # seq 3: new
    ]
    assert [a.seq for a in changed] == sorted(a.seq for a in changed)


def test_vanished_plugin_loses_pending_alerts_at_once_and_firing_ones_after_grace() -> None:
    """Issue 15: a label-discovered plugin that goes away left its pending alerts pending."""
    book = AlertBook([HOT, DOWN], instance="h", stale_after_seconds=30)
    cycle(book, 0, api=90, db=90)  # both pending
    cycle(book, 10, api=90, db=90)  # both firing
    cycle(book, 20, api=90, db=90, gone=90)  # gone: pending
    assert sorted((a.key.plugin, a.status) for a in book.alerts()) == [
        ("api", "firing"),
        ("db", "firing"),
        ("gone", "pending"),
    ]
    # db and gone are no longer sampled (past the sampler's grace: dropped from snapshots)
    kinds, changed = cycle(book, 30, api=90)
    assert kinds == [("Hot", "gone", "cancelled")]
    assert [(a.key.plugin, a.status) for a in changed] == [("gone", "resolved")]
    assert sorted(a.key.plugin for a in book.alerts()) == ["api", "db"]  # db: within grace
    kinds, _ = cycle(book, 40, api=90)
    assert kinds == []
    kinds, changed = cycle(book, 50, api=90)  # db last seen at 20: 30 s ago
    assert kinds == [("Hot", "db", "resolved")]
    assert [a.key.plugin for a in book.alerts()] == ["api"]
    # the plugin comes back: a new instance, pending again from scratch
    kinds, _ = cycle(book, 60, api=90, gone=90)
    assert kinds == [("Hot", "gone", "pending")]


def test_restored_alerts_continue_and_an_absent_one_gets_the_grace_period() -> None:
    book = AlertBook([HOT], instance="h", stale_after_seconds=30)
    pending = restore(book, API, "aaaa", started=-6, fired=None, notified=False)
    firing = restore(book, DB, "bbbb", started=-100, fired=-90, notified=True)
    assert book.take_changed() == []  # restored as stored: nothing to write
    kinds, _ = cycle(book, 4, api=90)  # 10 s after it started, across the restart
    assert kinds == [("Hot", "api", "firing")]
    assert pending.fired_at == at(4)
    kinds, _ = cycle(book, 30, api=90)
    assert kinds == []  # db absent since the start: grace counted from the first cycle
    kinds, _ = cycle(book, 34, api=90)
    assert kinds == [("Hot", "db", "resolved")]
    assert firing.resolved_at == at(34)
    assert [a.fingerprint for a in book.take_resolutions(at(34))[DB]] == ["bbbb"]


def test_restored_alert_of_a_removed_rule_is_resolved_and_announced() -> None:
    book = AlertBook([HOT], instance="h")
    alert = restore(
        book,
        API,
        "cccc",
        started=-100,
        fired=-90,
        notified=True,
        rule_name="Removed",
        severity="critical",
    )
    assert (alert.status, alert.resolved_at, alert.rule.severity) == ("resolved", at(0), "critical")
    assert book.alerts() == []
    assert book.take_changed() == [alert]
    assert book.take_resolutions(at(0)) == {API: [alert]}


def test_inhibition_by_runtime_dependency_stays_within_the_environment() -> None:
    book = AlertBook([DOWN], instance="h")
    book.set_dependencies({("acme", "api"): ("db",)})

    def samples(seconds: float, *, up: dict[PluginKey, bool]) -> list[PluginSample]:
        return [plugin_sample(k, when(seconds), up=v) for k, v in up.items()]

    run(
        book,
        0,
        samples(0, up={API: False, DB: True, API_STAGING: False, DB_STAGING: False}),
    )
    inhibited = {(a.key.environment, a.key.plugin): a.inhibited for a in book.alerts()}
    assert inhibited == {
        ("production", "api"): False,  # production's db is up: the api's own problem
        ("staging", "api"): True,  # staging's db is down
        ("staging", "db"): False,
    }
    assert sorted((a.key.environment, a.key.plugin) for a in book.firing()) == [
        ("production", "api"),
        ("staging", "db"),
    ]
    _, changed = run(
        book, 1, samples(1, up={API: False, DB: True, API_STAGING: False, DB_STAGING: True})
    )
    assert {(a.key.environment, a.key.plugin): (a.status, a.inhibited) for a in changed} == {
        ("staging", "api"): ("firing", False),  # staging's db is back
        ("staging", "db"): ("resolved", False),
    }


def test_silences_mute_until_they_end_and_swallow_a_resolution() -> None:
    book = AlertBook([DOWN], instance="h")
    book.set_silences([SilenceRule("acme", {"alertname": "Do*", "plugin": "api"}, at(30))])
    run(book, 0, [plugin_sample(API, when(0), up=False), plugin_sample(DB, when(0), up=False)])
    statuses = {a.key.plugin: (a.status, a.silenced_until) for a in book.alerts()}
    assert statuses == {"api": ("silenced", when(30)), "db": ("firing", None)}
    assert [a.key.plugin for a in book.notifiable()] == ["db"]
    for alert in book.open_alerts():
        book.mark_notified([alert])
    # another tenant's silence never matches
    book.add_silence(SilenceRule("other", {"plugin": "*"}, at(100)))
    run(book, 31, [plugin_sample(API, when(31), up=False), plugin_sample(DB, when(31), up=False)])
    assert {a.key.plugin: a.status for a in book.alerts()} == {"api": "firing", "db": "firing"}
    # resolves while a silence (added now) matches it: its resolution is not announced
    book.add_silence(SilenceRule("acme", {"plugin": "db"}, at(100)))
    run(book, 32, [plugin_sample(API, when(32)), plugin_sample(DB, when(32))])
    assert list(book.take_resolutions(at(32))) == [API]


def test_acknowledgements_from_the_database_and_locally() -> None:
    book = AlertBook([DOWN], instance="h")
    run(book, 0, [plugin_sample(API, when(0), up=False), plugin_sample(DB, when(0), up=False)])
    by_plugin = {a.key.plugin: a for a in book.open_alerts()}
    book.set_acknowledged({by_plugin["api"].fingerprint})
    down = [plugin_sample(API, when(1), up=False), plugin_sample(DB, when(1), up=False)]
    _, changed = run(book, 1, down)
    assert [(a.key.plugin, a.status) for a in changed] == [("api", "acknowledged")]
    # acknowledge() is what the engine calls after writing the acknowledgement itself
    assert book.acknowledge(by_plugin["db"].fingerprint)
    assert not book.acknowledge("0" * 16)
    assert by_plugin["db"].status == "acknowledged"
    assert book.take_changed() == []
    # acknowledged alerts still fire (no repeats, but the resolution is sent)
    assert sorted(a.status for a in book.firing()) == ["acknowledged", "acknowledged"]
