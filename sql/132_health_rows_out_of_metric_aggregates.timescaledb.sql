-- 132 on TimescaleDB: the plugin-metrics continuous aggregates stop materialising pluginmon's
-- own health_score rows.
--
-- 129 left them out of PostgreSQL's and Citus's rollups (129_health_rows_not_rolled_up.postgres.sql
-- says why: their labels differ on every row, so each rollup kept one row per health row) and
-- only hid them here, because a continuous aggregate's query cannot be altered and dropping
-- rollup_metrics_1h would drop the buckets it keeps beyond the raw rows' retention. So on
-- TimescaleDB each refresh still aggregated and stored every health row: in bench/fleet.py's
-- run of 100 agents of 1,000 plugins at 10 s, one refresh of rollup_metrics_1m took 3.1 s for
-- 48,567 rows (5.1% of a core), and rollup_metrics_1h kept one row per health row for 365 days.
--
-- Each aggregate is replaced by one under the same name whose query leaves them out. What the
-- old one materialised is kept: it is renamed <name>_before_132, loses its refresh policy (it
-- keeps its retention policy, which storage.timescale keeps at the configured interval), and
-- the view plugin_metrics_1m / _1h reads it for the buckets before its watermark (the cutover,
-- written into the view as a constant) and the new aggregate from there on. An old aggregate
-- that holds no row (a new database) is dropped at once; one that retention has emptied is
-- dropped by the maintenance pass (pluginmon_retire_superseded_metric_aggregates, below), and
-- the view then reads the new aggregate only. The new aggregates are created empty; their
-- refresh policies (storage.timescale) fill them from the cutover as the old ones' would have:
-- late rows for buckets before the cutover are no longer materialised.

-- Where each replaced aggregate's buckets end and its successor's begin (no row: the old one
-- held nothing, the new one has every bucket).
CREATE TABLE metrics_aggregate_cutovers (
    aggregate text PRIMARY KEY,
    cutover timestamptz NOT NULL
);

-- The view over a metrics aggregate from ``cutover`` on (every bucket when it is NULL), and
-- over its superseded predecessor for the buckets before ``cutover`` when ``old_name`` is
-- given. Each branch keeps 051's tenant filter, with the bypass checked against its own
-- relation. The cutover is written into the view as a literal: DateStyle and TimeZone are
-- pinned so that it reads back as the same instant.
CREATE FUNCTION pluginmon_define_metrics_view(view_name text, agg_name text, old_name text,
                                              cutover timestamptz)
RETURNS void
LANGUAGE plpgsql
SET datestyle = 'ISO, YMD'
SET timezone = 'UTC'
AS $$
DECLARE
    columns constant text :=
        'bucket, tenant_id, plugin_id, environment, metric_name, metric_kind, labels, '
        'sample_count, value_avg, value_min, value_max, value_first, value_last';
    tenant_rows constant text :=
        '((SELECT pluginmon_bypasses_rls(%L)) OR tenant_id = (SELECT pluginmon_current_tenant()))';
    view_sql text;
