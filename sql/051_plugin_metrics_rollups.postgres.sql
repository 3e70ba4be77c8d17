-- 051 rollups of plugins' own metrics, PostgreSQL backend: plain tables refreshed from their own
-- watermarks by pluginmon_refresh_metrics_rollup(), which storage/metric_rollups.py calls from
-- the maintenance job (under its advisory lock). Kept apart from the plugin_samples rollups
-- (their tables, watermark rows and refresh function are not touched here).
--
-- One row per series (plugin, environment, name, kind, labels) and bucket, each kind keeping
-- what it needs downstream: sample_count and value_avg/min/max/first/last for every kind. A
-- gauge is read as avg/min/max/last; a counter (and a histogram's _bucket/_sum/_count, a
-- summary's _sum/_count) as value_last per bucket, so a rate is still derived from
-- consecutive buckets with resets handled as on raw rows (a lower value starts again from 0;
-- value_first shows a reset inside the bucket); a histogram's buckets as their value_last per
-- le, so a quantile over a period is computed from two buckets' differences. The same columns,
-- expressions and bucket origin as the TimescaleDB continuous aggregates (051 .timescaledb).

CREATE TABLE rollup_metrics_1m (
    bucket       timestamptz      NOT NULL,
    tenant_id    text             NOT NULL,
    plugin_id    bigint           NOT NULL,
    environment  text             NOT NULL,
    metric_name  text             NOT NULL,
    metric_kind  text             NOT NULL,
    labels       jsonb            NOT NULL,
    sample_count bigint           NOT NULL,
    value_avg    double precision,
    value_min    double precision,
    value_max    double precision,
    value_first  double precision,
    value_last   double precision,
    PRIMARY KEY (plugin_id, metric_name, bucket, environment, metric_kind, labels, tenant_id)
);
CREATE INDEX idx_rollup_metrics_1m_tenant_bucket ON rollup_metrics_1m (tenant_id, bucket DESC);
CREATE INDEX idx_rollup_metrics_1m_bucket ON rollup_metrics_1m (bucket);

CREATE TABLE rollup_metrics_1h (LIKE rollup_metrics_1m INCLUDING ALL);

CREATE TABLE rollup_metrics_watermarks (
    rollup       text        PRIMARY KEY CHECK (rollup IN ('rollup_metrics_1m', 'rollup_metrics_1h')),
    watermark    timestamptz,
    refreshed_at timestamptz
);
INSERT INTO rollup_metrics_watermarks (rollup) VALUES ('rollup_metrics_1m'), ('rollup_metrics_1h');

-- Rows of plugin_metrics aggregated into ``width`` buckets over [window_start, window_end).
CREATE FUNCTION pluginmon_metrics_rollup(width interval, window_start timestamptz, window_end timestamptz)
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
     GROUP BY 1, 2, 3, 4, 5, 6, 7
$$;

-- Refresh one metrics rollup incrementally, as pluginmon_refresh_rollup (005) does for the
-- samples: when a bucket completed since the watermark, recompute [watermark - lookback, the
-- last complete bucket) and advance the watermark; refresh_from recomputes from there instead
-- (late rows older than the lookback). The first refresh starts at the oldest row.
CREATE FUNCTION pluginmon_refresh_metrics_rollup(target regclass, width interval, lookback interval,
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
    EXECUTE format('DELETE FROM %s WHERE bucket >= $1 AND bucket < $2', target)
        USING window_start, window_end;
    EXECUTE format('INSERT INTO %s (bucket, tenant_id, plugin_id, environment, metric_name, '
                   'metric_kind, labels, sample_count, value_avg, value_min, value_max, '
                   'value_first, value_last) '
                   'SELECT * FROM pluginmon_metrics_rollup($1, $2, $3)', target)
        USING width, window_start, window_end;
    GET DIAGNOSTICS buckets = ROW_COUNT;
    UPDATE rollup_metrics_watermarks
       SET watermark = greatest(coalesce(mark, window_end), window_end), refreshed_at = now()
     WHERE rollup_metrics_watermarks.rollup = target::text;
END
$$;

-- Row-level security like the samples' rollup tables (003); callers read the views below.
ALTER TABLE rollup_metrics_1m ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON rollup_metrics_1m
    USING (tenant_id = (SELECT pluginmon_current_tenant()))
    WITH CHECK (tenant_id = (SELECT pluginmon_current_tenant()));
ALTER TABLE rollup_metrics_1h ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON rollup_metrics_1h
    USING (tenant_id = (SELECT pluginmon_current_tenant()))
    WITH CHECK (tenant_id = (SELECT pluginmon_current_tenant()));

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
