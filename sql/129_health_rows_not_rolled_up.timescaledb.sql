-- 129 on TimescaleDB: pluginmon's own health_score rows are hidden from the plugin-metrics
-- rollups' views, so both backends read alike (129_health_rows_not_rolled_up.postgres.sql says
-- why the PostgreSQL refresh leaves them out: their labels differ on every row, so a rollup
-- keeps one row per health row and reduces nothing).
-- The continuous aggregates themselves still materialise them: a continuous aggregate's query
-- cannot be altered, and recreating rollup_metrics_1h with a filter would drop the buckets it
-- keeps beyond the raw rows' retention (365 days against 90). What that costs the refresh
-- policies is in docs/storage.md.
CREATE OR REPLACE VIEW plugin_metrics_1m WITH (security_barrier) AS
SELECT bucket, tenant_id, plugin_id, environment, metric_name, metric_kind, labels, sample_count,
       value_avg, value_min, value_max, value_first, value_last
  FROM rollup_metrics_1m
 WHERE metric_name <> 'health_score'
   AND ((SELECT pluginmon_bypasses_rls('rollup_metrics_1m'))
        OR tenant_id = (SELECT pluginmon_current_tenant()));

CREATE OR REPLACE VIEW plugin_metrics_1h WITH (security_barrier) AS
SELECT bucket, tenant_id, plugin_id, environment, metric_name, metric_kind, labels, sample_count,
       value_avg, value_min, value_max, value_first, value_last
  FROM rollup_metrics_1h
 WHERE metric_name <> 'health_score'
   AND ((SELECT pluginmon_bypasses_rls('rollup_metrics_1h'))
        OR tenant_id = (SELECT pluginmon_current_tenant()));
