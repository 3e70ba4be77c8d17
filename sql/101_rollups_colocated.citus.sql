-- 101 rollups co-located, Citus backend: the rollup refreshes as one INSERT ... SELECT ...
-- ON CONFLICT each, and the API role allowed to reach the workers.
--
-- The PostgreSQL refresh functions (061, 051) insert from a SQL function over the raw table,
-- which Citus cannot plan ("parameterized queries for SQL functions referencing distributed
-- tables"). Here the aggregation is inline: raw rows and rollups are co-located by tenant and
-- tenant_id is grouped on, so each shard group refreshes its own rollup rows on its node, and
-- a bucket recomputed again (the lookback) is updated in place. Everything else (watermarks,
-- the amortised lookback, refresh_from) is the PostgreSQL functions' behaviour unchanged, so
-- storage/partitions.py and storage/metric_rollups.py call them the same way.
--
-- The percentiles of 090 are computed inline the same way (percentile_cont over the bucket's
-- raw rows, pushed down with the rest of the aggregate).
--
-- A rollup bucket is never deleted by a refresh here (the PostgreSQL functions delete the
-- window first): raw rows inside a refresh window are not deleted (retention keeps them at
-- least two days, storage/backend.py), so every bucket is recomputed from all its rows.

-- Citus opens connections to the workers as the current user, and an API request runs as
-- pluginmon_api (SET LOCAL ROLE): it must be allowed to log in there. It has no password, so
-- it authenticates only as the nodes are configured to let each other in (trust from the
-- nodes' addresses, certificates or pg_dist_authinfo), never from a client's password.
ALTER ROLE pluginmon_api LOGIN;

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
    -- One statement per refresh that Citus pushes down to each shard group: rollup and raw
    -- rows are co-located by tenant, and tenant_id is in the GROUP BY.
    EXECUTE format('INSERT INTO %s AS r (bucket, tenant_id, plugin_id, environment, sample_count, '
                   'cpu_percent_avg, cpu_percent_max, rss_bytes_avg, rss_bytes_max, vms_bytes_max, '
                   'threads_max, process_count_max, up_ratio, restarts_sum, '
                   'cpu_percent_p50, cpu_percent_p95, cpu_percent_p99, '
                   'rss_bytes_p50, rss_bytes_p95, rss_bytes_p99) '
                   'SELECT date_bin($1, s."timestamp", timestamptz ''2000-01-03 00:00:00+00''), '
                   '       s.tenant_id, s.plugin_id, s.environment, count(*), avg(s.cpu_percent), '
                   '       max(s.cpu_percent), avg(s.rss_bytes)::double precision, max(s.rss_bytes), '
                   '       max(s.vms_bytes), max(s.threads), max(s.process_count), '
                   '       avg(s.up::integer)::double precision, sum(s.restarts), '
                   '       percentile_cont(0.50) WITHIN GROUP (ORDER BY s.cpu_percent), '
                   '       percentile_cont(0.95) WITHIN GROUP (ORDER BY s.cpu_percent), '
                   '       percentile_cont(0.99) WITHIN GROUP (ORDER BY s.cpu_percent), '
                   '       percentile_cont(0.50) WITHIN GROUP (ORDER BY s.rss_bytes::double precision), '
                   '       percentile_cont(0.95) WITHIN GROUP (ORDER BY s.rss_bytes::double precision), '
                   '       percentile_cont(0.99) WITHIN GROUP (ORDER BY s.rss_bytes::double precision) '
                   '  FROM plugin_samples s WHERE s."timestamp" >= $2 AND s."timestamp" < $3 '
                   ' GROUP BY 1, 2, 3, 4 '
                   'ON CONFLICT (plugin_id, bucket, environment, tenant_id) DO UPDATE SET '
                   '    sample_count = EXCLUDED.sample_count, cpu_percent_avg = EXCLUDED.cpu_percent_avg, '
                   '    cpu_percent_max = EXCLUDED.cpu_percent_max, rss_bytes_avg = EXCLUDED.rss_bytes_avg, '
                   '    rss_bytes_max = EXCLUDED.rss_bytes_max, vms_bytes_max = EXCLUDED.vms_bytes_max, '
                   '    threads_max = EXCLUDED.threads_max, process_count_max = EXCLUDED.process_count_max, '
                   '    up_ratio = EXCLUDED.up_ratio, restarts_sum = EXCLUDED.restarts_sum, '
                   '    cpu_percent_p50 = EXCLUDED.cpu_percent_p50, cpu_percent_p95 = EXCLUDED.cpu_percent_p95, '
                   '    cpu_percent_p99 = EXCLUDED.cpu_percent_p99, rss_bytes_p50 = EXCLUDED.rss_bytes_p50, '
                   '    rss_bytes_p95 = EXCLUDED.rss_bytes_p95, rss_bytes_p99 = EXCLUDED.rss_bytes_p99', target)
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
