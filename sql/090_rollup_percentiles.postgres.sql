-- 090, PostgreSQL backend: p50/p95/p99 of cpu_percent and rss_bytes in both rollups.
--
-- Method: percentile_cont over the bucket's raw plugin_samples rows, for the 1-minute and
-- the 1-hour rollup alike (a percentile cannot be rolled up from the percentiles of smaller
-- buckets), so the figures are exact: the same expression as
-- `percentile_cont(p) WITHIN GROUP (ORDER BY x)` over the raw rows of the bucket. The 1-hour
-- rollup already read raw rows; the percentiles add one sort per bucket and column.
-- Buckets materialised before this migration keep NULL percentiles until a back-fill
-- recomputes them (from raw rows still retained). rss_bytes percentiles are double
-- precision (percentile_cont interpolates between two rows).

ALTER TABLE rollup_samples_1m
    ADD COLUMN cpu_percent_p50 double precision,
    ADD COLUMN cpu_percent_p95 double precision,
    ADD COLUMN cpu_percent_p99 double precision,
    ADD COLUMN rss_bytes_p50   double precision,
    ADD COLUMN rss_bytes_p95   double precision,
    ADD COLUMN rss_bytes_p99   double precision;
ALTER TABLE rollup_samples_1h
    ADD COLUMN cpu_percent_p50 double precision,
    ADD COLUMN cpu_percent_p95 double precision,
    ADD COLUMN cpu_percent_p99 double precision,
    ADD COLUMN rss_bytes_p50   double precision,
    ADD COLUMN rss_bytes_p95   double precision,
    ADD COLUMN rss_bytes_p99   double precision;

-- The result type changes, so the function is dropped first (the refresh function calls it
-- through EXECUTE, which holds no dependency on it).
DROP FUNCTION pluginmon_samples_rollup(interval, timestamptz, timestamptz);

-- Rows of plugin_samples aggregated into ``width`` buckets over [window_start, window_end):
-- the same expressions as the TimescaleDB continuous aggregates (002 and 090).
CREATE FUNCTION pluginmon_samples_rollup(width interval, window_start timestamptz, window_end timestamptz)
RETURNS TABLE (bucket timestamptz, tenant_id text, plugin_id bigint, environment text,
               sample_count bigint, cpu_percent_avg double precision, cpu_percent_max double precision,
               rss_bytes_avg double precision, rss_bytes_max bigint, vms_bytes_max bigint,
               threads_max integer, process_count_max integer, up_ratio double precision,
               restarts_sum bigint,
               cpu_percent_p50 double precision, cpu_percent_p95 double precision,
               cpu_percent_p99 double precision, rss_bytes_p50 double precision,
               rss_bytes_p95 double precision, rss_bytes_p99 double precision)
LANGUAGE sql STABLE
AS $$
    SELECT date_bin(width, s."timestamp", timestamptz '2000-01-03 00:00:00+00'),
           s.tenant_id, s.plugin_id, s.environment,
           count(*),
           avg(s.cpu_percent),
           max(s.cpu_percent),
           avg(s.rss_bytes)::double precision,
           max(s.rss_bytes),
           max(s.vms_bytes),
           max(s.threads),
           max(s.process_count),
           avg(s.up::integer)::double precision,
           sum(s.restarts),
           percentile_cont(0.50) WITHIN GROUP (ORDER BY s.cpu_percent),
           percentile_cont(0.95) WITHIN GROUP (ORDER BY s.cpu_percent),
           percentile_cont(0.99) WITHIN GROUP (ORDER BY s.cpu_percent),
           percentile_cont(0.50) WITHIN GROUP (ORDER BY s.rss_bytes::double precision),
           percentile_cont(0.95) WITHIN GROUP (ORDER BY s.rss_bytes::double precision),
           percentile_cont(0.99) WITHIN GROUP (ORDER BY s.rss_bytes::double precision)
      FROM plugin_samples s
     WHERE s."timestamp" >= window_start AND s."timestamp" < window_end
     GROUP BY 1, 2, 3, 4
$$;

-- The refresh as 061 left it, inserting the percentile columns too.
CREATE OR REPLACE FUNCTION pluginmon_refresh_rollup(target regclass, width interval, lookback interval,
                                         at_time timestamptz DEFAULT now(),
                                         refresh_from timestamptz DEFAULT NULL,
                                         OUT window_start timestamptz, OUT window_end timestamptz,
                                         OUT buckets bigint)
