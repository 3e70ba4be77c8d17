-- 003 tenancy: roles, tenant bindings, row-level security on every tenant table, and the
-- tenant-checked views for what cannot carry row-level security.
--
-- Who sees what:
--   * the daemon's own role (owner of these tables), superusers and BYPASSRLS roles: all rows;
--   * a login role bound to a tenant in tenant_role_bindings: that tenant's rows only, whatever
--     it sets pluginmon.tenant_id to (the binding is looked up for session_user by a SECURITY
--     DEFINER function the role cannot change);
--   * members of pluginmon_tenant_reader / pluginmon_tenant_writer without a binding: nothing;
--   * any other role (an application role serving many tenants): the tenant named by
--     SET pluginmon.tenant_id, nothing when it is unset.
--
-- TimescaleDB refuses compression on a hypertable with row security, and continuous aggregates
-- cannot carry it at all, so the raw time series and the rollups are read through views that
-- apply the same check (public.plugin_samples_1m/_1h and pluginmon_tenant.plugin_samples/
-- plugin_metrics). The group roles get no privilege on the underlying relations, hence none
-- on chunks or partitions either. The same views exist on both backends.

-- Roles are cluster-wide and several databases (tests, staging) may share a cluster, so they
-- are created only when missing, and a concurrent creator is not an error.
DO $$
DECLARE
    role_to_create text;
BEGIN
    FOREACH role_to_create IN ARRAY ARRAY['pluginmon_tenant_reader', 'pluginmon_tenant_writer'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = role_to_create) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', role_to_create);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL;
            END;
        END IF;
    END LOOP;
END
$$;

-- Which login role belongs to which tenant. Only the owner reads or writes it.
CREATE TABLE tenant_role_bindings (
    role_name  name        PRIMARY KEY,
    -- CASCADE: a binding to a deleted tenant would bind to nothing.
    tenant_id  text        NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- The tenant the current session may see, or NULL for none.
CREATE FUNCTION pluginmon_current_tenant() RETURNS text
LANGUAGE plpgsql STABLE SECURITY DEFINER
AS $$
DECLARE
    bound text;
BEGIN
    -- session_user, not current_user: SET ROLE cannot escape a binding, and inside this
    -- SECURITY DEFINER function current_user is the owner anyway.
    SELECT b.tenant_id INTO bound FROM tenant_role_bindings b WHERE b.role_name = session_user;
    IF bound IS NOT NULL THEN
        RETURN bound;
    END IF;
    -- (Superusers count as members of every role; they are not tenant roles.)
    IF NOT (SELECT r.rolsuper FROM pg_roles r WHERE r.rolname = session_user)
       AND (pg_has_role(session_user, 'pluginmon_tenant_reader', 'MEMBER')
            OR pg_has_role(session_user, 'pluginmon_tenant_writer', 'MEMBER')) THEN
        -- Tenant group members choose nothing themselves: unbound means no rows.
        RETURN NULL;
    END IF;
    RETURN nullif(current_setting('pluginmon.tenant_id', true), '');
END
$$;

-- Would row-level security let the current role see every row of ``relation``? (Owner,
-- members inheriting the owner, superusers, BYPASSRLS.) Used by the views, which run with
-- their owner's privileges but must filter like the tables do.
CREATE FUNCTION pluginmon_bypasses_rls(relation regclass) RETURNS boolean
LANGUAGE sql STABLE
AS $$
    SELECT EXISTS (SELECT 1 FROM pg_roles r
                    WHERE r.rolname = current_user AND (r.rolsuper OR r.rolbypassrls))
        OR pg_has_role(current_user, (SELECT c.relowner FROM pg_class c WHERE c.oid = relation), 'USAGE')
$$;

-- Pin the search path of the SECURITY DEFINER function to this schema (and of its helpers,
-- for predictability), whatever schema the migrations run in.
DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION pluginmon_current_tenant() SET search_path = pg_catalog, %I',
                   current_schema());
    EXECUTE format('ALTER FUNCTION pluginmon_bypasses_rls(regclass) SET search_path = pg_catalog, %I',
                   current_schema());
END
$$;

REVOKE ALL ON FUNCTION pluginmon_current_tenant() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pluginmon_current_tenant() TO PUBLIC;

