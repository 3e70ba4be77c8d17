"""The one set of delivery rules for a notification, whichever deliverer sends it (the outbox table's or the alert journal's): the request a receiver gets, what a POST's result means next, and the attempt counts behind ``pluginmon_notifications_total``.

Both deliverers (alerts/outbox.py, alerts/journal_delivery.py) call these, so a receiver sees
the same bytes, signature, backoff and give-up rules whether the database was up or not,
and an operator sees every attempt in one metric (``deploy/`` alerts on its ``failed``
outcome): a notification sent from the journal while the outbox table could not take it is
still a notification.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from pluginmon.alerts.notifiers import SendResult, stamp_alertmanager_body
from pluginmon.alerts.rules import AlertmanagerConfig, WebhookConfig
from pluginmon.storage.errors import backoff_seconds

Receiver = WebhookConfig | AlertmanagerConfig


def find_receiver(
    webhooks: Mapping[str, WebhookConfig],
    alertmanager: AlertmanagerConfig | None,
    *,
    kind: str,
    name: str,
) -> Receiver | None:
    """The configured receiver a notification names (None: not configured now)."""
    if kind == "alertmanager":
        return alertmanager if alertmanager is not None and alertmanager.name == name else None
    return webhooks.get(name)


@dataclass(frozen=True, slots=True)
class Request:
    """What one POST sends: where, the body, and the HMAC secret (None: unsigned)."""

    url: str
    body: bytes
    secret: str | None


def request_for(receiver: Receiver, body: str, *, now: datetime) -> Request:
    """The POST for a notification's stored ``body`` sent at ``now`` (pure)."""
    if isinstance(receiver, AlertmanagerConfig):
        # endsAt from the send time, not the queue time: Alertmanager keeps a firing alert
        # for 4 resend intervals from now, however long the push waited.
        stamped = stamp_alertmanager_body(
            body, now + timedelta(seconds=4 * receiver.resend_interval_seconds)
        )
        return Request(receiver.url + "/api/v2/alerts", stamped.encode(), None)
    return Request(receiver.url, body.encode(), receiver.secret)


@dataclass(frozen=True, slots=True)
class Step:
    """What follows one POST: ``delivered``, ``failed`` (``why``), or ``retry`` at
    ``next_attempt_at`` (``why``: the receiver's error)."""

    outcome: str
    next_attempt_at: datetime | None = None
    why: str | None = None


def give_up_reason(
    *, receiver: Receiver, attempts: int, created_at: datetime | None, now: datetime
) -> str | None:
    """Why a retryable failure is final: the optional attempt cap, or too old; else None."""
    if receiver.max_attempts is not None and attempts >= receiver.max_attempts:
        return f"max_attempts {receiver.max_attempts}"
    limit = receiver.give_up_after_seconds
    if limit > 0 and created_at is not None:
        age = (now - created_at).total_seconds()
        if age >= limit:
            return f"queued {age:.0f}s ago, give_up_after_seconds {limit:g}"
    return None


def next_step(
    result: SendResult,
    *,
    receiver: Receiver,
    attempts: int,
    created_at: datetime | None,
    now: datetime,
    random_fraction: Callable[[], float] = random.random,
) -> Step:
    """The rules (docs/alerts.md, "Delivery") for one POST's ``result``, after ``attempts``
    attempts of a notification queued at ``created_at`` (pure).

    2xx: delivered. A connection error, timeout, 429 or 5xx: retried after capped
    exponential backoff with jitter (``Retry-After`` honoured up to the cap) until the
    notification is ``give_up_after_seconds`` old or ``max_attempts`` is reached. Any other
    status: failed at once (the receiver said no; asking again would get the same answer).
    """
    if result.outcome == "delivered":
        return Step("delivered")
    if result.outcome != "retry":
        return Step("failed", why=f"rejected: {result.error}")
    give_up = give_up_reason(receiver=receiver, attempts=attempts, created_at=created_at, now=now)
    if give_up is not None:
        return Step(
            "failed", why=f"gave up after {attempts} attempt(s) ({give_up}): {result.error}"
        )
    delay = backoff_seconds(
        max(0, attempts - 1),
        initial_seconds=receiver.backoff_initial_seconds,
        max_seconds=receiver.backoff_max_seconds,
        random_fraction=random_fraction,
    )
    if result.retry_after_seconds is not None:
        delay = max(delay, min(result.retry_after_seconds, receiver.backoff_max_seconds))
    return Step("retry", next_attempt_at=now + timedelta(seconds=delay), why=result.error)


class AttemptCounts:
    """Notification attempts by (receiver, outcome), from every deliverer: the one source of
    ``pluginmon_notifications_total``. Changed on the event loop, read by the render thread
    (a copy of a dict of ints)."""

    __slots__ = ("_counts",)

    def __init__(self) -> None:
        self._counts: Counter[tuple[str, str]] = Counter()

    def add(self, receiver: str, outcome: str) -> None:
        self._counts[(receiver, outcome)] += 1

    def snapshot(self) -> dict[tuple[str, str], int]:
        return dict(self._counts)
