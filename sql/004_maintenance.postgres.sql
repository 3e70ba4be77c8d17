-- 004 maintenance, PostgreSQL backend: daily partitions (created ahead, dropped whole past the
-- retention horizon) and the incremental rollup refresh. storage/partitions.py calls these
-- under an advisory lock so one daemon runs them per database. Days are UTC days.

-- [lower, upper) of a range partition, from its bound expression.
CREATE FUNCTION pluginmon_partition_bounds(partition regclass, OUT lower_bound timestamptz,
                                           OUT upper_bound timestamptz)
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    bound text;
    parts text[];
BEGIN
    SELECT pg_get_expr(c.relpartbound, c.oid) INTO bound FROM pg_class c WHERE c.oid = partition;
    parts := regexp_match(bound, $re$FROM \('([^']*)'\) TO \('([^']*)'\)$re$);
    IF parts IS NOT NULL THEN
        lower_bound := parts[1]::timestamptz;
        upper_bound := parts[2]::timestamptz;
    END IF;
END
$$;

-- Partitions of ``parent`` with their bounds (the DEFAULT partition has NULL bounds).
CREATE FUNCTION pluginmon_partitions(parent regclass)
RETURNS TABLE (partition regclass, lower_bound timestamptz, upper_bound timestamptz)
LANGUAGE sql STABLE
AS $$
    SELECT i.inhrelid::regclass, b.lower_bound, b.upper_bound
      FROM pg_inherits i
     CROSS JOIN LATERAL pluginmon_partition_bounds(i.inhrelid::regclass) b
     WHERE i.inhparent = parent
     ORDER BY b.lower_bound NULLS FIRST
$$;

-- Create the daily partition of ``parent`` that holds ``day`` unless one covers it already.
-- Rows for that day sitting in the DEFAULT partition are moved into it first (ATTACH would
-- refuse otherwise). Returns the new partition's name, or NULL when nothing was created.
CREATE FUNCTION pluginmon_create_day_partition(parent regclass, day date)
RETURNS text
LANGUAGE plpgsql
AS $$
DECLARE
    lo timestamptz := (day::timestamp AT TIME ZONE 'UTC');
    hi timestamptz := ((day + 1)::timestamp AT TIME ZONE 'UTC');
    parent_name name;
    parent_schema name;
    partition_name text;
    default_partition regclass;
BEGIN
    SELECT c.relname, n.nspname INTO parent_name, parent_schema
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = parent;
    IF EXISTS (SELECT 1 FROM pluginmon_partitions(parent) p
                WHERE p.lower_bound < hi AND p.upper_bound > lo) THEN
        RETURN NULL;
    END IF;
    partition_name := parent_name || '_p' || to_char(day, 'YYYYMMDD');
    EXECUTE format('CREATE TABLE %I.%I (LIKE %s INCLUDING DEFAULTS INCLUDING CONSTRAINTS)',
                   parent_schema, partition_name, parent);
    -- Lets ATTACH skip its validation scan.
    EXECUTE format('ALTER TABLE %I.%I ADD CONSTRAINT %I CHECK ("timestamp" >= %L AND "timestamp" < %L)',
                   parent_schema, partition_name, partition_name || '_bounds', lo, hi);
    SELECT p.partition INTO default_partition FROM pluginmon_partitions(parent) p
     WHERE p.lower_bound IS NULL;
    IF default_partition IS NOT NULL THEN
        EXECUTE format('WITH moved AS (DELETE FROM %s WHERE "timestamp" >= $1 AND "timestamp" < $2 RETURNING *) '
                       'INSERT INTO %I.%I SELECT * FROM moved', default_partition, parent_schema, partition_name)
            USING lo, hi;
    END IF;
    EXECUTE format('ALTER TABLE %s ATTACH PARTITION %I.%I FOR VALUES FROM (%L) TO (%L)',
                   parent, parent_schema, partition_name, lo, hi);
    EXECUTE format('ALTER TABLE %I.%I DROP CONSTRAINT %I',
                   parent_schema, partition_name, partition_name || '_bounds');
    RETURN partition_name;
END
$$;