BEGIN
    IF old_name IS NOT NULL AND cutover IS NULL THEN
        RAISE EXCEPTION 'no cutover between % and %', old_name, agg_name;
    END IF;
    -- (the new aggregate's first refreshes reach back before the cutover: those buckets are
    -- the old one's, also once retention has emptied it and it is gone)
    view_sql := format('SELECT %s FROM %I WHERE ', columns, agg_name)
                || CASE WHEN cutover IS NULL THEN ''
                        ELSE format('bucket >= %L::timestamptz AND ', cutover) END
                || format(tenant_rows, agg_name);
    IF old_name IS NOT NULL THEN
        view_sql := view_sql
                    || format(' UNION ALL SELECT %s FROM %I WHERE bucket < %L::timestamptz'
                              ' AND metric_name <> %L AND ',
                              columns, old_name, cutover, 'health_score')
                    || format(tenant_rows, old_name);
    END IF;
    EXECUTE format('CREATE OR REPLACE VIEW %I WITH (security_barrier) AS %s', view_name, view_sql);
END
$$;

-- Run by the maintenance pass (storage.timescale, under its lock): each superseded aggregate
-- that retention has emptied leaves the view and is dropped. Returns the ones dropped.
CREATE FUNCTION pluginmon_retire_superseded_metric_aggregates()
RETURNS SETOF text
LANGUAGE plpgsql
AS $$
DECLARE
    agg record;
    has_rows boolean;
BEGIN
    FOR agg IN SELECT * FROM (VALUES ('rollup_metrics_1m', 'plugin_metrics_1m'),
                                     ('rollup_metrics_1h', 'plugin_metrics_1h'))
                             AS v(name, view_name)
    LOOP
        CONTINUE WHEN to_regclass(agg.name || '_before_132') IS NULL;
        EXECUTE format('SELECT EXISTS (SELECT 1 FROM %I)', agg.name || '_before_132') INTO has_rows;
        CONTINUE WHEN has_rows;
        -- Dropping a continuous aggregate locks its raw hypertable exclusively: take that
        -- lock first (the caller's lock_timeout bounds the wait), so that a reader of
        -- plugin_metrics and then of the view cannot deadlock with the view's replacement.
        LOCK TABLE plugin_metrics IN ACCESS EXCLUSIVE MODE;
        PERFORM pluginmon_define_metrics_view(
            agg.view_name, agg.name, NULL,
            (SELECT c.cutover FROM metrics_aggregate_cutovers c WHERE c.aggregate = agg.name));
        EXECUTE format('DROP MATERIALIZED VIEW %I', agg.name || '_before_132');
        RETURN NEXT agg.name || '_before_132';
    END LOOP;
END
$$;

DO $$
DECLARE
    agg record;
    old_name text;
    owner_name text;
    has_rows boolean;
    cutover timestamptz;
BEGIN
    FOR agg IN SELECT * FROM (VALUES ('rollup_metrics_1m', 'plugin_metrics_1m', interval '1 minute'),
                                     ('rollup_metrics_1h', 'plugin_metrics_1h', interval '1 hour'))
                             AS v(name, view_name, width)
    LOOP
        old_name := agg.name || '_before_132';
        EXECUTE format('SELECT EXISTS (SELECT 1 FROM %I)', agg.name) INTO has_rows;
        -- where the old aggregate's materialisation ends (never past the current bucket)
        SELECT _timescaledb_functions.to_timestamp(
                   _timescaledb_functions.cagg_watermark(c.mat_hypertable_id))
          INTO cutover
          FROM _timescaledb_catalog.continuous_agg c
         WHERE c.user_view_schema = current_schema() AND c.user_view_name = agg.name;
        IF has_rows AND cutover IS NULL THEN
            RAISE EXCEPTION '% holds buckets but has no materialisation watermark', agg.name;
        END IF;
        cutover := least(cutover, time_bucket(agg.width, now()));
        SELECT r.rolname INTO owner_name
          FROM pg_class k JOIN pg_roles r ON r.oid = k.relowner
         WHERE k.oid = agg.name::regclass;
        PERFORM remove_continuous_aggregate_policy(agg.name::regclass, if_exists => true);
        EXECUTE format('ALTER MATERIALIZED VIEW %I RENAME TO %I', agg.name, old_name);
        EXECUTE format(
            'CREATE MATERIALIZED VIEW %I '
            'WITH (timescaledb.continuous, timescaledb.materialized_only = true) AS '
            'SELECT time_bucket(%L::interval, "timestamp") AS bucket, tenant_id, plugin_id, '
            '       environment, metric_name, metric_kind, labels, count(*) AS sample_count, '
            '       avg(value) AS value_avg, min(value) AS value_min, max(value) AS value_max, '
            '       first(value, "timestamp") AS value_first, last(value, "timestamp") AS value_last '
            '  FROM plugin_metrics WHERE metric_name <> %L '
            ' GROUP BY 1, 2, 3, 4, 5, 6, 7 WITH NO DATA',
            agg.name, agg.width, 'health_score');
        -- the same owner as the one it replaces (the views' bypass check reads it)
        EXECUTE format('ALTER MATERIALIZED VIEW %I OWNER TO %I', agg.name, owner_name);
        IF has_rows THEN
            INSERT INTO metrics_aggregate_cutovers (aggregate, cutover) VALUES (agg.name, cutover);
            PERFORM pluginmon_define_metrics_view(agg.view_name, agg.name, old_name, cutover);
        ELSE
            PERFORM pluginmon_define_metrics_view(agg.view_name, agg.name, NULL, NULL);
            EXECUTE format('DROP MATERIALIZED VIEW %I', old_name);
        END IF;
    END LOOP;
    -- The maintenance pass runs the retirement as the aggregates' owner (the daemon's role),
    -- whoever migrated: the table and the functions are that owner's too.
    EXECUTE format('ALTER TABLE metrics_aggregate_cutovers OWNER TO %I', owner_name);
    EXECUTE format('ALTER FUNCTION pluginmon_define_metrics_view(text, text, text, timestamptz) OWNER TO %I',
                   owner_name);
    EXECUTE format('ALTER FUNCTION pluginmon_retire_superseded_metric_aggregates() OWNER TO %I',
                   owner_name);
END
$$;

REVOKE ALL ON FUNCTION pluginmon_define_metrics_view(text, text, text, timestamptz) FROM PUBLIC;
REVOKE ALL ON FUNCTION pluginmon_retire_superseded_metric_aggregates() FROM PUBLIC;
