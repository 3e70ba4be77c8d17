-- 002 time series, PostgreSQL backend: native range partitions by "timestamp" (one per day),
-- created ahead and dropped whole for retention by pluginmon_maintain_partitions() (004);
-- rollups are plain tables refreshed from a watermark by pluginmon_refresh_rollups() (004).
--
-- No foreign key from the time-series tables to plugins, on both backends: a foreign key is
-- one index probe per row on the COPY hot path, and a plugin's history is meant to outlive
-- the plugin until retention removes it. plugin_id always comes from plugins (the writer
-- resolves it with ensure_tenant_and_plugin), so nothing is lost by not checking it here.

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
) PARTITION BY RANGE ("timestamp");

-- Catches rows outside every daily partition (a spool replayed after a long outage, a clock
-- far ahead) so COPY never fails for lack of a partition; maintenance moves them out.
CREATE TABLE plugin_samples_default PARTITION OF plugin_samples DEFAULT;

-- Exactly these two: ingest speed is benchmarked.
CREATE INDEX idx_plugin_samples_plugin_time ON plugin_samples (plugin_id, "timestamp" DESC);
CREATE INDEX idx_plugin_samples_tenant_time ON plugin_samples (tenant_id, "timestamp" DESC);

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
) PARTITION BY RANGE ("timestamp");

CREATE TABLE plugin_metrics_default PARTITION OF plugin_metrics DEFAULT;

-- The seed's recommended index, verbatim in effect.
CREATE INDEX idx_plugin_metrics_timeseries ON plugin_metrics (plugin_id, metric_name, "timestamp" DESC);
CREATE INDEX idx_plugin_metrics_tenant_time ON plugin_metrics (tenant_id, "timestamp" DESC);

-- Rollup storage. Callers read them through the views plugin_samples_1m / plugin_samples_1h
-- (003), which carry the tenant check; on TimescaleDB the same names are continuous aggregates.
CREATE TABLE rollup_samples_1m (
    bucket            timestamptz      NOT NULL,
    tenant_id         text             NOT NULL,
    plugin_id         bigint           NOT NULL,
    environment       text             NOT NULL,
    sample_count      bigint           NOT NULL,
    cpu_percent_avg   double precision,
    cpu_percent_max   double precision,
    rss_bytes_avg     double precision,
    rss_bytes_max     bigint,
    vms_bytes_max     bigint,
    threads_max       integer,
    process_count_max integer,
    up_ratio          double precision,
    restarts_sum      bigint,
    PRIMARY KEY (plugin_id, bucket, environment, tenant_id)
);
CREATE INDEX idx_rollup_samples_1m_tenant_bucket ON rollup_samples_1m (tenant_id, bucket DESC);
CREATE INDEX idx_rollup_samples_1m_bucket ON rollup_samples_1m (bucket);

CREATE TABLE rollup_samples_1h (LIKE rollup_samples_1m INCLUDING ALL);

-- How far each rollup is known complete: buckets before watermark are materialised.
CREATE TABLE rollup_watermarks (
    rollup       text        PRIMARY KEY CHECK (rollup IN ('rollup_samples_1m', 'rollup_samples_1h')),
    watermark    timestamptz,
    refreshed_at timestamptz
);
INSERT INTO rollup_watermarks (rollup) VALUES ('rollup_samples_1m'), ('rollup_samples_1h');
