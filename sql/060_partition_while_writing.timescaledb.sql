-- 060, TimescaleDB backend: nothing to change. Hypertables create their chunks themselves;
-- the PostgreSQL variant makes day partitions safe to create while agents write.
SELECT 1;
