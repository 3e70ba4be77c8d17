-- 128: the raw series are read by time range through a BRIN index on "timestamp".
--
-- Every minute something reads the newest rows of plugin_samples and plugin_metrics by time
-- alone: the registry job's usage refresh (the newest sample of each plugin and host in the
-- last 120 s, the newest health_score row), the 1-minute rollups (the minute's rows; on
-- TimescaleDB the continuous aggregates' refresh). Neither table had an index that starts
-- with the time (002 keeps two, (plugin_id, "timestamp") and (tenant_id, "timestamp")), so
-- before PostgreSQL 18, which can skip-scan the tenant index, such a read scanned the whole
-- current partition or chunk, a day of rows, and took longer with every hour of the day: on
-- TimescaleDB 2.28 / PostgreSQL 15 with 44 million rows in today's chunk (100,000 plugins,
-- 7 hours), one minute's rows took a parallel sequential scan reading all 686,000 pages
-- (5.4 GB), 1.9 s; the usage refresh 3.4-3.9 s. Through this index the same minute reads
-- 11,000 pages and the usage refresh takes 2.1-2.3 s, and neither grows with the day.
--
-- BRIN, not a B-tree: rows arrive in time order, so each range of pages holds a narrow time
-- span and the index is a few pages per gigabyte. What keeping it costs a COPY: nothing
-- resolved on one connection; the batch writer with two COPYs in flight measured 5-8% fewer
-- rows a second, about two standard errors (docs/BENCHMARKS.md). Page ranges filled since
-- the last summary are read whatever their times; autosummarize has autovacuum summarise
-- each range once it is full.
-- (Built under the migration's lock on each table: one sequential read of every partition or
-- chunk kept, about 8 s per 44 million rows, while writers wait. Each statement through
-- EXECUTE, as 123 says why.)
DO $$
BEGIN
    EXECUTE 'CREATE INDEX idx_plugin_samples_time ON plugin_samples USING brin ("timestamp")'
            ' WITH (autosummarize = on)';
    EXECUTE 'CREATE INDEX idx_plugin_metrics_time ON plugin_metrics USING brin ("timestamp")'
            ' WITH (autosummarize = on)';
END
$$;
