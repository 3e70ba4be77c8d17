-- 103 tenant conflict keys, PostgreSQL and TimescaleDB: a unique index with tenant_id for every
-- key an INSERT ... ON CONFLICT names, so the statements can name the same target on every
-- backend: ON CONFLICT (tenant_id, ...). On Citus those keys include tenant_id already (100:
-- Citus requires the distribution column in every unique key) and an ON CONFLICT target
-- without it matches no index there; 103's Citus variant creates nothing.
--
-- Each index is implied by the existing key without tenant_id (a set of columns unique
-- without tenant_id is unique with it), so creating it never fails on existing rows. None of
-- these tables is a hypertable.
CREATE UNIQUE INDEX plugin_environments_tenant_plugin_environment_key
    ON plugin_environments (tenant_id, plugin_id, environment);
CREATE UNIQUE INDEX plugin_vulnerabilities_tenant_finding_key
    ON plugin_vulnerabilities (tenant_id, plugin_id, environment, scanner, vulnerability_id,
                               package_name);
CREATE UNIQUE INDEX plugin_vex_statements_tenant_key
    ON plugin_vex_statements (tenant_id, plugin_id, environment, vulnerability_id, package_name);
CREATE UNIQUE INDEX plugin_sboms_tenant_key ON plugin_sboms (tenant_id, plugin_id, environment);
CREATE UNIQUE INDEX plugin_dependencies_tenant_edge_key
    ON plugin_dependencies (tenant_id, plugin_id, depends_on_plugin_id, kind);
CREATE UNIQUE INDEX plugin_dependency_states_tenant_key
    ON plugin_dependency_states (tenant_id, dependency_id, environment);
CREATE UNIQUE INDEX idx_plugin_alerts_open_tenant_fingerprint
    ON plugin_alerts (tenant_id, fingerprint)
    WHERE status <> 'resolved';
CREATE UNIQUE INDEX notification_outbox_tenant_idempotency_key
    ON notification_outbox (tenant_id, idempotency_key);
CREATE UNIQUE INDEX alert_notifications_sent_tenant_key
    ON alert_notifications_sent (tenant_id, idempotency_key);
CREATE UNIQUE INDEX plugin_analytics_tenant_period_key
    ON plugin_analytics (tenant_id, plugin_id, environment, period, period_start);
