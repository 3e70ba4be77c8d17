-- 051 rollups of plugins' own metrics, TimescaleDB backend: continuous aggregates, both on the
-- raw rows (the 1-hour figures are exact), their refresh and retention policies registered by
-- storage/timescale.py with the intervals of storage/metric_rollups.py. The same columns,
-- expressions and buckets as the PostgreSQL tables (051 .postgres, which says what each kind
-- keeps), read through the same tenant-checked views (a continuous aggregate cannot carry
-- row-level security).

CREATE MATERIALIZED VIEW rollup_metrics_1m
WITH (timescaledb.continuous, timescaledb.materialized_only = true) AS
SELECT
    time_bucket(INTERVAL '1 minute', "timestamp") AS bucket,
    tenant_id,
    plugin_id,
    environment,
    metric_name,
    metric_kind,
    labels,
    count(*)                  AS sample_count,
    avg(value)                AS value_avg,
    min(value)                AS value_min,
    max(value)                AS value_max,
    first(value, "timestamp") AS value_first,
    last(value, "timestamp")  AS value_last
FROM plugin_metrics
GROUP BY 1, 2, 3, 4, 5, 6, 7
WITH NO DATA;

CREATE MATERIALIZED VIEW rollup_metrics_1h
WITH (timescaledb.continuous, timescaledb.materialized_only = true) AS
SELECT
    time_bucket(INTERVAL '1 hour', "timestamp") AS bucket,
    tenant_id,
    plugin_id,
    environment,
    metric_name,
    metric_kind,
    labels,
    count(*)                  AS sample_count,
    avg(value)                AS value_avg,
    min(value)                AS value_min,
    max(value)                AS value_max,
    first(value, "timestamp") AS value_first,
    last(value, "timestamp")  AS value_last
FROM plugin_metrics
GROUP BY 1, 2, 3, 4, 5, 6, 7
WITH NO DATA;

CREATE VIEW plugin_metrics_1m WITH (security_barrier) AS
SELECT bucket, tenant_id, plugin_id, environment, metric_name, metric_kind, labels, sample_count,
       value_avg, value_min, value_max, value_first, value_last
  FROM rollup_metrics_1m
 WHERE (SELECT pluginmon_bypasses_rls('rollup_metrics_1m'))
    OR tenant_id = (SELECT pluginmon_current_tenant());

CREATE VIEW plugin_metrics_1h WITH (security_barrier) AS
SELECT bucket, tenant_id, plugin_id, environment, metric_name, metric_kind, labels, sample_count,
       value_avg, value_min, value_max, value_first, value_last
  FROM rollup_metrics_1h
 WHERE (SELECT pluginmon_bypasses_rls('rollup_metrics_1h'))
    OR tenant_id = (SELECT pluginmon_current_tenant());

GRANT SELECT ON plugin_metrics_1m, plugin_metrics_1h
    TO pluginmon_tenant_reader, pluginmon_tenant_writer, pluginmon_api;
