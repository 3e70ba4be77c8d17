"""Notifications held by the alert journal: those that could not reach the outbox table, until they are delivered from it or reconciled into the table.

While the database is away (or not migrated yet, or a plugin has no database id yet) a
notification cannot be a ``notification_outbox`` row. With a journal, the engine's
persistence hands it here instead (after appending it to the fsync'ed journal), and the
:class:`~pluginmon.alerts.journal_delivery.JournalDeliverer` POSTs it straight to its
receiver with the same idempotency key, signature and retry rules as the outbox. Each final
outcome (delivered, or given up) is appended to the journal as a delivery mark *before* it
is recorded here, so a kill loses no outcome that a receiver saw.

When the database is back, persistence takes what it can write (:meth:`take_reconcilable`)
and writes it into the outbox table in the transaction of the alert state: delivered ones as
'delivered' (their keys in ``alert_notifications_sent``, so the outbox deliverer never POSTs
them again), given-up ones as 'failed', the rest as 'pending' with their attempts, and drops
them from here. A notification whose POST is in flight is left for the next cycle.

One event loop owns this object: every method runs between awaits, so a flag set here is
seen by the deliverer and by persistence alike.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime

from pluginmon.collectors.models import PluginKey
from pluginmon.storage.outbox_store import DeliveryRecord, OutboxWrite, ReconciledNotification

logger = logging.getLogger(__name__)

DeliveryGroup = tuple[str, str, str]  # (receiver kind, receiver, group key)
RecordDeliveries = Callable[[Sequence[DeliveryRecord]], Awaitable[bool]]


@dataclass(slots=True, eq=False)
class JournaledNotification:
    """One notification held here, with how far its delivery got (mutable state)."""

    write: OutboxWrite  # plugin_id None while the plugin has no database id
    key: PluginKey
    attempts: int = 0
    next_attempt_at: datetime | None = None  # None: due now
    last_status_code: int | None = None
    last_error: str | None = None
    record: DeliveryRecord | None = None  # the final outcome, once there is one
    # A POST in flight, or being written to the database: nobody else touches it.
    busy: bool = False
    journaled: bool = False  # the notification (and its outcome, if any) is on disk

    @property
    def group(self) -> DeliveryGroup:
        w = self.write
        return (w.receiver_kind, w.receiver, w.group_key)

    @property
    def finished(self) -> bool:
        return self.record is not None

    def reconciled(self, plugin_id: int) -> ReconciledNotification:
        return ReconciledNotification(
            write=replace(self.write, plugin_id=plugin_id),
            record=self.record,
            attempts=self.attempts,
            next_attempt_at=self.next_attempt_at,
            last_status_code=self.last_status_code,
            last_error=self.last_error,
        )


class JournalOutbox:
    """The notifications the journal holds, oldest first, keyed by idempotency key.

    ``record`` appends delivery marks to the journal (False when it could not: logged by
    the journal; the outcome is still kept in memory). Beyond ``max_entries`` the oldest
    finished entries are dropped first (their outcome is then never written to the outbox
    table: nothing is sent twice for it), then the oldest undelivered ones, with a warning.
    """

    def __init__(self, *, record: RecordDeliveries, max_entries: int = 10_000) -> None:
        self._record = record
        self._max_entries = max_entries
        self._entries: dict[str, JournaledNotification] = {}

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def pending(self) -> int:
        """Notifications still to deliver (not finished)."""
        return sum(1 for e in self._entries.values() if e.record is None)

    def entries(self) -> list[JournaledNotification]:
        return list(self._entries.values())

    # --- filling ------------------------------------------------------------------------

    def add(
        self,
        write: OutboxWrite,
        key: PluginKey,
        *,
        journaled: bool,
        record: DeliveryRecord | None = None,
    ) -> JournaledNotification:
        """Hold a notification (a key held already is kept as it is)."""
        entry = self._entries.get(write.idempotency_key)
        if entry is None:
            entry = JournaledNotification(write, key, journaled=journaled, record=record)
            if record is not None:
                entry.attempts = record.attempts
            self._entries[write.idempotency_key] = entry
            self._bound()
        return entry

    def _bound(self) -> None:
        excess = len(self._entries) - self._max_entries
        if excess <= 0:
            return
        victims = [e for e in self._entries.values() if e.finished and not e.busy][:excess]
        if len(victims) < excess:
            rest = [e for e in self._entries.values() if not e.finished and not e.busy]
            victims += rest[: excess - len(victims)]
        for e in victims:
            del self._entries[e.write.idempotency_key]
        undelivered = sum(1 for e in victims if not e.finished)
        logger.warning(
            "journal delivery holds more than %d notifications: forgot %d delivered and %d "
            "undelivered one(s), the oldest",
            self._max_entries,
            len(victims) - undelivered,
            undelivered,
        )

    # --- delivering -----------------------------------------------------------------------

    def due(
        self, now: datetime, *, receivers: Callable[[str, str], bool]
    ) -> list[JournaledNotification]:
        """What to POST now: per (receiver, group) only the oldest unfinished notification
        (a resolution never overtakes its firing), if it is due, idle, and its receiver is
        configured (``receivers(kind, name)``)."""
        out: list[JournaledNotification] = []
        seen: set[DeliveryGroup] = set()
        for entry in self._entries.values():
            if entry.finished:
                continue
            group = entry.group
            if group in seen:
                continue
            seen.add(group)
            if entry.busy or not receivers(group[0], group[1]):
                continue
            if entry.next_attempt_at is None or entry.next_attempt_at <= now:
                out.append(entry)
        return out

    async def finish(self, entry: JournaledNotification, record: DeliveryRecord) -> None:
        """The final outcome of ``entry``: the journal's mark first, then memory."""
        await self._record([record])
        entry.record = record
        entry.attempts = record.attempts
        entry.next_attempt_at = None

    # --- reconciling ------------------------------------------------------------------------

    def take_reconcilable(
        self, plugin_id: Callable[[JournaledNotification], int | None]
    ) -> list[tuple[JournaledNotification, int]]:
        """Idle notifications whose plugin has an id, oldest first, marked busy until
        :meth:`remove` (written) or :meth:`release` (not written)."""
        out: list[tuple[JournaledNotification, int]] = []
        for entry in self._entries.values():
            if entry.busy:
                continue
            pid = plugin_id(entry)
            if pid is not None:
                entry.busy = True
                out.append((entry, pid))
        return out

    def unfinished_groups(self) -> set[DeliveryGroup]:
        """Groups with a notification held here and not finished: a newer notification of
        the same group must wait behind it (held here too), never overtake it in the table."""
        return {e.group for e in self._entries.values() if not e.finished}

    def release(self, entries: Iterable[JournaledNotification]) -> None:
        for e in entries:
            e.busy = False

    def remove(self, entries: Iterable[JournaledNotification]) -> None:
        for e in entries:
            e.busy = False
            self._entries.pop(e.write.idempotency_key, None)

    def keys(self) -> set[PluginKey]:
        return {e.key for e in self._entries.values()}
