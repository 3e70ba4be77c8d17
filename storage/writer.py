"""The batched writer: rows to the disk spool first, then exactly once to the database by binary COPY.

Over 500 lines on purpose (see the end of this docstring): the policy below is one state
machine whose parts are only correct together.

Policy (also in docs/writer.md):

* ``put()`` only appends to an in-memory queue; it never waits for the database.
* **Write-ahead** (with a spool): the writer's task forms the queued rows into batches at
  once (at most ``max_rows`` rows each; rows put with their own ``batch_id`` stay one batch),
  gives each a new id and appends it to the spool (fsync'ed; up to four batches with one
  fsync while the writes are behind) before it can be written; a caller that must know its
  rows are on disk awaits ``wait_logged()``. A SIGKILL therefore
  loses only rows put since the last append (the cycle in flight). The rows stay in memory
  too (up to the high-water mark, half of ``max_queue_rows``) and are written from there;
  each batch is acked in the spool, in order, once its transaction has committed. Nothing
  is written to disk twice: a batch that cannot be written now (database unavailable,
  slower than intake, or the memory bound reached) is dropped from memory only and read back
  from the spool later, oldest first, one transaction per batch, before any newer batch.
* **Exactly once** (storage/ledger.py): a batch's rows and its id in ``ingest_ledger``
  commit in one transaction; a batch whose id is there already (replayed after a crash
  between its commit and its ack, retried after a COPY whose commit succeeded although the
  client saw a timeout, still in flight at the shutdown deadline) is skipped and counted in
  ``rows_deduplicated``.
* A transaction is written when ``max_rows`` rows of batches in memory are pending or the
  oldest is ``max_delay_seconds`` old (or on ``flush()`` / shutdown); up to ``concurrency``
  transactions are in flight on the pool, each covering one or more whole batches.
* Transient errors (storage.errors.TRANSIENT_ERRORS: connection loss, timeouts, server
  shutting down or starting, too many connections, a read-only standby, a table not migrated
  yet) put the writer in "database unavailable" (logged once): the batches stay in the spool
  (or in memory without one) and the database is retried with capped exponential backoff
  and jitter, by replaying the spool's oldest batch. The first write that succeeds logs the
  recovery once. Any database error while getting a connection (a wrong password, a missing
  database) counts as transient too: it is never the rows' fault.
* Any other error from COPY (a CHECK or foreign-key violation, a value the column type
  refuses) is a problem with some rows: the batch is logged with its traceback and its parts
  are copied again under savepoints, split in halves until the rejected rows are isolated;
  the good rows commit with the batch's ledger row, the rejected ones are counted in
  ``rows_rejected`` (and in ``rows_dropped``).
* Drops, counted by reason (storage.drops) where each happens and logged once per state
  change: the queue of rows not yet in a batch never holds more than ``max_queue_rows`` (past
  that the oldest go, ``buffer_full``; without a spool this bound covers every row in
  memory); a batch the spool refuses (``spool_full``, ``spool_io_error``,
  ``spool_codec_error``) is still written from memory while the database is available and
  there is room, and dropped otherwise.
* Shutdown (``async with`` exit, ``close()``) writes what is in memory within
  ``close_timeout_seconds``; the rest is in the spool already (what never reached it is
  appended now), or, without a spool, counted as dropped and logged.

Without a spool, batches are formed the same way and wait in memory for the database,
bounded by ``max_queue_rows``; a retried batch keeps its id, so a COPY that timed out after
committing is not written twice.

One module past the usual size on purpose: the queue, the spool hand-off, the transactions
in flight, the replay, the in-order acks and the shutdown salvage share one state machine,
and each of the rules above is enforced by more than one of them. The SQL of a transaction
is in storage/ledger.py.
"""

from __future__ import annotations

import asyncio
import bisect
import enum
import logging
import math
import re
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Final, TypeVar

import asyncpg
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

from pluginmon.collectors.models import SAMPLE_MEASUREMENTS
from pluginmon.storage.drops import DropCounts, DropReason, spool_append_failure
from pluginmon.storage.errors import TRANSIENT_ERRORS, backoff_seconds
from pluginmon.storage.ledger import (
    ROW_ERRORS,
    Committed,
    LedgerBatch,
    LedgerError,
    copy_batches,
)
from pluginmon.storage.spool import (
    Spool,
    SpoolCodecError,
    SpooledBatch,
    SpoolFullError,
)

logger = logging.getLogger(__name__)

Row = tuple[object, ...]
T = TypeVar("T")

# The wide time-series table the collectors feed, in its column order.
PLUGIN_SAMPLES_TABLE: Final = "plugin_samples"
PLUGIN_SAMPLES_COLUMNS: Final = (
    "timestamp",
    "tenant_id",
    "plugin_id",
    "environment",
    "host",
    *SAMPLE_MEASUREMENTS,
)

# Upper bounds of the flush-duration histogram, in seconds (Prometheus-style, cumulative).
FLUSH_SECONDS_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

_IDENTIFIER_RE = re.compile(r"^[a-z_][a-z0-9_]*$")
# How many rejected rows of one batch are logged individually.
_REJECTED_ROWS_LOGGED = 5
# Batches appended to the spool with one fsync, at most.
_BATCHES_PER_APPEND = 4


class WriterClosedError(RuntimeError):
    """put() after the writer was closed."""


class WriterFailedError(RuntimeError):
    """The writer's background task died; the cause is chained."""


