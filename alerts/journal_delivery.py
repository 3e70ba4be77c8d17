"""Delivers the notifications the alert journal holds straight to webhooks and Alertmanager, while the outbox table cannot have them.

The outbox deliverer (alerts/outbox.py) needs the database: it claims rows. An alerting
system must page exactly when things are broken, the database included, so what the engine
could not write to the outbox table is journaled (fsync'ed) and handed to a
:class:`~pluginmon.alerts.journal_outbox.JournalOutbox`; this deliverer POSTs it from there
with the same bytes, idempotency key, HMAC signature, per-receiver timeout, backoff with
jitter, ``Retry-After``, give-up rules (all of them :mod:`pluginmon.alerts.delivery_rules`,
shared with the outbox deliverer) and per-group order as the outbox deliverer, counts each
attempt in the outbox deliverer's ``pluginmon_notifications_total`` too, and
appends each final outcome to the journal before anything else (so a receiver that got a
2xx is never sent the key again by this process, nor, once reconciled, by the outbox).

Sends run as tasks of their own: :meth:`JournalDeliverer.deliver_due` starts what is due
and returns at once, so a receiver that accepts and never answers holds only its own
notification (for its ``timeout_seconds``), never another receiver's. At most
``max_in_flight`` POSTs run at a time.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from types import TracebackType

import aiohttp
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from pluginmon.alerts.delivery_rules import (
    AttemptCounts,
    Receiver,
    find_receiver,
    next_step,
    request_for,
)
from pluginmon.alerts.engine import Clock, utc_now
from pluginmon.alerts.journal_outbox import JournaledNotification, JournalOutbox
from pluginmon.alerts.notifiers import post
from pluginmon.alerts.rules import AlertmanagerConfig, WebhookConfig
from pluginmon.storage.outbox_store import DeliveryRecord

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class JournalDeliveryStats:
    """Cumulative attempts by (receiver, outcome), and what the journal still holds."""

    notifications: Mapping[tuple[str, str], int] = field(default_factory=dict)
    pending: int = 0
    in_flight: int = 0


class JournalDeliverer:
    """POSTs the journal's due notifications; see the module docstring.

    ``outbox`` is the engine's (``AlertEngine.journal_outbox``); the receivers are the same
    configuration the outbox deliverer gets. A notification for a receiver that is not
    configured waits (it is written to the outbox table as pending when the database is
    back, where the outbox deliverer's rules for it apply).
    """

    def __init__(
        self,
        outbox: JournalOutbox,
        webhooks: Sequence[WebhookConfig] = (),
        alertmanager: AlertmanagerConfig | None = None,
        *,
        clock: Clock = utc_now,
        session: aiohttp.ClientSession | None = None,
        max_in_flight: int = 64,
        attempts: AttemptCounts | None = None,
    ) -> None:
        self._outbox = outbox
        self._webhooks = {w.name: w for w in webhooks}
        self._alertmanager = alertmanager
        self._clock = clock
        self._session = session
        self._own_session = session is None
        self._max_in_flight = max_in_flight
        self._tasks: set[asyncio.Task[None]] = set()
        self._counts: Counter[tuple[str, str]] = Counter()  # this path's share
        # pluginmon_notifications_total: the outbox deliverer's (the daemon passes it)
        self._attempts = attempts if attempts is not None else AttemptCounts()
        self._closed = False

    async def __aenter__(self) -> JournalDeliverer:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @property
    def receivers(self) -> tuple[str, ...]:
        """The names of the receivers this deliverer sends to (none: nothing to deliver)."""
        names = tuple(self._webhooks)
        return names if self._alertmanager is None else (*names, self._alertmanager.name)

    def set_receivers(
        self, webhooks: Sequence[WebhookConfig], alertmanager: AlertmanagerConfig | None
    ) -> None:
        """Deliver to these receivers from the next :meth:`deliver_due` on (a reload); a
        notification for a receiver that is gone waits, as at start."""
        self._webhooks = {w.name: w for w in webhooks}
        self._alertmanager = alertmanager

    def _receiver(self, kind: str, name: str) -> Receiver | None:
        return find_receiver(self._webhooks, self._alertmanager, kind=kind, name=name)

    def _configured(self, kind: str, name: str) -> bool:
        return self._receiver(kind, name) is not None

    async def deliver_due(self) -> int:
        """Start a POST for every due notification (within ``max_in_flight``); returns how
        many were started. Does not wait for them (see :meth:`drain`)."""
        if self._closed:
            return 0
        room = self._max_in_flight - len(self._tasks)
        if room <= 0:
            return 0
        due = self._outbox.due(self._clock(), receivers=self._configured)[:room]
        for entry in due:
            entry.busy = True
            task = asyncio.create_task(self._deliver(entry), name="journal-delivery")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return len(due)

    async def drain(self) -> None:
        """Wait for the POSTs in flight (and the outcomes they record)."""
        while self._tasks:
            await asyncio.wait(set(self._tasks))

    async def aclose(self) -> None:
        """Cancel the POSTs in flight (each stays in the journal, undelivered, and is sent
        again with the same idempotency key by the next run) and close the HTTP session."""
        self._closed = True
        tasks = set(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        if self._session is not None and self._own_session:
            await self._session.close()
            self._session = None

    def stats(self) -> JournalDeliveryStats:
        return JournalDeliveryStats(
            notifications=dict(self._counts),
            pending=self._outbox.pending,
            in_flight=len(self._tasks),
        )

    def collect(self) -> Iterator[Metric]:
        """prometheus-client's Collector (read at scrape time, from the render thread)."""
        stats = self.stats()
        attempts = CounterMetricFamily(
            "pluginmon_journal_notifications",
            "Notification attempts made from the alert journal while the outbox table could "
            "not take them, by receiver and outcome (also counted in "
            "pluginmon_notifications_total)",
            labels=["receiver", "outcome"],
        )
        for (receiver, outcome), count in sorted(stats.notifications.items()):
            attempts.add_metric([receiver, outcome], count)
        yield attempts
        yield GaugeMetricFamily(
            "pluginmon_journal_notifications_pending",
            "Notifications held by the alert journal and not delivered yet",
            value=stats.pending,
        )

    # --- one notification ---------------------------------------------------------------------

    async def _deliver(self, entry: JournaledNotification) -> None:
        try:
            await self._attempt(entry)
        except asyncio.CancelledError:
            raise
        except Exception:
            # A bug, not a receiver problem: keep the notification for the next attempt.
            logger.exception("journal delivery of %s failed", entry.write.idempotency_key)
            entry.next_attempt_at = self._clock() + timedelta(seconds=30)
        finally:
            entry.busy = False

    async def _attempt(self, entry: JournaledNotification) -> None:
        w = entry.write
        receiver = self._receiver(w.receiver_kind, w.receiver)
        if receiver is None:
            return  # the configuration lost it between due() and now: it waits
        request = request_for(receiver, w.body, now=self._clock())
        entry.attempts += 1
        result = await post(
            self._client(),
            request.url,
            request.body,
            idempotency_key=w.idempotency_key,
            secret=request.secret,
            timeout_seconds=receiver.timeout_seconds,
        )
        now = self._clock()
        step = next_step(
            result, receiver=receiver, attempts=entry.attempts, created_at=w.created_at, now=now
        )
        self._counts[(receiver.name, step.outcome)] += 1
        self._attempts.add(receiver.name, step.outcome)
        if step.outcome == "retry":
            entry.next_attempt_at = step.next_attempt_at
            entry.last_status_code = result.status_code
            entry.last_error = result.error
            logger.info(
                "journal notification to %s: %s; attempt %d, retrying at %s",
                receiver.name,
                result.error,
                entry.attempts,
                step.next_attempt_at,
            )
            return
        if step.outcome == "failed":
            logger.warning(
                "journal notification %s to %s failed, %s",
                w.idempotency_key,
                receiver.name,
                step.why,
            )
        record = DeliveryRecord(
            idempotency_key=w.idempotency_key,
            receiver=receiver.name,
            outcome=step.outcome,
            attempts=entry.attempts,
            at=now,
            status_code=result.status_code,
            error=None if step.outcome == "delivered" else step.why,
        )
        # Seen through even when cancelled (shutdown): the receiver has answered, and the
        # mark is what keeps the key from being sent again.
        await asyncio.shield(self._outbox.finish(entry, record))

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session
