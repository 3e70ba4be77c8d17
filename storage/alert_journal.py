"""The alerts' disk journal: alert writes, outbox rows and delivery outcomes the database could not take yet, and their replay.

While the database is away (or before it is migrated, or while a plugin has no database id
yet) the engine appends what it could not persist (alert writes and outbox rows) to this
journal, so a crash loses neither; notifications delivered from the journal meanwhile get a
delivery mark when they are delivered or given up. The journal is a storage.spool.Spool
(length + CRC-32 records, fsync per append, torn tail truncated on open, a directory lock);
each batch is rows of (kind, JSON document), kind "alert", "outbox" or "delivery", in the
order the engine would have written them. JSON, not pickle: data, never code.

The JSON documents are the models themselves: pydantic ``TypeAdapter``s over the frozen
:class:`~pluginmon.storage.alert_state.AlertWrite`,
:class:`~pluginmon.storage.outbox_store.OutboxWrite` and
:class:`~pluginmon.storage.outbox_store.DeliveryRecord` dataclasses encode and validate
them, plus a format version ``"v"``. Version 2 (written now) adds ``plugin`` (the plugin's
name) and lets ``plugin_id`` be null: entries journaled before the plugin had a database id.
Version 1 is the document the hand-written codec before it wrote (field names, ISO 8601
timestamps with a zone, ``NaN`` kept as ``NaN``), so journals written by earlier versions
replay unchanged; the timestamps written now end in ``Z`` instead of ``+00:00``, which both
readers accept.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import asyncpg
from pydantic import TypeAdapter, ValidationError

from pluginmon.storage.alert_state import QUERY_TIMEOUT_SECONDS, AlertWrite, Connection, save_alert
from pluginmon.storage.errors import TRANSIENT_ERRORS
from pluginmon.storage.outbox_store import (
    DeliveryRecord,
    OutboxWrite,
    ReconciledNotification,
    insert_outbox,
    reconcile_outbox,
)
from pluginmon.storage.queries import check_plugin_key, ensure_plugins_each
from pluginmon.storage.spool import Spool, SpooledBatch

logger = logging.getLogger(__name__)

JOURNAL_FORMAT_VERSION: Final = 2
_READABLE_VERSIONS: Final = frozenset({1, 2})
JOURNAL_MAX_BYTES: Final = 64 * 1024 * 1024
_KIND_ALERT: Final = "alert"
_KIND_OUTBOX: Final = "outbox"
_KIND_DELIVERY: Final = "delivery"

_ALERT_WRITE: Final = TypeAdapter(AlertWrite)
_OUTBOX_WRITE: Final = TypeAdapter(OutboxWrite)
_DELIVERY_RECORD: Final = TypeAdapter(DeliveryRecord)

JournalEntry = AlertWrite | OutboxWrite | DeliveryRecord


class JournalFormatError(ValueError):
    """A journal entry this version of pluginmon cannot read."""


def _encode(adapter: TypeAdapter[Any], write: JournalEntry) -> str:
    # mode="json" turns datetimes into ISO strings and leaves floats as floats, so NaN
    # stays NaN (dump_json would write null); sort_keys as the v1 codec did.
    document = adapter.dump_python(write, mode="json")
    document["v"] = JOURNAL_FORMAT_VERSION
    return json.dumps(document, sort_keys=True, allow_nan=True)


def _decode(adapter: TypeAdapter[Any], text: str, what: str) -> Any:
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise JournalFormatError(f"{what} entry is not JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise JournalFormatError(f"{what} entry is not a JSON object")
    version = raw.pop("v", None)
    if version not in _READABLE_VERSIONS or isinstance(version, bool):
        raise JournalFormatError(f"{what} entry format {version!r} is not supported")
    try:
        write = adapter.validate_python(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(entry)'}: {e['msg']}" for e in exc.errors()
        )
        raise JournalFormatError(f"malformed {what} entry: {problems}") from exc
    for f in dataclasses.fields(write):
        value = getattr(write, f.name)
        if isinstance(value, datetime) and value.tzinfo is None:
            raise JournalFormatError(f"malformed {what} entry: {f.name}: timestamp without a zone")
    return write


def encode_alert_write(write: AlertWrite) -> str:
    return _encode(_ALERT_WRITE, write)


def decode_alert_write(text: str) -> AlertWrite:
    """An alert entry; without ``instance`` (written before owners were recorded) it is ''
    (replay gives it the replaying engine's instance, see :func:`replay_journal`)."""
    write: AlertWrite = _decode(_ALERT_WRITE, text, "alert")
    return write


def encode_outbox_write(write: OutboxWrite) -> str:
    return _encode(_OUTBOX_WRITE, write)


def decode_outbox_write(text: str) -> OutboxWrite:
    write: OutboxWrite = _decode(_OUTBOX_WRITE, text, "outbox")
    return write


def encode_delivery(record: DeliveryRecord) -> str:
    return _encode(_DELIVERY_RECORD, record)


def decode_delivery(text: str) -> DeliveryRecord:
    record: DeliveryRecord = _decode(_DELIVERY_RECORD, text, "delivery")
    if record.outcome not in ("delivered", "failed"):
        raise JournalFormatError(f"malformed delivery entry: outcome: {record.outcome!r}")
    return record


@dataclass(frozen=True, slots=True)
class JournalBatch:
    """One appended batch, decoded; ``handle`` is what :meth:`AlertJournal.ack` needs."""

    handle: SpooledBatch
    entries: tuple[JournalEntry, ...]


class AlertJournal:
    """The alerts' append-only disk journal (a Spool of (kind, JSON) rows), see above.

    Blocking file I/O, like Spool: async callers go through ``asyncio.to_thread``.
    """

    def __init__(self, directory: Path, *, max_bytes: int = JOURNAL_MAX_BYTES) -> None:
        self._spool = Spool(directory, max_bytes=max_bytes, segment_bytes=max_bytes // 8)
        self.directory = self._spool.directory

    @property
    def batches(self) -> int:
        """Batches appended and not yet acked."""
        return self._spool.batches

    @property
    def entries(self) -> int:
        return self._spool.rows

    def append(
        self,
        alerts: Sequence[AlertWrite],
        outbox: Sequence[OutboxWrite],
        deliveries: Sequence[DeliveryRecord] = (),
    ) -> None:
        """One batch, fsync'ed before returning (SpoolFullError at the cap, OSError)."""
        rows: list[tuple[object, ...]] = [(_KIND_ALERT, encode_alert_write(a)) for a in alerts]
        rows += [(_KIND_OUTBOX, encode_outbox_write(o)) for o in outbox]
        rows += [(_KIND_DELIVERY, encode_delivery(d)) for d in deliveries]
        self._spool.append(rows)

    def read(self, max_batches: int | None = None) -> list[JournalBatch]:
        """The oldest ``max_batches`` batches (all when None), decoded, oldest first.

        An entry that does not decode is logged and left out (its batch is still acked).
        """
        batches: list[JournalBatch] = []
        for spooled in self._spool.replay():
            if max_batches is not None and len(batches) >= max_batches:
                break
            entries: list[JournalEntry] = []
            for row in spooled.rows:
                kind, text = row[0], row[1]
                try:
                    if kind == _KIND_ALERT and isinstance(text, str):
                        entries.append(decode_alert_write(text))
                    elif kind == _KIND_OUTBOX and isinstance(text, str):
                        entries.append(decode_outbox_write(text))
                    elif kind == _KIND_DELIVERY and isinstance(text, str):
                        entries.append(decode_delivery(text))
                    else:
                        raise JournalFormatError(f"unknown entry kind {kind!r}")
                except JournalFormatError as exc:
                    logger.error("alert journal %s: skipping entry: %s", self.directory, exc)
            batches.append(JournalBatch(spooled, tuple(entries)))
        return batches

    def ack(self, batches: Sequence[JournalBatch]) -> None:
        """Forget these batches (written to the database); oldest first, as read."""
        for batch in batches:
            self._spool.peek()  # drops an undecodable head that read() skipped
            self._spool.ack(batch.handle)

    def ack_all(self) -> int:
        """Forget every batch; returns how many there were."""
        return self.ack_oldest(None)

    def ack_oldest(self, count: int | None) -> int:
        """Forget the ``count`` oldest batches (all when None); returns how many were."""
        acked = 0
        while count is None or acked < count:
            head = self._spool.peek()
            if head is None:
                break
            self._spool.ack(head)
            acked += 1
        return acked

    def close(self) -> None:
        self._spool.close()


# --- replay -------------------------------------------------------------------------------------

_FIND_ALERT_INSTANCE = """
SELECT id, last_evaluated_at FROM plugin_alerts
 WHERE plugin_id = $1 AND started_at = $2 AND fingerprint = $3
 ORDER BY id DESC LIMIT 1
"""


async def replay_alert(conn: Connection, write: AlertWrite) -> int | None:
    """Apply one journaled alert write idempotently; returns the row id, None if skipped.

    The instance is found by (plugin, started_at, fingerprint), so replaying a journal twice
    updates the same row instead of inserting a second one; a row evaluated after the write
    was journaled (the database came back and the engine wrote newer state) is left alone.
    """
    row = await conn.fetchrow(
        _FIND_ALERT_INSTANCE,
        write.plugin_id,
        write.started_at,
        write.fingerprint,
        timeout=QUERY_TIMEOUT_SECONDS,
    )
    if row is not None:
        stored_at = row["last_evaluated_at"]
        if stored_at is not None and stored_at > write.last_evaluated_at:
            return None
        return await save_alert(conn, replace(write, id=int(row["id"])))
    return await save_alert(conn, replace(write, id=None))


@dataclass(frozen=True, slots=True)
class ReplayResult:
    alerts: int  # alert writes applied
    notifications: int  # outbox rows offered (a key already in the outbox is kept as is)
    skipped: int  # older than the stored row
    refused: int  # refused by the database (say, the plugin was deleted), logged
    delivered: int = 0  # notifications the journal delivered, recorded as delivered


def entry_plugin(entry: AlertWrite | OutboxWrite) -> str:
    """The plugin's name of an entry (v1 alert entries name it in their labels only)."""
    if entry.plugin:
        return entry.plugin
    if isinstance(entry, AlertWrite):
        return entry.labels.get("plugin", "")
    return ""


def _permanent(exc: BaseException) -> bool:
    return isinstance(exc, asyncpg.PostgresError) and not isinstance(exc, TRANSIENT_ERRORS)


class PluginIdResolver:
    """Plugin ids of journal entries journaled before their plugin had one, looked up (and
    the plugin created, as the sample sink would) by (tenant, name) for a whole replay at
    once, before its transaction: the plugins it creates and their audit entries commit on
    their own (storage.queries.ensure_plugins), so the replay's long transaction holds no
    tenant's audit chain head, and a savepoint rolled back never takes an id with it."""

    def __init__(self) -> None:
        self._ids: dict[tuple[str, str], int] = {}
        self._refused: dict[tuple[str, str], str] = {}

    async def prepare(self, conn: Connection, batches: Sequence[JournalBatch]) -> None:
        keys: list[tuple[str, str, str]] = []
        for batch in batches:
            for entry in batch.entries:
                if isinstance(entry, DeliveryRecord) or entry.plugin_id is not None:
                    continue
                key = (entry.tenant_id, entry_plugin(entry))
                try:
                    check_plugin_key(*key)
                except ValueError as exc:
                    self._refused[key] = str(exc)
                else:
                    keys.append((*key, entry.environment))
        if not keys:
            return
        # The database refuses one of them for good (e.g. a NUL in a name): each alone, so only
        # that plugin's entries are dropped, as the replay drops an entry the database refuses.
        ids, refused = await ensure_plugins_each(conn, keys, refused=_permanent)
        self._ids.update(ids)
        self._refused.update(refused)

    def resolve(self, entry: AlertWrite | OutboxWrite) -> int:
        """The entry's plugin id; ValueError when the schema refuses the plugin."""
        if entry.plugin_id is not None:
            return entry.plugin_id
        key = (entry.tenant_id, entry_plugin(entry))
        if key in self._refused:
            raise ValueError(self._refused[key])
        return self._ids[key]


async def replay_journal(
    conn: Connection, batches: Sequence[JournalBatch], *, instance: str = ""
) -> ReplayResult:
    """Write journaled batches in order, in one transaction; safe to repeat. (The plugins
    that entries without an id name are created first, committed on their own.)

    Each entry keeps the owner instance it was journaled with; an entry without one (written
    before owners were recorded) gets ``instance``, the replaying engine's: the journal lives
    in that daemon's data directory. An entry without a plugin id gets it now (by name).

    Alert rows are upserted per instance (:func:`replay_alert`), outbox rows are inserted
    with ``ON CONFLICT (tenant_id, idempotency_key) DO NOTHING``, so a notification that was already
    written (or delivered) is not queued twice; one the journal has a delivery mark for is
    written with that outcome (delivered: its key in alert_notifications_sent, so it is
    never POSTed again). Entries the database refuses for good are dropped one by one
    (savepoints) and logged; connection errors propagate.
    """
    marks = {
        e.idempotency_key: e
        for batch in batches
        for e in batch.entries
        if isinstance(e, DeliveryRecord)
    }
    ids = PluginIdResolver()
    await ids.prepare(conn, batches)
    alerts = notifications = skipped = refused = delivered = 0
    async with conn.transaction():
        for batch in batches:
            for entry in batch.entries:
                if isinstance(entry, DeliveryRecord):
                    continue
                if not entry.instance and instance:
                    entry = replace(entry, instance=instance)
                try:
                    async with conn.transaction():  # a savepoint
                        entry = replace(entry, plugin_id=ids.resolve(entry))
                        if isinstance(entry, AlertWrite):
                            if await replay_alert(conn, entry) is None:
                                skipped += 1
                            else:
                                alerts += 1
                        elif (mark := marks.get(entry.idempotency_key)) is not None:
                            await reconcile_outbox(conn, [ReconciledNotification(entry, mark)])
                            notifications += 1
                            delivered += mark.outcome == "delivered"
                        else:
                            await insert_outbox(conn, [entry])
                            notifications += 1
                except (asyncpg.PostgresError, ValueError) as exc:
                    if isinstance(exc, TRANSIENT_ERRORS):
                        raise
                    refused += 1
                    logger.error(
                        "alert journal: dropping %s for tenant %s plugin %s: %s",
                        "alert state" if isinstance(entry, AlertWrite) else "notification",
                        entry.tenant_id,
                        entry.plugin_id if entry.plugin_id is not None else entry_plugin(entry),
                        exc,
                    )
    return ReplayResult(alerts, notifications, skipped, refused, delivered)