@dataclass(frozen=True, slots=True)
class WriterStats:
    """A consistent snapshot of the writer's counters, for the exporter.

    ``rows_dropped`` counts every row that will never be written, including the
    ``rows_rejected`` ones the database refused; ``dropped`` is the same by reason (zeros
    included); ``rows_queued`` is in memory (queued, held or being written), ``spool_rows``
    only on disk (the backlog the spool's replay has to read back).
    """

    rows_written: int
    batches_written: int  # transactions committed
    rows_dropped: int
    rows_rejected: int
    dropped: Mapping[DropReason, int]
    rows_queued: int
    rows_spooled: int  # appended to the spool, total (with a spool: every row, ahead of its write)
    rows_replayed: int  # written after being read back from the spool, total
    spool_rows: int
    spool_bytes: int
    last_flush_seconds: float
    flush_seconds_sum: float
    flush_seconds_count: int
    # (upper bound, cumulative count), then (inf, flush_seconds_count)
    flush_seconds_buckets: tuple[tuple[float, int], ...]
    database_available: bool
    # Rows of batches found in the ingest ledger already (written before), skipped.
    rows_deduplicated: int = 0


@dataclass(slots=True)
class _Chunk:
    """Rows of one put(), not in a batch yet."""

    arrived: float  # monotonic time of put()
    rows: list[Row]
    sequence: int  # of the put()
    batch_id: uuid.UUID | None  # given by the caller: the rows stay one batch under this id
    start: int = 0  # rows before this were taken already

    @property
    def remaining(self) -> int:
        return len(self.rows) - self.start


class _State(enum.Enum):
    PENDING = "pending"
    WRITING = "writing"  # in a transaction in flight
    DONE = "done"  # committed (or found in the ledger), waiting for its ack in the spool


@dataclass(slots=True, eq=False)
class _Batch:
    """One batch: an id, its rows (None: on disk only), its record in the spool."""

    batch_id: uuid.UUID
    rows: list[Row] | None
    row_count: int
    arrived: float  # of its oldest row
    handle: SpooledBatch | None = None  # None: not in the spool (no spool, or it refused)
    state: _State = _State.PENDING


