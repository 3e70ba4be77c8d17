-- 092, PostgreSQL backend: rollups recompute what changed, not a lookback.
--
-- 061's 1-minute refresh read each raw row about four times (one bucket back every minute, the
-- whole 10-minute lookback again every 10 minutes), the 1-hour refresh twice (the previous hour
-- again with each new one), and the plugin_metrics rollups (051) eleven and two times. In a
-- fleet of 25 agents of 1,000 plugins at 10 s that was most of the database's CPU beyond the
-- COPYs themselves (bench/fleet.py --top-statements).
--
-- Now every INSERT or COPY into plugin_samples / plugin_metrics logs the time range it wrote
-- (one row per rollup and statement, in the writer's transaction: a statement trigger over the
-- transition table) in rollup_invalidations. A refresh takes (deletes) the log rows it can see,
-- recomputes the buckets they touched behind the watermark (no further back than the lookback,
-- as before: rows later than that still need the explicit back-fill), then the buckets
-- completed since the watermark. Rows and their log row commit together, so a refresh either
-- sees both or leaves the log row for the next one. A row a little late is folded in at the
-- next refresh instead of within a lookback, and a raw row is read about once per rollup.
-- The refresh functions keep their signatures; 061's lookback_mark is no longer used.
-- Numbered after 090, whose percentile columns the recomputed rows carry (090 restated the
-- refresh the 061 way; this replaces it).
-- Rows written with triggers disabled (session_replication_role = replica) are not logged:
-- back-fill them explicitly.
CREATE TABLE rollup_invalidations (
    rollup text        NOT NULL,
    lo     timestamptz NOT NULL,
    hi     timestamptz NOT NULL
);

-- Statement trigger: TG_ARGV names the rollups of the table written.
-- SECURITY DEFINER: whoever may write the table logs its rows, without rights on the log.
CREATE FUNCTION pluginmon_log_rollup_invalidation() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
AS $$
DECLARE
    first_ts timestamptz;
    last_ts timestamptz;
BEGIN
    SELECT min(n."timestamp"), max(n."timestamp") INTO first_ts, last_ts FROM written n;
    IF first_ts IS NOT NULL THEN
        INSERT INTO rollup_invalidations (rollup, lo, hi)
        SELECT r, first_ts, last_ts FROM unnest(TG_ARGV) AS r;
    END IF;
    RETURN NULL;
END
$$;

DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION pluginmon_log_rollup_invalidation() SET search_path = pg_catalog, %I',
                   current_schema());
END
$$;

CREATE TRIGGER pluginmon_rollup_invalidation AFTER INSERT ON plugin_samples
    REFERENCING NEW TABLE AS written FOR EACH STATEMENT
    EXECUTE FUNCTION pluginmon_log_rollup_invalidation('rollup_samples_1m', 'rollup_samples_1h');
CREATE TRIGGER pluginmon_rollup_invalidation AFTER INSERT ON plugin_metrics
    REFERENCING NEW TABLE AS written FOR EACH STATEMENT
    EXECUTE FUNCTION pluginmon_log_rollup_invalidation('rollup_metrics_1m', 'rollup_metrics_1h');

-- Take (delete) ``target``'s visible log rows; return the whole ``width`` buckets they touched
-- in [not_before, mark), merged into disjoint ranges in order. Log rows at or after the mark
-- are dropped: those buckets are computed when they complete, from rows already committed.
CREATE FUNCTION pluginmon_take_invalidations(target text, width interval, mark timestamptz,
                                             not_before timestamptz)
