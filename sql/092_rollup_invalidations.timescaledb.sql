-- 092, TimescaleDB backend: nothing to change. Continuous aggregates keep their own
-- invalidation log; the PostgreSQL variant gives its rollup tables one.
SELECT 1;