LANGUAGE plpgsql
AS $$
DECLARE
    -- TimescaleDB's time_bucket origin for sub-month widths: a Monday.
    origin constant timestamptz := timestamptz '2000-01-03 00:00:00+00';
    mark timestamptz;
    whole_mark timestamptz;
    whole boolean := true;  -- this refresh covers the whole lookback
BEGIN
    SELECT w.watermark, w.lookback_mark INTO mark, whole_mark
      FROM rollup_watermarks w WHERE w.rollup = target::text FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no watermark row for %', target USING ERRCODE = 'undefined_object';
    END IF;
    window_end := date_bin(width, at_time, origin);
    IF refresh_from IS NOT NULL THEN
        window_start := date_bin(width, refresh_from, origin);
    ELSIF mark IS NOT NULL THEN
        IF whole_mark IS NOT NULL AND mark - whole_mark < lookback AND mark >= whole_mark THEN
            whole := false;
            window_start := date_bin(width, mark - least(width, lookback), origin);
        ELSE
            -- Everything since the last whole refresh, and the lookback before it.
            window_start := date_bin(width, least(coalesce(whole_mark, mark), mark) - lookback,
                                     origin);
        END IF;
    ELSE
        SELECT date_bin(width, min(s."timestamp"), origin) INTO window_start FROM plugin_samples s;
    END IF;
    buckets := 0;
    -- Nothing completed since the last refresh: the lookback waits for the next bucket, so an
    -- idle run costs nothing.
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
    EXECUTE format('INSERT INTO %s (bucket, tenant_id, plugin_id, environment, sample_count, '
                   'cpu_percent_avg, cpu_percent_max, rss_bytes_avg, rss_bytes_max, vms_bytes_max, '
                   'threads_max, process_count_max, up_ratio, restarts_sum, '
                   'cpu_percent_p50, cpu_percent_p95, cpu_percent_p99, '
                   'rss_bytes_p50, rss_bytes_p95, rss_bytes_p99) '
                   'SELECT * FROM pluginmon_samples_rollup($1, $2, $3)', target)
        USING width, window_start, window_end;
    GET DIAGNOSTICS buckets = ROW_COUNT;
    UPDATE rollup_watermarks SET watermark = greatest(coalesce(mark, window_end), window_end),
                                 refreshed_at = now(),
                                 lookback_mark = CASE
                                     WHEN whole AND refresh_from IS NULL
                                     THEN greatest(coalesce(mark, window_end), window_end)
                                     ELSE lookback_mark END
     WHERE rollup_watermarks.rollup = target::text;
END
$$;

-- The contract views gain the percentile columns (at the end, so CREATE OR REPLACE keeps the
-- existing ones); the TimescaleDB variant has the same columns.
CREATE OR REPLACE VIEW plugin_samples_1m WITH (security_barrier) AS
SELECT bucket, tenant_id, plugin_id, environment, sample_count,
       cpu_percent_avg, cpu_percent_max, rss_bytes_avg, rss_bytes_max, vms_bytes_max,
       threads_max, process_count_max, up_ratio, restarts_sum,
       cpu_percent_p50, cpu_percent_p95, cpu_percent_p99,
       rss_bytes_p50, rss_bytes_p95, rss_bytes_p99
  FROM rollup_samples_1m
 WHERE (SELECT pluginmon_bypasses_rls('rollup_samples_1m'))
    OR tenant_id = (SELECT pluginmon_current_tenant());

CREATE OR REPLACE VIEW plugin_samples_1h WITH (security_barrier) AS
SELECT bucket, tenant_id, plugin_id, environment, sample_count,
       cpu_percent_avg, cpu_percent_max, rss_bytes_avg, rss_bytes_max, vms_bytes_max,
       threads_max, process_count_max, up_ratio, restarts_sum,
       cpu_percent_p50, cpu_percent_p95, cpu_percent_p99,
       rss_bytes_p50, rss_bytes_p95, rss_bytes_p99
  FROM rollup_samples_1h
 WHERE (SELECT pluginmon_bypasses_rls('rollup_samples_1h'))
    OR tenant_id = (SELECT pluginmon_current_tenant());
