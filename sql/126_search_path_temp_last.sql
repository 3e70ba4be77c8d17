-- 126: every function of pluginmon's that pins its search path (each SECURITY DEFINER
-- function, and the helpers pinned beside them) names pg_temp last in it, and so do the
-- trigger functions that read tables.
--
-- A session's temporary schema is searched first for tables and views unless the search path
-- names it, even before pg_catalog. With 003's 'pg_catalog, <schema>', a tenant's login role
-- could create a temporary table named tenant_role_bindings (or pg_roles) and
-- pluginmon_current_tenant(), which runs as its owner, read that instead: a reader bound to
-- tenant a that wrote (session_user, 'b') there was given tenant b's rows, and a role that
-- shadowed pg_roles passed for a superuser and chose its tenant with pluginmon.tenant_id.
-- Temporary tables are open to every role by default (TEMPORARY on the database). The other
-- SECURITY DEFINER functions (the audit chain, the push of plugin metrics, the rollup
-- invalidation log) read and write tables by unqualified name the same way, and so do
-- plugin_config's triggers, which run as the writer: a tenant writer that shadowed plugins
-- could store values its config schema refuses. PostgreSQL's documented remedy ("Writing
-- SECURITY DEFINER Functions Safely"): name pg_temp last. tests/test_rls.py holds the attack
-- and checks the functions.
--
-- Left as they are: functions that belong to an extension (TimescaleDB's, created in this
-- schema by 002, pin their own paths and are the extension's to change), and
-- pluginmon_audit_expire(), owned by pluginmon_audit_retention, which only the daemon's own
-- role may call (030 revoked EXECUTE from PUBLIC): no other session's temporary tables are
-- ever in its scope, and changing it would need that role (031's dance); a superuser
-- migrating pins it too.
-- pluginmon_touch_updated_at() reads no table and runs on every update of plugins, where a
-- SET clause would cost each row.
DO $$
DECLARE
    fn regprocedure;
BEGIN
    FOR fn IN
        SELECT p.oid::regprocedure FROM pg_proc p
         WHERE p.pronamespace = current_schema()::regnamespace
           -- functions the migrating role may alter (its own; any, for a superuser)
           AND pg_has_role(current_user, p.proowner, 'USAGE')
           AND NOT EXISTS (SELECT 1 FROM pg_depend d
                            WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid
                              AND d.deptype = 'e')
           AND (p.prosecdef
                OR EXISTS (SELECT 1 FROM unnest(p.proconfig) AS c
                            WHERE c LIKE 'search\_path=%')
                OR (p.oid IN (SELECT t.tgfoid FROM pg_trigger t)
                    AND p.proname <> 'pluginmon_touch_updated_at'))
    LOOP
        EXECUTE format('ALTER FUNCTION %s SET search_path = pg_catalog, %I, pg_temp',
                       fn, current_schema());
    END LOOP;
END
$$;