RETURNS TABLE (range_start timestamptz, range_end timestamptz)
LANGUAGE sql VOLATILE
AS $$
    WITH taken AS (
        DELETE FROM rollup_invalidations i WHERE i.rollup = target RETURNING i.lo, i.hi
    ), spans AS (
        SELECT greatest(date_bin(width, t.lo, timestamptz '2000-01-03 00:00:00+00'), not_before) AS s,
               least(date_bin(width, t.hi, timestamptz '2000-01-03 00:00:00+00') + width, mark) AS e
          FROM taken t
    ), ordered AS (
        SELECT s, e, max(e) OVER (ORDER BY s, e ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS reach
          FROM spans WHERE s < e
    ), islands AS (
        SELECT s, e, count(*) FILTER (WHERE reach IS NULL OR reach < s) OVER (ORDER BY s, e) AS island
          FROM ordered
    )
    SELECT min(s), max(e) FROM islands GROUP BY island ORDER BY 1
$$;

-- Recompute ``target``'s buckets in [from_ts, to_ts) from the raw rows; rows inserted.
-- A hash aggregate in memory: the default work_mem (4 MB) sorted a minute of a 25-agent fleet
-- on disk; this is local to the refresh's transaction. Inserted in primary-key order: the
-- aggregate's own order scattered the inserts over the key's pages (15-35% slower).
CREATE FUNCTION pluginmon_recompute_rollup(target regclass, width interval, from_ts timestamptz,
                                           to_ts timestamptz, source text)
RETURNS bigint
LANGUAGE plpgsql
AS $$
DECLARE
    n bigint;
BEGIN
    PERFORM set_config('work_mem', '64MB', true);
    EXECUTE format('DELETE FROM %s WHERE bucket >= $1 AND bucket < $2', target)
        USING from_ts, to_ts;
    IF source = 'plugin_samples' THEN
        EXECUTE format('INSERT INTO %s (bucket, tenant_id, plugin_id, environment, sample_count, '
                       'cpu_percent_avg, cpu_percent_max, rss_bytes_avg, rss_bytes_max, vms_bytes_max, '
                       'threads_max, process_count_max, up_ratio, restarts_sum, '
                       'cpu_percent_p50, cpu_percent_p95, cpu_percent_p99, '
                       'rss_bytes_p50, rss_bytes_p95, rss_bytes_p99) '
                       'SELECT * FROM pluginmon_samples_rollup($1, $2, $3) ORDER BY plugin_id, bucket', target)
            USING width, from_ts, to_ts;
    ELSE
        EXECUTE format('INSERT INTO %s (bucket, tenant_id, plugin_id, environment, metric_name, '
                       'metric_kind, labels, sample_count, value_avg, value_min, value_max, '
                       'value_first, value_last) '
                       'SELECT * FROM pluginmon_metrics_rollup($1, $2, $3) ORDER BY plugin_id, metric_name, bucket',
                       target)
            USING width, from_ts, to_ts;
    END IF;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;

-- One refresh of either family: ``source`` is plugin_samples or plugin_metrics, ``mark`` the
-- watermark the caller locked. Returns the window recomputed (from the first invalidated
-- bucket, or the watermark) and the rows inserted; the caller moves the watermark to
-- ``window_end`` when ``advanced``.
CREATE FUNCTION pluginmon_refresh_from_log(target regclass, width interval, lookback interval,
                                           at_time timestamptz, refresh_from timestamptz,
                                           mark timestamptz, source text,
                                           OUT window_start timestamptz,
                                           OUT window_end timestamptz, OUT buckets bigint,
                                           OUT advanced boolean)
LANGUAGE plpgsql
AS $$
DECLARE
    -- TimescaleDB's time_bucket origin for sub-month widths: a Monday.
    origin constant timestamptz := timestamptz '2000-01-03 00:00:00+00';
    starts timestamptz[];
    ends timestamptz[];
BEGIN
    window_end := date_bin(width, at_time, origin);
    buckets := 0;
    advanced := false;
    IF refresh_from IS NOT NULL THEN
        -- An explicit back-fill: exactly the range asked for; the log is left to the refresh.
        window_start := date_bin(width, refresh_from, origin);
        IF window_start >= window_end THEN
            RETURN;
        END IF;
        buckets := pluginmon_recompute_rollup(target, width, window_start, window_end, source);
        advanced := true;
        RETURN;
    END IF;
    IF mark IS NULL THEN
        -- The first refresh reads every row: what the log holds so far is covered.
        DELETE FROM rollup_invalidations i WHERE i.rollup = target::text;
        EXECUTE format('SELECT date_bin($1, min(s."timestamp"), $2) FROM %I s', source)
            INTO window_start USING width, origin;
        IF window_start IS NULL OR window_start >= window_end THEN
            window_start := coalesce(window_start, window_end);
            RETURN;
        END IF;
        buckets := pluginmon_recompute_rollup(target, width, window_start, window_end, source);
        advanced := true;
        RETURN;
    END IF;
    -- Taken before the raw rows are read: a log row committed after this is left for the next
    -- refresh, even when its rows are read below (recomputed twice, never missed).
    SELECT array_agg(t.range_start ORDER BY t.range_start), array_agg(t.range_end ORDER BY t.range_start)
      INTO starts, ends
      FROM pluginmon_take_invalidations(target::text, width, mark,
                                        date_bin(width, mark - lookback, origin)) t;
    FOR i IN 1 .. coalesce(array_length(starts, 1), 0) LOOP
        buckets := buckets + pluginmon_recompute_rollup(target, width, starts[i], ends[i], source);
    END LOOP;
    window_start := coalesce(starts[1], least(mark, window_end));
    IF window_end > mark THEN
        buckets := buckets + pluginmon_recompute_rollup(target, width, mark, window_end, source);
        advanced := true;
    ELSE
        -- Nothing completed since the last refresh (an idle run): only invalidated buckets.
        window_end := greatest(window_end, coalesce(ends[array_length(ends, 1)], window_end));
        IF starts IS NULL THEN
            window_start := window_end;
        END IF;
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION pluginmon_refresh_rollup(target regclass, width interval, lookback interval,
                                         at_time timestamptz DEFAULT now(),
                                         refresh_from timestamptz DEFAULT NULL,
                                         OUT window_start timestamptz, OUT window_end timestamptz,
                                         OUT buckets bigint)
LANGUAGE plpgsql
AS $$
DECLARE
    mark timestamptz;
    moved boolean;
BEGIN
    SELECT w.watermark INTO mark FROM rollup_watermarks w WHERE w.rollup = target::text FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no watermark row for %', target USING ERRCODE = 'undefined_object';
    END IF;
    SELECT r.window_start, r.window_end, r.buckets, r.advanced
      INTO window_start, window_end, buckets, moved
      FROM pluginmon_refresh_from_log(target, width, lookback, at_time, refresh_from, mark,
                                      'plugin_samples') r;
    IF moved THEN
        UPDATE rollup_watermarks SET watermark = greatest(coalesce(mark, window_end), window_end),
                                     refreshed_at = now()
         WHERE rollup_watermarks.rollup = target::text;
    END IF;
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
    mark timestamptz;
    moved boolean;
BEGIN
    SELECT w.watermark INTO mark FROM rollup_metrics_watermarks w
     WHERE w.rollup = target::text FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no watermark row for %', target USING ERRCODE = 'undefined_object';
    END IF;
    SELECT r.window_start, r.window_end, r.buckets, r.advanced
      INTO window_start, window_end, buckets, moved
      FROM pluginmon_refresh_from_log(target, width, lookback, at_time, refresh_from, mark,
                                      'plugin_metrics') r;
    IF moved THEN
        UPDATE rollup_metrics_watermarks
           SET watermark = greatest(coalesce(mark, window_end), window_end), refreshed_at = now()
         WHERE rollup_metrics_watermarks.rollup = target::text;
    END IF;
END
$$;
