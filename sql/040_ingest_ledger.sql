-- Exactly-once ingest: one row per batch the BatchWriter commits, in the same transaction as
-- the batch's rows (storage/writer.py). A batch carries its id from the moment it is formed,
-- through the disk spool, to here; written again (replayed from the spool after a crash, or
-- retried after a COPY whose commit succeeded although the client saw a timeout), it finds
-- its id and is skipped. The daemon's maintenance deletes rows older than
-- ingest_ledger_retention_hours (storage/upkeep.py), under the maintenance advisory lock.
CREATE TABLE ingest_ledger (
    batch_id     uuid        PRIMARY KEY,
    table_name   text        NOT NULL,
    -- Rows of the batch written (rows the database rejected are not counted).
    row_count    integer     NOT NULL CONSTRAINT ingest_ledger_row_count_nonnegative CHECK (row_count >= 0),
    committed_at timestamptz NOT NULL DEFAULT now()
);

-- What the pruning deletes by.
CREATE INDEX idx_ingest_ledger_committed_at ON ingest_ledger (committed_at);
