-- 091: the daily plugin_analytics rows pluginmon computes itself (storage/analytics.py, in the
-- maintenance job): per plugin and environment and UTC day, how long it was observed and up,
-- the CPU time it used, its memory percentiles, restarts, and operations started and failed.
-- Additive: the platform's usage columns (invocations, errors, active_users, latency_ms_*)
-- are untouched by pluginmon's upsert, and these stay NULL on rows only the platform writes.

ALTER TABLE plugin_analytics
    -- Sample-covered seconds of the day (see storage/analytics.py for how a sample counts).
    ADD COLUMN observed_seconds   double precision
        CONSTRAINT plugin_analytics_observed_nonnegative CHECK (observed_seconds >= 0),
    ADD COLUMN up_seconds         double precision
        CONSTRAINT plugin_analytics_up_nonnegative CHECK (up_seconds >= 0),
    -- up_seconds / observed_seconds: a stretch without samples counts neither way.
    ADD COLUMN uptime_ratio       double precision
        CONSTRAINT plugin_analytics_uptime_ratio_range CHECK (uptime_ratio BETWEEN 0 AND 1),
    ADD COLUMN cpu_seconds        double precision
        CONSTRAINT plugin_analytics_cpu_seconds_nonnegative CHECK (cpu_seconds >= 0),
    ADD COLUMN sample_count       bigint
        CONSTRAINT plugin_analytics_sample_count_nonnegative CHECK (sample_count >= 0),
    ADD COLUMN rss_bytes_p50      double precision,
    ADD COLUMN rss_bytes_p95      double precision,
    ADD COLUMN rss_bytes_p99      double precision,
    ADD COLUMN restarts           bigint
        CONSTRAINT plugin_analytics_restarts_nonnegative CHECK (restarts >= 0),
    ADD COLUMN operations         bigint
        CONSTRAINT plugin_analytics_operations_nonnegative CHECK (operations >= 0),
    ADD COLUMN operation_failures bigint
        CONSTRAINT plugin_analytics_failures_nonnegative CHECK (operation_failures >= 0),
    -- The end of the window the row was computed over: the day's end once complete, the
    -- last full hour for today so far.
    ADD COLUMN computed_through   timestamptz,
    ADD CONSTRAINT plugin_analytics_failures_le_operations CHECK (operation_failures <= operations);

-- How far the daily analytics are computed (one row; the maintenance job moves it forward).
CREATE TABLE analytics_progress (
    period           text        PRIMARY KEY CHECK (period IN ('day')),
    computed_through timestamptz,
    refreshed_at     timestamptz
);
INSERT INTO analytics_progress (period) VALUES ('day');

-- The API reads analytics under row-level security (003 enabled it on plugin_analytics).
GRANT SELECT ON plugin_analytics TO pluginmon_api;
