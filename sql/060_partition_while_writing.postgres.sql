-- 060, PostgreSQL backend: creating a day partition while agents write into the table.
--
-- pluginmon_create_day_partition (004) moves the day's rows out of the DEFAULT partition and
-- then ATTACHes the new one. A COPY committing a row for that day into DEFAULT between the
-- move and the ATTACH made the ATTACH fail (check violation): on a fresh database every row
-- goes to DEFAULT until the first maintenance pass, so with agents writing continuously the
-- pass failed again and again (tests/test_many_agents.py). And a COPY that had started before
-- the ATTACH and routed a row to DEFAULT after it failed instead.
--
-- Now the function first takes SHARE ROW EXCLUSIVE on the parent: it waits for the COPYs in
-- progress (at most the caller's lock_timeout, 5 s in storage/partitions.py; past that the
-- step is postponed to the next pass), new writes wait for the move and the ATTACH (empty
-- DEFAULT: milliseconds), and then route with the new partition. Reads are not blocked.
-- Everything else is 004's function unchanged.
CREATE OR REPLACE FUNCTION pluginmon_create_day_partition(parent regclass, day date)
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
    SELECT p.partition INTO default_partition FROM pluginmon_partitions(parent) p
     WHERE p.lower_bound IS NULL;
    IF default_partition IS NOT NULL THEN
        EXECUTE format('LOCK TABLE %s IN SHARE ROW EXCLUSIVE MODE', parent);
        -- Another session may have created it while this one waited for the lock.
        IF EXISTS (SELECT 1 FROM pluginmon_partitions(parent) p
                    WHERE p.lower_bound < hi AND p.upper_bound > lo) THEN
            RETURN NULL;
        END IF;
    END IF;
    partition_name := parent_name || '_p' || to_char(day, 'YYYYMMDD');
    EXECUTE format('CREATE TABLE %I.%I (LIKE %s INCLUDING DEFAULTS INCLUDING CONSTRAINTS)',
                   parent_schema, partition_name, parent);
    -- Lets ATTACH skip its validation scan.
    EXECUTE format('ALTER TABLE %I.%I ADD CONSTRAINT %I CHECK ("timestamp" >= %L AND "timestamp" < %L)',
                   parent_schema, partition_name, partition_name || '_bounds', lo, hi);
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
