"""The alert engine's disk journal: opened on demand, replayed when a previous process left one, acked once the database has it all."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path

from pluginmon.storage.alert_journal import AlertJournal, replay_journal
from pluginmon.storage.alert_state import AlertWrite, Connection
from pluginmon.storage.outbox_store import OutboxWrite
from pluginmon.storage.spool import SpoolError

logger = logging.getLogger(__name__)


class OutageJournal:
    """storage.alert_journal.AlertJournal as the engine uses it (file I/O in a thread).

    A failure to open, append or ack is logged once (and its recovery once) and leaves
    the engine on in-memory state only; the next cycle that needs the journal tries again.
    """

    def __init__(self, directory: Path, *, max_bytes: int, instance: str) -> None:
        self.directory = directory
        self._max_bytes = max_bytes
        self._instance = instance
        self._journal: AlertJournal | None = None
        self._ok = True
        # Batches a previous process left, not yet replayed into the database.
        self._inherited = 0

    @property
    def batches(self) -> int:
        """Batches on disk, not yet acked."""
        return 0 if self._journal is None else self._journal.batches

    @property
    def inherited(self) -> int:
        return self._inherited

    async def open(self) -> bool:
        """Open the journal once; False (logged) if the directory cannot be used now."""
        if self._journal is not None:
            return True
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
        batches = await asyncio.to_thread(journal.read, self._inherited)
        result = await replay_journal(conn, batches, instance=self._instance)
        await asyncio.to_thread(journal.ack, batches)
        self._inherited = 0
        logger.info(
            "alert journal replayed: %d alert write(s), %d notification(s), %d older than "
            "the database, %d refused",
            result.alerts,
            result.notifications,
            result.skipped,
            result.refused,
        )

    async def append(self, alerts: Sequence[AlertWrite], outbox: Sequence[OutboxWrite]) -> bool:
        """One fsync'ed batch; False (logged once) if it could not be written."""
        if not await self.open():
            return False
        journal = self._journal
        assert journal is not None
        try:
            await asyncio.to_thread(journal.append, alerts, outbox)
        except (OSError, SpoolError) as exc:
            self._note(f"alert journal append failed: {exc}")
            return False
        self._note(None)
        return True

    async def ack_all(self) -> bool:
        """Everything in memory reached the database: drop the journal's copy. False when
        there was nothing this process may ack (or the ack failed, logged)."""
        journal = self._journal
        if journal is None or not journal.batches or self._inherited:
            return False
        try:
            count = await asyncio.to_thread(journal.ack_all)
        except (OSError, SpoolError) as exc:
            self._note(f"alert journal ack failed: {exc}")
            return False
        logger.info("alert journal: %d batch(es) acked, their state is in the database", count)
        return True

    async def close(self) -> None:
        """Release the journal (its directory lock). Every append is already on disk."""
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
