-- 004 maintenance, TimescaleDB backend: nothing to create. Chunks, retention, compression and
-- rollup refresh are TimescaleDB background jobs, registered with the configured intervals by
-- storage/timescale.py; completed operations and the audit log are deleted by the daemon's
-- maintenance job (storage/backend.py) on both backends.
SELECT 1;
