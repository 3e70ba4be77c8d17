-- 002 time series, TimescaleDB backend: hypertables (1-day chunks), compression settings and
-- continuous aggregates. Policies (retention, compression, cagg refresh) are registered with
-- the configured intervals by storage/timescale.py, not here.
--
-- No foreign key from the time-series tables to plugins, on both backends: a foreign key is
-- one index probe per row on the COPY hot path, and a plugin's history is meant to outlive
-- the plugin until retention removes it. plugin_id always comes from plugins (the writer
-- resolves it with ensure_tenant_and_plugin), so nothing is lost by not checking it here.

CREATE EXTENSION IF NOT EXISTS timescaledb;

CREATE TABLE plugin_samples (
    "timestamp"              timestamptz      NOT NULL,
    tenant_id                text             NOT NULL,
    plugin_id                bigint           NOT NULL,
    environment              text             NOT NULL,
    host                     text             NOT NULL,
    cpu_percent              double precision NOT NULL CONSTRAINT plugin_samples_cpu_percent_nonnegative CHECK (cpu_percent >= 0),
    rss_bytes                bigint           NOT NULL CONSTRAINT plugin_samples_rss_bytes_nonnegative CHECK (rss_bytes >= 0),
    vms_bytes                bigint           NOT NULL CONSTRAINT plugin_samples_vms_bytes_nonnegative CHECK (vms_bytes >= 0),
    uss_bytes                bigint           NULL     CONSTRAINT plugin_samples_uss_bytes_nonnegative CHECK (uss_bytes >= 0),
    swap_bytes               bigint           NULL     CONSTRAINT plugin_samples_swap_bytes_nonnegative CHECK (swap_bytes >= 0),
    threads                  integer          NOT NULL CONSTRAINT plugin_samples_threads_nonnegative CHECK (threads >= 0),
    fds                      integer          NULL     CONSTRAINT plugin_samples_fds_nonnegative CHECK (fds >= 0),
    read_bytes               bigint           NULL     CONSTRAINT plugin_samples_read_bytes_nonnegative CHECK (read_bytes >= 0),
    write_bytes              bigint           NULL     CONSTRAINT plugin_samples_write_bytes_nonnegative CHECK (write_bytes >= 0),
    ctx_switches_voluntary   bigint           NULL     CONSTRAINT plugin_samples_ctx_voluntary_nonnegative CHECK (ctx_switches_voluntary >= 0),
    ctx_switches_involuntary bigint           NULL     CONSTRAINT plugin_samples_ctx_involuntary_nonnegative CHECK (ctx_switches_involuntary >= 0),
    process_count            integer          NOT NULL CONSTRAINT plugin_samples_process_count_nonnegative CHECK (process_count >= 0),
    restarts                 integer          NOT NULL DEFAULT 0 CONSTRAINT plugin_samples_restarts_nonnegative CHECK (restarts >= 0),
    up                       boolean          NOT NULL
);

SELECT create_hypertable('plugin_samples', by_range('timestamp', INTERVAL '1 day'),
                         create_default_indexes => false);

-- Exactly these two: ingest speed is benchmarked.
CREATE INDEX idx_plugin_samples_plugin_time ON plugin_samples (plugin_id, "timestamp" DESC);
CREATE INDEX idx_plugin_samples_tenant_time ON plugin_samples (tenant_id, "timestamp" DESC);

ALTER TABLE plugin_samples SET (
    timescaledb.compress,
    timescaledb.compress_segmentby = 'plugin_id',
    timescaledb.compress_orderby = '"timestamp" DESC'
);

CREATE TABLE plugin_metrics (
    "timestamp"  timestamptz      NOT NULL,
    tenant_id    text             NOT NULL,
    plugin_id    bigint           NOT NULL,
    environment  text             NOT NULL,
    metric_name  text             NOT NULL,
    metric_kind  text             NOT NULL
                 CONSTRAINT plugin_metrics_kind_check CHECK (metric_kind IN ('gauge', 'counter', 'histogram', 'summary')),
    value        double precision NOT NULL,
    labels       jsonb            NOT NULL DEFAULT '{}'
);

SELECT create_hypertable('plugin_metrics', by_range('timestamp', INTERVAL '1 day'),
                         create_default_indexes => false);

-- The seed's recommended index, verbatim in effect.
CREATE INDEX idx_plugin_metrics_timeseries ON plugin_metrics (plugin_id, metric_name, "timestamp" DESC);
CREATE INDEX idx_plugin_metrics_tenant_time ON plugin_metrics (tenant_id, "timestamp" DESC);

ALTER TABLE plugin_metrics SET (
    timescaledb.compress,
    timescaledb.compress_segmentby = 'plugin_id, metric_name',
    timescaledb.compress_orderby = '"timestamp" DESC'
);

-- Continuous aggregates, both directly on the raw samples so the 1-hour figures are exact
-- (not averages of averages). Callers read them through the views plugin_samples_1m /
-- plugin_samples_1h (003): a continuous aggregate cannot carry row-level security.
CREATE MATERIALIZED VIEW rollup_samples_1m
WITH (timescaledb.continuous, timescaledb.materialized_only = true) AS
SELECT
    time_bucket(INTERVAL '1 minute', "timestamp") AS bucket,
    tenant_id,
    plugin_id,
    environment,
    count(*)                             AS sample_count,
    avg(cpu_percent)                     AS cpu_percent_avg,
    max(cpu_percent)                     AS cpu_percent_max,
    avg(rss_bytes)::double precision     AS rss_bytes_avg,
    max(rss_bytes)                       AS rss_bytes_max,
    max(vms_bytes)                       AS vms_bytes_max,
    max(threads)                         AS threads_max,
    max(process_count)                   AS process_count_max,
    avg(up::integer)::double precision   AS up_ratio,
    sum(restarts)                        AS restarts_sum
FROM plugin_samples
GROUP BY 1, 2, 3, 4
WITH NO DATA;

CREATE MATERIALIZED VIEW rollup_samples_1h
WITH (timescaledb.continuous, timescaledb.materialized_only = true) AS
SELECT
    time_bucket(INTERVAL '1 hour', "timestamp") AS bucket,
    tenant_id,
    plugin_id,
    environment,
    count(*)                             AS sample_count,
    avg(cpu_percent)                     AS cpu_percent_avg,
    max(cpu_percent)                     AS cpu_percent_max,
    avg(rss_bytes)::double precision     AS rss_bytes_avg,
    max(rss_bytes)                       AS rss_bytes_max,
    max(vms_bytes)                       AS vms_bytes_max,
    max(threads)                         AS threads_max,
    max(process_count)                   AS process_count_max,
    avg(up::integer)::double precision   AS up_ratio,
    sum(restarts)                        AS restarts_sum
FROM plugin_samples
GROUP BY 1, 2, 3, 4
WITH NO DATA;
