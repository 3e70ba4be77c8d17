-- 129: pluginmon's own health_score rows leave the plugin-metrics rollups.
--
-- The health engine writes one plugin_metrics row per plugin at least once a minute, whose
-- labels carry every component's score and the weakest one's explanation: no two rows share
-- their labels, so 051's rollups, which keep one row per series (labels included) and
-- bucket, kept one rollup row per health row in rollup_metrics_1m and again in
-- rollup_metrics_1h, and read nothing through them (health history is read from the raw rows:
-- dashboards/generate.py, the API's plugin metrics). In a fleet of 100 agents of 1,000
-- plugins (bench/fleet.py) that was 105,000 rows a minute aggregated and written into each:
-- about 4 s of server time a minute for the 1-minute rollup, and once an hour the 1-hour
-- rollup did the same for the whole completed hour (6 million rows) in one statement of the
-- maintenance job; the 1-hour table also kept every health row for its 365 days, four times
-- the raw rows' 90. (The refresh still reads the window's raw rows; it no longer groups,
-- sorts and inserts the health rows among them.)
-- 'health_score' is reserved: a plugin's own series of that name is stored as
-- exported_health_score (collectors/exposition.py), so this filter leaves out only
-- pluginmon's rows. The views hide the health rows earlier refreshes stored, so every bucket
-- reads alike; those rows leave with the rollups' retention (or: DELETE FROM
-- rollup_metrics_1h WHERE metric_name = 'health_score', and the same for _1m).
CREATE OR REPLACE FUNCTION pluginmon_metrics_rollup(width interval, window_start timestamptz, window_end timestamptz)
RETURNS TABLE (bucket timestamptz, tenant_id text, plugin_id bigint, environment text,
               metric_name text, metric_kind text, labels jsonb, sample_count bigint,
               value_avg double precision, value_min double precision, value_max double precision,
               value_first double precision, value_last double precision)
LANGUAGE sql STABLE
AS $$
    SELECT date_bin(width, m."timestamp", timestamptz '2000-01-03 00:00:00+00'),
           m.tenant_id, m.plugin_id, m.environment, m.metric_name, m.metric_kind, m.labels,
           count(*),
           avg(m.value),
           min(m.value),
           max(m.value),
           (array_agg(m.value ORDER BY m."timestamp" ASC))[1],
           (array_agg(m.value ORDER BY m."timestamp" DESC))[1]
      FROM plugin_metrics m
     WHERE m."timestamp" >= window_start AND m."timestamp" < window_end
       AND m.metric_name <> 'health_score'
     GROUP BY 1, 2, 3, 4, 5, 6, 7
$$;

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
