"""The notification planner: what to send to which receiver, grouped by plugin, with repeat timers.

Pure: given the notifiable alerts and the resolutions to announce at ``now`` (unix seconds),
it returns the notifications to queue, each with its receiver, group key, idempotency key
and the exact body (alerts.notifiers) that will be signed and sent. It keeps only when each
(receiver, group) was last queued. Notifications are keyed by
:class:`~pluginmon.collectors.models.PluginKey`; database ids are persistence's business.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from pluginmon.alerts.book import AlertRecord
from pluginmon.alerts.notifiers import NotifiedAlert, alertmanager_body, group_key, webhook_body
from pluginmon.alerts.rules import AlertmanagerConfig, WebhookConfig, render_annotations
from pluginmon.collectors.models import PluginKey


def new_idempotency_key() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True, slots=True)
class Notification:
    """One notification to one receiver about one plugin's group of alerts."""

    key: PluginKey
    receiver: str
    receiver_kind: str  # "webhook" | "alertmanager"
    group_key: str
    idempotency_key: str
    body: str
    fingerprints: tuple[str, ...]
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Plan:
    notifications: tuple[Notification, ...]
    # Firing alerts that went into a notification (or, with no receiver configured, would
    # have): the book marks them notified.
    announced: tuple[AlertRecord, ...]


class NotificationPlanner:
    """Groups alerts by plugin (tenant, plugin, environment), as Alertmanager groups by labels.

    A group is queued to every receiver when one of its alerts starts firing (or stops being
    silenced or inhibited) and when one resolves (webhooks with ``send_resolved``); webhooks
    repeat it every ``repeat_interval_seconds`` while it has unacknowledged firing alerts,
    Alertmanager every ``resend_interval_seconds`` while anything fires.
    """

    def __init__(
        self,
        *,
        webhooks: Sequence[WebhookConfig] = (),
        alertmanager: AlertmanagerConfig | None = None,
        external_url: str = "",
        new_key: Callable[[], str] = new_idempotency_key,
    ) -> None:
        self._webhooks = tuple(webhooks)
        self._alertmanager = alertmanager
        self._external_url = external_url
        self._new_key = new_key
        # (receiver, group key) -> unix seconds its last notification was queued
        self._last_sent: dict[tuple[str, str], float] = {}

    @property
    def has_receivers(self) -> bool:
        return bool(self._webhooks) or self._alertmanager is not None

    def reconfigure(
        self,
        *,
        webhooks: Sequence[WebhookConfig],
        alertmanager: AlertmanagerConfig | None,
        external_url: str,
    ) -> None:
        """New receivers (a configuration reload); repeat timers of kept receivers stay."""
        self._webhooks = tuple(webhooks)
        self._alertmanager = alertmanager
        self._external_url = external_url

    def restore_last_sent(self, last_sent: Mapping[tuple[str, str], float]) -> None:
        """When each (receiver, group) was last queued, as a previous process left it (the
        later of that and what this process queued, which may have run before it was read)."""
        mine = self._last_sent
        for group, at in last_sent.items():
            if at > mine.get(group, float("-inf")):
                mine[group] = at

    def plan(
        self,
        notifiable: Iterable[AlertRecord],
        resolutions: Mapping[PluginKey, Sequence[AlertRecord]],
        *,
        now: float,
    ) -> Plan:
        """The notifications due at ``now`` for these firing (notifiable) alerts and
        resolutions to announce; updates the repeat timers of what it queues."""
        if not self.has_receivers:
            return Plan((), tuple(a for a in notifiable if not a.notified))
        by_key: dict[PluginKey, list[AlertRecord]] = defaultdict(list)
        for alert in notifiable:
            by_key[alert.key].append(alert)
        notifications: list[Notification] = []
        announced: list[AlertRecord] = []
        for key in set(by_key) | set(resolutions):
            firing = sorted(by_key.get(key, ()), key=lambda a: a.seq)
            resolved = sorted(resolutions.get(key, ()), key=lambda a: a.seq)
            queued = self._plan_group(key, firing, resolved, now)
            if queued:
                notifications += queued
                announced += firing
        return Plan(tuple(notifications), tuple(announced))

    def _plan_group(
        self,
        key: PluginKey,
        firing: list[AlertRecord],
        just_resolved: list[AlertRecord],
        now: float,
    ) -> list[Notification]:
        if not firing and not just_resolved:
            return []
        group_labels = {"tenant": key.tenant, "plugin": key.plugin, "environment": key.environment}
        gkey = group_key(group_labels)
        new = any(not a.notified for a in firing)
        wants_repeat = any(not a.acknowledged for a in firing)
        now_dt = datetime.fromtimestamp(now, UTC)
        out: list[Notification] = []
        for hook in self._webhooks:
            last = self._last_sent.get((hook.name, gkey))
            repeat_due = (
                wants_repeat and last is not None and now - last >= hook.repeat_interval_seconds
            )
            resolved = just_resolved if hook.send_resolved else []
            if not (new or resolved or repeat_due):
                continue
            alerts = [_notified(a) for a in (*firing, *resolved)]
            body = webhook_body(
                receiver=hook.name,
                group_labels=group_labels,
                alerts=alerts,
                external_url=self._external_url,
            )
            out.append(self._notification(key, hook.name, "webhook", gkey, body, alerts, now_dt))
        am = self._alertmanager
        if am is not None:
            last = self._last_sent.get((am.name, gkey))
            resend_due = bool(firing) and (last is None or now - last >= am.resend_interval_seconds)
            if new or just_resolved or resend_due:
                alerts = [_notified(a) for a in (*firing, *just_resolved)]
                # Firing alerts get their endsAt when the deliverer sends them (send time +
                # 4 resend intervals): a push retried after an outage must not arrive expired.
                body = alertmanager_body(alerts, generator_url=self._external_url)
                out.append(
                    self._notification(key, am.name, "alertmanager", gkey, body, alerts, now_dt)
                )
        return out

    def _notification(
        self,
        key: PluginKey,
        receiver: str,
        kind: str,
        gkey: str,
        body: str,
        alerts: Sequence[NotifiedAlert],
        now_dt: datetime,
    ) -> Notification:
        self._last_sent[(receiver, gkey)] = now_dt.timestamp()
        return Notification(
            key=key,
            receiver=receiver,
            receiver_kind=kind,
            group_key=gkey,
            idempotency_key=self._new_key(),
            body=body,
            fingerprints=tuple(a.fingerprint for a in alerts),
            created_at=now_dt,
        )


def _notified(alert: AlertRecord) -> NotifiedAlert:
    resolved_at = alert.resolved_at
    return NotifiedAlert(
        status="firing" if resolved_at is None else "resolved",
        labels=alert.labels,
        # a firing alert says what its value is now, not when it started firing
        annotations=render_annotations(alert.rule, alert.key, alert.value)
        if resolved_at is None
        else alert.annotations,
        starts_at=datetime.fromtimestamp(alert.started_at, UTC),
        ends_at=None if resolved_at is None else datetime.fromtimestamp(resolved_at, UTC),
        fingerprint=alert.fingerprint,
    )
