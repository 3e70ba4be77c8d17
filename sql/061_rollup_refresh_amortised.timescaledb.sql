-- 061, TimescaleDB backend: nothing to change. Continuous aggregates track what changed (their
-- invalidation log) and recompute only that; the PostgreSQL variant amortises its lookback.
SELECT 1;