-- One maintenance pass over a time-partitioned table:
--   * partitions wholly older than now - retention are dropped (rows counted first);
--   * the partition straddling the horizon, and the DEFAULT partition, lose exactly the rows
--     older than the horizon, so no row younger than it is ever lost;
--   * partitions exist for every day from today to days_ahead, and for every day that has
--     rows waiting in the DEFAULT partition (moved out of it).
-- Returns one row per action: ('created' | 'dropped' | 'deleted', relation, rows).
CREATE FUNCTION pluginmon_maintain_partitions(parent regclass, retention interval,
                                              days_ahead integer DEFAULT 7,
                                              at_time timestamptz DEFAULT now())
RETURNS TABLE (action text, relation text, row_count bigint)
LANGUAGE plpgsql
AS $$
DECLARE
    horizon timestamptz := at_time - retention;
    part record;
    n bigint;
    day date;
    created text;
BEGIN
    IF retention <= interval '0' THEN
        RAISE EXCEPTION 'retention must be positive, got %', retention USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOR part IN SELECT * FROM pluginmon_partitions(parent) LOOP
        IF part.lower_bound IS NULL OR part.lower_bound < horizon AND part.upper_bound > horizon THEN
            EXECUTE format('DELETE FROM %s WHERE "timestamp" < $1', part.partition) USING horizon;
            GET DIAGNOSTICS n = ROW_COUNT;
            IF n > 0 THEN
                action := 'deleted'; relation := part.partition::text; row_count := n;
                RETURN NEXT;
            END IF;
        ELSIF part.upper_bound <= horizon THEN
            EXECUTE format('SELECT count(*) FROM %s', part.partition) INTO n;
            action := 'dropped'; relation := part.partition::text; row_count := n;
            EXECUTE format('ALTER TABLE %s DETACH PARTITION %s', parent, part.partition);
            EXECUTE format('DROP TABLE %s', part.partition);
            RETURN NEXT;
        END IF;
    END LOOP;

    FOR day IN
        SELECT d::date FROM generate_series((at_time AT TIME ZONE 'UTC')::date,
                                            (at_time AT TIME ZONE 'UTC')::date + days_ahead,
                                            interval '1 day') AS g(d)
    LOOP
        created := pluginmon_create_day_partition(parent, day);
        IF created IS NOT NULL THEN
            action := 'created'; relation := created; row_count := 0;
            RETURN NEXT;
        END IF;
    END LOOP;

    FOR part IN SELECT * FROM pluginmon_partitions(parent) p WHERE p.lower_bound IS NULL LOOP
        FOR day IN EXECUTE format(
            'SELECT DISTINCT ("timestamp" AT TIME ZONE ''UTC'')::date FROM %s ORDER BY 1', part.partition)
        LOOP
            created := pluginmon_create_day_partition(parent, day);
            IF created IS NOT NULL THEN
                EXECUTE format('SELECT count(*) FROM %I', created) INTO n;
                action := 'created'; relation := created; row_count := n;
                RETURN NEXT;
            END IF;
        END LOOP;
    END LOOP;
END
$$;

-- Rows of plugin_samples aggregated into ``width`` buckets over [window_start, window_end):
-- the same expressions as the TimescaleDB continuous aggregates.
CREATE FUNCTION pluginmon_samples_rollup(width interval, window_start timestamptz, window_end timestamptz)
RETURNS TABLE (bucket timestamptz, tenant_id text, plugin_id bigint, environment text,
               sample_count bigint, cpu_percent_avg double precision, cpu_percent_max double precision,
               rss_bytes_avg double precision, rss_bytes_max bigint, vms_bytes_max bigint,
               threads_max integer, process_count_max integer, up_ratio double precision,
               restarts_sum bigint)
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
           sum(s.restarts)
      FROM plugin_samples s
     WHERE s."timestamp" >= window_start AND s."timestamp" < window_end
     GROUP BY 1, 2, 3, 4
$$;

-- Refresh one rollup table incrementally: recompute the buckets in
-- [watermark - lookback, the last complete bucket), then advance the watermark. The lookback
-- absorbs samples that arrive late (a flushed spool); older late rows need refresh_from.
-- The first refresh starts at the oldest sample. Returns the window and the bucket count.
CREATE FUNCTION pluginmon_refresh_rollup(target regclass, width interval, lookback interval,
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

-- Today's and the next days' partitions now, so the first samples do not land in DEFAULT.
SELECT pluginmon_maintain_partitions('plugin_samples', interval '90 days');
SELECT pluginmon_maintain_partitions('plugin_metrics', interval '90 days');
