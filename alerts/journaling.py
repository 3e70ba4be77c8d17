"""The alert engine's disk journal: opened on demand, replayed (or read into memory) when a previous process left one, rewritten to what the database still lacks once it is back."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

from pluginmon.storage.alert_journal import AlertJournal, JournalBatch, replay_journal
from pluginmon.storage.alert_state import AlertWrite, Connection
from pluginmon.storage.outbox_store import DeliveryRecord, OutboxWrite
from pluginmon.storage.spool import SpoolError

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class JournalContents:
    """What journal batches hold, folded: the state to take back without the database."""

    # The latest write of each alert instance ((fingerprint, started_at)), in the order of
    # their latest writes.
    alerts: list[AlertWrite]
    # Every notification, oldest first, with its delivery mark if it has one.
    notifications: list[tuple[OutboxWrite, DeliveryRecord | None]]
    last_sent: dict[tuple[str, str], float]  # (receiver, group key) -> unix seconds queued


def read_back(batches: Sequence[JournalBatch], *, instance: str) -> JournalContents:
    """Fold journal batches (oldest first) into :class:`JournalContents` (pure). Entries
    without an owner (journaled before owners were recorded) get ``instance``."""
    latest: dict[tuple[str, datetime], AlertWrite] = {}
    marks: dict[str, DeliveryRecord] = {}
    notifications: list[OutboxWrite] = []
    for batch in batches:
        for entry in batch.entries:
            if isinstance(entry, DeliveryRecord):
                marks[entry.idempotency_key] = entry
                continue
            if not entry.instance:
                entry = replace(entry, instance=instance)
            if isinstance(entry, AlertWrite):
                latest.pop((entry.fingerprint, entry.started_at), None)  # later writes win
                latest[(entry.fingerprint, entry.started_at)] = entry
            else:
                notifications.append(entry)
    last_sent: dict[tuple[str, str], float] = {}
    for write in notifications:
        group = (write.receiver, write.group_key)
        last_sent[group] = max(last_sent.get(group, 0.0), write.created_at.timestamp())
    return JournalContents(
        alerts=list(latest.values()),
        notifications=[(n, marks.get(n.idempotency_key)) for n in notifications],
        last_sent=last_sent,
    )


class OutageJournal:
    """storage.alert_journal.AlertJournal as the engine uses it (file I/O in a thread).

    A failure to open, append or ack is logged once (and its recovery once) and leaves
    the engine on in-memory state only; the next cycle that needs the journal tries again.
    One lock orders every change (the engine's appends and rewrites, the journal
    deliverer's delivery marks).
    """

    def __init__(self, directory: Path, *, max_bytes: int, instance: str) -> None:
        self.directory = directory
        self._max_bytes = max_bytes
        self._instance = instance
        self._journal: AlertJournal | None = None
        self._ok = True
        # Batches a previous process left, not yet replayed into the database (nor read
        # into memory by absorb()).
        self._inherited = 0
        self._lock = asyncio.Lock()
        self._closed = False

    @property
    def batches(self) -> int:
        """Batches on disk, not yet acked."""
        return 0 if self._journal is None else self._journal.batches

    @property
    def inherited(self) -> int:
        return self._inherited

    async def open(self) -> bool:
        """Open the journal once; False (logged) if the directory cannot be used now, or
        after :meth:`close`."""
        if self._journal is not None:
            return True
        async with self._lock:
            return await self._open_locked()

    async def _open_locked(self) -> bool:
        if self._journal is not None:
            return True
        if self._closed:
            return False
        try:
            journal = await asyncio.to_thread(
                AlertJournal, self.directory, max_bytes=self._max_bytes
            )
        except (OSError, SpoolError) as exc:
            self._note(f"cannot open alert journal {self.directory}: {exc}")
            return False
        self._journal = journal
        self._inherited = journal.batches
        if journal.batches:
            logger.info(
                "alert journal %s: %d entries in %d batch(es) left by a previous run",
                journal.directory,
                journal.entries,
                journal.batches,
            )
        return True

    async def replay_inherited(self, conn: Connection) -> None:
        """Write the batches a previous process journaled, then ack them. Idempotent, so a
        crash between the commit and the ack only replays them again."""
        journal = self._journal
        if journal is None or not self._inherited:
            return
        async with self._lock:
            batches = await asyncio.to_thread(journal.read, self._inherited)
            result = await replay_journal(conn, batches, instance=self._instance)
            await asyncio.to_thread(journal.ack, batches)
            self._inherited = 0
        logger.info(
            "alert journal replayed: %d alert write(s), %d notification(s) (%d delivered "
            "from the journal), %d older than the database, %d refused",
            result.alerts,
            result.notifications,
            result.delivered,
            result.skipped,
            result.refused,
        )

    async def absorb(self) -> list[JournalBatch]:
        """The batches a previous process left, read without the database; from now on
        they count as this process's own (acked by :meth:`rewrite` once the database has
        what they hold). Empty when there are none or the journal cannot be opened."""
        if not await self.open() or not self._inherited:
            return []
        journal = self._journal
        assert journal is not None
        async with self._lock:
            try:
                batches = await asyncio.to_thread(journal.read, self._inherited)
            except (OSError, SpoolError) as exc:
                self._note(f"cannot read alert journal {self.directory}: {exc}")
                return []
            self._inherited = 0
        return batches

    async def append(
        self,
        alerts: Sequence[AlertWrite],
        outbox: Sequence[OutboxWrite],
        deliveries: Sequence[DeliveryRecord] = (),
    ) -> bool:
        """One fsync'ed batch; False (logged once) if it could not be written."""
        if not await self.open():
            return False
        journal = self._journal
        assert journal is not None
        async with self._lock:
            try:
                await asyncio.to_thread(journal.append, alerts, outbox, deliveries)
            except (OSError, SpoolError) as exc:
                self._note(f"alert journal append failed: {exc}")
                return False
        self._note(None)
        return True

    async def rewrite(
        self,
        alerts: Sequence[AlertWrite],
        outbox: Sequence[OutboxWrite],
        deliveries: Sequence[DeliveryRecord] = (),
    ) -> bool:
        """The database has everything but this: append it as one batch (if there is any),
        then ack every batch before it. False when there was nothing this process may ack
        (a previous process's batches not replayed yet) or the disk refused (logged).
        A crash in between leaves both copies, which replay the same."""
        journal = self._journal
        if journal is None or not journal.batches or self._inherited:
            return False
        async with self._lock:
            before = journal.batches
            try:
                if alerts or outbox or deliveries:
                    await asyncio.to_thread(journal.append, alerts, outbox, deliveries)
                count = await asyncio.to_thread(journal.ack_oldest, before)
            except (OSError, SpoolError) as exc:
                self._note(f"alert journal rewrite failed: {exc}")
                return False
        self._note(None)
        kept = len(alerts) + len(outbox) + len(deliveries)
        if kept:
            logger.info(
                "alert journal: %d batch(es) acked, their state is in the database; %d "
                "entries not in the database yet kept",
                count,
                kept,
            )
        else:
            logger.info("alert journal: %d batch(es) acked, their state is in the database", count)
        return True

    async def close(self) -> None:
        """Release the journal (its directory lock). Every append is already on disk."""
        async with self._lock:
            self._closed = True
            journal, self._journal = self._journal, None
            if journal is not None:
                await asyncio.to_thread(journal.close)

    def _note(self, error: str | None) -> None:
        if error is None:
            if not self._ok:
                self._ok = True
                logger.info("alert journal writable again")
        elif self._ok:
            self._ok = False
            logger.error("%s; unpersisted alert state is only in memory", error)
