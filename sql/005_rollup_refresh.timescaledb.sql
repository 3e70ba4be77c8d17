-- 005 rollup refresh: PostgreSQL backend only; continuous aggregates refresh themselves.
SELECT 1;
