"""The batched writer: rows in memory, binary COPY to the database, the disk spool when it is away.

Over 500 lines on purpose: the back-pressure policy below is one state machine (queue,
batches in flight, spool, retry) whose parts are only correct together.

Back-pressure policy (also in docs/writer.md):

* ``put()`` only appends to an in-memory queue; it never waits for the database.
* A batch is written when ``max_rows`` rows are queued or the oldest queued row is
  ``max_delay_seconds`` old (or on ``flush()`` / shutdown), by one binary COPY, with up to
  ``concurrency`` batches in flight on the pool.
* With a spool: while the database is unavailable, every batch that is due goes to the spool
  instead of staying in memory; when the database is slower than intake and the queue passes
  its high-water mark (half of ``max_queue_rows``), the oldest rows above the mark (plus one
  batch) go to the spool in one append.
  While the spool holds rows, new batches are appended behind them, so the spool is replayed
  in order, one batch at a time, before any newer data is written.
* The queue never holds more than ``max_queue_rows``: past that, the oldest rows are dropped.
  With a spool, rows are dropped when the spool is at its size cap (the batch that does not
  fit), or if the spool's disk cannot absorb the excess before the queue doubles from its
  high-water mark to the bound (in practice never: one fsync'ed append takes all of it).
  Drops are counted in ``rows_dropped``, by reason (storage.drops) where each happens, and
  logged once per state change, not once per batch.
* Transient errors (storage.errors.TRANSIENT_ERRORS: connection loss, timeouts, server shutting down or
  starting, too many connections, a read-only standby, a table not migrated yet) put the
  writer in "database unavailable" (logged once): the batch goes to the spool (or back to
  the queue without one), and the database is retried with capped exponential backoff and
  jitter. The first write that succeeds logs the recovery once.
* Any database error while getting a connection (a wrong password, a missing database)
  counts as transient too: it is never the rows' fault.
* Any other error from COPY (a CHECK or foreign-key violation, a value the column type
  refuses) is a problem with some rows, not the database: the batch is logged with its
  traceback and split in halves until the rejected rows are isolated; the good rows are
  written and the rejected ones counted in ``rows_rejected`` (and in ``rows_dropped``).
* Shutdown (``async with`` exit, ``close()``) writes everything within
  ``close_timeout_seconds``; whatever is not written by then goes to the spool, or is
  counted as dropped and logged when there is no spool.

Delivery is at least once: a COPY that times out after the server committed it, or a crash
between a replayed batch's COPY and its ack, can write that batch twice.

One module past the usual size on purpose: the queue, the COPY tasks, the spool hand-off,
the replay and the shutdown salvage share one state machine, and each of the rules above
is enforced by more than one of them.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import math
import re
import time
from collections import deque
from collections.abc import Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final

import asyncpg
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

from pluginmon.collectors.models import SAMPLE_MEASUREMENTS
from pluginmon.storage.drops import DropCounts, DropReason
from pluginmon.storage.errors import TRANSIENT_ERRORS, backoff_seconds
from pluginmon.storage.spool import Spool, SpoolCodecError, SpoolFullError

logger = logging.getLogger(__name__)

Row = tuple[object, ...]

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

# Errors caused by some rows of a batch: isolate and reject those rows. Checked after
# TRANSIENT_ERRORS (which holds some PostgresError subclasses).
ROW_ERRORS: Final[tuple[type[BaseException], ...]] = (
    asyncpg.PostgresError,  # constraint violations, out-of-range values (classes 22, 23)
    ValueError,  # client-side encoding of a value
    TypeError,
    OverflowError,
)

# Upper bounds of the flush-duration histogram, in seconds (Prometheus-style, cumulative).
FLUSH_SECONDS_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

_IDENTIFIER_RE = re.compile(r"^[a-z_][a-z0-9_]*$")
# How many rejected rows of one batch are logged individually.
_REJECTED_ROWS_LOGGED = 5


class WriterClosedError(RuntimeError):
    """put() after the writer was closed."""


class WriterFailedError(RuntimeError):
    """The writer's background task died; the cause is chained."""


