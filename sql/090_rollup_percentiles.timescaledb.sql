-- 090, TimescaleDB backend: p50/p95/p99 of cpu_percent and rss_bytes in both rollups.
--
-- A continuous aggregate's query cannot be altered, and dropping rollup_samples_1m/_1h to
-- recreate them would lose every bucket older than the raw retention (the 1-hour rollup is
-- kept a year, raw rows 90 days). So the percentiles live in two new continuous aggregates
-- over the raw rows, rollup_samples_pct_1m and rollup_samples_pct_1h (percentile_cont is
-- accepted in finalized continuous aggregates in TimescaleDB 2.x), with the same buckets,
-- refresh windows and retention as their siblings (storage/timescale.py), and the contract
-- views plugin_samples_1m / _1h join them in. Both are built from raw rows, not the 1-hour
-- from the 1-minute one (a percentile cannot be rolled up from percentiles; TimescaleDB
-- does not take percentile_cont in a continuous aggregate over another), so the figures are
-- exact: the same as percentile_cont over the bucket's raw rows, as on the PostgreSQL backend.
-- Buckets materialised before this migration have NULL percentiles until a back-fill
-- refreshes the new aggregates over raw rows still retained.

CREATE MATERIALIZED VIEW rollup_samples_pct_1m
WITH (timescaledb.continuous, timescaledb.materialized_only = true) AS
SELECT
    time_bucket(INTERVAL '1 minute', "timestamp") AS bucket,
    tenant_id,
    plugin_id,
    environment,
    percentile_cont(0.50) WITHIN GROUP (ORDER BY cpu_percent)                    AS cpu_percent_p50,
    percentile_cont(0.95) WITHIN GROUP (ORDER BY cpu_percent)                    AS cpu_percent_p95,
    percentile_cont(0.99) WITHIN GROUP (ORDER BY cpu_percent)                    AS cpu_percent_p99,
    percentile_cont(0.50) WITHIN GROUP (ORDER BY rss_bytes::double precision)    AS rss_bytes_p50,
    percentile_cont(0.95) WITHIN GROUP (ORDER BY rss_bytes::double precision)    AS rss_bytes_p95,
    percentile_cont(0.99) WITHIN GROUP (ORDER BY rss_bytes::double precision)    AS rss_bytes_p99
FROM plugin_samples
GROUP BY 1, 2, 3, 4
WITH NO DATA;

CREATE MATERIALIZED VIEW rollup_samples_pct_1h
WITH (timescaledb.continuous, timescaledb.materialized_only = true) AS
SELECT
    time_bucket(INTERVAL '1 hour', "timestamp") AS bucket,
    tenant_id,
    plugin_id,
    environment,
    percentile_cont(0.50) WITHIN GROUP (ORDER BY cpu_percent)                    AS cpu_percent_p50,
    percentile_cont(0.95) WITHIN GROUP (ORDER BY cpu_percent)                    AS cpu_percent_p95,
    percentile_cont(0.99) WITHIN GROUP (ORDER BY cpu_percent)                    AS cpu_percent_p99,
    percentile_cont(0.50) WITHIN GROUP (ORDER BY rss_bytes::double precision)    AS rss_bytes_p50,
    percentile_cont(0.95) WITHIN GROUP (ORDER BY rss_bytes::double precision)    AS rss_bytes_p95,
    percentile_cont(0.99) WITHIN GROUP (ORDER BY rss_bytes::double precision)    AS rss_bytes_p99
FROM plugin_samples
GROUP BY 1, 2, 3, 4
WITH NO DATA;

CREATE INDEX idx_rollup_samples_pct_1m_key ON rollup_samples_pct_1m (plugin_id, bucket, environment, tenant_id);
CREATE INDEX idx_rollup_samples_pct_1h_key ON rollup_samples_pct_1h (plugin_id, bucket, environment, tenant_id);

-- The contract views gain the percentile columns (at the end, so CREATE OR REPLACE keeps the
-- existing ones); the PostgreSQL variant has the same columns. A LEFT JOIN: a bucket the
-- percentile aggregate has not materialised yet still shows its averages.
CREATE OR REPLACE VIEW plugin_samples_1m WITH (security_barrier) AS
SELECT r.bucket, r.tenant_id, r.plugin_id, r.environment, r.sample_count,
       r.cpu_percent_avg, r.cpu_percent_max, r.rss_bytes_avg, r.rss_bytes_max, r.vms_bytes_max,
       r.threads_max, r.process_count_max, r.up_ratio, r.restarts_sum,
       p.cpu_percent_p50, p.cpu_percent_p95, p.cpu_percent_p99,
       p.rss_bytes_p50, p.rss_bytes_p95, p.rss_bytes_p99
  FROM rollup_samples_1m r
  LEFT JOIN rollup_samples_pct_1m p
    ON p.plugin_id = r.plugin_id AND p.bucket = r.bucket
   AND p.environment = r.environment AND p.tenant_id = r.tenant_id
 WHERE (SELECT pluginmon_bypasses_rls('rollup_samples_1m'))
    OR r.tenant_id = (SELECT pluginmon_current_tenant());

CREATE OR REPLACE VIEW plugin_samples_1h WITH (security_barrier) AS
SELECT r.bucket, r.tenant_id, r.plugin_id, r.environment, r.sample_count,
       r.cpu_percent_avg, r.cpu_percent_max, r.rss_bytes_avg, r.rss_bytes_max, r.vms_bytes_max,
       r.threads_max, r.process_count_max, r.up_ratio, r.restarts_sum,
       p.cpu_percent_p50, p.cpu_percent_p95, p.cpu_percent_p99,
       p.rss_bytes_p50, p.rss_bytes_p95, p.rss_bytes_p99
  FROM rollup_samples_1h r
  LEFT JOIN rollup_samples_pct_1h p
    ON p.plugin_id = r.plugin_id AND p.bucket = r.bucket
   AND p.environment = r.environment AND p.tenant_id = r.tenant_id
 WHERE (SELECT pluginmon_bypasses_rls('rollup_samples_1h'))
    OR r.tenant_id = (SELECT pluginmon_current_tenant());
