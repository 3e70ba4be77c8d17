"""Alert persistence: alert state, queued notifications and health scores to the database, the disk journal while it is away.

The only part of the engine that knows database ids: plugin ids come from the mapping the
caller passes each cycle (or a :class:`PluginIds` source, or the rows loaded at start), and
the id of each alert's plugin_alerts row is kept here by the alert's ``seq``. An alert or a
notification whose plugin has no id yet stays in memory, counted as unpersisted, until one
is known.

Changed alerts and queued notifications are written in one transaction, so a notification
is never in the outbox without the state that caused it (and never lost with it). While the
database is away they stay in memory (the notification backlog is bounded) and, with a
journal, are appended to it on disk after each cycle; the first cycle that reaches the
database writes everything and acks the journal.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import asyncpg

from pluginmon.alerts.book import AlertRecord
from pluginmon.alerts.health import HealthScore
from pluginmon.alerts.health_rows import HealthDue, HealthWriteSchedule
from pluginmon.alerts.journaling import OutageJournal
from pluginmon.alerts.metric_values import plugin_metric_values
from pluginmon.alerts.planner import Notification
from pluginmon.alerts.scoring import health_labels_json
from pluginmon.collectors.models import PluginKey
from pluginmon.storage import alert_inputs, alert_state, health_store, outbox_store
from pluginmon.storage.alert_inputs import Silence
from pluginmon.storage.alert_journal import JOURNAL_MAX_BYTES
from pluginmon.storage.alert_state import AlertWrite, StoredAlert
from pluginmon.storage.errors import TRANSIENT_ERRORS
from pluginmon.storage.health_store import HealthWrite
from pluginmon.storage.outbox_store import OutboxWrite

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
        spool_dir: Path | None = None,
        journal_max_bytes: int = JOURNAL_MAX_BYTES,
    ) -> None:
        self.instance = instance
        self._pool = pool
        self._ids_source = plugin_ids
        self._cycle_ids: PluginIds | None = None
        self._known_ids: dict[PluginKey, int] = {}  # from the rows loaded at start
        self._db_timeout = database_timeout_seconds
        self._max_backlog = max_backlog_notifications
        self._deps_refresh = dependencies_refresh_seconds
        self._deps_loaded_at: float | None = None
        self._metrics_max_age = timedelta(seconds=metrics_max_age_seconds)
        self._journal = (
            None
            if spool_dir is None
            else OutageJournal(spool_dir, max_bytes=journal_max_bytes, instance=instance)
        )

        self._row_ids: dict[int, int] = {}  # alert seq -> plugin_alerts.id
        self._unsaved: dict[int, AlertRecord] = {}  # alert seq -> changed, not in the database
        self._unjournaled: dict[int, AlertRecord] = {}  # changed since last journaled
        self._backlog: list[Notification] = []
        self._journaled_keys: set[str] = set()  # idempotency keys of backlog in the journal
        # Which plugins' health_score rows and plugins.health_score to write each cycle.
        self._health_writes = HealthWriteSchedule(
            row_interval_seconds=health_write_interval_seconds,
            plugin_interval_seconds=plugin_health_update_seconds,
        )
        self._db_ok = True

    @property
    def unpersisted_alerts(self) -> int:
        return len(self._unsaved)

    @property
    def unpersisted_notifications(self) -> int:
        return len(self._backlog)

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

    # --- start --------------------------------------------------------------------------------

    async def start(self) -> StartState:
        """Replay the journal a previous process left (if any), then adopt rows that have no
        owner yet (written before owners were recorded) and load this instance's open alerts
        and last notification times. Transient database errors propagate."""
        if self._journal is not None:
            await self._journal.open()
        async with asyncio.timeout(self._db_timeout), self._pool.acquire() as conn:
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

    # --- inputs -------------------------------------------------------------------------------

    async def read_inputs(
        self, now: datetime, keys: Iterable[PluginKey], metric_names: Sequence[str]
    ) -> Inputs | str:
        """Silences, acknowledgements, runtime dependencies (every
        ``dependencies_refresh_seconds``) and, when ``metric_names`` is not empty, the latest
        plugin_metrics values of ``keys``; a transient database error as a string."""
        try:
            async with asyncio.timeout(self._db_timeout), self._pool.acquire() as conn:
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
        by_id: dict[tuple[int, str], PluginKey] = {}
        for key in keys:
            pid = self.plugin_id(key)
            if pid is not None:
                by_id[(pid, key.environment)] = key
        # Gauges as their value, counters as rates, name:pNN as quantiles (metric_values).
        values = await plugin_metric_values(
            conn, list(by_id), names, now - self._metrics_max_age, now=now
        )
        metrics: dict[PluginKey, dict[str, float]] = defaultdict(dict)
        for (pid, env, name), value in values.items():
            metrics[by_id[(pid, env)]][name] = value
        return dict(metrics)

    async def acknowledge(self, fingerprint: str, by: str, at: datetime) -> bool:
        async with asyncio.timeout(self._db_timeout), self._pool.acquire() as conn:
            return await alert_state.acknowledge(conn, fingerprint, by, at)

    async def add_silence(
        self,
        *,
        tenant: str,
        matchers: Mapping[str, str],
        starts_at: datetime,
        ends_at: datetime,
        created_by: str,
        comment: str,
    ) -> int:
        async with asyncio.timeout(self._db_timeout), self._pool.acquire() as conn:
            return await alert_inputs.add_silence(
                conn,
                tenant_id=tenant,
                matchers=matchers,
                ends_at=ends_at,
                created_by=created_by,
                comment=comment,
                starts_at=starts_at,
            )

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
    ) -> str | None:
        """Write what changed; then ack the journal, or (database away, or ``database_error``
        already known this cycle) journal what the database does not have. Returns the
        database error, None when everything with a plugin id is in the database."""
        error = database_error
        if error is None:
            error = await self._write(now, open_alerts, health)
        self._note_database(error)
        if error is None:
            if self._journal is not None and await self._journal.ack_all():
                self._journaled_keys.clear()
        else:
            await self._journal_unsaved(now)
        return error

    async def _write(
        self, now: datetime, open_alerts: Iterable[AlertRecord], health: Sequence[HealthScore]
    ) -> str | None:
        alerts: list[tuple[AlertRecord, int]] = []
        for alert in sorted(self._unsaved.values(), key=lambda a: a.seq):
            pid = self.plugin_id(alert.key)
            if pid is not None:
                alerts.append((alert, pid))
        outbox: list[tuple[Notification, int]] = []
        for n in self._backlog:
            pid = self.plugin_id(n.key)
            if pid is not None:
                outbox.append((n, pid))
        unsaved, row_ids = self._unsaved, self._row_ids
        clean = [a for a in open_alerts if a.seq not in unsaved and a.seq in row_ids]
        try:
            async with asyncio.timeout(self._db_timeout), self._pool.acquire() as conn:
                if self._journal is not None:
                    # A journal this process could not replay at start goes in first, in order.
                    await self._journal.replay_inherited(conn)
                ids: list[int | None]
                try:
                    async with conn.transaction():
                        ids = [
                            await alert_state.save_alert(conn, self._alert_write(a, pid, now))
                            for a, pid in alerts
                        ]
                        await outbox_store.insert_outbox(
                            conn, [self._outbox_write(n, pid) for n, pid in outbox]
                        )
                        await alert_state.touch_alerts(
                            conn, [row_ids[a.seq] for a in clean], [a.value for a in clean], now
                        )
                except TRANSIENT_ERRORS:
                    raise
                except asyncpg.PostgresError:
                    # One bad row (say, its plugin was deleted) must not block every other
                    # alert forever: save item by item, dropping what the database refuses.
                    logger.exception("alert state refused as a whole; saving it item by item")
                    ids = await self._write_item_by_item(conn, alerts, outbox, now)
                for (alert, _), row_id in zip(alerts, ids, strict=True):
                    del unsaved[alert.seq]
                    self._unjournaled.pop(alert.seq, None)
                    if alert.resolved_at is not None:
                        row_ids.pop(alert.seq, None)  # closed: never written again
                    elif row_id is not None:
                        row_ids[alert.seq] = row_id
                written = {id(n) for n, _ in outbox}
                self._backlog = [n for n in self._backlog if id(n) not in written]
                self._journaled_keys &= {n.idempotency_key for n in self._backlog}
                await self._write_health(conn, now, health)
        except TRANSIENT_ERRORS as exc:
            return _error(exc)
        return None

    async def _write_item_by_item(
        self,
        conn: Any,
        alerts: Sequence[tuple[AlertRecord, int]],
        outbox: Sequence[tuple[Notification, int]],
        now: datetime,
    ) -> list[int | None]:
        ids: list[int | None] = []
        async with conn.transaction():
            for alert, pid in alerts:
                try:
                    async with conn.transaction():  # a savepoint
                        write = self._alert_write(alert, pid, now)
                        ids.append(await alert_state.save_alert(conn, write))
                except TRANSIENT_ERRORS:
                    raise
                except asyncpg.PostgresError as exc:
                    logger.error(
                        "dropping state of alert %s for %s/%s: %s",
                        alert.rule.name,
                        alert.key.tenant,
                        alert.key.plugin,
                        exc,
                    )
                    ids.append(None)
            for n, pid in outbox:
                try:
                    async with conn.transaction():
                        await outbox_store.insert_outbox(conn, [self._outbox_write(n, pid)])
                except TRANSIENT_ERRORS:
                    raise
                except asyncpg.PostgresError as exc:
                    logger.error(
                        "dropping notification to %s about %s/%s: %s",
                        n.receiver,
                        n.key.tenant,
                        n.group_key,
                        exc,
                    )
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

    async def _journal_unsaved(self, now: datetime) -> None:
        """Append what the database does not have and the journal does not hold yet."""
        if self._journal is None:
            return
        alerts: list[tuple[AlertRecord, int]] = []
        for alert in sorted(self._unjournaled.values(), key=lambda a: a.seq):
            pid = self.plugin_id(alert.key)
            if pid is not None:
                alerts.append((alert, pid))
        outbox: list[tuple[Notification, int]] = []
        for n in self._backlog:
            pid = self.plugin_id(n.key)
            if pid is not None and n.idempotency_key not in self._journaled_keys:
                outbox.append((n, pid))
        if not alerts and not outbox:
            return
        if await self._journal.append(
            [self._alert_write(a, pid, now) for a, pid in alerts],
            [self._outbox_write(n, pid) for n, pid in outbox],
        ):
            for alert, _ in alerts:
                del self._unjournaled[alert.seq]
            self._journaled_keys.update(n.idempotency_key for n, _ in outbox)

    async def aclose(self) -> None:
        """Release the journal (its directory lock); writes nothing."""
        if self._journal is not None:
            await self._journal.close()

    # --- rows ---------------------------------------------------------------------------------

    def _alert_write(self, a: AlertRecord, plugin_id: int, now: datetime) -> AlertWrite:
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
        )

    def _outbox_write(self, n: Notification, plugin_id: int) -> OutboxWrite:
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
        )

    def _note_database(self, error: str | None) -> None:
        if error is None and not self._db_ok:
            self._db_ok = True
            logger.info("alert state persisted again: database reachable")
        elif error is not None and self._db_ok:
            self._db_ok = False
            logger.warning(
                "alert state kept in memory, database unreachable (%s); will persist when it is back",
                error,
            )
