-- 100 distribute, Citus backend: every table the PostgreSQL files (001-085) created on the
-- coordinator is distributed by tenant, made a reference table, or left on the coordinator.
--
--   * reference tables (small, shared, read by every node): tenants, tenant_role_bindings,
--     api_tokens and the rollup watermarks;
--   * distributed by tenant_id and co-located with plugins (one shard group holds all of a
--     tenant's rows, so joins, foreign keys and rollup refreshes stay inside one node): every
--     tenant table, the time series (plugin_samples, plugin_metrics: still range-partitioned
--     by day, the same maintenance functions manage the partitions) and the rollup tables;
--   * ingest_ledger: distributed by batch_id (it has no tenant);
--   * left on the coordinator as plain tables: schema_migrations, audit_log and audit_chain.
--     The audit trail's hash chain and its append-only rule are triggers, which Citus
--     refuses on distributed tables; the trail has no foreign key to anything distributed,
--     every daemon and API request runs through the coordinator, and Citus joins local and
--     distributed tables. So the audit tables keep their triggers and their guarantees.
--
-- Citus requires every primary key and unique constraint of a distributed table to include
-- the distribution column: each one without tenant_id gets it appended, under the same name
-- (a key unique without tenant_id is also unique with it; only the partial unique indexes on
-- plugin_alerts.fingerprint and plugin_approvals.operation_id become unique per tenant).
--
-- Triggers Citus refuses on distributed and reference tables, dropped here, and what stands in:
--   * *_touch (tenants, plugins, plugin_dependencies, plugin_alerts, notification_outbox):
--     updated_at is set by the statements that update (registry/, storage/ do so already);
--   * plugin_config_validate / _version / _required: the API (registry/config_values.py)
--     validates against config_schema and computes versions; the unique partial index
--     idx_plugin_config_current (one current version per key) is the backstop;
--   * plugin_approval_decisions_check (four eyes): the API refuses a requester's decision
--     (registry/approvals.py); plugin_approvals_not_self_approved stays as the CHECK.
--
-- Row-level security policies on distributed tables may not contain subqueries: the policies
-- are recreated with pluginmon_current_tenant() called directly. Tenant sessions must send
-- SET LOCAL pluginmon.tenant_id to the workers: citus.propagate_set_commands = 'local' is set
-- where tenant transactions begin (registry, API).

-- create_distributed_table inside a transaction block, next to foreign keys to reference
-- tables, needs the sequential executor.
SET LOCAL citus.multi_shard_modify_mode TO 'sequential';

-- Policies without subqueries -------------------------------------------------------------------

DO $$
DECLARE
    p record;
    wrapped constant text := '( SELECT pluginmon_current_tenant() AS pluginmon_current_tenant)';
BEGIN
    FOR p IN SELECT * FROM pg_policies
              WHERE schemaname = current_schema() AND policyname = 'tenant_isolation'
                AND tablename NOT IN ('audit_log', 'audit_chain') LOOP
        EXECUTE format('DROP POLICY tenant_isolation ON %I', p.tablename);
        EXECUTE format('CREATE POLICY tenant_isolation ON %I USING (%s)%s', p.tablename,
                       replace(p.qual, wrapped, 'pluginmon_current_tenant()'),
                       CASE WHEN p.with_check IS NULL THEN ''
                            ELSE ' WITH CHECK (' || replace(p.with_check, wrapped, 'pluginmon_current_tenant()') || ')'
                       END);
    END LOOP;
END
$$;

-- Triggers ----------------------------------------------------------------------------------------

DROP TRIGGER tenants_touch ON tenants;
DROP TRIGGER plugins_touch ON plugins;
DROP TRIGGER plugin_dependencies_touch ON plugin_dependencies;
DROP TRIGGER plugin_alerts_touch ON plugin_alerts;
DROP TRIGGER notification_outbox_touch ON notification_outbox;
DROP TRIGGER plugin_config_validate ON plugin_config;
DROP TRIGGER plugin_config_version ON plugin_config;
DROP TRIGGER plugin_config_required ON plugin_config;
DROP TRIGGER plugin_approval_decisions_check ON plugin_approval_decisions;

-- Foreign keys that cannot exist while the tables change kind ----------------------------------

-- To tenants: re-added once tenants is a reference table (a local table referencing it would
-- be converted by Citus on the way).
ALTER TABLE plugins DROP CONSTRAINT plugins_tenant_id_fkey;
ALTER TABLE tenant_role_bindings DROP CONSTRAINT tenant_role_bindings_tenant_id_fkey;
ALTER TABLE alert_silences DROP CONSTRAINT alert_silences_tenant_id_fkey;
ALTER TABLE api_tokens DROP CONSTRAINT api_tokens_tenant_id_fkey;
-- ON DELETE SET NULL on a key that must include tenant_id would null the distribution
-- column (see the end of this file).
ALTER TABLE alert_notifications_sent DROP CONSTRAINT alert_notifications_sent_outbox_id_fkey;

-- Keys with tenant_id ------------------------------------------------------------------------------

CREATE FUNCTION pg_temp.pluginmon_tenant_keys(relation regclass) RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    c record;
    tenant_attnum smallint;
BEGIN
    SELECT a.attnum INTO tenant_attnum FROM pg_attribute a
     WHERE a.attrelid = relation AND a.attname = 'tenant_id';
    FOR c IN SELECT con.conname, pg_get_constraintdef(con.oid) AS def FROM pg_constraint con
              WHERE con.conrelid = relation AND con.contype IN ('p', 'u')
                AND NOT tenant_attnum = ANY (con.conkey) LOOP
        EXECUTE format('ALTER TABLE %s DROP CONSTRAINT %I', relation, c.conname);
        EXECUTE format('ALTER TABLE %s ADD CONSTRAINT %I %s', relation, c.conname,
                       regexp_replace(c.def, '\)$', ', tenant_id)'));
    END LOOP;
END
$$;

SELECT pg_temp.pluginmon_tenant_keys(t::regclass) FROM unnest(ARRAY[
    'plugins', 'plugin_operations', 'plugin_config', 'plugin_dependencies', 'plugin_alerts',
    'plugin_backups', 'plugin_restore_points', 'plugin_approvals', 'plugin_vulnerabilities',
    'plugin_analytics', 'notification_outbox', 'alert_notifications_sent', 'alert_silences',
    'plugin_environments', 'plugin_approval_decisions', 'plugin_dependency_states',
    'plugin_backup_verifications', 'plugin_sboms', 'plugin_vex_statements']) AS t;

DROP INDEX idx_plugin_config_current;
CREATE UNIQUE INDEX idx_plugin_config_current
    ON plugin_config (plugin_id, environment, key, tenant_id)
    WHERE is_current;
DROP INDEX idx_plugin_alerts_open_fingerprint;
CREATE UNIQUE INDEX idx_plugin_alerts_open_fingerprint
    ON plugin_alerts (fingerprint, tenant_id)
    WHERE status <> 'resolved';
DROP INDEX idx_plugin_approvals_operation;
CREATE UNIQUE INDEX idx_plugin_approvals_operation
    ON plugin_approvals (operation_id, tenant_id)
    WHERE operation_id IS NOT NULL;

-- Reference tables -------------------------------------------------------------------------------------

SELECT create_reference_table('tenants');
SELECT create_reference_table('tenant_role_bindings');
SELECT create_reference_table('api_tokens');
SELECT create_reference_table('rollup_watermarks');
SELECT create_reference_table('rollup_metrics_watermarks');

-- Distributed by tenant, co-located with plugins, parents before children -------------------------

SELECT create_distributed_table('plugins', 'tenant_id');
SELECT create_distributed_table(t, 'tenant_id', colocate_with => 'plugins') FROM unnest(ARRAY[
    'plugin_operations', 'plugin_config', 'plugin_dependencies', 'plugin_alerts',
    'plugin_backups', 'plugin_restore_points', 'plugin_approvals', 'plugin_vulnerabilities',
    'plugin_analytics', 'notification_outbox', 'alert_notifications_sent', 'alert_silences',
    'plugin_environments', 'plugin_approval_decisions', 'plugin_dependency_states',
    'plugin_backup_verifications', 'plugin_sboms', 'plugin_vex_statements',
    'plugin_samples', 'plugin_metrics', 'rollup_samples_1m', 'rollup_samples_1h',
    'rollup_metrics_1m', 'rollup_metrics_1h']) AS t;
SELECT create_distributed_table('ingest_ledger', 'batch_id', colocate_with => 'none');

-- Foreign keys back --------------------------------------------------------------------------------------

-- Through EXECUTE: Citus sends an ALTER TABLE on a distributed or reference table to the
-- workers as the text of the statement it came in, and the runner sends this whole file as
-- one string (the workers refuse several commands in one statement).
DO $$
BEGIN
    EXECUTE 'ALTER TABLE plugins ADD CONSTRAINT plugins_tenant_id_fkey
             FOREIGN KEY (tenant_id) REFERENCES tenants (id) ON DELETE RESTRICT';
    EXECUTE 'ALTER TABLE tenant_role_bindings ADD CONSTRAINT tenant_role_bindings_tenant_id_fkey
             FOREIGN KEY (tenant_id) REFERENCES tenants (id) ON DELETE CASCADE';
    EXECUTE 'ALTER TABLE alert_silences ADD CONSTRAINT alert_silences_tenant_id_fkey
             FOREIGN KEY (tenant_id) REFERENCES tenants (id) ON DELETE CASCADE';
    EXECUTE 'ALTER TABLE api_tokens ADD CONSTRAINT api_tokens_tenant_id_fkey
             FOREIGN KEY (tenant_id) REFERENCES tenants (id) ON DELETE RESTRICT';
END
$$;
-- alert_notifications_sent.outbox_id keeps no foreign key on Citus: ON DELETE SET NULL is
-- refused on a key that includes the distribution column. The outbox pruning
-- (storage/outbox_store.py) deletes delivered rows; the sent record only keeps the id.