class _Unwritten(Exception):
    """A transient error (or an unexpected one) stopped a write; nothing was committed."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"nothing written: {cause!r}")
        self.cause = cause


async def _uncancellable(operation: Awaitable[T]) -> T:
    """Run ``operation`` to its end even if the caller is cancelled meanwhile.

    The cancellation is delivered afterwards; an error of the operation then is logged by
    the operation's own handling, not raised in place of the CancelledError.
    """
    task = asyncio.ensure_future(operation)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait({task})
        if not task.cancelled() and task.exception() is not None:
            logger.error("cleanup after cancellation failed", exc_info=task.exception())
        raise


def _position(handle: SpooledBatch) -> tuple[int, int]:
    return handle.segment, handle.offset


class BatchWriter:
    """``async with BatchWriter(pool, table=..., columns=...) as writer: writer.put(rows)``.

    ``pool`` is an asyncpg pool (see storage.pool) on a database migrated with the ingest
    ledger. ``table`` and ``columns`` are identifiers chosen by code; they are validated
    anyway. Rows are tuples in ``columns`` order. ``spool`` (owned and closed by the caller,
    used by nobody else meanwhile) makes the writer crash- and outage-proof: every batch is
    appended to it before it is written. Without one, rows wait in memory for the database,
    bounded by ``max_queue_rows``.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        table: str,
        columns: Sequence[str],
        max_rows: int = 5000,
        max_delay_seconds: float = 1.0,
        max_queue_rows: int = 200_000,
        copy_timeout_seconds: float = 30.0,
        concurrency: int = 2,
        spool: Spool | None = None,
        close_timeout_seconds: float = 10.0,
        retry_initial_seconds: float = 0.5,
        retry_max_seconds: float = 30.0,
    ) -> None:
        if not _IDENTIFIER_RE.match(table):
            raise ValueError(f"table {table!r} is not a plain lower-case identifier")
        if not columns:
            raise ValueError("columns must not be empty")
        for column in columns:
            if not _IDENTIFIER_RE.match(column):
                raise ValueError(f"column {column!r} is not a plain lower-case identifier")
        if len(set(columns)) != len(columns):
            raise ValueError(f"duplicate column in {list(columns)}")
        if max_rows < 1 or concurrency < 1:
            raise ValueError("max_rows and concurrency must be at least 1")
        if max_queue_rows < 2 * max_rows:
            raise ValueError(f"max_queue_rows must be at least 2 x max_rows ({2 * max_rows})")
        if min(max_delay_seconds, copy_timeout_seconds, close_timeout_seconds) <= 0:
            raise ValueError("delays and timeouts must be positive")
        if not 0 < retry_initial_seconds <= retry_max_seconds:
            raise ValueError("need 0 < retry_initial_seconds <= retry_max_seconds")
        self._pool = pool
        self._table = table
        self._columns = tuple(columns)
        self._max_rows = max_rows
        self._max_delay = max_delay_seconds
        self._max_queue_rows = max_queue_rows
        self._high_water = max_queue_rows // 2
        self._copy_timeout = copy_timeout_seconds
        self._concurrency = concurrency
        self._spool = spool
        self._close_timeout = close_timeout_seconds
        self._retry_initial = retry_initial_seconds
        self._retry_max = retry_max_seconds

        # Rows put and not in a batch yet.
        self._chunks: deque[_Chunk] = deque()
        self._queued = 0
        self._put_sequence = 0
        # While batches are being appended to the spool: the first put() they hold, and rows.
        self._logging_from: int | None = None
        self._logging_rows = 0
        # Batches not acked yet, oldest first; with a spool, in the spool's order.
        self._batches: deque[_Batch] = deque()
        # Kept by _account(), so that stats() (from a scrape thread) never iterates.
        self._memory_rows = 0  # rows held by batches
        self._pending_memory_rows = 0  # ... of batches not being written
        self._logged_memory_rows = 0  # ... of batches that are in the spool too
        self._on_disk_only = 0  # batches (not done) whose rows are only in the spool
        self._unlogged_pending = 0  # batches (with a spool) the spool refused, not written
        # Batches in the spool from before this writer (a crash, an outage): replayed first.
        self._backlog = 0
        self._in_flight: dict[int, list[_Batch]] = {}
        self._log_task: asyncio.Task[None] | None = None
        self._replay_task: asyncio.Task[None] | None = None
        self._ack_task: asyncio.Task[None] | None = None
        self._runner: asyncio.Task[None] | None = None
        self._close_task: asyncio.Task[None] | None = None
        self._closing = False
        self._flush_waiters = 0
        self._wakeup = asyncio.Event()
        self._changed = asyncio.Event()

        self._available = True
        self._unavailable_since = 0.0
        self._failed_attempts = 0  # consecutive, while unavailable
        self._retry_at = 0.0
        self._replay_not_before = 0.0  # after a spool read error
        self._ack_not_before = 0.0  # after a spool ack error
        self._dropping = False
        self._spool_refusing = False

        self._rows_written = 0
        self._batches_written = 0
        self._dropped = DropCounts()
        self._rows_rejected = 0
        self._rows_spooled = 0
        self._rows_replayed = 0
        self._rows_deduplicated = 0
        self._last_flush_seconds = 0.0
        self._flush_seconds_sum = 0.0
        self._flush_seconds_count = 0
        self._flush_bucket_counts = [0] * len(FLUSH_SECONDS_BUCKETS)

    # -- public interface ------------------------------------------------------------------

    async def __aenter__(self) -> BatchWriter:
        if self._runner is not None:
            raise RuntimeError("a BatchWriter can be entered once")
        if self._spool is not None:
            # What a crashed or killed predecessor left: replayed before any new batch.
            self._backlog = self._spool.batches
        self._runner = asyncio.create_task(self._run(), name=f"batch-writer-{self._table}")
        self._runner.add_done_callback(lambda _task: self._notify())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    def put(self, rows: Sequence[Row], *, batch_id: uuid.UUID | None = None) -> None:
        """Queue rows (tuples in ``columns`` order) for writing; never waits.

        With ``batch_id`` the rows are written as one batch under that id, exactly once
        however often they are put with it (a caller replaying its own durable record, such
        as the sample sink's unresolved spool, gives that record's id).
        Raises ValueError for a row of the wrong width (a programming error),
        WriterClosedError after close, WriterFailedError if the writer died.
        """
        if self._closing:
            raise WriterClosedError(f"writer for {self._table} is closed")
        if self._runner is None:
            raise RuntimeError("BatchWriter is not running: use `async with BatchWriter(...)`")
        self._check_runner()
        batch = list(rows)
        if not batch:
            return
        widths = set(map(len, batch))
        if widths != {len(self._columns)}:
            raise ValueError(
                f"rows for {self._table} need {len(self._columns)} values, got widths "
                f"{sorted(widths)}"
            )
        was_empty = not self._chunks
        self._put_sequence += 1
        self._chunks.append(_Chunk(time.monotonic(), batch, self._put_sequence, batch_id))
        self._queued += len(batch)
        # Without a spool, every row in memory counts against the bound; with one, batches
        # in memory are on disk too (dropped from memory, never lost, past the high-water
        # mark), so only the rows not in a batch yet do.
        held = self._pending_memory_rows if self._spool is None else 0
        overflow = self._queued + held - self._max_queue_rows
        if overflow > 0:
            self._drop(
                self._drop_oldest(overflow), DropReason.BUFFER_FULL, "the in-memory queue is full"
            )
        # With a spool the rows go to disk at once; without one the task needs to look only
        # when a batch may have become due (it forms batches from whatever is queued then).
        if self._spool is not None or was_empty or self._queued >= self._max_rows:
            self._wakeup.set()

    async def put_wait(self, rows: Sequence[Row]) -> None:
        """put(), after waiting until the rows in memory are below the high-water mark.

        For bulk producers (benchmarks, backfills) that can wait: it waits on the writer's
        progress, never on a database call, and not at all while the database is
        unavailable (then the usual overflow policy applies).
        """
        while (
            self._rows_in_memory() > 0
            and self._rows_in_memory() + len(rows) > self._high_water
            and self._available
            and not self._closing
        ):
            self._check_runner()
            if self._runner is None or self._runner.done():
                break
            changed = self._changed
            await changed.wait()
        self.put(rows)

    async def wait_logged(self) -> None:
        """Return once every row put so far is in the spool (fsync'ed), written, or dropped.

        Returns at once without a spool (rows then live in memory until written). Waits on
        the disk, never on the database; bound it with asyncio.timeout if the disk may hang.
        """
        if self._spool is None:
            return
        target = self._put_sequence
        while self._unlogged_from() <= target:
            self._check_runner()
            if self._runner is None or self._runner.done():
                return
            changed = self._changed
            await changed.wait()

    async def flush(self) -> None:
        """Write everything queued, including partial batches, and return when done.

        Done means nothing in memory and nothing in flight, and the spool drained unless
        the database is unavailable (then the rows are in the spool). Without a spool and
        with the database away this waits for the database; bound it with asyncio.timeout.
        """
        self._flush_waiters += 1
        # Once: the task then forces partial batches out; every change after that wakes it by
        # itself (waking it on each check would spin while a write or an fsync is running).
        self._wakeup.set()
        try:
            while not self._flushed():
                self._check_runner()
                if self._runner is None or self._runner.done():
                    return  # not started, or closed: nothing will make progress
                changed = self._changed
                await changed.wait()
        finally:
            self._flush_waiters -= 1

    def stats(self) -> WriterStats:
        cumulative = 0
        buckets: list[tuple[float, int]] = []
        for bound, count in zip(FLUSH_SECONDS_BUCKETS, self._flush_bucket_counts, strict=True):
            cumulative += count
            buckets.append((bound, cumulative))
        buckets.append((math.inf, self._flush_seconds_count))
        spool = self._spool
        dropped = dict(self._dropped.snapshot())
        # Counted by the spool itself, when its replay meets a batch that no longer decodes.
        dropped[DropReason.SPOOL_DISCARDED] += spool.discarded_rows if spool else 0
        return WriterStats(
            rows_written=self._rows_written,
            batches_written=self._batches_written,
            rows_dropped=sum(dropped.values()),
            rows_rejected=self._rows_rejected,
            dropped=dropped,
            rows_queued=self._rows_in_memory(),
            rows_spooled=self._rows_spooled,
            rows_replayed=self._rows_replayed,
            # Rows written ahead to the spool and still held in memory are written from
            # memory: only the rest is a backlog on disk.
            spool_rows=max(0, spool.rows - self._logged_memory_rows) if spool else 0,
            spool_bytes=spool.bytes if spool else 0,
            last_flush_seconds=self._last_flush_seconds,
            flush_seconds_sum=self._flush_seconds_sum,
            flush_seconds_count=self._flush_seconds_count,
            flush_seconds_buckets=tuple(buckets),
            database_available=self._available,
            rows_deduplicated=self._rows_deduplicated,
        )

    @property
    def database_available(self) -> bool:
        return self._available

    def collect(self) -> Iterator[Metric]:
        """prometheus-client's Collector: rows written and skipped, the COPY durations, read now.

        Called from a scrape's render thread: it only reads counters the loop updates.
        """
        stats = self.stats()
        rows = CounterMetricFamily(
            "pluginmon_rows_written", "Rows written to the database", labels=["table"]
        )
        rows.add_metric([self._table], stats.rows_written)
        yield rows
        deduplicated = CounterMetricFamily(
            "pluginmon_rows_deduplicated",
            "Rows of batches found in the ingest ledger (written before: a replay or a retry "
            "after a commit the client did not see) and skipped",
            labels=["table"],
        )
        deduplicated.add_metric([self._table], stats.rows_deduplicated)
        yield deduplicated
        yield HistogramMetricFamily(
            "pluginmon_write_duration_seconds",
            "Duration of one COPY batch",
            buckets=[
                ("+Inf" if math.isinf(bound) else repr(float(bound)), count)
                for bound, count in stats.flush_seconds_buckets
            ],
            sum_value=stats.flush_seconds_sum,
        )

    async def close(self) -> None:
        """Write what is in memory within close_timeout_seconds, leave the rest in the spool
        (or count it as dropped without one), stop.

        Shielded: cancelling the caller does not cut the shutdown short; it finishes
        (bounded by the deadline) and then the cancellation continues.
        """
        if self._runner is None:
            self._closing = True
            return
        if self._close_task is None:
            self._close_task = asyncio.create_task(self._close())
        try:
            await asyncio.shield(self._close_task)
        except asyncio.CancelledError:
            await self._close_task
            raise

    # -- bookkeeping -----------------------------------------------------------------------

    def _rows_in_memory(self) -> int:
        return self._queued + self._logging_rows + self._memory_rows

    def _unlogged_from(self) -> int:
        """The first put() whose rows are not all in the spool (or settled otherwise)."""
        first = self._put_sequence + 1
        if self._chunks:
            first = self._chunks[0].sequence
        if self._logging_from is not None:
            first = min(first, self._logging_from)
        return first

    def _account(self, batch: _Batch, sign: int) -> None:
        """Add (1) or take away (-1) ``batch``'s share of the counters, around a change."""
        if batch.rows is not None:
            rows = sign * batch.row_count
            self._memory_rows += rows
            if batch.state is _State.PENDING:
                self._pending_memory_rows += rows
            if batch.handle is not None:
                self._logged_memory_rows += rows
            elif batch.state is _State.PENDING and self._spool is not None:
                self._unlogged_pending += sign
        elif batch.state is not _State.DONE:
            self._on_disk_only += sign

    def _change(self, batch: _Batch, *, state: _State | None = None, evict: bool = False) -> None:
        self._account(batch, -1)
        if state is not None:
            batch.state = state
        if evict or batch.state is _State.DONE:
            batch.rows = None
        self._account(batch, 1)

    def _append_batch(self, batch: _Batch) -> None:
        self._batches.append(batch)
        self._account(batch, 1)

    def _remove_batch(self, batch: _Batch) -> None:
        self._account(batch, -1)
        if self._batches and self._batches[0] is batch:
            self._batches.popleft()
        else:
            self._batches.remove(batch)

    # -- the queue of rows not in a batch yet ----------------------------------------------

    def _take(self, count: int) -> list[Row]:
        """Pop up to ``count`` of the oldest queued rows (to drop them)."""
        taken: list[Row] = []
        while self._chunks and len(taken) < count:
            chunk = self._chunks[0]
            need = count - len(taken)
            if chunk.remaining <= need:
                taken.extend(chunk.rows[chunk.start :] if chunk.start else chunk.rows)
                self._chunks.popleft()
            else:
                taken.extend(chunk.rows[chunk.start : chunk.start + need])
                chunk.start += need
        self._queued -= len(taken)
        return taken

    def _next_batch_rows(self) -> tuple[uuid.UUID, list[Row], float]:
        """The oldest queued rows as one batch: a put() with its own id alone, else up to
        ``max_rows`` rows of consecutive put()s, under a new id."""
        first = self._chunks[0]
        arrived = first.arrived
        if first.batch_id is not None:
            self._chunks.popleft()
            rows = first.rows[first.start :] if first.start else first.rows
            self._queued -= len(rows)
            return first.batch_id, rows, arrived
        taken: list[Row] = []
        while self._chunks and len(taken) < self._max_rows and self._chunks[0].batch_id is None:
            chunk = self._chunks[0]
            need = self._max_rows - len(taken)
            if chunk.remaining <= need:
                if not taken and not chunk.start:
                    taken = chunk.rows
                else:
                    taken.extend(chunk.rows[chunk.start :] if chunk.start else chunk.rows)
                self._chunks.popleft()
            else:
                taken.extend(chunk.rows[chunk.start : chunk.start + need])
                chunk.start += need
        self._queued -= len(taken)
        return uuid.uuid4(), taken, arrived

    def _drop_oldest(self, count: int) -> int:
        """Remove up to ``count`` of the oldest rows in memory that are not being written:
        without a spool, pending batches first (whole or their oldest rows; a batch keeps its
        id, so what remains of it is still written at most once), then the queue."""
        dropped = 0
        if self._spool is None:
            for batch in list(self._batches):
                if dropped >= count:
                    break
                if batch.state is not _State.PENDING or batch.rows is None:
                    continue
                need = count - dropped
                if batch.row_count <= need:
                    self._remove_batch(batch)
                    dropped += batch.row_count
                else:
                    self._account(batch, -1)
                    batch.rows = batch.rows[need:]
                    batch.row_count -= need
                    self._account(batch, 1)
                    dropped += need
        return dropped + len(self._take(count - dropped))

    def _next_group(self, now: float, force: bool) -> tuple[list[_Batch] | None, float]:
        """The batches of the next transaction, if it is due; else when it will be.

        Consecutive pending batches held in memory, from the oldest, up to ``max_rows``
        rows. A batch only on disk stops the group: it and what follows it wait for the
        replay, which reads them back in order.
        """
        group: list[_Batch] = []
        rows = 0
        full = False
        for batch in self._batches:
            if batch.state is not _State.PENDING:
                if group:
                    break
                continue
            if batch.rows is None:
                break
            if group and rows + batch.row_count > self._max_rows:
                full = True
                break
            group.append(batch)
            rows += batch.row_count
            if rows >= self._max_rows:
                full = True
                break
        if not group:
            return None, math.inf
        due_at = group[0].arrived + self._max_delay
        if full or force or now >= due_at:
            return group, now
        return None, due_at

    def _replay_wanted(self) -> bool:
        if self._spool is None:
            return False
        if self._backlog > 0:
            return True
        head = self._batches[0] if self._batches else None
        return head is not None and head.state is _State.PENDING and head.rows is None

    def _may_hold(self, rows: int) -> bool:
        """Whether a new batch of ``rows`` stays in memory too (besides the spool).

        Not while the database is unavailable (memory stays bounded through an outage), and
        not while older batches are only on disk (they are written first, read back).
        """
        return (
            self._available
            and self._on_disk_only == 0
            and self._backlog == 0
            and self._memory_rows + rows <= self._high_water
        )

    def _settled(self) -> bool:
        """Nothing running and nothing queued that is not in a batch yet."""
        return (
            not self._chunks
            and self._log_task is None
            and not self._in_flight
            and self._replay_task is None
            and self._ack_task is None
            and not (self._batches and self._batches[0].state is _State.DONE)
        )

    def _flushed(self) -> bool:
        if not self._settled() or self._unlogged_pending:
            return False
        if not self._batches and self._backlog == 0:
            return True
        # The database is away: every batch is in the spool; done for now.
        return self._spool is not None and not self._available

    def _finished(self) -> bool:
        """At close: nothing left that the writer may still do."""
        if not self._settled() or self._unlogged_pending:
            return False
        group, _due = self._next_group(time.monotonic(), force=True)
        return group is None

    # -- the background task ---------------------------------------------------------------

    def _notify(self) -> None:
        """Wake flush() / put_wait() / wait_logged() waiters to re-check the state."""
        changed = self._changed
        self._changed = asyncio.Event()
        changed.set()

    def _check_runner(self) -> None:
        runner = self._runner
        if runner is None or not runner.done():
            return
        if not runner.cancelled() and runner.exception() is not None:
            raise WriterFailedError(
                f"the writer for {self._table} failed; see the chained error"
            ) from runner.exception()
        if not self._closing:
            raise WriterFailedError(f"the writer for {self._table} stopped")

    async def _run(self) -> None:
        async with asyncio.TaskGroup() as tasks:
            while True:
                self._wakeup.clear()
                deadline = await self._step(tasks)
                self._notify()
                if self._closing and self._finished():
                    return
                if deadline is not None:
                    await self._sleep_until(deadline)

    async def _sleep_until(self, deadline: float) -> None:
        if self._wakeup.is_set():
            return
        timeout = None if math.isinf(deadline) else max(0.0, deadline - time.monotonic())
        try:
            async with asyncio.timeout(timeout):
                await self._wakeup.wait()
        except TimeoutError:
            pass

    async def _step(self, tasks: asyncio.TaskGroup) -> float | None:
        """Do one thing; None to go on at once, else the monotonic time to look again."""
        now = time.monotonic()
        spool = self._spool
        db_allowed = self._available or now >= self._retry_at

        # Rows into batches; with a spool, on disk before anything else happens to them
        # (one append at a time, beside the transactions in flight).
        if spool is None:
            while self._chunks:
                batch_id, rows, arrived = self._next_batch_rows()
                self._append_batch(_Batch(batch_id, rows, len(rows), arrived))
        elif self._log_task is None:
            if self._chunks:
                self._log_task = tasks.create_task(self._log(self._form_queued()))
            elif not self._available and self._unlogged_pending:
                # The database went away while the spool was refusing batches: try the
                # spool again (behind everything else, under their ids), or drop them.
                self._log_task = tasks.create_task(self._log(self._take_refused()))

        deadline = math.inf
        if self._batches and self._batches[0].state is _State.DONE and self._ack_task is None:
            if now >= self._ack_not_before:
                self._ack_task = tasks.create_task(self._ack_done())
            else:
                deadline = self._ack_not_before

        if (
            self._replay_wanted()
            and self._replay_task is None
            and not self._closing
            and not self._in_flight
            and self._ack_task is None
            and not (self._batches and self._batches[0].state is _State.DONE)
        ):
            replay_at = max(self._replay_not_before, 0.0 if self._available else self._retry_at)
            if now >= replay_at:
                self._replay_task = tasks.create_task(self._replay())
                return None
            deadline = min(deadline, replay_at)

        group, due_at = self._next_group(now, self._closing or self._flush_waiters > 0)
        if group is None:
            return min(deadline, due_at)
        if not db_allowed:
            return min(deadline, self._retry_at)
        if len(self._in_flight) >= (self._concurrency if self._available else 1):
            return deadline  # a finishing transaction sets the wakeup
        for batch in group:
            self._change(batch, state=_State.WRITING)
        self._in_flight[id(group)] = group
        tasks.create_task(self._write_group(group))
        return None

    # -- write-ahead to the spool ----------------------------------------------------------

    def _form_queued(self) -> list[tuple[uuid.UUID, list[Row], float]]:
        """The oldest queued rows as batches to append, a few at a time (so the first are
        written while the next are appended)."""
        self._logging_from = self._chunks[0].sequence
        # One batch while nothing waits to be written (the first COPY starts sooner), a few
        # (one fsync) while the writes are behind.
        most = _BATCHES_PER_APPEND if self._pending_memory_rows >= self._max_rows else 1
        formed: list[tuple[uuid.UUID, list[Row], float]] = []
        while self._chunks and len(formed) < most:
            formed.append(self._next_batch_rows())
        self._logging_rows = sum(len(rows) for _, rows, _ in formed)
        return formed

    def _take_refused(self) -> list[tuple[uuid.UUID, list[Row], float]]:
        """The batches the spool refused earlier that the database has not taken."""
        refused = [b for b in self._batches if b.handle is None and b.state is _State.PENDING]
        formed: list[tuple[uuid.UUID, list[Row], float]] = []
        for batch in refused:
            assert batch.rows is not None
            formed.append((batch.batch_id, batch.rows, batch.arrived))
            self._remove_batch(batch)
        self._logging_rows = sum(len(rows) for _, rows, _ in formed)
        return formed

    async def _log(self, formed: list[tuple[uuid.UUID, list[Row], float]]) -> None:
        try:
            # Seen through even at the shutdown deadline: a batch is then either in the
            # spool and known to be, or not appended at all (and salvaged).
            await _uncancellable(self._append_and_track(formed))
        finally:
            self._log_task = None
            self._wakeup.set()
            self._notify()

    async def _append_and_track(
        self, formed: list[tuple[uuid.UUID, list[Row], float]], *, at_shutdown: bool = False
    ) -> None:
        """Append ``formed`` batches to the spool and track them; a batch the spool refuses
        is written from memory if the database is available and there is room (never at
        shutdown), else dropped."""
        spool = self._spool
        assert spool is not None

        def append_all() -> list[SpooledBatch | Exception]:
            if len(formed) > 1:
                try:
                    # One write and one fsync for all of them (the usual case).
                    return list(spool.append_many([(rows, bid) for bid, rows, _ in formed]))
                except (SpoolFullError, SpoolCodecError, OSError):
                    pass  # one by one below
            # One by one: what fits is stored, only what does not is refused.
            outcomes: list[SpooledBatch | Exception] = []
            for batch_id, rows, _arrived in formed:
                try:
                    handle = spool.append(rows, batch_id=batch_id)
                    assert handle is not None
                    outcomes.append(handle)
                except (SpoolFullError, SpoolCodecError, OSError) as exc:
                    outcomes.append(exc)
            return outcomes

        try:
            outcomes = await asyncio.to_thread(append_all)
        finally:
            self._logging_from = None
            self._logging_rows = 0
        for (batch_id, rows, arrived), outcome in zip(formed, outcomes, strict=True):
            if isinstance(outcome, SpooledBatch):
                self._rows_spooled += len(rows)
                held = rows if not at_shutdown and self._may_hold(len(rows)) else None
                self._append_batch(_Batch(batch_id, held, len(rows), arrived, handle=outcome))
                self._stored_again()
                if self._spool_refusing:
                    self._spool_refusing = False
                    logger.warning("the spool %s takes batches again", spool.directory)
                continue
            reason = spool_append_failure(outcome)
            if (
                not at_shutdown
                and self._available
                and self._memory_rows + len(rows) <= self._high_water
            ):
                # Not on disk, but the database may still take it: write it from memory.
                self._append_batch(_Batch(batch_id, rows, len(rows), arrived))
                if not self._spool_refusing:
                    self._spool_refusing = True
                    logger.error(
                        "the spool %s refused a batch of %d rows for %s (%s: %s); writing "
                        "such batches from memory only while the database takes them",
                        spool.directory,
                        len(rows),
                        self._table,
                        type(outcome).__name__,
                        outcome,
                    )
                continue
            self._drop(len(rows), reason, f"the spool refused the batch: {outcome}")

    # -- writing ---------------------------------------------------------------------------

    async def _write_group(self, group: list[_Batch]) -> None:
        key = id(group)
        try:
            committed = await self._commit(
                [LedgerBatch(batch.batch_id, batch.rows or ()) for batch in group]
            )
        except _Unwritten as unwritten:
            del self._in_flight[key]
            for batch in group:
                # In the spool: drop it from memory; the replay reads it back in order.
                self._change(batch, state=_State.PENDING, evict=batch.handle is not None)
            self._mark_unavailable(unwritten.cause)
        else:
            # Not in a finally: a group cancelled mid-write stays WRITING for close().
            del self._in_flight[key]
            for batch in group:
                self._change(batch, state=_State.DONE)
            self._mark_available()
            self._stored_again()
            self._record(committed)
        finally:
            self._wakeup.set()
            self._notify()

    async def _ack_done(self) -> None:
        """Ack the committed batches at the head, in order (one cursor write), and forget
        them."""
        spool = self._spool
        try:
            while self._batches and self._batches[0].state is _State.DONE:
                done: list[_Batch] = []
                for batch in self._batches:
                    if batch.state is not _State.DONE:
                        break
                    done.append(batch)
                handles = [batch.handle for batch in done if batch.handle is not None]
                if handles:
                    assert spool is not None
                    try:
                        # Seen through at the shutdown deadline too: it only saves a replay
                        # (the ledger would skip the batches), but costs no more than that.
                        await _uncancellable(asyncio.to_thread(spool.ack_many, handles))
                    except OSError:
                        logger.exception(
                            "cannot update the spool %s; retrying later", spool.directory
                        )
                        self._ack_not_before = time.monotonic() + self._retry_max
                        return
                for batch in done:
                    self._remove_batch(batch)
        finally:
            self._ack_task = None
            self._wakeup.set()
            self._notify()

    async def _replay(self) -> None:
        """Write the spool's oldest batches, read back from disk, one transaction each."""
        spool = self._spool
        assert spool is not None
        try:
            while not self._closing and self._replay_wanted():
                try:
                    item = await asyncio.to_thread(spool.peek)
                except OSError:
                    logger.exception("cannot read the spool %s; retrying later", spool.directory)
                    self._replay_not_before = time.monotonic() + self._retry_max
                    return
                batch = self._match_head(item)
                if item is None:
                    return
                if batch is not None:
                    self._change(batch, state=_State.WRITING)
                try:
                    committed = await self._commit([LedgerBatch(item.batch_id, item.rows)])
                except _Unwritten as unwritten:
                    if batch is not None:
                        self._change(batch, state=_State.PENDING)
                    self._mark_unavailable(unwritten.cause)
                    return
                self._mark_available()
                self._stored_again()
                self._rows_replayed += committed.rows_written
                self._record(committed)
                try:
                    # Seen through even at the shutdown deadline: a written batch left
                    # un-acked would be read back after the restart (and then skipped).
                    # (Our batch stays WRITING meanwhile: the acker leaves it alone.)
                    await _uncancellable(asyncio.to_thread(spool.ack, item))
                except OSError:
                    logger.exception("cannot update the spool %s; retrying later", spool.directory)
                    self._replay_not_before = time.monotonic() + self._retry_max
                    if batch is not None:
                        # The acker tries again; a backlog batch is read back again later
                        # (and skipped by the ledger then).
                        self._change(batch, state=_State.DONE)
                        self._ack_not_before = self._replay_not_before
                    return
                if batch is not None:
                    self._remove_batch(batch)
                else:
                    self._backlog = max(0, self._backlog - 1)
                self._notify()
        finally:
            self._replay_task = None
            self._wakeup.set()
            self._notify()

    def _match_head(self, item: SpooledBatch | None) -> _Batch | None:
        """The batch of ours the spool's oldest record is (None: one from before us)."""
        if item is None:
            # Nothing left on disk; batches of ours the spool no longer has were discarded
            # as undecodable (the spool counts their rows).
            self._backlog = 0
            while self._replay_wanted():
                self._remove_batch(self._batches[0])
            return None
        while self._batches:
            head = self._batches[0]
            if head.handle is None or head.state is not _State.PENDING or head.rows is not None:
                break
            if _position(item) == _position(head.handle):
                self._backlog = 0
                return head
            if _position(item) < _position(head.handle):
                break
            # The spool discarded our oldest batch's record (undecodable): it is gone.
            self._remove_batch(head)
        return None

    async def _commit(self, batches: Sequence[LedgerBatch]) -> Committed:
        """One transaction (storage.ledger.copy_batches); _Unwritten if nothing committed."""
        started = time.monotonic()
        rows = sum(len(batch.rows) for batch in batches)
        try:
            connection = await self._pool.acquire(timeout=self._copy_timeout)
        except (*TRANSIENT_ERRORS, asyncpg.PostgresError) as exc:
            # Whatever keeps us from a connection (refused, a wrong password, a missing
            # database) is an outage for us, never a problem with these rows.
            raise _Unwritten(exc) from exc
        try:
            try:
                committed = await self._copy(connection, batches, isolate_rejected=False)
            except TRANSIENT_ERRORS:
                raise
            except ROW_ERRORS:
                logger.exception(
                    "COPY of %d rows into %s failed; splitting the batch to isolate the "
                    "rejected rows",
                    rows,
                    self._table,
                )
                committed = await self._copy(connection, batches, isolate_rejected=True)
        except TRANSIENT_ERRORS as exc:
            raise _Unwritten(exc) from exc
        except LedgerError as exc:
            logger.error("%s; retrying like an outage", exc, exc_info=exc.cause)
            raise _Unwritten(exc.cause) from exc
        except Exception as exc:
            # Not a known database or row error (a bug, a driver surprise): keep the rows
            # like in an outage, so the writer goes on and nothing is lost.
            logger.exception("unexpected error writing %d rows to %s", rows, self._table)
            raise _Unwritten(exc) from exc
        finally:
            await self._pool.release(connection)
        elapsed = time.monotonic() - started
        self._batches_written += 1
        self._last_flush_seconds = elapsed
        self._flush_seconds_sum += elapsed
        self._flush_seconds_count += 1
        index = bisect.bisect_left(FLUSH_SECONDS_BUCKETS, elapsed)
        if index < len(self._flush_bucket_counts):
            self._flush_bucket_counts[index] += 1
        return committed

    async def _copy(
        self,
        connection: asyncpg.Connection,
        batches: Sequence[LedgerBatch],
        *,
        isolate_rejected: bool,
    ) -> Committed:
        return await copy_batches(
            connection,
            table=self._table,
            columns=self._columns,
            batches=batches,
            timeout_seconds=self._copy_timeout,
            isolate_rejected=isolate_rejected,
        )

    def _record(self, committed: Committed) -> None:
        """Count (and log) what a committed transaction did."""
        self._rows_written += committed.rows_written
        if committed.rows_deduplicated:
            self._rows_deduplicated += committed.rows_deduplicated
            logger.info(
                "%d batch(es) of %d rows for %s were written before (found in the ingest "
                "ledger): skipped",
                committed.batches_deduplicated,
                committed.rows_deduplicated,
                self._table,
            )
        rejected = committed.rejected
        if not rejected:
            return
        self._rows_rejected += len(rejected)
        self._dropped.add(DropReason.REJECTED, len(rejected))
        for item in rejected[:_REJECTED_ROWS_LOGGED]:
            logger.warning(
                "row rejected by %s and dropped: %s: %s; row: %r",
                self._table,
                type(item.error).__name__,
                item.error,
                item.row,
            )
        if len(rejected) > _REJECTED_ROWS_LOGGED:
            logger.warning(
                "%d rows of one batch rejected by %s in all (first %d logged)",
                len(rejected),
                self._table,
                _REJECTED_ROWS_LOGGED,
            )

    # -- state changes, logged once each ---------------------------------------------------

    def _mark_unavailable(self, cause: BaseException) -> None:
        now = time.monotonic()
        if self._available:
            self._available = False
            self._unavailable_since = now
            self._failed_attempts = 0
            logger.warning(
                "database unavailable for %s (%s: %s); %s until it is back",
                self._table,
                type(cause).__name__,
                cause,
                "spooling rows to disk" if self._spool is not None else "holding rows in memory",
            )
            if self._spool is not None:
                # Memory stays bounded through the outage: batches in the spool are read
                # back from there, in order, when the database is back.
                for batch in self._batches:
                    if (
                        batch.state is _State.PENDING
                        and batch.rows is not None
                        and batch.handle is not None
                    ):
                        self._change(batch, evict=True)
        self._retry_at = now + backoff_seconds(
            self._failed_attempts,
            initial_seconds=self._retry_initial,
            max_seconds=self._retry_max,
        )
        self._failed_attempts += 1
        self._wakeup.set()

    def _mark_available(self) -> None:
        if self._available:
            return
        self._available = True
        backlog = self.stats().spool_rows
        logger.info(
            "database available again for %s after %.1f s%s",
            self._table,
            time.monotonic() - self._unavailable_since,
            f"; replaying {backlog} spooled rows before new data" if backlog else "",
        )
        self._wakeup.set()

    def _drop(self, count: int, reason: DropReason, why: str) -> None:
        if count <= 0:
            return
        self._dropped.add(reason, count)
        if not self._dropping:
            self._dropping = True
            logger.error(
                "dropping rows for %s: %s (%d rows now; later drops are counted, "
                "not logged, until rows are stored again)",
                self._table,
                why,
                count,
            )

    def _stored_again(self) -> None:
        if self._dropping:
            self._dropping = False
            logger.warning(
                "rows for %s are being stored again; %d dropped so far",
                self._table,
                self._dropped.total,
            )

    # -- shutdown --------------------------------------------------------------------------

    async def _close(self) -> None:
        runner = self._runner
        assert runner is not None
        self._closing = True
        self._wakeup.set()
        try:
            async with asyncio.timeout(self._close_timeout):
                await asyncio.wait({runner})
        except TimeoutError:
            logger.warning(
                "writer for %s did not finish within %.1f s; %s the rest",
                self._table,
                self._close_timeout,
                "leaving" if self._spool is not None else "dropping",
            )
            runner.cancel()
            await asyncio.wait({runner})
        await self._salvage()
        self._notify()
        if not runner.cancelled() and runner.exception() is not None:
            raise WriterFailedError(f"the writer for {self._table} failed") from (
                runner.exception()
            )

    async def _salvage(self) -> None:
        """After the deadline (or a crash): what is only in memory to the spool, or counted
        as dropped; batches in the spool stay there (the next start writes them)."""
        spool = self._spool
        if spool is None:
            lost = self._queued + sum(
                batch.row_count for batch in self._batches if batch.state is not _State.DONE
            )
            self._take(self._queued)
            for batch in list(self._batches):
                self._remove_batch(batch)
            self._in_flight.clear()
            if lost:
                self._drop(
                    lost,
                    DropReason.BUFFER_FULL,
                    "shutdown deadline passed with no spool configured",
                )
            return
        formed: list[tuple[uuid.UUID, list[Row], float]] = []
        while self._chunks:
            formed.append(self._next_batch_rows())
        for batch in list(self._batches):
            if batch.handle is None and batch.state is not _State.DONE and batch.rows:
                formed.append((batch.batch_id, batch.rows, batch.arrived))
                self._remove_batch(batch)
        self._in_flight.clear()
        if formed:
            await self._append_and_track(formed, at_shutdown=True)
            logger.warning(
                "spooled %d unwritten rows for %s at shutdown",
                sum(len(rows) for _, rows, _ in formed),
                self._table,
            )
        for batch in self._batches:
            if batch.rows is not None:
                self._change(batch, evict=True)
