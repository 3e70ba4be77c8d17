-- 005 rollup refresh, PostgreSQL backend: skip the recomputation when no bucket completed
-- since the last refresh (maintenance may run every minute; the 1-hour rollup then works once
-- an hour instead of every run).

-- Refresh one rollup table incrementally: when a bucket has completed since the watermark,
-- recompute the buckets in [watermark - lookback, the last complete bucket), then advance the
-- watermark. The lookback absorbs samples that arrive late (a flushed spool); older late rows
-- need refresh_from. The first refresh starts at the oldest sample. Returns the window and the
-- bucket count.
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
BEGIN
    SELECT w.watermark INTO mark FROM rollup_watermarks w WHERE w.rollup = target::text FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no watermark row for %', target USING ERRCODE = 'undefined_object';
    END IF;
    window_end := date_bin(width, at_time, origin);
    IF refresh_from IS NOT NULL THEN
        window_start := date_bin(width, refresh_from, origin);
    ELSIF mark IS NOT NULL THEN
        window_start := date_bin(width, mark - lookback, origin);
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
                   'threads_max, process_count_max, up_ratio, restarts_sum) '
                   'SELECT * FROM pluginmon_samples_rollup($1, $2, $3)', target)
        USING width, window_start, window_end;
    GET DIAGNOSTICS buckets = ROW_COUNT;
    UPDATE rollup_watermarks SET watermark = greatest(coalesce(mark, window_end), window_end),
                                 refreshed_at = now()
     WHERE rollup_watermarks.rollup = target::text;
END
$$;
