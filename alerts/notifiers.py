"""Notification bodies (Alertmanager webhook v4, Alertmanager API v2), HMAC signing, one HTTP POST."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import aiohttp

logger = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Pluginmon-Signature"
IDEMPOTENCY_HEADER = "Idempotency-Key"
USER_AGENT = "pluginmon-alerts/0.1"
# Alertmanager's "not ended" timestamp in webhook bodies.
ZERO_TIME = "0001-01-01T00:00:00Z"


def sign(secret: str, body: bytes) -> str:
    """The ``X-Pluginmon-Signature`` value: ``sha256=<hex HMAC-SHA256 of the body bytes>``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify_signature(secret: str, body: bytes, header: str | None) -> bool:
    """What a receiver does: recompute over the raw body and compare in constant time."""
    return header is not None and hmac.compare_digest(sign(secret, body), header)


def rfc3339(at: datetime) -> str:
    return at.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class NotifiedAlert:
    """One alert as it appears in a notification."""

    status: str  # "firing" | "resolved"
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    starts_at: datetime
    ends_at: datetime | None  # resolved time, or None while firing
    fingerprint: str


def group_key(group_labels: Mapping[str, str]) -> str:
    """Alertmanager-style group key: route path ``{}`` and the sorted group labels."""
    inner = ", ".join(f'{k}="{v}"' for k, v in sorted(group_labels.items()))
    return "{}:{" + inner + "}"


def _common(maps: Sequence[Mapping[str, str]]) -> dict[str, str]:
    if not maps:
        return {}
    common = dict(maps[0])
    for m in maps[1:]:
        common = {k: v for k, v in common.items() if m.get(k) == v}
    return dict(sorted(common.items()))


def webhook_body(
    *,
    receiver: str,
    group_labels: Mapping[str, str],
    alerts: Sequence[NotifiedAlert],
    external_url: str,
) -> str:
    """The JSON an Alertmanager webhook receiver expects (``version`` "4")."""
    status = "firing" if any(a.status == "firing" for a in alerts) else "resolved"
    payload = {
        "version": "4",
        "groupKey": group_key(group_labels),
        "truncatedAlerts": 0,
        "status": status,
        "receiver": receiver,
        "groupLabels": dict(sorted(group_labels.items())),
        "commonLabels": _common([a.labels for a in alerts]),
        "commonAnnotations": _common([a.annotations for a in alerts]),
        "externalURL": external_url,
        "alerts": [
            {
                "status": a.status,
                "labels": dict(sorted(a.labels.items())),
                "annotations": dict(sorted(a.annotations.items())),
                "startsAt": rfc3339(a.starts_at),
                "endsAt": ZERO_TIME if a.ends_at is None else rfc3339(a.ends_at),
                "generatorURL": external_url,
                "fingerprint": a.fingerprint,
            }
            for a in alerts
        ],
    }
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False)


def alertmanager_body(
    alerts: Sequence[NotifiedAlert],
    *,
    generator_url: str,
    firing_ends_at: datetime | None = None,
) -> str:
    """``POST /api/v2/alerts`` body: postable alerts; resolved ones carry their resolve time
    as ``endsAt``. Firing ones end at ``firing_ends_at``; when it is None (what the engine
    queues) they carry no ``endsAt`` and the deliverer stamps one at send time
    (:func:`stamp_alertmanager_body`), so a push retried after an outage is not expired."""
    out: list[dict[str, object]] = []
    for a in alerts:
        item: dict[str, object] = {
            "labels": dict(sorted(a.labels.items())),
            "annotations": dict(sorted(a.annotations.items())),
            "startsAt": rfc3339(a.starts_at),
        }
        ends = firing_ends_at if a.ends_at is None else a.ends_at
        if ends is not None:
            item["endsAt"] = rfc3339(ends)
        item["generatorURL"] = generator_url
        out.append(item)
    return json.dumps(out, separators=(",", ":"), ensure_ascii=False)


def stamp_alertmanager_body(body: str, firing_ends_at: datetime) -> str:
    """The body with ``endsAt = firing_ends_at`` on every alert that has none (firing ones);
    resolved alerts keep their resolve time. Called by the deliverer right before a POST."""
    alerts = json.loads(body)
    if not isinstance(alerts, list):
        return body
    ends = rfc3339(firing_ends_at)
    changed = False
    for item in alerts:
        if isinstance(item, dict) and not item.get("endsAt"):
            item["endsAt"] = ends
            changed = True
    if not changed:
        return body
    return json.dumps(alerts, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True, slots=True)
class SendResult:
    outcome: str  # "delivered" | "retry" | "failed"
    status_code: int | None = None
    error: str | None = None
    retry_after_seconds: float | None = None


def classify_status(status: int) -> str:
    """2xx delivered; 429 and 5xx are worth retrying; any other answer will not change."""
    if 200 <= status < 300:
        return "delivered"
    if status == 429 or status >= 500:
        return "retry"
    return "failed"


async def post(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    *,
    idempotency_key: str,
    secret: str | None,
    timeout_seconds: float,
) -> SendResult:
    """POST one notification; never raises for network trouble (that is a ``retry``)."""
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        IDEMPOTENCY_HEADER: idempotency_key,
    }
    if secret:
        headers[SIGNATURE_HEADER] = sign(secret, body)
    try:
        async with session.post(
            url,
            data=body,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=timeout_seconds),
            allow_redirects=False,
        ) as response:
            await response.read()
            outcome = classify_status(response.status)
            retry_after = _retry_after(response.headers.get("Retry-After"))
            error = None if outcome == "delivered" else f"HTTP {response.status}"
            return SendResult(outcome, response.status, error, retry_after)
    except TimeoutError:
        return SendResult("retry", None, f"timed out after {timeout_seconds:g}s")
    except (aiohttp.ClientError, OSError) as exc:
        # The exception text names host and port at most; never the body or headers.
        return SendResult("retry", None, f"{type(exc).__name__}: {exc}"[:300])
    except asyncio.CancelledError:
        raise


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None
