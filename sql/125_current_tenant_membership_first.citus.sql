-- 125, Citus backend: 102's pluginmon_current_tenant() (the binding read from the reference
-- table's local placement) with the same change as 125_current_tenant_membership_first.sql:
-- pg_roles is read for tenant-group members only. 102's CREATE OR REPLACE had dropped the
-- search path 003 pinned on this SECURITY DEFINER function; it is pinned again here.
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
    IF (pg_has_role(session_user, 'pluginmon_tenant_reader', 'MEMBER')
        OR pg_has_role(session_user, 'pluginmon_tenant_writer', 'MEMBER'))
       AND NOT (SELECT r.rolsuper FROM pg_roles r WHERE r.rolname = session_user) THEN
        RETURN NULL;
    END IF;
    RETURN nullif(current_setting('pluginmon.tenant_id', true), '');
END
$$;

DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION pluginmon_current_tenant() SET search_path = pg_catalog, %I, pg_temp',
                   current_schema());
END
$$;
