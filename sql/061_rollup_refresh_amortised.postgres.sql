-- 061, PostgreSQL backend: the 1-minute rollup's lookback, amortised.
--
-- 005's refresh recomputed [watermark - lookback, last complete bucket) whenever a bucket
-- completed: with a 10-minute lookback that is eleven minutes of raw rows every minute, each
-- row read and each rollup row deleted and inserted eleven times. With 50 agents of 1,000
-- plugins at 10 s (5,000 rows/s) the maintenance then took 22% of a core against 5.5% for
-- the COPYs themselves (bench/fleet.py, pg_stat_statements), and it grows with the fleet.
--
-- Now a refresh looks back one bucket (rows that are a little late: a COPY that committed
-- after the previous refresh), and a whole refresh runs once the watermark is ``lookback``
-- past where the last whole one left it (``lookback_mark``), from that mark minus the
-- lookback. So a row up to ``lookback`` late is still folded in (within one lookback), as
-- before, for about four buckets read a minute instead of eleven. rollup_watermarks keeps the
-- mark, so whichever daemon holds the maintenance lock keeps the rhythm. Rows later than the
-- lookback need the explicit back-fill, as before. For the 1-hour rollup (lookback = width)
-- nothing changes.
-- The watermark as the last whole refresh (one over the whole lookback) left it.
ALTER TABLE rollup_watermarks ADD COLUMN lookback_mark timestamptz;

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
                   'threads_max, process_count_max, up_ratio, restarts_sum) '
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