@dataclass(frozen=True, slots=True)
class WriterStats:
    """A consistent snapshot of the writer's counters, for the exporter.

    ``rows_dropped`` counts every row that will never be written, including the
    ``rows_rejected`` ones the database refused; ``dropped`` is the same by reason (zeros
    included); ``rows_queued`` is in memory (queued or being written), ``spool_rows`` on disk.
    """

    rows_written: int
    batches_written: int
    rows_dropped: int
    rows_rejected: int
    dropped: Mapping[DropReason, int]
    rows_queued: int
    rows_spooled: int  # appended to the spool, total
    rows_replayed: int  # written from the spool, total
    spool_rows: int
    spool_bytes: int
    last_flush_seconds: float
    flush_seconds_sum: float
    flush_seconds_count: int
    # (upper bound, cumulative count), then (inf, flush_seconds_count)
    flush_seconds_buckets: tuple[tuple[float, int], ...]
    database_available: bool


@dataclass(slots=True)
class _Chunk:
    arrived: float  # monotonic time of put()
    rows: list[Row]
    start: int = 0  # rows before this were taken already

    @property
    def remaining(self) -> int:
        return len(self.rows) - self.start


@dataclass(frozen=True, slots=True)
class _Batch:
    rows: list[Row]
    arrived: float  # of its oldest row


class _Unwritten(Exception):
    """A transient error stopped a write; ``rows`` were not written."""

    def __init__(self, rows: list[Row], cause: BaseException) -> None:
        super().__init__(f"{len(rows)} rows not written: {cause!r}")
        self.rows = rows
        self.cause = cause


async def _uncancellable(operation: Coroutine[Any, Any, None]) -> None:
    """Run ``operation`` to its end even if the caller is cancelled meanwhile.

    The cancellation is delivered afterwards; an error of the operation then is logged by
    the operation's own handling, not raised in place of the CancelledError.
    """
    task = asyncio.ensure_future(operation)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait({task})
        if not task.cancelled() and task.exception() is not None:
            logger.error("cleanup after cancellation failed", exc_info=task.exception())
        raise


