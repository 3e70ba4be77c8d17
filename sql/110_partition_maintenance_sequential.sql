-- 110 partition maintenance sequential: nothing to do on PostgreSQL and TimescaleDB. On Citus
-- (110_partition_maintenance_sequential.citus.sql) the partition maintenance function runs its
-- shard work over one connection per worker.
SELECT 1;
