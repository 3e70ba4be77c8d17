-- 129 on Citus: pluginmon's own health_score rows leave the plugin-metrics rollups, as in
-- the PostgreSQL file (129_health_rows_not_rolled_up.postgres.sql says why): 101's refresh
-- restated with the same filter, and the same views. The refresh here updates buckets in
-- place and never deletes one, so the health rows earlier refreshes stored stay until the
-- rollups' retention; the views hide them.
CREATE OR REPLACE FUNCTION pluginmon_refresh_metrics_rollup(target regclass, width interval, lookback interval,
                                                 at_time timestamptz DEFAULT now(),
                                                 refresh_from timestamptz DEFAULT NULL,
                                                 OUT window_start timestamptz,
                                                 OUT window_end timestamptz, OUT buckets bigint)
LANGUAGE plpgsql
AS $$
DECLARE
    origin constant timestamptz := timestamptz '2000-01-03 00:00:00+00';
    mark timestamptz;
BEGIN
    SELECT w.watermark INTO mark FROM rollup_metrics_watermarks w
     WHERE w.rollup = target::text FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no watermark row for %', target USING ERRCODE = 'undefined_object';
    END IF;
    window_end := date_bin(width, at_time, origin);
    IF refresh_from IS NOT NULL THEN
        window_start := date_bin(width, refresh_from, origin);
    ELSIF mark IS NOT NULL THEN
        window_start := date_bin(width, mark - lookback, origin);
    ELSE
        SELECT date_bin(width, min(m."timestamp"), origin) INTO window_start FROM plugin_metrics m;
    END IF;
    buckets := 0;
    IF refresh_from IS NULL AND mark IS NOT NULL AND window_end <= mark THEN
        window_start := window_end;
        RETURN;
    END IF;
    IF window_start IS NULL OR window_start >= window_end THEN
        window_start := coalesce(window_start, window_end);
        RETURN;
    END IF;
    EXECUTE format('INSERT INTO %s AS r (bucket, tenant_id, plugin_id, environment, metric_name, '
                   'metric_kind, labels, sample_count, value_avg, value_min, value_max, '
                   'value_first, value_last) '
                   'SELECT date_bin($1, m."timestamp", timestamptz ''2000-01-03 00:00:00+00''), '
                   '       m.tenant_id, m.plugin_id, m.environment, m.metric_name, m.metric_kind, '
                   '       m.labels, count(*), avg(m.value), min(m.value), max(m.value), '
                   '       (array_agg(m.value ORDER BY m."timestamp" ASC))[1], '
                   '       (array_agg(m.value ORDER BY m."timestamp" DESC))[1] '
                   '  FROM plugin_metrics m WHERE m."timestamp" >= $2 AND m."timestamp" < $3 '
                   '   AND m.metric_name <> ''health_score'' '
                   ' GROUP BY 1, 2, 3, 4, 5, 6, 7 '
                   'ON CONFLICT (plugin_id, metric_name, bucket, environment, metric_kind, labels, tenant_id) '
                   'DO UPDATE SET sample_count = EXCLUDED.sample_count, value_avg = EXCLUDED.value_avg, '
                   '    value_min = EXCLUDED.value_min, value_max = EXCLUDED.value_max, '
                   '    value_first = EXCLUDED.value_first, value_last = EXCLUDED.value_last', target)
        USING width, window_start, window_end;
    GET DIAGNOSTICS buckets = ROW_COUNT;
    UPDATE rollup_metrics_watermarks
       SET watermark = greatest(coalesce(mark, window_end), window_end), refreshed_at = now()
     WHERE rollup_metrics_watermarks.rollup = target::text;
END
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
