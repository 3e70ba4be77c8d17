"""Delivers due notification_outbox rows to webhooks and Alertmanager, with retries and backoff."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any

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
from pluginmon.alerts.notifiers import SendResult, post
from pluginmon.alerts.rules import AlertmanagerConfig, WebhookConfig
from pluginmon.storage import outbox_store
from pluginmon.storage.errors import TRANSIENT_ERRORS, backoff_seconds
from pluginmon.storage.outbox_store import ClaimedNotification, DeliveryOutcome

logger = logging.getLogger(__name__)


# deliver_due waits this long for its POSTs; slower ones finish in the background and are
# recorded by a later call, so a receiver that never answers holds up no other receiver.
SEND_WAIT_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class DeliveryReport:
    claimed: int = 0
    # Outcomes recorded by this call: its own POSTs that finished within the send wait,
    # and slower ones of earlier calls that finished since.
    delivered: int = 0
    retried: int = 0
    failed: int = 0
    already_delivered: int = 0  # key found in alert_notifications_sent: not POSTed again
    in_flight: int = 0  # POSTs still waiting for their receiver (each within its timeout)
    database_error: str | None = None
    backing_off: bool = False  # the database was down recently; this call did nothing


@dataclass(frozen=True, slots=True)
class DeliveryStats:
    """Cumulative counters for pluginmon_notifications_total (every deliverer's attempts,
    see ``attempts``) and pluginmon_outbox_pending."""

    notifications: Mapping[tuple[str, str], int] = field(default_factory=dict)
    pending: int = 0


class OutboxDeliverer:
    """Claims due rows (``FOR UPDATE SKIP LOCKED``), POSTs them, records the outcome.

    One notification per receiver and group is in flight at a time, oldest first. A 2xx
    records the idempotency key in alert_notifications_sent before anything else happens
    to the row; outcomes that could not be recorded (database down) are kept and recorded
    before the next claim, so a delivered key is never POSTed again by this process.

    No head-of-line blocking: every POST is its own task bounded by its receiver's
    ``timeout_seconds``; ``deliver_due`` waits for them at most ``send_wait_seconds`` and
    leaves the slower ones running. A receiver that accepts and never answers keeps only
    its own rows leased (claim_due leases a claimed row for longer than any timeout) while
    the next calls claim and send everything else; its outcome (a retry, "timed out") is
    recorded by the first call after it finished.

    ``instance`` (default the hostname; the daemon passes its ``host`` setting) must match
    the engine's: a deliverer claims only its own instance's rows, and only for receivers it
    has configured. A row whose receiver is no longer configured stays pending (logged once).
    Retryable failures are retried until the notification is ``give_up_after_seconds`` old.
    """

    def __init__(
        self,
        pool: Any,
        webhooks: Sequence[WebhookConfig] = (),
        alertmanager: AlertmanagerConfig | None = None,
        *,
        clock: Clock = utc_now,
        batch_size: int = 100,
        lease_seconds: float | None = None,
        database_timeout_seconds: float = 10.0,
        database_backoff_max_seconds: float = 30.0,
        session: aiohttp.ClientSession | None = None,
        keep_finished_seconds: float = 7 * 86400.0,
        prune_interval_seconds: float = 3600.0,
        instance: str | None = None,
        unconfigured_check_seconds: float = 60.0,
        send_wait_seconds: float = SEND_WAIT_SECONDS,
        attempts: AttemptCounts | None = None,
    ) -> None:
        self.instance = instance or socket.gethostname()
        self._pool = pool
        self._webhooks = {w.name: w for w in webhooks}
        self._alertmanager = alertmanager
        self._clock = clock
        self._batch_size = batch_size
        timeouts = [w.timeout_seconds for w in webhooks]
        if alertmanager is not None:
            timeouts.append(alertmanager.timeout_seconds)
        self._lease_seconds = lease_seconds or (max(timeouts, default=10.0) + 30.0)
        self._db_timeout = database_timeout_seconds
        self._db_backoff_max = database_backoff_max_seconds
        self._session = session
        self._own_session = session is None
        self._unrecorded: list[DeliveryOutcome] = []
        self._send_wait = send_wait_seconds
        # POSTs under way, and the outcomes of those that finished after their call returned.
        self._in_flight: set[asyncio.Task[DeliveryOutcome]] = set()
        self._finished_late: list[DeliveryOutcome] = []
        self.attempts = attempts if attempts is not None else AttemptCounts()
        """Every attempt by (receiver, outcome): pluginmon_notifications_total. Hand it to
        the journal deliverer, whose attempts count here too."""
        self._pending = 0
        self._db_failures = 0
        self._db_retry_at: datetime | None = None
        self._wake = asyncio.Event()
        self._keep_finished = timedelta(seconds=keep_finished_seconds)
        self._prune_interval = timedelta(seconds=prune_interval_seconds)
        self._pruned_at: datetime | None = None
        self._unconfigured_every = timedelta(seconds=unconfigured_check_seconds)
        self._unconfigured_at: datetime | None = None
        self._unconfigured_logged: set[tuple[str, str]] = set()

    async def __aenter__(self) -> OutboxDeliverer:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        # A POST cut short here stays leased and pending: it is retried after the lease.
        for task in list(self._in_flight):
            task.cancel()
        if self._in_flight:
            await asyncio.gather(*self._in_flight, return_exceptions=True)
        self._in_flight.clear()
        if self._session is not None and self._own_session:
            await self._session.close()
            self._session = None

    def set_receivers(
        self, webhooks: Sequence[WebhookConfig], alertmanager: AlertmanagerConfig | None
    ) -> None:
        """Deliver to these receivers from the next claim on (a configuration reload).

        Rows queued for a receiver that is gone stay pending until it is configured again,
        as they do after a restart; one already claimed is put back for a minute (``_send``).
        """
        self._webhooks = {w.name: w for w in webhooks}
        self._alertmanager = alertmanager
        # A claim must outlive the slowest send; a lease never shrinks (it may be explicit).
        timeouts = [w.timeout_seconds for w in webhooks]
        if alertmanager is not None:
            timeouts.append(alertmanager.timeout_seconds)
        self._lease_seconds = max(self._lease_seconds, max(timeouts, default=0.0) + 30.0)

    @property
    def receivers(self) -> tuple[str, ...]:
        """The names of the receivers this deliverer sends to (none: nothing to deliver)."""
        names = tuple(self._webhooks)
        return names if self._alertmanager is None else (*names, self._alertmanager.name)

    def stats(self) -> DeliveryStats:
        return DeliveryStats(notifications=self.attempts.snapshot(), pending=self._pending)

    def collect(self) -> Iterator[Metric]:
        """prometheus-client's Collector: delivery attempts and the outbox backlog, read at
        scrape time (from the render thread: reads only)."""
        stats = self.stats()
        notifications = CounterMetricFamily(
            "pluginmon_notifications",
            "Notification attempts by receiver and outcome",
            labels=["receiver", "outcome"],
        )
        for (receiver, outcome), count in sorted(stats.notifications.items()):
            notifications.add_metric([receiver, outcome], count)
        yield notifications
        yield GaugeMetricFamily(
            "pluginmon_outbox_pending", "Notifications waiting in the outbox", value=stats.pending
        )

    def wake(self) -> None:
        """Deliver now instead of at the next poll (call after the engine queued something)."""
        self._wake.set()

    async def run(self, *, poll_interval_seconds: float = 1.0) -> None:
        """Deliver forever: every ``poll_interval_seconds`` or as soon as ``wake()`` is called."""
        while True:
            self._wake.clear()
            try:
                await self.deliver_due()
            except Exception:
                logger.exception("outbox delivery failed; retrying at the next poll")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(poll_interval_seconds):
                    await self._wake.wait()

    async def deliver_due(self) -> DeliveryReport:
        now = self._clock()
        if self._db_retry_at is not None and now < self._db_retry_at:
            return DeliveryReport(backing_off=True)
        try:
            async with asyncio.timeout(self._db_timeout), self._pool.acquire() as conn:
                if self._unrecorded:
                    await outbox_store.record_outcomes(conn, self._unrecorded)
                    self._unrecorded.clear()
                claimed = await outbox_store.claim_due(
                    conn,
                    now,
                    limit=self._batch_size,
                    lease_seconds=self._lease_seconds,
                    instance=self.instance,
                    webhooks=list(self._webhooks),
                    alertmanager=None if self._alertmanager is None else self._alertmanager.name,
                )
                sent = await outbox_store.already_sent(conn, (c.idempotency_key for c in claimed))
        except TRANSIENT_ERRORS as exc:
            return self._database_down(now, exc)
        self._database_up()

        skipped: list[DeliveryOutcome] = []
        to_send: list[ClaimedNotification] = []
        for c in claimed:
            if c.idempotency_key in sent:
                skipped.append(DeliveryOutcome(c, "delivered", now, status_code=None))
            else:
                to_send.append(c)
        sent_now = await self._send_all(to_send)
        # Earlier calls' slow POSTs that finished since, then this call's.
        finished, self._finished_late = self._finished_late, []
        finished.extend(sent_now)
        for o in finished:
            self.attempts.add(o.notification.receiver, o.outcome)

        self._unrecorded.extend(skipped)
        self._unrecorded.extend(finished)
        database_error: str | None = None
        try:
            async with asyncio.timeout(self._db_timeout), self._pool.acquire() as conn:
                await outbox_store.record_outcomes(conn, self._unrecorded)
                self._unrecorded.clear()
                self._pending = await outbox_store.pending_count(conn, self.instance)
                if (
                    self._unconfigured_at is None
                    or now - self._unconfigured_at >= self._unconfigured_every
                ):
                    self._unconfigured_at = now
                    await self._note_unconfigured(conn)
                if self._pruned_at is None or now - self._pruned_at >= self._prune_interval:
                    self._pruned_at = now
                    pruned = await outbox_store.prune_outbox(
                        conn, delivered_before=now - self._keep_finished
                    )
                    if pruned:
                        logger.info("outbox: pruned %d finished notification(s)", pruned)
        except TRANSIENT_ERRORS as exc:
            database_error = f"{type(exc).__name__}: {exc}"
            self._database_down(self._clock(), exc)

        counted = Counter(o.outcome for o in finished)
        return DeliveryReport(
            claimed=len(claimed),
            delivered=counted["delivered"],
            retried=counted["retry"],
            failed=counted["failed"],
            already_delivered=len(skipped),
            in_flight=len(self._in_flight),
            database_error=database_error,
        )

    async def _send_all(self, to_send: Sequence[ClaimedNotification]) -> list[DeliveryOutcome]:
        """Start one POST task per notification; the outcomes of those done within the send
        wait. The rest keep running and land in ``_finished_late`` when done."""
        if not to_send:
            return []
        session = self._client()
        tasks = [asyncio.create_task(self._send_safely(session, c)) for c in to_send]
        self._in_flight.update(tasks)
        await asyncio.wait(tasks, timeout=self._send_wait)
        outcomes: list[DeliveryOutcome] = []
        for task in tasks:
            if task.done():
                self._in_flight.discard(task)
                outcomes.append(task.result())
            else:
                task.add_done_callback(self._finished_in_background)
        return outcomes

    def _finished_in_background(self, task: asyncio.Task[DeliveryOutcome]) -> None:
        self._in_flight.discard(task)
        if not task.cancelled():
            self._finished_late.append(task.result())

    async def _send_safely(
        self, session: aiohttp.ClientSession, n: ClaimedNotification
    ) -> DeliveryOutcome:
        """``_send``, with anything unexpected (a bug, a body that does not parse) turned
        into a retry of this one notification instead of an exception nobody awaits."""
        try:
            return await self._send(session, n)
        except Exception as exc:
            logger.exception("notification %d to %s: unexpected error", n.id, n.receiver)
            now = self._clock()
            return DeliveryOutcome(
                n,
                "retry",
                now,
                error=f"{type(exc).__name__}: {exc}"[:300],
                next_attempt_at=now + timedelta(seconds=60),
            )

    # --- one notification ---------------------------------------------------------------------

    async def _send(
        self, session: aiohttp.ClientSession, n: ClaimedNotification
    ) -> DeliveryOutcome:
        receiver = find_receiver(
            self._webhooks, self._alertmanager, kind=n.receiver_kind, name=n.receiver
        )
        if receiver is None:
            # claim_due only claims configured receivers; the configuration changed between
            # the claim and now (not in this process): leave the row pending.
            return DeliveryOutcome(
                n,
                "retry",
                self._clock(),
                error="receiver not configured",
                next_attempt_at=self._clock() + timedelta(seconds=60),
            )
        request = request_for(receiver, n.body, now=self._clock())
        result = await post(
            session,
            request.url,
            request.body,
            idempotency_key=n.idempotency_key,
            secret=request.secret,
            timeout_seconds=receiver.timeout_seconds,
        )
        return self._outcome(n, receiver, result)

    def _outcome(
        self, n: ClaimedNotification, receiver: Receiver, result: SendResult
    ) -> DeliveryOutcome:
        now = self._clock()
        step = next_step(
            result, receiver=receiver, attempts=n.attempts, created_at=n.created_at, now=now
        )
        if step.outcome == "delivered":
            return DeliveryOutcome(n, "delivered", now, status_code=result.status_code)
        if step.outcome == "retry":
            assert step.next_attempt_at is not None
            logger.info(
                "notification %d to %s: %s; attempt %d, retrying in %.1fs",
                n.id,
                receiver.name,
                result.error,
                n.attempts,
                (step.next_attempt_at - now).total_seconds(),
            )
            return DeliveryOutcome(
                n,
                "retry",
                now,
                status_code=result.status_code,
                error=result.error,
                next_attempt_at=step.next_attempt_at,
            )
        logger.warning("notification %d to %s failed, %s", n.id, receiver.name, step.why)
        return DeliveryOutcome(n, "failed", now, status_code=result.status_code, error=step.why)

    async def _note_unconfigured(self, conn: Any) -> None:
        """Log, once per receiver, pending rows of this instance that wait for a receiver
        that is not configured (the configuration changed); they are kept, not failed."""
        waiting = await outbox_store.unconfigured_receivers(
            conn,
            self.instance,
            list(self._webhooks),
            None if self._alertmanager is None else self._alertmanager.name,
        )
        for (kind, name), count in sorted(waiting.items()):
            if (kind, name) in self._unconfigured_logged:
                continue
            self._unconfigured_logged.add((kind, name))
            logger.warning(
                "outbox: %d pending notification(s) for %s receiver %r, which is not "
                "configured; kept pending until it is configured again",
                count,
                kind,
                name,
            )
        self._unconfigured_logged &= set(waiting)

    # --- plumbing -----------------------------------------------------------------------------

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    def _database_down(self, now: datetime, exc: BaseException) -> DeliveryReport:
        self._db_failures += 1
        if self._db_failures == 1:
            logger.warning("outbox: database unreachable (%s); backing off", type(exc).__name__)
        delay = backoff_seconds(
            self._db_failures - 1, initial_seconds=0.5, max_seconds=self._db_backoff_max
        )
        self._db_retry_at = now + timedelta(seconds=delay)
        return DeliveryReport(database_error=f"{type(exc).__name__}: {exc}")

    def _database_up(self) -> None:
        if self._db_failures:
            logger.info("outbox: database reachable again")
        self._db_failures = 0
        self._db_retry_at = None
