-- 110 partition maintenance sequential, Citus backend: pluginmon_maintain_partitions() runs
-- with citus.multi_shard_modify_mode = 'sequential'.
--
-- One call creates a day partition after another in one transaction: LOCK TABLE on the parent
-- (which Citus takes on the workers too), the default partition's rows moved, then ATTACH
-- PARTITION. In Citus's default parallel mode a statement may open more connections to a
-- worker, and one of them then waited for a lock another connection of the same transaction
-- held: Citus found a distributed deadlock of the transaction with itself and cancelled it
-- ("canceling the transaction since it was involved in a distributed deadlock", on ATTACH
-- PARTITION of plugin_metrics; 1 of 3 maintenance runs of a new database on the local test
-- cluster, 0 of 6 with this setting). Sequential mode keeps every shard of a worker on one
-- connection for the transaction. The function moves a day of rows at most, on few shards,
-- so the parallelism lost costs little.
ALTER FUNCTION pluginmon_maintain_partitions(regclass, interval, integer, timestamptz)
    SET citus.multi_shard_modify_mode = 'sequential';
