"""The notification planner on its own: grouping, repeat timers, bodies (no database, no HTTP;
``now`` injected as unix seconds, idempotency keys from a counter)."""

from __future__ import annotations

import itertools
import json
from datetime import timedelta

from pluginmon.alerts.book import AlertBook, AlertRecord
from pluginmon.alerts.planner import NotificationPlanner, Plan
from pluginmon.alerts.rules import AlertmanagerConfig, Rule, WebhookConfig
from pluginmon.collectors.models import PluginKey
from tests.alerts_helpers import T0, plugin_sample

T = T0.timestamp()
API = PluginKey("acme", "api", "production")
DB = PluginKey("acme", "db", "production")
HOT = Rule(
    name="Hot",
    metric="cpu_percent",
    op=">",
    threshold=50,
    annotations={"summary": "{plugin} at {value:.0f}%"},
)
BUSY = Rule(name="Busy", metric="threads", op=">", threshold=1, severity="info")
OPS = WebhookConfig(name="ops", url="http://127.0.0.1:9/ops", repeat_interval_seconds=60)
QUIET = WebhookConfig(name="quiet", url="http://127.0.0.1:9/quiet", send_resolved=False)
AM = AlertmanagerConfig(url="http://127.0.0.1:9", resend_interval_seconds=30)


def planner(
    *receivers: WebhookConfig, alertmanager: AlertmanagerConfig | None = None
) -> NotificationPlanner:
    counter = itertools.count(1)
    return NotificationPlanner(
        webhooks=receivers,
        alertmanager=alertmanager,
        external_url="http://pm.test",
        new_key=lambda: f"key-{next(counter)}",
    )


def cycle(book: AlertBook, p: NotificationPlanner, seconds: float, **cpu: float) -> Plan:
    """What the engine does each cycle, without scoring and persistence."""
    at = T0 + timedelta(seconds=seconds)
    samples = [plugin_sample(PluginKey("acme", n), at, cpu=v) for n, v in cpu.items()]
    book.evaluate(samples, [None] * len(samples), {}, now=T + seconds)
    plan = p.plan(book.notifiable(), book.take_resolutions(T + seconds), now=T + seconds)
    book.mark_notified(plan.announced)
    return plan


def test_one_notification_per_receiver_and_plugin_group() -> None:
    book, p = AlertBook([HOT, BUSY], instance="h"), planner(OPS)
    plan = cycle(book, p, 0, api=90, db=90)
    by_plugin = {n.key.plugin: n for n in plan.notifications}
    assert sorted(by_plugin) == ["api", "db"]
    n = by_plugin["api"]
    assert (n.receiver, n.receiver_kind, n.created_at) == ("ops", "webhook", T0)
    assert n.group_key == '{}:{environment="production", plugin="api", tenant="acme"}'
    assert {m.idempotency_key for m in plan.notifications} == {"key-1", "key-2"}
    body = json.loads(n.body)
    assert [a["labels"]["alertname"] for a in body["alerts"]] == ["Hot", "Busy"]  # rule order
    assert n.fingerprints == tuple(a["fingerprint"] for a in body["alerts"])
    assert (body["status"], body["receiver"], body["externalURL"]) == (
        "firing",
        "ops",
        "http://pm.test",
    )
    assert body["alerts"][0]["annotations"] == {"summary": "api at 90%"}
    assert sorted((a.key.plugin, a.rule.name) for a in plan.announced) == [
        ("api", "Busy"),
        ("api", "Hot"),
        ("db", "Busy"),
        ("db", "Hot"),
    ]
    assert all(a.notified for a in book.open_alerts())


