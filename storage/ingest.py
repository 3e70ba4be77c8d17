"""Where a sample is stored: plugin ids, plugin_samples rows by column name, the spool of samples without an id yet, drops by reason.

A snapshot's way in: ``SampleSink.put(snapshot)`` first replays older samples still waiting
for their plugin's id, then looks up the ids of plugins it has not seen (bounded: a slow
database never stalls sampling), turns each sample into a ``plugin_samples`` row and hands
the rows to the ``BatchWriter``, and returns once they are in the writer's spool (fsync'ed):
a SIGKILL loses at most the snapshot in flight. Samples of a plugin whose id is not known
yet go to the unresolved spool on disk (fsync'ed, never only in memory), keyed by (tenant,
plugin, environment), and are replayed oldest first once the id resolves: each spooled
batch goes to the writer under its own id (so it reaches the database exactly once even if
the process dies between handing it over and acking it) and is acked once the writer has
it on disk. Every row that is lost is counted under its reason (storage.drops) at the place
where it is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from operator import attrgetter
from pathlib import Path
from typing import Any, Final

import asyncpg
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from pluginmon.collectors.models import SAMPLE_MEASUREMENTS, PluginKey, PluginSample, Snapshot
from pluginmon.storage.drops import DropCounts, DropReason, spool_append_failure
from pluginmon.storage.errors import TRANSIENT_ERRORS
from pluginmon.storage.queries import check_plugin_key, ensure_plugins_each
from pluginmon.storage.reachability import DatabaseWatch
from pluginmon.storage.spool import Row, Spool, SpoolCodecError, SpooledBatch, SpoolFullError
from pluginmon.storage.writer import PLUGIN_SAMPLES_COLUMNS, BatchWriter

logger = logging.getLogger(__name__)

# How long one put() may wait for plugin ids (a slow or unreachable database must not stall
# sampling: the samples go to the unresolved spool instead).
RESOLVE_TIMEOUT_SECONDS: Final = 3.0
# Plugins looked up (and created) per batch of statements: a thousand new plugins were a
# thousand round trips and commits, which a hundred agents starting together made take
# minutes (docs/BENCHMARKS.md, "Fleet: 100 agents").
RESOLVE_CHUNK: Final = 500
# After a failed id lookup, how long new plugins' samples go straight to the spool.
RESOLVE_RETRY_SECONDS: Final = 5.0
# How long one put() waits for the writer to have its rows on disk (a hung disk must not
# stall sampling for good; the rows then stay queued in the writer).
LOG_TIMEOUT_SECONDS: Final = 5.0

# -- plugin_samples rows, by column name ------------------------------------------------------

_COLUMN: Final = {name: index for index, name in enumerate(PLUGIN_SAMPLES_COLUMNS)}
_TIMESTAMP: Final = _COLUMN["timestamp"]
_TENANT: Final = _COLUMN["tenant_id"]
_PLUGIN: Final = _COLUMN["plugin_id"]
_ENVIRONMENT: Final = _COLUMN["environment"]
# The caller gives these two; every other column is read from the sample.
_GIVEN: Final = ("plugin_id", "host")
# Where a sample holds each column's value: a measurement under its own name.
_SAMPLE_ATTRIBUTE: Final = {
    "timestamp": "timestamp",
    "tenant_id": "key.tenant",
    "environment": "key.environment",
    **{name: name for name in SAMPLE_MEASUREMENTS},
}
# One C-level call reads every sampled column in table order (10,000 rows a tick).
_read_sampled = attrgetter(
    *(_SAMPLE_ATTRIBUTE[column] for column in PLUGIN_SAMPLES_COLUMNS if column not in _GIVEN)
)
# Values a sample can hold below what the table's CHECKs accept: -0.0 % CPU, and a negative
# restart count the sampler uses for "unknown".
_FLOORS: Final = tuple(
    (_COLUMN[column], floor) for column, floor in (("cpu_percent", 0.0), ("restarts", 0))
)
_CPU_AT, _RESTARTS_AT = (index for index, _ in _FLOORS)
# sample_row splices the two given values in by position (10,000 rows a tick: one tuple
# concatenation, no list and no inserts): the plugin after the timestamp and the tenant, the
# host after the environment.
if (_COLUMN["plugin_id"], _COLUMN["host"]) != (2, 4):
    raise AssertionError(f"plugin_samples columns moved; sample_row expects them: {_COLUMN}")


def sample_row(sample: PluginSample, *, plugin: int | str, host: str) -> Row:
    """One ``plugin_samples`` row (PLUGIN_SAMPLES_COLUMNS order) with ``plugin`` (a plugin
    id, or the plugin's name while its id is not known) in the plugin_id column."""
    sampled = _read_sampled(sample)
    # Concatenated: unpacking into a new tuple builds a list first (0.68 us against 0.63).
    row: tuple[Any, ...] = sampled[:2] + (plugin, sampled[2], host) + sampled[3:]  # noqa: RUF005
    if row[_CPU_AT] < 0.0 or row[_RESTARTS_AT] < 0:
        values = list(row)
        for index, floor in _FLOORS:
            if values[index] < floor:
                values[index] = floor
        return tuple(values)
    return row


def row_key(row: Row) -> PluginKey:
    """The plugin of an unresolved row (its plugin_id column holds the plugin's name)."""
    return PluginKey(
        tenant=str(row[_TENANT]), plugin=str(row[_PLUGIN]), environment=str(row[_ENVIRONMENT])
    )


def with_plugin_id(row: Row, plugin_id: int) -> Row:
    """An unresolved row with its plugin's id in the plugin_id column."""
    values = list(row)
    values[_PLUGIN] = plugin_id
    return tuple(values)


def row_timestamp(row: Row) -> datetime | None:
    value = row[_TIMESTAMP]
    return value if isinstance(value, datetime) else None


# -- spools ---------------------------------------------------------------------------------------


class SampleSpool(Spool):
    """A Spool of plugin_samples rows that remembers the oldest timestamp replayed from it.

    Rows leaving a spool are late: older than the rollups' regular refresh may look back.
    Maintenance (storage.upkeep) takes the oldest one and back-fills the rollups from there.
    """

    def __init__(self, directory: Path, *, max_bytes: int) -> None:
        super().__init__(directory, max_bytes=max_bytes)
        self._oldest_acked: datetime | None = None
        self._oldest_lock = threading.Lock()

    def ack(self, batch: SpooledBatch) -> None:
        super().ack(batch)
        oldest = min(filter(None, map(row_timestamp, batch.rows)), default=None)
        if oldest is not None:
            self.note_late_rows(oldest)

    def note_late_rows(self, since: datetime) -> None:
        with self._oldest_lock:
            if self._oldest_acked is None or since < self._oldest_acked:
                self._oldest_acked = since

    def take_late_rows_since(self) -> datetime | None:
        """The oldest timestamp acked since the last call (None: nothing), and forget it."""
        with self._oldest_lock:
            oldest, self._oldest_acked = self._oldest_acked, None
            return oldest


@dataclass(frozen=True, slots=True)
class PendingBatch:
    batch: SpooledBatch
    keys: frozenset[PluginKey]


class UnresolvedSpool:
    """Samples of plugins whose id the database has not given us yet, on disk.

    A plugin seen for the first time while the database is away (or before the schema is
    migrated) has no plugin_id, so its samples cannot be plugin_samples rows yet. They are
    appended here, fsync'ed, keyed by (tenant, plugin, environment); once the ids resolve they
    are replayed, oldest first, into the writer. While a plugin has rows here, its newer
    samples are appended behind them, so its rows reach the writer in time order. Blocking:
    call through ``asyncio.to_thread``.
    """

    def __init__(self, directory: Path, *, max_bytes: int) -> None:
        self.spool = SampleSpool(directory, max_bytes=max_bytes)
        # Plugins with rows in the spool; rebuilt from disk after a restart.
        self.keys: set[PluginKey] = set()
        for batch in self.spool.replay():
            self.keys.update(map(row_key, batch.rows))

    @property
    def rows(self) -> int:
        return self.spool.rows

    def append(self, rows: Sequence[Row]) -> None:
        """Store rows durably or raise (SpoolFullError, SpoolCodecError, OSError)."""
        self.spool.append(rows)
        self.keys.update(map(row_key, rows))

    def peek(self) -> PendingBatch | None:
        batch = self.spool.peek()
        if batch is None:
            self.keys.clear()
            return None
        return PendingBatch(batch, frozenset(map(row_key, batch.rows)))

    def ack(self, pending: PendingBatch) -> None:
        self.spool.ack(pending.batch)
        if self.spool.rows == 0:
            self.keys.clear()

    def close(self) -> None:
        self.spool.close()


# -- the sink ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SinkStats:
    """Where this run's samples went, for the daemon's last log line."""

    rows_written: int
    rows_in_spool: int  # both spools: rows with a plugin id, and samples still waiting for one
    rows_dropped: int
    samples_unresolved: int


class SampleSink:
    """Stores snapshots: ids resolved, rows to the writer, the rest to disk, drops counted.

    Built complete: the pool (for id lookups), the running writer (with its own spool), the
    open unresolved spool and the database watch (``schema_ready`` gates the lookups; lookup
    failures mark the database unreachable). The sink owns none of them: the caller opens and
    closes each. ``replay_seconds`` bounds how long one ``put()`` replays the unresolved spool.
    """

    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        writer: BatchWriter,
        unresolved: UnresolvedSpool,
        database: DatabaseWatch,
        replay_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pool = pool
        self._writer = writer
        self._unresolved = unresolved
        self._database = database
        self._replay_seconds = replay_seconds
        self._clock = clock
        self._plugin_ids: dict[PluginKey, int] = {}
        self._invalid: set[PluginKey] = set()
        self._resolve_retry_at = 0.0
        self._unresolved_failing = False
        self._log_slow = False
        self._dropped = DropCounts()

    @property
    def plugin_ids(self) -> Mapping[PluginKey, int]:
        """The ids resolved so far (a copy)."""
        return dict(self._plugin_ids)

    async def put(self, snapshot: Snapshot) -> None:
        """Store one snapshot: rows of known plugins to the writer; samples of plugins
        without an id yet (or with older samples still waiting) to the unresolved spool.

        Raises WriterFailedError / WriterClosedError when the writer cannot take rows any
        more (the caller cannot run without it).
        """
        await self._replay_unresolved()
        samples, host = snapshot.samples, snapshot.host
        known, waiting_keys = self._plugin_ids, self._unresolved.keys
        # One lookup per sample while every id is known and nothing waits (10,000 a tick).
        plugin_ids = [known.get(sample.key) for sample in samples]
        if None in plugin_ids:
            await self._resolve_ids(
                [
                    sample.key
                    for sample, plugin_id in zip(samples, plugin_ids, strict=True)
                    if plugin_id is None and sample.key not in waiting_keys
                ]
            )
            plugin_ids = [known.get(sample.key) for sample in samples]
        rows: list[Row] = []
        waiting: list[Row] = []
        invalid = 0
        for sample, plugin_id in zip(samples, plugin_ids, strict=True):
            if plugin_id is not None and not (waiting_keys and sample.key in waiting_keys):
                rows.append(sample_row(sample, plugin=plugin_id, host=host))
            elif sample.key in self._invalid:  # never given an id
                invalid += 1
            else:
                # Behind this plugin's older samples, which are still on disk.
                waiting.append(sample_row(sample, plugin=sample.key.plugin, host=host))
        if invalid:
            self._dropped.add(DropReason.INVALID_PLUGIN, invalid)
        if waiting:
            await self._spool_unresolved(waiting)
        if rows:
            self._writer.put(rows)
            await self._wait_logged(LOG_TIMEOUT_SECONDS)

    async def _wait_logged(self, timeout_seconds: float) -> bool:
        """Wait until the writer has every row put so far on disk; False on timeout."""
        try:
            async with asyncio.timeout(max(timeout_seconds, 0.0)):
                await self._writer.wait_logged()
        except TimeoutError:
            if not self._log_slow:
                self._log_slow = True
                logger.warning(
                    "the writer's spool did not take a snapshot's rows within %.1f s; they "
                    "stay queued in memory meanwhile",
                    timeout_seconds,
                )
            return False
        self._log_slow = False
        return True

    async def flush(self, *, timeout_seconds: float) -> None:
        """Nudge the writer to write partial batches now (it also flushes on its own)."""
        # While a long spool replays, flush() waits for it; that is progress, not a failure.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_seconds):
                await self._writer.flush()

    async def _resolve_ids(self, keys: Iterable[PluginKey]) -> bool:
        """Learn the plugin ids of ``keys`` not known yet; False when the database did not
        answer within RESOLVE_TIMEOUT_SECONDS (the caller spools what is unresolved).

        Bounded, so a slow or unreachable database never stalls sampling; after a failure
        the database is not asked again for RESOLVE_RETRY_SECONDS.
        """
        missing = [
            k for k in dict.fromkeys(keys) if k not in self._plugin_ids and k not in self._invalid
        ]
        if not missing:
            return True
        if not self._database.schema_ready or self._clock() < self._resolve_retry_at:
            return False
        valid: list[PluginKey] = []
        for key in missing:
            try:
                check_plugin_key(key.tenant, key.plugin)
            except ValueError as exc:
                # A label-discovered process with a tenant the schema refuses.
                self._invalid.add(key)
                logger.warning(
                    "plugin %s/%s (%s): not stored: %s",
                    key.tenant,
                    key.plugin,
                    key.environment,
                    exc,
                )
            else:
                valid.append(key)
        try:
            async with asyncio.timeout(RESOLVE_TIMEOUT_SECONDS), self._pool.acquire() as conn:
                # In chunks, each its own statements: what resolved before a timeout stays
                # resolved.
                for start in range(0, len(valid), RESOLVE_CHUNK):
                    chunk = valid[start : start + RESOLVE_CHUNK]
                    ids, refused = await ensure_plugins_each(
                        conn, [(k.tenant, k.plugin, k.environment) for k in chunk]
                    )
                    for key in chunk:
                        plugin_id = ids.get((key.tenant, key.plugin))
                        if plugin_id is not None:
                            self._plugin_ids[key] = plugin_id
                            continue
                        # Refused for good: never asked again; its samples are dropped
                        # (invalid_plugin), the other plugins of the chunk resolve.
                        self._invalid.add(key)
                        logger.warning(
                            "plugin %r/%r (%r): not stored: the database refuses it: %s",
                            key.tenant,
                            key.plugin,
                            key.environment,
                            refused[(key.tenant, key.plugin)],
                        )
        except (*TRANSIENT_ERRORS, asyncpg.PostgresError) as exc:
            self._resolve_retry_at = self._clock() + RESOLVE_RETRY_SECONDS
            self._database.failed(exc)
            return False
        return True

    async def _spool_unresolved(self, rows: list[Row]) -> None:
        try:
            await asyncio.to_thread(self._unresolved.append, rows)
        except (SpoolFullError, SpoolCodecError, OSError) as exc:
            self._dropped.add(spool_append_failure(exc), len(rows))
            if not self._unresolved_failing:
                self._unresolved_failing = True
                logger.error(
                    "dropping %d samples of plugins without an id yet: %s (later drops are "
                    "counted, not logged)",
                    len(rows),
                    exc,
                )
            return
        self._unresolved_failing = False

    async def _replay_unresolved(self) -> None:
        """Replay the unresolved spool into the writer, oldest first, once ids resolve.

        Time-boxed (``replay_seconds``) so sampling goes on; what is left is replayed at the
        next put(), still before that plugin's newer samples.
        """
        unresolved = self._unresolved
        if unresolved.rows == 0 or not self._database.schema_ready:
            return
        until = self._clock() + self._replay_seconds
        replayed = 0
        while self._clock() < until:
            try:
                pending = await asyncio.to_thread(unresolved.peek)
            except OSError:
                logger.exception("cannot read the unresolved spool; retrying at the next tick")
                return
            if pending is None:
                break
            if not await self._resolve_ids(pending.keys):
                break
            rows: list[Row] = []
            invalid = 0
            for row in pending.batch.rows:
                plugin_id = self._plugin_ids.get(row_key(row))
                if plugin_id is None:  # the schema refused this plugin
                    invalid += 1
                else:
                    rows.append(with_plugin_id(row, plugin_id))
            if invalid:
                self._dropped.add(DropReason.INVALID_PLUGIN, invalid)
            # A writer that cannot take them raises before the ack: the batch stays on disk.
            # Its id goes along: put again after a crash before the ack below, the batch is
            # still written once. Acked only once the writer has it on disk.
            if rows:
                self._writer.put(rows, batch_id=pending.batch.batch_id)
                if not await self._wait_logged(max(until - self._clock(), 1.0)):
                    return
            try:
                await asyncio.shield(asyncio.to_thread(unresolved.ack, pending))
            except OSError:
                logger.exception("cannot update the unresolved spool; retrying at the next tick")
                return
            replayed += len(rows)
        if replayed:
            logger.info(
                "replayed %d spooled samples of plugins whose id is now known (%d left)",
                replayed,
                unresolved.rows,
            )

    # -- what happened to the samples ---------------------------------------------------------

    def dropped(self) -> Mapping[DropReason, int]:
        """Rows lost so far by reason (zeros included): the writer's, the sink's and both
        spools' (undecodable batches discarded at replay)."""
        counts = dict(self._writer.stats().dropped)
        for reason, rows in self._dropped.snapshot().items():
            counts[reason] += rows
        counts[DropReason.SPOOL_DISCARDED] += self._unresolved.spool.discarded_rows
        return counts

    def stats(self) -> SinkStats:
        writer = self._writer.stats()
        unresolved = self._unresolved.rows
        return SinkStats(
            rows_written=writer.rows_written,
            rows_in_spool=writer.spool_rows + unresolved,
            rows_dropped=sum(self.dropped().values()),
            samples_unresolved=unresolved,
        )

    def collect(self) -> Iterator[Metric]:
        """prometheus-client's Collector: the backlog of both spools and every drop by
        reason, read at scrape time (from the render thread: reads only)."""
        yield GaugeMetricFamily(
            "pluginmon_spool_samples",
            "Rows waiting in the disk spool for the database",
            value=self._writer.stats().spool_rows + self._unresolved.rows,
        )
        dropped = CounterMetricFamily(
            "pluginmon_dropped_samples", "Samples dropped, by reason", labels=["reason"]
        )
        for reason, rows in sorted(self.dropped().items()):
            dropped.add_metric([reason.value], rows)
        yield dropped