-- Enable row-level security on a tenant table: one policy for reads and writes, SELECT for the
-- reader group, DML for the writer group. Later migrations (alerts' 020+) call it too.
CREATE FUNCTION pluginmon_enable_tenant_rls(relation regclass, tenant_column name DEFAULT 'tenant_id',
                                            writable boolean DEFAULT true)
RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    EXECUTE format('ALTER TABLE %s ENABLE ROW LEVEL SECURITY', relation);
    EXECUTE format('DROP POLICY IF EXISTS tenant_isolation ON %s', relation);
    EXECUTE format(
        'CREATE POLICY tenant_isolation ON %s USING (%I = (SELECT pluginmon_current_tenant())) '
        'WITH CHECK (%I = (SELECT pluginmon_current_tenant()))',
        relation, tenant_column, tenant_column);
    EXECUTE format('GRANT SELECT ON %s TO pluginmon_tenant_reader, pluginmon_tenant_writer', relation);
    IF writable THEN
        EXECUTE format('GRANT INSERT, UPDATE, DELETE ON %s TO pluginmon_tenant_writer', relation);
    END IF;
END
$$;

-- Row-level security on every plain tenant table.
SELECT pluginmon_enable_tenant_rls('tenants', 'id', writable => false);
SELECT pluginmon_enable_tenant_rls('plugins');
SELECT pluginmon_enable_tenant_rls('plugin_operations');
SELECT pluginmon_enable_tenant_rls('plugin_config');
SELECT pluginmon_enable_tenant_rls('plugin_dependencies');
SELECT pluginmon_enable_tenant_rls('plugin_alerts');
SELECT pluginmon_enable_tenant_rls('audit_log', writable => false);
SELECT pluginmon_enable_tenant_rls('plugin_backups');
SELECT pluginmon_enable_tenant_rls('plugin_restore_points');
SELECT pluginmon_enable_tenant_rls('plugin_approvals');
SELECT pluginmon_enable_tenant_rls('plugin_vulnerabilities');
SELECT pluginmon_enable_tenant_rls('plugin_analytics');
-- The bindings themselves: RLS on, and no grants at all (the owner manages them).
ALTER TABLE tenant_role_bindings ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON tenant_role_bindings
    USING (tenant_id = (SELECT pluginmon_current_tenant()));

-- The time-series tables: row-level security where the backend allows it (PostgreSQL
-- partitioned tables; TimescaleDB refuses it next to compression), no group grants on either.
DO $$
DECLARE
    relation text;
BEGIN
    FOREACH relation IN ARRAY ARRAY['plugin_samples', 'plugin_metrics', 'rollup_samples_1m', 'rollup_samples_1h'] LOOP
        IF EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = to_regclass(relation) AND c.relkind IN ('r', 'p'))
           AND NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
            EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', relation);
            EXECUTE format('CREATE POLICY tenant_isolation ON %I USING (tenant_id = (SELECT pluginmon_current_tenant())) '
                           'WITH CHECK (tenant_id = (SELECT pluginmon_current_tenant()))', relation);
        END IF;
    END LOOP;
END
$$;

-- Rollup views (the contract names), tenant-checked. security_barrier keeps callers' own
-- predicates from running before the tenant check.
CREATE VIEW plugin_samples_1m WITH (security_barrier) AS
SELECT bucket, tenant_id, plugin_id, environment, sample_count,
       cpu_percent_avg, cpu_percent_max, rss_bytes_avg, rss_bytes_max, vms_bytes_max,
       threads_max, process_count_max, up_ratio, restarts_sum
  FROM rollup_samples_1m
 WHERE (SELECT pluginmon_bypasses_rls('rollup_samples_1m'))
    OR tenant_id = (SELECT pluginmon_current_tenant());

CREATE VIEW plugin_samples_1h WITH (security_barrier) AS
SELECT bucket, tenant_id, plugin_id, environment, sample_count,
       cpu_percent_avg, cpu_percent_max, rss_bytes_avg, rss_bytes_max, vms_bytes_max,
       threads_max, process_count_max, up_ratio, restarts_sum
  FROM rollup_samples_1h
 WHERE (SELECT pluginmon_bypasses_rls('rollup_samples_1h'))
    OR tenant_id = (SELECT pluginmon_current_tenant());

GRANT SELECT ON plugin_samples_1m, plugin_samples_1h TO pluginmon_tenant_reader, pluginmon_tenant_writer;

-- Raw time series for tenant roles: same names in their own schema, which the binding puts
-- first on the role's search_path, so dashboards' SQL is the same for every data source.
CREATE SCHEMA pluginmon_tenant;

CREATE VIEW pluginmon_tenant.plugin_samples WITH (security_barrier) AS
SELECT * FROM plugin_samples
 WHERE (SELECT pluginmon_bypasses_rls('plugin_samples'))
    OR tenant_id = (SELECT pluginmon_current_tenant());

CREATE VIEW pluginmon_tenant.plugin_metrics WITH (security_barrier) AS
SELECT * FROM plugin_metrics
 WHERE (SELECT pluginmon_bypasses_rls('plugin_metrics'))
    OR tenant_id = (SELECT pluginmon_current_tenant());

GRANT USAGE ON SCHEMA pluginmon_tenant TO pluginmon_tenant_reader, pluginmon_tenant_writer;
GRANT SELECT ON ALL TABLES IN SCHEMA pluginmon_tenant TO pluginmon_tenant_reader, pluginmon_tenant_writer;

-- Bind a login role to a tenant (run by an administrator with CREATEROLE): records the binding,
-- makes the role a member of the reader (or writer) group and puts pluginmon_tenant first on
-- its search path in this database.
CREATE FUNCTION pluginmon_bind_tenant_role(role_to_bind name, tenant text, access text DEFAULT 'reader')
RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    IF access NOT IN ('reader', 'writer') THEN
        RAISE EXCEPTION 'access must be reader or writer, not %', access
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO tenant_role_bindings (role_name, tenant_id) VALUES (role_to_bind, tenant)
        ON CONFLICT (role_name) DO UPDATE SET tenant_id = EXCLUDED.tenant_id;
    EXECUTE format('GRANT %I TO %I', 'pluginmon_tenant_' || access, role_to_bind);
    EXECUTE format('ALTER ROLE %I IN DATABASE %I SET search_path = pluginmon_tenant, %I',
                   role_to_bind, current_database(), current_schema());
END
$$;

REVOKE ALL ON FUNCTION pluginmon_bind_tenant_role(name, text, text) FROM PUBLIC;