class _ConnectFailed(Exception):
    """No connection to write with; ``cause`` says why."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


class BatchWriter:
    """``async with BatchWriter(pool, table=..., columns=...) as writer: writer.put(rows)``.

    ``pool`` is an asyncpg pool (see storage.pool). ``table`` and ``columns`` are
    identifiers chosen by code; they are validated anyway. Rows are tuples in ``columns``
    order. ``spool`` (owned and closed by the caller) makes the writer outage-proof; without
    one, rows wait in memory for the database, bounded by ``max_queue_rows``.
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

        self._chunks: deque[_Chunk] = deque()
        self._queued = 0
        self._in_flight: dict[int, _Batch] = {}
        self._replay_task: asyncio.Task[None] | None = None
        self._runner: asyncio.Task[None] | None = None
        self._close_task: asyncio.Task[None] | None = None
        self._closing = False
        self._flush_waiters = 0
        self._spooling_rows = 0  # taken from the queue, being appended to the spool
        self._wakeup = asyncio.Event()
        self._changed = asyncio.Event()

        self._available = True
        self._unavailable_since = 0.0
        self._failed_attempts = 0  # consecutive, while unavailable
        self._retry_at = 0.0
        self._replay_not_before = 0.0  # after a spool I/O error
        self._dropping = False

        self._rows_written = 0
        self._batches_written = 0
        self._dropped = DropCounts()
        self._rows_rejected = 0
        self._rows_spooled = 0
        self._rows_replayed = 0
        self._last_flush_seconds = 0.0
        self._flush_seconds_sum = 0.0
        self._flush_seconds_count = 0
        self._flush_bucket_counts = [0] * len(FLUSH_SECONDS_BUCKETS)

    # -- public interface ------------------------------------------------------------------

    async def __aenter__(self) -> BatchWriter:
        if self._runner is not None:
            raise RuntimeError("a BatchWriter can be entered once")
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

    def put(self, rows: Sequence[Row]) -> None:
        """Queue rows (tuples in ``columns`` order) for writing; never waits.

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
        was_empty = self._queued == 0
        self._chunks.append(_Chunk(time.monotonic(), batch))
        self._queued += len(batch)
        overflow = self._queued - self._max_queue_rows
        if overflow > 0:
            self._drop(
                len(self._take(overflow)), DropReason.BUFFER_FULL, "the in-memory queue is full"
            )
        if was_empty or self._queued >= self._max_rows:
            self._wakeup.set()

    async def put_wait(self, rows: Sequence[Row]) -> None:
        """put(), after waiting until the queue is below its high-water mark.

        For bulk producers (benchmarks, backfills) that can wait: it waits on the writer's
        progress, never on a database call, and not at all while the database is
        unavailable (then the usual overflow policy applies).
        """
        while (
            self._queued > 0
            and self._queued + len(rows) > self._high_water
            and self._available
            and not self._closing
        ):
            self._check_runner()
            if self._runner is None or self._runner.done():
                break
            changed = self._changed
            await changed.wait()
        self.put(rows)

    async def flush(self) -> None:
        """Write everything queued, including partial batches, and return when done.

        Done means nothing in memory and nothing in flight, and the spool drained unless
        the database is unavailable (then the rows are in the spool). Without a spool and
        with the database away this waits for the database; bound it with asyncio.timeout.
        """
        self._flush_waiters += 1
        try:
            while not self._flushed():
                self._check_runner()
                if self._runner is None or self._runner.done():
                    return  # not started, or closed: nothing will make progress
                changed = self._changed
                self._wakeup.set()
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
            # tuple(): a scrape thread may call this while the loop changes the dict.
            rows_queued=self._queued
            + self._spooling_rows
            + sum(len(b.rows) for b in tuple(self._in_flight.values())),
            rows_spooled=self._rows_spooled,
            rows_replayed=self._rows_replayed,
            spool_rows=spool.rows if spool else 0,
            spool_bytes=spool.bytes if spool else 0,
            last_flush_seconds=self._last_flush_seconds,
            flush_seconds_sum=self._flush_seconds_sum,
            flush_seconds_count=self._flush_seconds_count,
            flush_seconds_buckets=tuple(buckets),
            database_available=self._available,
        )

    @property
    def database_available(self) -> bool:
        return self._available

    def collect(self) -> Iterator[Metric]:
        """prometheus-client's Collector: rows written and the COPY durations, read now.

        Called from a scrape's render thread: it only reads counters the loop updates.
        """
        stats = self.stats()
        rows = CounterMetricFamily(
            "pluginmon_rows_written", "Rows written to the database", labels=["table"]
        )
        rows.add_metric([self._table], stats.rows_written)
        yield rows
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
        """Write what is queued within close_timeout_seconds, spool the rest, stop.

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

    # -- queue -----------------------------------------------------------------------------

    def _take(self, count: int) -> list[Row]:
        """Pop up to ``count`` of the oldest queued rows."""
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

    def _take_batch(self) -> _Batch:
        arrived = self._chunks[0].arrived
        return _Batch(self._take(self._max_rows), arrived)

    def _unshift(self, batch: _Batch) -> None:
        """Put a batch back at the head of the queue (no spool, database away)."""
        self._chunks.appendleft(_Chunk(batch.arrived, batch.rows))
        self._queued += len(batch.rows)
        overflow = self._queued - self._max_queue_rows
        if overflow > 0:
            self._drop(
                len(self._take(overflow)), DropReason.BUFFER_FULL, "the in-memory queue is full"
            )

    def _batch_due(self, now: float, force: bool) -> bool:
        if self._queued >= self._max_rows:
            return True
        return self._queued > 0 and (force or now - self._chunks[0].arrived >= self._max_delay)

    def _flushed(self) -> bool:
        spool_done = self._spool is None or self._spool.rows == 0 or not self._available
        return self._finished() and spool_done

    # -- the background task ---------------------------------------------------------------

    def _notify(self) -> None:
        """Wake flush() / put_wait() waiters to re-check the state."""
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

    def _finished(self) -> bool:
        return (
            self._queued == 0
            and self._spooling_rows == 0
            and not self._in_flight
            and self._replay_task is None
        )

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

        # The database is slower than intake: keep memory bounded with the spool. All the
        # excess goes in one append (one fsync), so spilling keeps up with any intake rate.
        if spool is not None and self._queued > self._high_water:
            await self._to_spool(self._take(self._queued - self._high_water + self._max_rows))
            return None

        spool_pending = spool is not None and spool.rows > 0
        if (
            spool_pending
            and db_allowed
            and self._replay_task is None
            and not self._closing
            and now >= self._replay_not_before
            and (self._available or not self._in_flight)
        ):
            self._replay_task = tasks.create_task(self._replay())
            return None

        force = self._closing or self._flush_waiters > 0
        if not self._batch_due(now, force):
            deadline = self._chunks[0].arrived + self._max_delay if self._queued else math.inf
            # When the replay may start; a probe still in flight wakes us when it ends.
            if (
                spool_pending
                and self._replay_task is None
                and not self._closing
                and (self._available or not self._in_flight)
            ):
                replay_at = max(self._replay_not_before, 0.0 if self._available else self._retry_at)
                deadline = min(deadline, max(replay_at, now + 0.001))
            return deadline

        if spool is not None and (
            not self._available or spool_pending or self._replay_task is not None
        ):
            # Behind the spooled rows, in order; the replay writes them.
            await self._to_spool(self._take_batch().rows)
            return None
        if not db_allowed:
            return self._retry_at
        if len(self._in_flight) >= (self._concurrency if self._available else 1):
            return math.inf  # a finishing batch sets the wakeup
        batch = self._take_batch()
        self._in_flight[id(batch)] = batch
        tasks.create_task(self._write_queued_batch(batch))
        return None

    async def _write_queued_batch(self, batch: _Batch) -> None:
        key = id(batch)
        try:
            await self._write_rows(batch.rows)
        except _Unwritten as unwritten:
            self._mark_unavailable(unwritten.cause)
            # The rows pass to the spool or back to the queue: close() must not salvage
            # them a second time.
            del self._in_flight[key]
            if self._spool is not None:
                await self._to_spool(unwritten.rows)
            else:
                self._unshift(_Batch(unwritten.rows, batch.arrived))
        else:
            # Not in a finally: a batch cancelled mid-write stays in _in_flight for close().
            del self._in_flight[key]
            self._mark_available()
            self._stored_again()
        finally:
            self._wakeup.set()
            self._notify()

    async def _replay(self) -> None:
        spool = self._spool
        assert spool is not None
        try:
            while not self._closing:
                try:
                    item = await asyncio.to_thread(spool.peek)
                except OSError:
                    logger.exception("cannot read the spool %s; retrying later", spool.directory)
                    self._replay_not_before = time.monotonic() + self._retry_max
                    return
                if item is None:
                    return
                try:
                    await self._write_rows(list(item.rows))
                except _Unwritten as unwritten:
                    # The whole batch stays in the spool (parts of a split batch may be in
                    # already: at-least-once).
                    self._mark_unavailable(unwritten.cause)
                    return
                self._mark_available()
                self._rows_replayed += len(item.rows)
                try:
                    # Seen through even at the shutdown deadline: a written batch left
                    # un-acked would be written again after the restart.
                    await _uncancellable(asyncio.to_thread(spool.ack, item))
                except OSError:
                    logger.exception("cannot update the spool %s; retrying later", spool.directory)
                    self._replay_not_before = time.monotonic() + self._retry_max
                    return
                self._notify()
        finally:
            self._replay_task = None
            self._wakeup.set()
            self._notify()

    # -- writing ---------------------------------------------------------------------------

    async def _copy(self, rows: list[Row]) -> None:
        started = time.monotonic()
        try:
            connection = await self._pool.acquire(timeout=self._copy_timeout)
        except (*TRANSIENT_ERRORS, asyncpg.PostgresError) as exc:
            # Whatever keeps us from a connection (refused, a wrong password, a missing
            # database) is an outage for us, never a problem with these rows.
            raise _ConnectFailed(exc) from exc
        try:
            await connection.copy_records_to_table(
                self._table,
                records=rows,
                columns=self._columns,
                timeout=self._copy_timeout,
            )
        finally:
            await self._pool.release(connection)
        elapsed = time.monotonic() - started
        self._rows_written += len(rows)
        self._batches_written += 1
        self._last_flush_seconds = elapsed
        self._flush_seconds_sum += elapsed
        self._flush_seconds_count += 1
        index = bisect.bisect_left(FLUSH_SECONDS_BUCKETS, elapsed)
        if index < len(self._flush_bucket_counts):
            self._flush_bucket_counts[index] += 1

    async def _write_rows(self, rows: list[Row]) -> None:
        """Write ``rows``, isolating and rejecting bad rows; _Unwritten on transient errors."""
        pending: deque[list[Row]] = deque([rows])
        rejected_in_batch = 0
        while pending:
            part = pending[0]
            try:
                await self._copy(part)
            except _ConnectFailed as failed:
                raise _Unwritten([row for piece in pending for row in piece], failed.cause) from (
                    failed.cause
                )
            except TRANSIENT_ERRORS as exc:
                raise _Unwritten([row for piece in pending for row in piece], exc) from exc
            except ROW_ERRORS as exc:
                pending.popleft()
                if part is rows:
                    logger.exception(
                        "COPY of %d rows into %s failed; splitting the batch to isolate the "
                        "rejected rows",
                        len(rows),
                        self._table,
                    )
                if len(part) > 1:
                    middle = len(part) // 2
                    pending.appendleft(part[middle:])
                    pending.appendleft(part[:middle])
                    continue
                rejected_in_batch += 1
                self._rows_rejected += 1
                self._dropped.add(DropReason.REJECTED, 1)
                if rejected_in_batch <= _REJECTED_ROWS_LOGGED:
                    logger.warning(
                        "row rejected by %s and dropped: %s: %s; row: %r",
                        self._table,
                        type(exc).__name__,
                        exc,
                        part[0],
                    )
                continue
            except Exception as exc:
                # Not a known database or row error (a bug, a driver surprise): keep the
                # rows like in an outage, so the writer goes on and nothing is lost.
                logger.exception("unexpected error writing %d rows to %s", len(part), self._table)
                raise _Unwritten([row for piece in pending for row in piece], exc) from exc
            pending.popleft()
        if rejected_in_batch > _REJECTED_ROWS_LOGGED:
            logger.warning(
                "%d rows of one batch rejected by %s in all (first %d logged)",
                rejected_in_batch,
                self._table,
                _REJECTED_ROWS_LOGGED,
            )

    async def _to_spool(self, rows: list[Row]) -> None:
        """Append a batch to the spool; a failure to store it is counted as a drop.

        Shielded: once started, the append is seen through even if the caller is cancelled
        (at the shutdown deadline), so a batch is never both spooled and salvaged, nor lost
        between the two.
        """
        self._spooling_rows += len(rows)
        await _uncancellable(self._append_to_spool(rows))

    async def _append_to_spool(self, rows: list[Row]) -> None:
        spool = self._spool
        assert spool is not None
        try:
            await asyncio.to_thread(spool.append, rows)
        except SpoolFullError as exc:
            self._drop(len(rows), DropReason.SPOOL_FULL, str(exc))
            return
        except SpoolCodecError as exc:
            self._drop(len(rows), DropReason.SPOOL_CODEC, f"the batch cannot be spooled: {exc}")
            return
        except OSError as exc:
            self._drop(len(rows), DropReason.SPOOL_IO, f"writing to the spool failed: {exc}")
            return
        finally:
            self._spooling_rows -= len(rows)
        self._rows_spooled += len(rows)
        self._stored_again()

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
        spooled = self._spool.rows if self._spool is not None else 0
        logger.info(
            "database available again for %s after %.1f s%s",
            self._table,
            time.monotonic() - self._unavailable_since,
            f"; replaying {spooled} spooled rows before new data" if spooled else "",
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
                "spooling" if self._spool is not None else "dropping",
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
        """After the deadline (or a crash): spool what is still in memory, or count it."""
        leftovers = [batch.rows for batch in self._in_flight.values()]
        self._in_flight.clear()
        while self._queued:
            leftovers.append(self._take(self._max_rows))
        total = sum(len(rows) for rows in leftovers)
        if not total:
            return
        if self._spool is None:
            self._drop(
                total, DropReason.BUFFER_FULL, "shutdown deadline passed with no spool configured"
            )
            return
        for rows in leftovers:
            await self._to_spool(rows)
        logger.warning("spooled %d unwritten rows for %s at shutdown", total, self._table)
