"""Alert persistence: alert state, queued notifications and health scores to the database, the disk journal while it is away.

Over 500 lines on purpose: the alert row ids, the notification backlog and the journal's
outbox are one state, changed by the database write (one transaction, item by item when it
is refused), by the hand-over to the journal and by the journal's rewrite; they are read
together when any of them changes.

The only part of the engine that knows database ids: plugin ids come from the mapping the
caller passes each cycle (or a :class:`PluginIds` source, or the rows loaded at start), and
the id of each alert's plugin_alerts row is kept here by the alert's ``seq``. An alert or a
notification whose plugin has no id yet stays in memory, counted as unpersisted, until one
is known.

Changed alerts and queued notifications are written in one transaction, so a notification
is never in the outbox without the state that caused it (and never lost with it). While the
database is away they stay in memory and, with a journal, are appended to it on disk after
each cycle; the first cycle that reaches the database writes everything and acks the journal
(keeping on disk only what is still not in the database).

With a journal, a notification that cannot be written to the outbox table (the database is
away or not migrated yet, its plugin has no id yet) goes to :attr:`journal_outbox`, from
where the journal deliverer sends it; once the database takes it, it is reconciled into the
outbox table with its outcome (delivered ones never sent again). Without a journal it waits
in a bounded in-memory backlog for the database.

Before the owner calls the engine's ``start()`` (the schema may not exist yet) persistence
never touches the database: a journal left by a previous process is read into memory
(:meth:`absorb_journal`) and everything else is journaled.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import asyncpg

from pluginmon.alerts.book import AlertRecord
from pluginmon.alerts.health import HealthScore
from pluginmon.alerts.health_rows import HealthDue, HealthWriteSchedule
from pluginmon.alerts.journal_outbox import JournaledNotification, JournalOutbox
from pluginmon.alerts.journaling import OutageJournal, read_back
from pluginmon.alerts.metric_reads import MetricReads
from pluginmon.alerts.metric_values import plugin_metric_values
from pluginmon.alerts.planner import Notification
from pluginmon.alerts.scoring import health_labels_json
from pluginmon.collectors.models import PluginKey
from pluginmon.storage import alert_inputs, alert_state, health_store, outbox_store
from pluginmon.storage.alert_inputs import Silence
from pluginmon.storage.alert_journal import (
    JOURNAL_MAX_BYTES,
    JournalBatch,
    entry_plugin,
    replay_alert,
)
from pluginmon.storage.alert_state import AlertWrite, StoredAlert
from pluginmon.storage.errors import TRANSIENT_ERRORS
from pluginmon.storage.health_store import HealthWrite
from pluginmon.storage.outbox_store import DeliveryRecord, OutboxWrite

logger = logging.getLogger(__name__)


class PluginIds(Protocol):
    """Where persistence finds the ``plugins.id`` of a plugin key (None: not known yet).

    A ``Mapping[PluginKey, int]`` is one; so is the ingest side's id cache.
    """

    def get(self, key: PluginKey, /) -> int | None: ...


@dataclass(frozen=True, slots=True)
class StartState:
    """What a previous process left in the database for this instance."""

    open_alerts: list[StoredAlert]
    last_sent: dict[tuple[str, str], float]  # (receiver, group key) -> unix seconds queued


@dataclass(frozen=True, slots=True)
class Absorbed:
    """What a previous process journaled, read into memory without the database."""

    open_alerts: list[AlertWrite]  # the latest write of each alert instance still open
    last_sent: dict[tuple[str, str], float]  # (receiver, group key) -> unix seconds queued


@dataclass(frozen=True, slots=True)
class Inputs:
    """What one cycle read from the database besides samples."""

    silences: list[Silence]
    acknowledged: set[str]
    dependencies: Mapping[tuple[str, str], tuple[str, ...]] | None  # None: not due this cycle
    metrics: dict[PluginKey, dict[str, float]] | None  # None: not read this cycle


def _dt(t: float | None) -> datetime | None:
    return None if t is None else datetime.fromtimestamp(t, UTC)


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


NOT_STARTED = "the alert engine has not been started on the database yet (schema not ready)"
# How long a cycle waits for a database it already knows to be away (see _attempt_timeout).
OUTAGE_PROBE_SECONDS = 3.0


class AlertPersistence:
    """Reads the engine's inputs and writes its state; see the module docstring."""

    def __init__(
        self,
        pool: Any,
        *,
        instance: str,
        plugin_ids: PluginIds | None = None,
        database_timeout_seconds: float = 10.0,
        max_backlog_notifications: int = 10_000,
        plugin_health_update_seconds: float = 60.0,
        health_write_interval_seconds: float = 0.0,
        dependencies_refresh_seconds: float = 30.0,
        metrics_max_age_seconds: float = 600.0,
        registry_metrics_interval_seconds: float = 0.0,
        spool_dir: Path | None = None,
        journal_max_bytes: int = JOURNAL_MAX_BYTES,
    ) -> None:
        self.instance = instance
        self._pool = pool
        self._ids_source = plugin_ids
        self._cycle_ids: PluginIds | None = None
        self._known_ids: dict[PluginKey, int] = {}  # from the rows loaded at start
        # The plugins of the last cycle whose ids were all known, those ids, and their
        # (id, environment) pairs.
        self._pairs_keys: list[PluginKey] = []
        self._pairs_ids: list[int | None] = []
        self._pairs: dict[tuple[int, str], PluginKey] = {}
        self._db_timeout = database_timeout_seconds
        self._max_backlog = max_backlog_notifications
        self._deps_refresh = dependencies_refresh_seconds
        self._deps_loaded_at: float | None = None
        self._metrics_max_age = timedelta(seconds=metrics_max_age_seconds)
        # The registry's gauges at the rate the registry job writes them (metric_reads).
        self.metric_reads = MetricReads(registry_interval_seconds=registry_metrics_interval_seconds)
        self._journal = (
            None
            if spool_dir is None
            else OutageJournal(spool_dir, max_bytes=journal_max_bytes, instance=instance)
        )
        self.journal_outbox: JournalOutbox | None = (
            None
            if self._journal is None
            else JournalOutbox(
                record=self._record_deliveries, max_entries=max_backlog_notifications
            )
        )
        """Notifications the outbox table could not take, delivered from the journal
        (None without a journal: they wait in memory for the database)."""

        self._row_ids: dict[int, int] = {}  # alert seq -> plugin_alerts.id
        self._unsaved: dict[int, AlertRecord] = {}  # alert seq -> changed, not in the database
        self._unjournaled: dict[int, AlertRecord] = {}  # changed since last journaled
        self._backlog: list[Notification] = []
        # Alert writes read from a previous process's journal (absorb_journal), to replay
        # into the database before anything newer; the seq of the book's record of each
        # open one, which takes the row id.
        self._absorbed: list[AlertWrite] = []
        self._absorbed_seq: dict[int, int] = {}  # id() of an absorbed write -> book seq
        self._compacted_batches: int | None = None  # journal batches after the last rewrite
        # Which plugins' health_score rows and plugins.health_score to write each cycle.
        self._health_writes = HealthWriteSchedule(
            row_interval_seconds=health_write_interval_seconds,
            plugin_interval_seconds=plugin_health_update_seconds,
        )
        self._db_ok = True

    @property
    def _attempt_timeout(self) -> float:
        # While the database is known to be away, a cycle only probes it, briefly: a
        # database that accepts connections and never answers must not hold up evaluation
        # (and so every alert) for the whole timeout each cycle.
        return self._db_timeout if self._db_ok else min(self._db_timeout, OUTAGE_PROBE_SECONDS)

    @property
    def unpersisted_alerts(self) -> int:
        return len(self._unsaved)

    @property
    def unpersisted_notifications(self) -> int:
        """Notifications not in the outbox table yet (in memory, or held by the journal)."""
        held = 0 if self.journal_outbox is None else len(self.journal_outbox)
        return len(self._backlog) + held

    @property
    def journal_batches(self) -> int:
        return 0 if self._journal is None else self._journal.batches

    # --- plugin ids ---------------------------------------------------------------------------

    def use_ids(self, plugin_ids: PluginIds | None) -> None:
        """The ids the caller knows this cycle (consulted before the constructor's source)."""
        self._cycle_ids = plugin_ids

    def plugin_id(self, key: PluginKey) -> int | None:
        for source in (self._cycle_ids, self._ids_source):
            if source is not None and (found := source.get(key)) is not None:
                return found
        return self._known_ids.get(key)

    def _ids_of(self, keys: list[PluginKey]) -> list[int | None]:
        """:meth:`plugin_id` of each key: one C-level pass over the first source (the usual
        case: the sink's ids, which has them all), :meth:`plugin_id` only for the keys it
        lacks."""
        first = self._cycle_ids if self._cycle_ids is not None else self._ids_source
        if first is None:
            return [self._known_ids.get(key) for key in keys]
        ids = list(map(first.get, keys))
        if None in ids:
            ids = [
                self.plugin_id(key) if pid is None else pid
                for key, pid in zip(keys, ids, strict=True)
            ]
        return ids

    def _entry_plugin_id(self, entry: JournaledNotification) -> int | None:
        return entry.write.plugin_id or self.plugin_id(entry.key)

    # --- start --------------------------------------------------------------------------------

    async def start(self) -> StartState:
        """Replay the journal a previous process left (if any and not absorbed), then adopt
        rows that have no owner yet (written before owners were recorded) and load this
        instance's open alerts and last notification times. Transient database errors
        propagate."""
        if self._journal is not None:
            await self._journal.open()
        async with asyncio.timeout(self._attempt_timeout), self._pool.acquire() as conn:
            if self._journal is not None:
                await self._journal.replay_inherited(conn)
            adopted = await alert_state.adopt_unowned(conn, self.instance)
            if any(adopted):
                logger.info(
                    "instance %s adopted %d open alert(s) and %d pending notification(s) "
                    "that had no owner",
                    self.instance,
                    *adopted,
                )
            stored = await alert_state.load_open_alerts(conn, self.instance)
            last = await outbox_store.last_notified(conn, self.instance)
        return StartState(stored, {k: v.timestamp() for k, v in last.items()})

    def adopt(self, alert: AlertRecord, row: StoredAlert) -> None:
        """``alert`` is the book's record of the stored ``row``."""
        self._row_ids[alert.seq] = row.id
        self._known_ids.setdefault(alert.key, row.plugin_id)

    async def absorb_journal(self) -> Absorbed | None:
        """Read what a previous process journaled into memory, without the database (it may
        be away, or not migrated yet): every alert write, to replay into the database
        first; the open alerts, for the book to restore; the notifications with their
        delivery marks, into :attr:`journal_outbox` (delivered from there). The batches
        stay on disk until the database has all of it. None when there is nothing."""
        if self._journal is None or self.journal_outbox is None:
            return None
        batches = await self._journal.absorb()
        if not batches:
            return None
        return self._take_batches(batches)

    def _take_batches(self, batches: Sequence[JournalBatch]) -> Absorbed:
        assert self.journal_outbox is not None
        contents = read_back(batches, instance=self.instance)
        for write, mark in contents.notifications:
            key = PluginKey(write.tenant_id, entry_plugin(write), write.environment)
            if write.plugin_id is not None:
                self._known_ids.setdefault(key, write.plugin_id)
            self.journal_outbox.add(write, key, journaled=True, record=mark)
        self._absorbed = list(contents.alerts)
        open_alerts = [w for w in contents.alerts if w.resolved_at is None]
        logger.info(
            "alert journal read without the database: %d alert instance(s) (%d open), "
            "%d notification(s) (%d already delivered or given up)",
            len(contents.alerts),
            len(open_alerts),
            len(contents.notifications),
            sum(1 for _, mark in contents.notifications if mark is not None),
        )
        return Absorbed(open_alerts, contents.last_sent)

    def adopt_absorbed(self, alert: AlertRecord, write: AlertWrite) -> None:
        """``alert`` is the book's record of the journaled ``write`` (it takes the row id
        when the write reaches the database)."""
        if write.plugin_id is not None:
            self._known_ids.setdefault(alert.key, write.plugin_id)
        self._absorbed_seq[id(write)] = alert.seq

    # --- inputs -------------------------------------------------------------------------------

    async def read_inputs(
        self, now: datetime, keys: Iterable[PluginKey], metric_names: Sequence[str]
    ) -> Inputs | str:
        """Silences, acknowledgements, runtime dependencies (every
        ``dependencies_refresh_seconds``) and, when ``metric_names`` is not empty, the latest
        plugin_metrics values of ``keys``; a transient database error as a string."""
        try:
            async with asyncio.timeout(self._attempt_timeout), self._pool.acquire() as conn:
                silences = await alert_inputs.active_silences(conn, now)
                acked = await alert_state.acknowledged(conn)
                deps = None
                ts = now.timestamp()
                if self._deps_loaded_at is None or ts - self._deps_loaded_at >= self._deps_refresh:
                    deps = await alert_inputs.runtime_dependencies(conn)
                    self._deps_loaded_at = ts
                metrics = None
                if metric_names:
                    metrics = await self._metric_values(conn, keys, metric_names, now)
        except TRANSIENT_ERRORS as exc:
            return _error(exc)
        return Inputs(silences, set(acked), deps, metrics)

    async def _metric_values(
        self, conn: Any, keys: Iterable[PluginKey], names: Sequence[str], now: datetime
    ) -> dict[PluginKey, dict[str, float]]:
        # (plugin id, environment): the same plugin in two environments shares one
        # plugins.id, and each environment has its own series
        keys = list(keys)
        ids = self._ids_of(keys)
        by_id = self._pairs
        if keys != self._pairs_keys or ids != self._pairs_ids:
            # Built again only when the plugins or their ids change, or some id is still
            # unknown (10,000 pairs and dict entries a cycle otherwise).
            by_id = {}
            for key, pid in zip(keys, ids, strict=True):
                if pid is not None:
                    by_id[(pid, key.environment)] = key
            complete = len(by_id) == len(keys)
            self._pairs_keys, self._pairs_ids, self._pairs = (
                (keys, ids, by_id) if complete else ([], [], {})
            )
        reads = self.metric_reads
        ts = now.timestamp()
        plan = reads.plan(names, by_id.keys(), now=ts)
        read: dict[tuple[int, str, str], float] = {}
        if plan.names:
            # Gauges as their value, counters as rates, name:pNN as quantiles (metric_values).
            read = await plugin_metric_values(
                conn, list(by_id), plan.names, now - self._metrics_max_age, now=now
            )
        values = reads.take(plan, read, by_id.keys(), now=ts)
        metrics: dict[PluginKey, dict[str, float]] = defaultdict(dict)
        for (pid, env, name), value in values.items():
            metrics[by_id[(pid, env)]][name] = value
        return dict(metrics)

    # --- what to write ------------------------------------------------------------------------

    def track(self, changed: Iterable[AlertRecord]) -> None:
        """Alerts whose state changed (the book's :meth:`take_changed`)."""
        for alert in changed:
            self._unsaved[alert.seq] = alert
            self._unjournaled[alert.seq] = alert

    def queue(self, notifications: Sequence[Notification]) -> None:
        """Notifications to write with the state; the oldest go beyond the backlog bound."""
        self._backlog.extend(notifications)
        if len(self._backlog) > self._max_backlog:
            dropped = len(self._backlog) - self._max_backlog
            del self._backlog[:dropped]
            logger.warning(
                "dropped %d queued notification(s): the database has been unreachable too long",
                dropped,
            )

    async def save(
        self,
        now: datetime,
        open_alerts: Iterable[AlertRecord],
        health: Sequence[HealthScore],
        *,
        database_error: str | None = None,
    ) -> tuple[str | None, int]:
        """Write what changed; hand what the outbox table did not take to the journal's
        outbox; journal what the database does not have; once the database has everything
        it can, rewrite the journal to what is still only in memory (usually nothing).

        Returns the database error (None when everything with a plugin id is in the
        database; ``database_error`` when it is already known this cycle) and how many
        notifications went to the journal's outbox.
        """
        error = database_error
        if error is None:
            error = await self._write(now, open_alerts, health)
        self._note_database(error)
        handed = self._hand_over()
        await self._journal_unsaved(now)
        if error is None:
            await self._compact(now)
        return error, handed

    def _hand_over(self) -> int:
        """Notifications the outbox table did not take go to the journal's outbox (with a
        journal), journaled by the caller and delivered from there."""
        held = self.journal_outbox
        if held is None or not self._backlog:
            return 0
        for n in self._backlog:
            held.add(self._outbox_write(n, self.plugin_id(n.key)), n.key, journaled=False)
        count = len(self._backlog)
        self._backlog = []
        return count

    async def _write(
        self, now: datetime, open_alerts: Iterable[AlertRecord], health: Sequence[HealthScore]
    ) -> str | None:
        held = self.journal_outbox
        taken: list[tuple[JournaledNotification, int]] = []
        written = False
        try:
            async with asyncio.timeout(self._db_timeout), self._pool.acquire() as conn:
                if self._journal is not None:
                    # A journal this process could not replay at start goes in first, in order.
                    await self._journal.replay_inherited(conn)
                absorbed = [
                    (replace(w, plugin_id=pid), self._absorbed_seq.get(id(w)))
                    for w in self._absorbed
                    if (pid := w.plugin_id or self.plugin_id(self._write_key(w))) is not None
                ]
                alerts: list[tuple[AlertRecord, int]] = []
                for alert in sorted(self._unsaved.values(), key=lambda a: a.seq):
                    pid = self.plugin_id(alert.key)
                    if pid is not None:
                        alerts.append((alert, pid))
                if held is not None:
                    taken = held.take_reconcilable(self._entry_plugin_id)
                    taken_keys = {id(e) for e, _ in taken}
                    # a group with a notification still held by the journal (in flight, or no
                    # plugin id yet): its newer ones wait behind it there, in order
                    blocked = {
                        e.group
                        for e in held.entries()
                        if not e.finished and id(e) not in taken_keys
                    }
                else:
                    blocked = set()
                outbox: list[tuple[Notification, int]] = []
                for n in self._backlog:
                    pid = self.plugin_id(n.key)
                    if (
                        pid is not None
                        and (n.receiver_kind, n.receiver, n.group_key) not in blocked
                    ):
                        outbox.append((n, pid))
                unsaved, row_ids = self._unsaved, self._row_ids
                clean = [a for a in open_alerts if a.seq not in unsaved and a.seq in row_ids]
                batch = _Batch(absorbed, alerts, taken, outbox)
                try:
                    async with conn.transaction():
                        ids = await self._write_batch(conn, batch, now, item_by_item=False)
                        await alert_state.touch_alerts(
                            conn, [row_ids[a.seq] for a in clean], [a.value for a in clean], now
                        )
                except TRANSIENT_ERRORS:
                    raise
                except asyncpg.PostgresError:
                    # One bad row (say, its plugin was deleted) must not block every other
                    # alert forever: save item by item, dropping what the database refuses.
                    logger.exception("alert state refused as a whole; saving it item by item")
                    async with conn.transaction():
                        ids = await self._write_batch(conn, batch, now, item_by_item=True)
                written = True
                # those still without a plugin id wait for one
                self._absorbed = [
                    w
                    for w in self._absorbed
                    if (w.plugin_id or self.plugin_id(self._write_key(w))) is None
                ]
                kept = {id(w) for w in self._absorbed}
                self._absorbed_seq = {k: v for k, v in self._absorbed_seq.items() if k in kept}
                for (alert, _), row_id in zip(alerts, ids, strict=True):
                    del unsaved[alert.seq]
                    self._unjournaled.pop(alert.seq, None)
                    if alert.resolved_at is not None:
                        row_ids.pop(alert.seq, None)  # closed: never written again
                    elif row_id is not None:
                        row_ids[alert.seq] = row_id
                done = {id(n) for n, _ in outbox}
                self._backlog = [n for n in self._backlog if id(n) not in done]
                if held is not None:
                    held.remove(e for e, _ in taken)
                await self._write_health(conn, now, health)
        except TRANSIENT_ERRORS as exc:
            return _error(exc)
        finally:
            if held is not None and not written:
                held.release(e for e, _ in taken)
        return None

    @staticmethod
    def _write_key(write: AlertWrite) -> PluginKey:
        return PluginKey(write.tenant_id, entry_plugin(write), write.environment)

    async def _write_batch(
        self, conn: Any, batch: _Batch, now: datetime, *, item_by_item: bool
    ) -> list[int | None]:
        """Absorbed journal writes, changed alerts, the journal's notifications (with their
        outcomes), then the new ones, in that order; returns the row id of each changed
        alert (None: refused). ``item_by_item``: each in a savepoint, refused ones dropped
        and logged."""

        async def each(what: str, write: Callable[[], Awaitable[Any]]) -> tuple[bool, Any]:
            if not item_by_item:
                return True, await write()
            try:
                async with conn.transaction():  # a savepoint
                    return True, await write()
            except TRANSIENT_ERRORS:
                raise
            except (asyncpg.PostgresError, ValueError) as exc:
                logger.error("dropping %s: %s", what, exc)
                return False, None

        for write, seq in batch.absorbed:
            what = (
                f"journaled state of alert {write.rule_name} for {write.tenant_id}/"
                f"{entry_plugin(write)}"
            )
            _, row_id = await each(what, partial(replay_alert, conn, write))
            if row_id is not None and seq is not None and write.resolved_at is None:
                self._row_ids.setdefault(seq, row_id)
        ids: list[int | None] = []
        for alert, pid in batch.alerts:
            what = f"state of alert {alert.rule.name} for {alert.key.tenant}/{alert.key.plugin}"
            write_ = self._alert_write(alert, pid, now)
            _, row_id = await each(what, partial(alert_state.save_alert, conn, write_))
            ids.append(row_id)
        reconciled = [e.reconciled(pid) for e, pid in batch.taken]
        new = [self._outbox_write(n, pid) for n, pid in batch.outbox]
        if item_by_item:
            for r in reconciled:
                await each(_about(r.write), partial(outbox_store.reconcile_outbox, conn, [r]))
            for row in new:
                await each(_about(row), partial(outbox_store.insert_outbox, conn, [row]))
        else:
            await outbox_store.reconcile_outbox(conn, reconciled)
            await outbox_store.insert_outbox(conn, new)
        return ids

    async def _write_health(self, conn: Any, now: datetime, health: Sequence[HealthScore]) -> None:
        ts = now.timestamp()
        due: list[HealthDue] = []
        rows: list[HealthWrite] = []
        for item in self._health_writes.due(health, ts):
            key = item.score.key
            pid = self.plugin_id(key)
            if pid is None:
                continue
            due.append(item)
            rows.append(
                HealthWrite(
                    tenant_id=key.tenant,
                    plugin_id=pid,
                    environment=key.environment,
                    score=item.score.score,
                    labels_json=health_labels_json(item.score) if item.row else "",
                    update_plugin=item.plugin,
                    write_row=item.row,
                )
            )
        try:
            await health_store.write_health(conn, rows, now)
        except TRANSIENT_ERRORS:
            raise
        except Exception:
            # Health rows are derived data: never let them block alert persistence.
            logger.exception("could not write health scores")
            return
        self._health_writes.written(due, ts)

    # --- the journal --------------------------------------------------------------------------

    async def _journal_unsaved(self, now: datetime) -> None:
        """Append what the database does not have and the journal does not hold yet (alerts
        of plugins without an id too: the id is looked up when they reach the database)."""
        if self._journal is None:
            return
        alerts = sorted(self._unjournaled.values(), key=lambda a: a.seq)
        entries = (
            []
            if self.journal_outbox is None
            else [e for e in self.journal_outbox.entries() if not e.journaled]
        )
        if not alerts and not entries:
            return
        if await self._journal.append(
            [self._alert_write(a, self.plugin_id(a.key), now) for a in alerts],
            [e.write for e in entries],
            [e.record for e in entries if e.record is not None],
        ):
            for alert in alerts:
                del self._unjournaled[alert.seq]
            for e in entries:
                e.journaled = True

    async def _compact(self, now: datetime) -> None:
        """The database took everything it can: keep on disk only what is still only in
        memory (alerts and notifications of plugins without an id yet, notifications held
        by the journal's outbox), in one new batch, and ack every older batch."""
        journal = self._journal
        if journal is None or not journal.batches:
            return
        alerts = sorted(self._unsaved.values(), key=lambda a: a.seq)
        entries = [] if self.journal_outbox is None else self.journal_outbox.entries()
        absorbed = list(self._absorbed)
        if (alerts or entries or absorbed) and journal.batches == self._compacted_batches:
            return  # nothing appended since the last rewrite
        if await journal.rewrite(
            absorbed + [self._alert_write(a, self.plugin_id(a.key), now) for a in alerts],
            [e.write for e in entries],
            [e.record for e in entries if e.record is not None],
        ):
            self._unjournaled.clear()
            for e in entries:
                e.journaled = True
            self._compacted_batches = journal.batches

    async def _record_deliveries(self, records: Sequence[DeliveryRecord]) -> bool:
        """Append delivery marks (the journal deliverer's outcomes); False if not on disk."""
        if self._journal is None:
            return False
        return await self._journal.append([], [], records)

    async def aclose(self) -> None:
        """Release the journal (its directory lock); writes nothing."""
        if self._journal is not None:
            await self._journal.close()

    # --- rows ---------------------------------------------------------------------------------

    def _alert_write(self, a: AlertRecord, plugin_id: int | None, now: datetime) -> AlertWrite:
        return AlertWrite(
            id=self._row_ids.get(a.seq),
            tenant_id=a.key.tenant,
            plugin_id=plugin_id,
            environment=a.key.environment,
            rule_name=a.rule.name,
            fingerprint=a.fingerprint,
            severity=a.rule.severity,
            status=a.status,
            inhibited=a.inhibited,
            value=a.value,
            labels=a.labels,
            annotations=a.annotations,
            started_at=datetime.fromtimestamp(a.started_at, UTC),
            fired_at=_dt(a.fired_at),
            resolved_at=_dt(a.resolved_at),
            silenced_until=_dt(a.silenced_until),
            last_active_at=_dt(a.last_active_at),
            last_evaluated_at=now,
            notified_at=now if a.notified else None,
            instance=self.instance,
            plugin=a.key.plugin,
        )

    def _outbox_write(self, n: Notification, plugin_id: int | None) -> OutboxWrite:
        return OutboxWrite(
            tenant_id=n.key.tenant,
            plugin_id=plugin_id,
            environment=n.key.environment,
            receiver=n.receiver,
            receiver_kind=n.receiver_kind,
            group_key=n.group_key,
            idempotency_key=n.idempotency_key,
            body=n.body,
            fingerprints=n.fingerprints,
            created_at=n.created_at,
            instance=self.instance,
            plugin=n.key.plugin,
        )

    def _note_database(self, error: str | None) -> None:
        if error is None and not self._db_ok:
            self._db_ok = True
            logger.info("alert state persisted again: database reachable")
        elif error is NOT_STARTED and self._db_ok:
            self._db_ok = False
            logger.info(
                "alert engine not started on the database yet: evaluating in memory%s",
                ""
                if self._journal is None
                else " and journaling; notifications go out from the journal",
            )
        elif error is not None and self._db_ok:
            self._db_ok = False
            logger.warning(
                "alert state kept in memory%s, database unreachable (%s); will persist when "
                "it is back",
                "" if self._journal is None else " and in the journal",
                error,
            )


def _about(row: OutboxWrite) -> str:
    return f"notification to {row.receiver} about {row.tenant_id}/{row.group_key}"


@dataclass(frozen=True, slots=True)
class _Batch:
    """What one write takes to the database, in order."""

    absorbed: list[tuple[AlertWrite, int | None]]
    alerts: list[tuple[AlertRecord, int]]
    taken: list[tuple[JournaledNotification, int]]
    outbox: list[tuple[Notification, int]]
