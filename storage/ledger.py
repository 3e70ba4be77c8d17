"""Exactly-once COPY: a batch's rows and its id in the ingest ledger, committed in one transaction.

Every batch the BatchWriter writes carries an id (a UUID) from the moment it is formed,
through the disk spool (storage/spool.py stores it with the batch). ``copy_batches`` writes
one or more batches in ONE transaction: first their ids go into ``ingest_ledger``
(sql/040_ingest_ledger.sql) with ``ON CONFLICT DO NOTHING``, then the rows of the batches
whose id was not there yet go in by binary COPY. A batch written again (replayed from the
spool after a crash between its commit and its ack, or retried after a COPY whose commit
succeeded although the client saw a timeout) finds its id and is skipped. A concurrent
transaction writing the same id (a timed-out COPY still running on the server) makes the
insert wait for it, and then skip or write as that one committed or not. This is Kafka
Connect's and Flink's way: the offset ledger commits with the data.

Rows the database refuses (``ROW_ERRORS``) are isolated inside the same transaction: each
part is copied under a savepoint, a refused part is split in halves, and the good rows
commit together with the batch's ledger row (its ``row_count`` says how many rows went in).
A replay of such a batch is skipped like any other: the good rows are in, and the refused
ones would be refused again.
"""

from __future__ import annotations

import logging
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import asyncpg

from pluginmon.storage.errors import TRANSIENT_ERRORS

logger = logging.getLogger(__name__)

Row = tuple[object, ...]

LEDGER_TABLE: Final = "ingest_ledger"

# Errors caused by some rows of a batch: isolate and reject those rows. Checked after
# TRANSIENT_ERRORS (which holds some PostgresError subclasses).
ROW_ERRORS: Final[tuple[type[BaseException], ...]] = (
    asyncpg.PostgresError,  # constraint violations, out-of-range values (classes 22, 23)
    ValueError,  # client-side encoding of a value
    TypeError,
    OverflowError,
)

# The ids of the batches not in the ledger yet (the others are already written).
_CLAIM = """
INSERT INTO ingest_ledger (batch_id, table_name, row_count)
SELECT batch.id, $2, batch.row_count
  FROM unnest($1::uuid[], $3::integer[]) AS batch (id, row_count)
ON CONFLICT (batch_id) DO NOTHING
RETURNING batch_id
"""
_COUNT_REJECTED = "UPDATE ingest_ledger SET row_count = row_count - $2 WHERE batch_id = $1"


@dataclass(frozen=True, slots=True)
class LedgerBatch:
    """Rows written together or not at all, under one id."""

    batch_id: uuid.UUID
    rows: Sequence[Row]


@dataclass(frozen=True, slots=True)
class RejectedRow:
    row: Row
    error: BaseException


@dataclass(frozen=True, slots=True)
class Committed:
    """What one transaction of ``copy_batches`` did."""

    rows_written: int
    # Batches (and their rows) whose id was in the ledger already: written before.
    batches_deduplicated: int
    rows_deduplicated: int
    rejected: tuple[RejectedRow, ...] = ()


