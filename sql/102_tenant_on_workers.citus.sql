-- 102 tenant on workers, Citus backend: pluginmon_current_tenant() (003) without a distributed
-- query inside.
--
-- Row-level security on a distributed table is evaluated on the worker that holds the shard,
-- inside Citus's own query on that shard, and there the function's lookup of
-- tenant_role_bindings (a reference table) would be a distributed query nested in a shard
-- query, which Citus refuses. Every node holds a full copy (placement) of a reference table,
-- so the lookup reads that local copy by its shard name instead. Same answers as 003's:
-- a bound login role gets its tenant whatever it sets; a member of the tenant groups without a
-- binding gets nothing; any other role gets pluginmon.tenant_id, which reaches the workers
-- only when it is set with SET LOCAL under citus.propagate_set_commands = 'local' (set_config()
-- is not propagated).
CREATE OR REPLACE FUNCTION pluginmon_current_tenant() RETURNS text
LANGUAGE plpgsql STABLE SECURITY DEFINER
AS $$
DECLARE
    bound text;
    placement text;
BEGIN
    SELECT shard_name('tenant_role_bindings'::regclass, s.shardid) INTO placement
      FROM pg_dist_shard s WHERE s.logicalrelid = 'tenant_role_bindings'::regclass;
    EXECUTE format('SELECT b.tenant_id FROM %s b WHERE b.role_name = $1', placement)
        INTO bound USING session_user;
    IF bound IS NOT NULL THEN
        RETURN bound;
    END IF;
    -- (Superusers count as members of every role; they are not tenant roles.)
    IF NOT (SELECT r.rolsuper FROM pg_roles r WHERE r.rolname = session_user)
       AND (pg_has_role(session_user, 'pluginmon_tenant_reader', 'MEMBER')
            OR pg_has_role(session_user, 'pluginmon_tenant_writer', 'MEMBER')) THEN
        RETURN NULL;
    END IF;
    RETURN nullif(current_setting('pluginmon.tenant_id', true), '');
END
$$;

-- The tenant-checked views (003, 051) run with their owner's privileges on PostgreSQL, but
-- Citus queries the shards behind a view as the caller: the caller needs SELECT on the tables
-- themselves. Row-level security on them (003, 051, with 100's policies) keeps it to the
-- caller's tenant, exactly as the views do.
DO $$
BEGIN
    EXECUTE 'GRANT SELECT ON plugin_samples, plugin_metrics, rollup_samples_1m, rollup_samples_1h,
                             rollup_metrics_1m, rollup_metrics_1h
             TO pluginmon_tenant_reader, pluginmon_tenant_writer, pluginmon_api';
END
$$;
