-- 100 distribute, PostgreSQL backend: nothing to do. On Citus (100_distribute.citus.sql) this
-- version distributes the tables by tenant.
SELECT 1;