class LedgerError(Exception):
    """Recording the batch ids failed for a reason that is not transient (the ledger table's
    privileges, say): never the rows' fault. ``cause`` is the database's error."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"recording batch ids in {LEDGER_TABLE} failed: {cause}")
        self.cause = cause


async def copy_batches(
    connection: asyncpg.Connection,
    *,
    table: str,
    columns: Sequence[str],
    batches: Sequence[LedgerBatch],
    timeout_seconds: float,
    isolate_rejected: bool,
) -> Committed:
    """Write ``batches`` in one transaction, each exactly once (see the module docstring).

    ``table`` and ``columns`` are identifiers the caller validated. Without
    ``isolate_rejected`` a refused row fails the whole transaction with its error (one of
    ROW_ERRORS; the caller then calls again with it, to isolate the refused rows). Transient
    errors (storage.errors) and LedgerError propagate; nothing is committed then.
    """
    async with connection.transaction():
        fresh = await _claim(
            connection, table=table, batches=batches, timeout_seconds=timeout_seconds
        )
        writing = [batch for batch in batches if batch.batch_id in fresh]
        skipped = [batch for batch in batches if batch.batch_id not in fresh]
        records: Sequence[Row]
        if len(writing) == 1:
            records = writing[0].rows
        else:
            records = [row for batch in writing for row in batch.rows]
        committed = Committed(
            rows_written=len(records),
            batches_deduplicated=len(skipped),
            rows_deduplicated=sum(len(batch.rows) for batch in skipped),
        )
        if not records:
            return committed
        if not isolate_rejected:
            await connection.copy_records_to_table(
                table, records=records, columns=columns, timeout=timeout_seconds
            )
            return committed
        rejected = await _copy_isolating(
            connection,
            table=table,
            columns=columns,
            records=records,
            timeout_seconds=timeout_seconds,
        )
        if rejected:
            await _count_rejected(connection, writing, rejected, timeout_seconds=timeout_seconds)
        return Committed(
            rows_written=len(records) - len(rejected),
            batches_deduplicated=committed.batches_deduplicated,
            rows_deduplicated=committed.rows_deduplicated,
            rejected=tuple(RejectedRow(records[index], error) for index, error in rejected),
        )


async def _claim(
    connection: asyncpg.Connection,
    *,
    table: str,
    batches: Sequence[LedgerBatch],
    timeout_seconds: float,
) -> set[uuid.UUID]:
    try:
        claimed = await connection.fetch(
            _CLAIM,
            [batch.batch_id for batch in batches],
            table,
            [len(batch.rows) for batch in batches],
            timeout=timeout_seconds,
        )
    except TRANSIENT_ERRORS:
        raise
    except asyncpg.PostgresError as exc:
        raise LedgerError(exc) from exc
    return {record[0] for record in claimed}


async def _copy_isolating(
    connection: asyncpg.Connection,
    *,
    table: str,
    columns: Sequence[str],
    records: Sequence[Row],
    timeout_seconds: float,
) -> list[tuple[int, BaseException]]:
    """Copy ``records`` part by part, each under a savepoint, halving the refused parts
    until each refused row is alone; (index, error) of each refused row."""
    rejected: list[tuple[int, BaseException]] = []
    middle = len(records) // 2
    pending = deque([(0, middle), (middle, len(records))] if middle else [(0, len(records))])
    while pending:
        start, stop = pending.popleft()
        try:
            # A savepoint: a refused part leaves the transaction (and its ledger rows) usable.
            async with connection.transaction():
                await connection.copy_records_to_table(
                    table, records=records[start:stop], columns=columns, timeout=timeout_seconds
                )
        except TRANSIENT_ERRORS:
            raise
        except ROW_ERRORS as exc:
            if stop - start > 1:
                middle = (start + stop) // 2
                pending.appendleft((middle, stop))
                pending.appendleft((start, middle))
            else:
                rejected.append((start, exc))
    return rejected


async def _count_rejected(
    connection: asyncpg.Connection,
    writing: Sequence[LedgerBatch],
    rejected: Sequence[tuple[int, BaseException]],
    *,
    timeout_seconds: float,
) -> None:
    """Take the refused rows off their batches' ledger row counts."""
    per_batch: dict[uuid.UUID, int] = {}
    bounds: list[tuple[int, uuid.UUID]] = []
    stop = 0
    for batch in writing:
        stop += len(batch.rows)
        bounds.append((stop, batch.batch_id))
    for index, _error in rejected:
        batch_id = next(batch_id for stop, batch_id in bounds if index < stop)
        per_batch[batch_id] = per_batch.get(batch_id, 0) + 1
    await connection.executemany(_COUNT_REJECTED, list(per_batch.items()), timeout=timeout_seconds)
