-- 128 on Citus: the raw series are read by time range through a B-tree on "timestamp".
--
-- The common 128 gives plugin_samples and plugin_metrics a BRIN index on "timestamp" for the
-- reads of the newest rows by time alone (see that file). Citus converts partitions older
-- than a week to columnar storage (storage/citus.py), which keeps B-tree indexes but not
-- BRIN: alter_old_partitions_set_access_method() tries to drop the partition's BRIN index,
-- which the parent's index requires, and the conversion fails. So on Citus the index is a
-- B-tree, on every shard. A database migrated on PostgreSQL and then moved to Citus
-- (docs/scaling.md) ran the common 128 and runs this one too: its BRIN indexes are replaced.
-- (Each statement through EXECUTE, as 123 says why.)
DO $$
BEGIN
    EXECUTE 'DROP INDEX IF EXISTS idx_plugin_samples_time';
    EXECUTE 'CREATE INDEX idx_plugin_samples_time ON plugin_samples ("timestamp")';
    EXECUTE 'DROP INDEX IF EXISTS idx_plugin_metrics_time';
    EXECUTE 'CREATE INDEX idx_plugin_metrics_time ON plugin_metrics ("timestamp")';
END
$$;