def test_repeats_while_unacknowledged_and_resolution_goes_to_send_resolved_receivers() -> None:
    book, p = AlertBook([HOT], instance="h"), planner(OPS, QUIET)
    assert [n.receiver for n in cycle(book, p, 0, api=90).notifications] == ["ops", "quiet"]
    assert cycle(book, p, 30, api=95).notifications == ()
    # repeat_interval_seconds: ops after 60 s; quiet has the 4 h default
    repeat = cycle(book, p, 60, api=97).notifications
    assert [n.receiver for n in repeat] == ["ops"]
    # the repeat says what the value is now
    assert json.loads(repeat[0].body)["alerts"][0]["annotations"] == {"summary": "api at 97%"}
    (alert,) = book.open_alerts()
    book.acknowledge(alert.fingerprint)
    assert cycle(book, p, 200, api=99).notifications == ()  # acknowledged: no repeats
    resolved = cycle(book, p, 210, api=1).notifications
    assert [n.receiver for n in resolved] == ["ops"]  # quiet: send_resolved = false
    body = json.loads(resolved[0].body)
    assert body["status"] == "resolved"
    assert body["alerts"][0]["endsAt"] == "2026-03-01T12:03:30.000Z"


def test_a_new_alert_in_a_notified_group_sends_the_whole_group() -> None:
    hotter = Rule(name="Hotter", metric="cpu_percent", op=">", threshold=80)
    book, p = AlertBook([HOT, hotter], instance="h"), planner(OPS)
    (first,) = cycle(book, p, 0, api=60).notifications
    assert first.fingerprints == tuple(a.fingerprint for a in book.open_alerts())
    assert cycle(book, p, 5, api=70).notifications == ()
    plan = cycle(book, p, 10, api=90, db=10)  # Hotter starts firing; db is fine
    (n,) = plan.notifications
    body = json.loads(n.body)
    assert [a["labels"]["alertname"] for a in body["alerts"]] == ["Hot", "Hotter"]
    assert [a.rule.name for a in plan.announced] == ["Hot", "Hotter"]


def test_alertmanager_resends_while_firing_and_leaves_endsat_to_the_sender() -> None:
    book, p = AlertBook([HOT], instance="h"), planner(alertmanager=AM)
    (first,) = cycle(book, p, 0, api=90).notifications
    assert (first.receiver, first.receiver_kind) == ("alertmanager", "alertmanager")
    (pushed,) = json.loads(first.body)
    assert "endsAt" not in pushed
    assert pushed["startsAt"] == "2026-03-01T12:00:00.000Z"
    assert cycle(book, p, 20, api=90).notifications == ()
    assert len(cycle(book, p, 30, api=90).notifications) == 1  # resend_interval_seconds
    (resolved,) = cycle(book, p, 35, api=1).notifications
    assert json.loads(resolved.body)[0]["endsAt"] == "2026-03-01T12:00:35.000Z"


def test_restored_timers_prevent_a_repeat_right_after_a_restart() -> None:
    book, p = AlertBook([HOT], instance="h"), planner(OPS)
    restored: AlertRecord = book.restore(
        rule_name="Hot",
        key=API,
        labels={"alertname": "Hot", "plugin": "api"},
        fingerprint_="abcd",
        severity="warning",
        started_at=T - 100,
        last_active_at=T - 10,
        fired_at=T - 100,
        value=90.0,
        annotations={},
        inhibited=False,
        silenced_until=None,
        acknowledged=False,
        notified=True,
        now=T,
    )
    group = '{}:{environment="production", plugin="api", tenant="acme"}'
    p.restore_last_sent({("ops", group): T - 50})
    assert cycle(book, p, 0, api=90).notifications == ()
    assert [n.fingerprints for n in cycle(book, p, 10, api=90).notifications] == [("abcd",)]
    assert restored.notified


def test_without_receivers_alerts_are_marked_notified_and_nothing_is_queued() -> None:
    book, p = AlertBook([HOT], instance="h"), planner()
    plan = cycle(book, p, 0, api=90)
    assert plan.notifications == ()
    assert [a.key for a in plan.announced] == [API]
    assert cycle(book, p, 10, api=1).announced == ()
