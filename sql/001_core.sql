-- 001 core: tenants, plugins and every plain (non time-series) table of the seed's model.
--
-- Conventions used throughout:
--   * every tenant table carries tenant_id text NOT NULL (row-level security keys on it, 003);
--   * child tables reference plugins through the composite key (plugin_id, tenant_id), so a
--     row can never claim a tenant other than its plugin's;
--   * ON DELETE CASCADE where the child is meaningless without its plugin (config, alerts,
--     analytics...), RESTRICT where deleting would silently lose something another party
--     relies on (backups, restore points, a plugin that others depend on, a tenant);
--   * enums that other systems define (the seed's PluginSource) are PostgreSQL enums; our own
--     small vocabularies are text + CHECK so they can grow with a plain ALTER ... CHECK.

-- Tenants ---------------------------------------------------------------------------------

CREATE TABLE tenants (
    id          text        PRIMARY KEY
                            CONSTRAINT tenants_id_slug CHECK (id ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    name        text        NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Plugins ---------------------------------------------------------------------------------

-- The seed's Prisma enum, verbatim.
CREATE TYPE plugin_source AS ENUM (
    'MARKETPLACE',
    'GIT_REPOSITORY',
    'NPM_REGISTRY',
    'LOCAL_FILE',
    'DOCKER_REGISTRY',
    'INTERNAL',
    'CUSTOM'
);

CREATE TABLE plugins (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- RESTRICT: offboarding a tenant is a deliberate, ordered operation, never a side effect.
    tenant_id         text        NOT NULL REFERENCES tenants (id) ON DELETE RESTRICT,
    name              text        NOT NULL CONSTRAINT plugins_name_nonempty CHECK (name <> ''),
    version           text,
    description       text,
    status            text        NOT NULL DEFAULT 'installed'
                                  CONSTRAINT plugins_status_check CHECK (status IN (
                                      'discovered', 'installing', 'installed', 'updating',
                                      'failed', 'uninstalling', 'uninstalled')),
    enabled           boolean     NOT NULL DEFAULT true,
    environment       text        NOT NULL DEFAULT 'production',
    health_score      real        CONSTRAINT plugins_health_score_range
                                  CHECK (health_score >= 0 AND health_score <= 100),
    last_health_check timestamptz,
    cpu_usage         double precision CONSTRAINT plugins_cpu_usage_nonnegative CHECK (cpu_usage >= 0),
    memory_usage      bigint      CONSTRAINT plugins_memory_usage_nonnegative CHECK (memory_usage >= 0),
    installed_from    plugin_source,
    installed_by      text,
    installed_at      timestamptz,
    config_schema     jsonb       CONSTRAINT plugins_config_schema_object
                                  CHECK (config_schema IS NULL OR jsonb_typeof(config_schema) = 'object'),
    dependencies      text[]      NOT NULL DEFAULT '{}',
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT plugins_tenant_name_key UNIQUE (tenant_id, name),
    -- Target of the composite foreign keys below.
    CONSTRAINT plugins_id_tenant_key UNIQUE (id, tenant_id)
);

-- The seed's recommended index, verbatim in effect (not CONCURRENTLY: migrations run in a
-- transaction, and the table is empty when it is created).
CREATE INDEX idx_plugins_tenant_status_health
    ON plugins (tenant_id, status, health_score)
    WHERE tenant_id IS NOT NULL;
-- Partial: installed and enabled plugins only (what the monitor and dashboards list).
CREATE INDEX idx_plugins_tenant_active
    ON plugins (tenant_id, environment, name)
    WHERE enabled AND status = 'installed';
-- Resource usage tracking per tenant.
CREATE INDEX idx_plugins_tenant_resources
    ON plugins (tenant_id, cpu_usage DESC, memory_usage DESC);

-- Operations ------------------------------------------------------------------------------

CREATE TABLE plugin_operations (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id      text        NOT NULL,
    plugin_id      bigint      NOT NULL,
    environment    text        NOT NULL,
    operation_type text        NOT NULL
                               CONSTRAINT plugin_operations_type_check CHECK (operation_type IN (
                                   'install', 'uninstall', 'update', 'enable', 'disable',
                                   'configure', 'rollback', 'backup', 'restore', 'health_check')),
    status         text        NOT NULL DEFAULT 'pending'
                               CONSTRAINT plugin_operations_status_check CHECK (status IN (
                                   'pending', 'running', 'retrying', 'succeeded', 'failed',
                                   'cancelled')),
    retry_count    integer     NOT NULL DEFAULT 0
                               CONSTRAINT plugin_operations_retry_count_nonnegative CHECK (retry_count >= 0),
    retry_limit    integer     NOT NULL DEFAULT 3
                               CONSTRAINT plugin_operations_retry_limit_nonnegative CHECK (retry_limit >= 0),
    error          text,
    user_id        text,
    details        jsonb       NOT NULL DEFAULT '{}',
    started_at     timestamptz NOT NULL DEFAULT now(),
    finished_at    timestamptz,
    duration_ms    bigint      CONSTRAINT plugin_operations_duration_nonnegative CHECK (duration_ms >= 0),
    created_at     timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT plugin_operations_retry_within_limit CHECK (retry_count <= retry_limit),
    CONSTRAINT plugin_operations_finished_after_start CHECK (finished_at IS NULL OR finished_at >= started_at),
    -- Terminal states have a finish time; retention ("completed operations, 30 days") keys on it.
    CONSTRAINT plugin_operations_terminal_finished CHECK (
        (status IN ('succeeded', 'failed', 'cancelled')) = (finished_at IS NOT NULL)),
    -- CASCADE: the operation history belongs to the plugin; the durable trail of who deleted
    -- what lives in audit_log, which has no foreign key and outlives the plugin.
    CONSTRAINT plugin_operations_plugin_fkey FOREIGN KEY (plugin_id, tenant_id)
        REFERENCES plugins (id, tenant_id) ON DELETE CASCADE
);

-- The seed's recommended index, verbatim in effect.
CREATE INDEX idx_plugin_operations_env_type_status
    ON plugin_operations (environment, operation_type, status, started_at);
CREATE INDEX idx_plugin_operations_plugin_started
    ON plugin_operations (plugin_id, started_at DESC);
CREATE INDEX idx_plugin_operations_tenant_user
    ON plugin_operations (tenant_id, user_id, started_at DESC);
-- Status queries: what is still in flight.
CREATE INDEX idx_plugin_operations_open
    ON plugin_operations (tenant_id, status)
    WHERE status IN ('pending', 'running', 'retrying');
-- Retention of completed operations.
CREATE INDEX idx_plugin_operations_finished
    ON plugin_operations (finished_at)
    WHERE finished_at IS NOT NULL;

-- Configuration -----------------------------------------------------------------------------

-- One row per (plugin, environment, key, version); the newest version is_current. Values are
-- typed JSON checked against plugins.config_schema by the trigger below. Secrets are never
-- stored in clear: the application encrypts them (envelope encryption, key id recorded) and
-- stores the ciphertext; pgcrypto is not assumed to exist.
CREATE TABLE plugin_config (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id         text        NOT NULL,
    plugin_id         bigint      NOT NULL,
    environment       text        NOT NULL,
    key               text        NOT NULL CONSTRAINT plugin_config_key_nonempty CHECK (key <> ''),
    value             jsonb,
    is_secret         boolean     NOT NULL DEFAULT false,
    secret_ciphertext bytea,
    secret_key_id     text,
    version           integer     NOT NULL DEFAULT 1 CONSTRAINT plugin_config_version_positive CHECK (version >= 1),
    is_current        boolean     NOT NULL DEFAULT true,
    created_by        text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT plugin_config_secret_encrypted CHECK (
        NOT is_secret
        OR (value IS NULL AND secret_ciphertext IS NOT NULL AND octet_length(secret_ciphertext) > 0
            AND secret_key_id IS NOT NULL)),
    CONSTRAINT plugin_config_plain_value CHECK (
        is_secret OR (value IS NOT NULL AND secret_ciphertext IS NULL AND secret_key_id IS NULL)),
    CONSTRAINT plugin_config_version_key UNIQUE (plugin_id, environment, key, version),
    -- CASCADE: configuration has no meaning without its plugin.
    CONSTRAINT plugin_config_plugin_fkey FOREIGN KEY (plugin_id, tenant_id)
        REFERENCES plugins (id, tenant_id) ON DELETE CASCADE
);

-- Configuration retrieval by environment and key: exactly one current version.
CREATE UNIQUE INDEX idx_plugin_config_current
    ON plugin_config (plugin_id, environment, key)
    WHERE is_current;
-- Partial: non-secret configuration only, for the frequent plain reads.
CREATE INDEX idx_plugin_config_non_secret
    ON plugin_config (tenant_id, environment, key)
    WHERE is_current AND NOT is_secret;

-- Does ``value`` have JSON-schema type ``type_name``? (integer: a number with no fraction.)
CREATE FUNCTION pluginmon_json_type_matches(value jsonb, type_name text)
RETURNS boolean
LANGUAGE sql IMMUTABLE
AS $$
    SELECT CASE type_name
        WHEN 'integer' THEN jsonb_typeof(value) = 'number' AND value::text::numeric = trunc(value::text::numeric)
        WHEN 'number'  THEN jsonb_typeof(value) = 'number'
        ELSE jsonb_typeof(value) = type_name
    END
$$;

-- Row checks against the plugin's JSON schema: known key (when additionalProperties is false),
-- "type" (a name or a list of names), "enum". Secrets: only the key is checked.
CREATE FUNCTION pluginmon_plugin_config_validate() RETURNS trigger
LANGUAGE plpgsql
AS $$
DECLARE
    schema   jsonb;
    property jsonb;
    allowed  jsonb;
BEGIN
    SELECT p.config_schema INTO schema FROM plugins p WHERE p.id = NEW.plugin_id;
    IF schema IS NULL THEN
        RETURN NEW;
    END IF;
    property := schema -> 'properties' -> NEW.key;
    IF property IS NULL THEN
        IF schema -> 'additionalProperties' = 'false'::jsonb THEN
            RAISE EXCEPTION 'plugin_config: key "%" is not in the plugin''s config_schema', NEW.key
                USING ERRCODE = 'check_violation', CONSTRAINT = 'plugin_config_schema_key';
        END IF;
        RETURN NEW;
    END IF;
    IF NEW.is_secret THEN
        RETURN NEW;
    END IF;
    allowed := property -> 'type';
    IF allowed IS NOT NULL THEN
        IF jsonb_typeof(allowed) = 'string' THEN
            allowed := jsonb_build_array(allowed);
        END IF;
        IF NOT EXISTS (
            SELECT 1 FROM jsonb_array_elements_text(allowed) AS t(type_name)
            WHERE pluginmon_json_type_matches(NEW.value, t.type_name)
        ) THEN
            RAISE EXCEPTION 'plugin_config: value of "%" must be of type %, got %',
                    NEW.key, allowed, jsonb_typeof(NEW.value)
                USING ERRCODE = 'check_violation', CONSTRAINT = 'plugin_config_schema_type';
        END IF;
    END IF;
    IF property ? 'enum' AND NOT (property -> 'enum') @> jsonb_build_array(NEW.value) THEN
        RAISE EXCEPTION 'plugin_config: value of "%" must be one of %', NEW.key, property -> 'enum'
            USING ERRCODE = 'check_violation', CONSTRAINT = 'plugin_config_schema_enum';
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER plugin_config_validate
    BEFORE INSERT OR UPDATE OF key, value, is_secret, plugin_id ON plugin_config
    FOR EACH ROW EXECUTE FUNCTION pluginmon_plugin_config_validate();

-- Versioning: inserting a current value retires the previous current one and takes the next
-- version number, so history is kept without the caller computing versions.
CREATE FUNCTION pluginmon_plugin_config_version() RETURNS trigger
LANGUAGE plpgsql
AS $$
DECLARE
    previous integer;
BEGIN
    IF NOT NEW.is_current THEN
        RETURN NEW;
    END IF;
    -- Serialise concurrent writers of the same key on the plugin row.
    PERFORM 1 FROM plugins WHERE id = NEW.plugin_id FOR UPDATE;
    SELECT max(version) INTO previous
      FROM plugin_config
     WHERE plugin_id = NEW.plugin_id AND environment = NEW.environment AND key = NEW.key;
    IF previous IS NOT NULL THEN
        UPDATE plugin_config SET is_current = false
         WHERE plugin_id = NEW.plugin_id AND environment = NEW.environment AND key = NEW.key
           AND is_current;
        NEW.version := previous + 1;
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER plugin_config_version
    BEFORE INSERT ON plugin_config
    FOR EACH ROW EXECUTE FUNCTION pluginmon_plugin_config_version();

-- "required": checked at commit for every (plugin, environment) whose configuration changed,
-- so a configuration set is written in one transaction.
CREATE FUNCTION pluginmon_plugin_config_required() RETURNS trigger
LANGUAGE plpgsql
AS $$
DECLARE
    row_plugin_id bigint;
    row_environment text;
    missing text;
BEGIN
    IF TG_OP = 'DELETE' THEN
        row_plugin_id := OLD.plugin_id;
        row_environment := OLD.environment;
    ELSE
        row_plugin_id := NEW.plugin_id;
        row_environment := NEW.environment;
    END IF;
    SELECT string_agg(r.key, ', ' ORDER BY r.key) INTO missing
      FROM plugins p
     CROSS JOIN LATERAL jsonb_array_elements_text(
               CASE WHEN jsonb_typeof(p.config_schema -> 'required') = 'array'
                    THEN p.config_schema -> 'required' ELSE '[]'::jsonb END) AS r(key)
     WHERE p.id = row_plugin_id
       AND NOT EXISTS (
           SELECT 1 FROM plugin_config c
            WHERE c.plugin_id = row_plugin_id AND c.environment = row_environment
              AND c.key = r.key AND c.is_current
              AND (c.is_secret OR c.value <> 'null'::jsonb));
    IF missing IS NOT NULL THEN
        RAISE EXCEPTION 'plugin_config: plugin % environment "%" lacks required keys: %',
                row_plugin_id, row_environment, missing
            USING ERRCODE = 'check_violation', CONSTRAINT = 'plugin_config_schema_required';
    END IF;
    RETURN NULL;
END
$$;

CREATE CONSTRAINT TRIGGER plugin_config_required
    AFTER INSERT OR UPDATE OR DELETE ON plugin_config
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION pluginmon_plugin_config_required();

-- Dependencies ------------------------------------------------------------------------------

CREATE TABLE plugin_dependencies (
    id                   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id            text        NOT NULL,
    plugin_id            bigint      NOT NULL,
    depends_on_plugin_id bigint      NOT NULL,
    version_range        text        NOT NULL DEFAULT '*'
                                     CONSTRAINT plugin_dependencies_version_range_nonempty CHECK (version_range <> ''),
    kind                 text        NOT NULL DEFAULT 'runtime'
                                     CONSTRAINT plugin_dependencies_kind_check CHECK (kind IN ('runtime', 'dev')),
    satisfied            boolean     NOT NULL DEFAULT false,
    conflict             boolean     NOT NULL DEFAULT false,
    conflict_reason      text,
    resolved_version     text,
    checked_at           timestamptz,
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT plugin_dependencies_not_self CHECK (plugin_id <> depends_on_plugin_id),
    CONSTRAINT plugin_dependencies_conflict_unsatisfied CHECK (NOT (conflict AND satisfied)),
    CONSTRAINT plugin_dependencies_edge_key UNIQUE (plugin_id, depends_on_plugin_id, kind),
    -- CASCADE: a plugin's own dependency declarations go with it.
    CONSTRAINT plugin_dependencies_plugin_fkey FOREIGN KEY (plugin_id, tenant_id)
        REFERENCES plugins (id, tenant_id) ON DELETE CASCADE,
    -- RESTRICT: a plugin that others depend on cannot be deleted from under them; and the
    -- composite key keeps dependencies inside one tenant.
    CONSTRAINT plugin_dependencies_depends_on_fkey FOREIGN KEY (depends_on_plugin_id, tenant_id)
        REFERENCES plugins (id, tenant_id) ON DELETE RESTRICT
);

-- Partial: unsatisfied dependencies, for conflict resolution.
CREATE INDEX idx_plugin_dependencies_unsatisfied
    ON plugin_dependencies (tenant_id, plugin_id)
    WHERE NOT satisfied;
CREATE INDEX idx_plugin_dependencies_depends_on
    ON plugin_dependencies (depends_on_plugin_id);

-- Alerts ----------------------------------------------------------------------------------

CREATE TABLE plugin_alerts (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id         text        NOT NULL,
    plugin_id         bigint      NOT NULL,
    environment       text        NOT NULL,
    rule_name         text        NOT NULL,
    fingerprint       text        NOT NULL,
    severity          text        NOT NULL
                                  CONSTRAINT plugin_alerts_severity_check CHECK (severity IN ('info', 'warning', 'critical')),
    status            text        NOT NULL DEFAULT 'pending'
                                  CONSTRAINT plugin_alerts_status_check CHECK (status IN (
                                      'pending', 'firing', 'resolved', 'acknowledged', 'silenced')),
    inhibited         boolean     NOT NULL DEFAULT false,
    value             double precision,
    labels            jsonb       NOT NULL DEFAULT '{}',
    annotations       jsonb       NOT NULL DEFAULT '{}',
    started_at        timestamptz NOT NULL DEFAULT now(),
    fired_at          timestamptz,
    resolved_at       timestamptz,
    acknowledged_at   timestamptz,
    acknowledged_by   text,
    silenced_until    timestamptz,
    last_evaluated_at timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT plugin_alerts_resolved_at CHECK (status <> 'resolved' OR resolved_at IS NOT NULL),
    -- CASCADE: alerts describe the plugin; they have no meaning once it is gone.
    CONSTRAINT plugin_alerts_plugin_fkey FOREIGN KEY (plugin_id, tenant_id)
        REFERENCES plugins (id, tenant_id) ON DELETE CASCADE
);

-- At most one open (not resolved) alert per fingerprint.
CREATE UNIQUE INDEX idx_plugin_alerts_open_fingerprint
    ON plugin_alerts (fingerprint)
    WHERE status <> 'resolved';
-- Alert management by severity and status.
CREATE INDEX idx_plugin_alerts_tenant_severity_status
    ON plugin_alerts (tenant_id, severity, status, started_at DESC);
CREATE INDEX idx_plugin_alerts_plugin_started
    ON plugin_alerts (plugin_id, started_at DESC);

-- Audit -----------------------------------------------------------------------------------

-- No foreign keys on purpose: the audit trail must outlive the plugins (and tenants) it
-- describes, so it records names as well as ids. Retention: 2 years by default.
CREATE TABLE audit_log (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id   text        NOT NULL,
    occurred_at timestamptz NOT NULL DEFAULT now(),
    actor       text        NOT NULL,
    action      text        NOT NULL CONSTRAINT audit_log_action_nonempty CHECK (action <> ''),
    entity_type text        NOT NULL,
    entity_id   text,
    plugin_id   bigint,
    plugin_name text,
    environment text,
    outcome     text        NOT NULL DEFAULT 'success'
                            CONSTRAINT audit_log_outcome_check CHECK (outcome IN ('success', 'failure', 'denied')),
    request_id  text,
    details     jsonb       NOT NULL DEFAULT '{}'
);

CREATE INDEX idx_audit_log_tenant_occurred ON audit_log (tenant_id, occurred_at DESC);
CREATE INDEX idx_audit_log_entity ON audit_log (tenant_id, entity_type, entity_id);
CREATE INDEX idx_audit_log_occurred ON audit_log (occurred_at);

-- Backups and restore points ----------------------------------------------------------------

CREATE TABLE plugin_backups (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id    text        NOT NULL,
    plugin_id    bigint      NOT NULL,
    environment  text        NOT NULL,
    provider     text        NOT NULL
                             CONSTRAINT plugin_backups_provider_check CHECK (provider IN (
                                 's3', 'gcs', 'azure_blob', 'local', 'sftp', 'nfs')),
    location     text        NOT NULL CONSTRAINT plugin_backups_location_nonempty CHECK (location <> ''),
    checksum     text        CONSTRAINT plugin_backups_checksum_format
                             CHECK (checksum ~ '^(sha256|sha512|blake2b):[0-9a-f]+$'),
    size_bytes   bigint      CONSTRAINT plugin_backups_size_nonnegative CHECK (size_bytes >= 0),
    plugin_version text,
    status       text        NOT NULL DEFAULT 'pending'
                             CONSTRAINT plugin_backups_status_check CHECK (status IN (
                                 'pending', 'running', 'completed', 'failed', 'expired')),
    created_by   text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    completed_at timestamptz,
    verified_at  timestamptz,
    expires_at   timestamptz,
    CONSTRAINT plugin_backups_completed_has_checksum CHECK (status <> 'completed' OR checksum IS NOT NULL),
    CONSTRAINT plugin_backups_verified_after_completed CHECK (verified_at IS NULL OR completed_at IS NOT NULL),
    CONSTRAINT plugin_backups_id_tenant_key UNIQUE (id, tenant_id),
    -- RESTRICT: a backup points at data outside the database; deleting the plugin must not
    -- silently forget it. Expire or delete the backups first.
    CONSTRAINT plugin_backups_plugin_fkey FOREIGN KEY (plugin_id, tenant_id)
        REFERENCES plugins (id, tenant_id) ON DELETE RESTRICT
);

CREATE INDEX idx_plugin_backups_plugin_created ON plugin_backups (plugin_id, created_at DESC);
CREATE INDEX idx_plugin_backups_unverified
    ON plugin_backups (tenant_id, completed_at)
    WHERE status = 'completed' AND verified_at IS NULL;

CREATE TABLE plugin_restore_points (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id       text        NOT NULL,
    plugin_id       bigint      NOT NULL,
    backup_id       bigint      NOT NULL,
    environment     text        NOT NULL,
    label           text        NOT NULL,
    plugin_version  text,
    config_snapshot jsonb       NOT NULL DEFAULT '{}',
    provider        text        NOT NULL
                                CONSTRAINT plugin_restore_points_provider_check CHECK (provider IN (
                                    's3', 'gcs', 'azure_blob', 'local', 'sftp', 'nfs')),
    location        text        NOT NULL,
    checksum        text        CONSTRAINT plugin_restore_points_checksum_format
                                CHECK (checksum ~ '^(sha256|sha512|blake2b):[0-9a-f]+$'),
    status          text        NOT NULL DEFAULT 'available'
                                CONSTRAINT plugin_restore_points_status_check CHECK (status IN (
                                    'available', 'restoring', 'restored', 'invalid', 'expired')),
    verified_at     timestamptz,
    restored_at     timestamptz,
    created_by      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    -- RESTRICT both ways: a restore point is only useful with its backup and its plugin.
    CONSTRAINT plugin_restore_points_backup_fkey FOREIGN KEY (backup_id, tenant_id)
        REFERENCES plugin_backups (id, tenant_id) ON DELETE RESTRICT,
    CONSTRAINT plugin_restore_points_plugin_fkey FOREIGN KEY (plugin_id, tenant_id)
        REFERENCES plugins (id, tenant_id) ON DELETE RESTRICT
);

CREATE INDEX idx_plugin_restore_points_plugin ON plugin_restore_points (plugin_id, created_at DESC);
CREATE INDEX idx_plugin_restore_points_backup ON plugin_restore_points (backup_id);

-- Approvals -------------------------------------------------------------------------------

CREATE TABLE plugin_approvals (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id         text        NOT NULL,
    plugin_id         bigint      NOT NULL,
    environment       text        NOT NULL,
    request_type      text        NOT NULL
                                  CONSTRAINT plugin_approvals_request_type_check CHECK (request_type IN (
                                      'install', 'update', 'uninstall', 'enable', 'config_change')),
    requested_version text,
    status            text        NOT NULL DEFAULT 'pending'
                                  CONSTRAINT plugin_approvals_status_check CHECK (status IN (
                                      'pending', 'approved', 'rejected', 'expired', 'cancelled')),
    requested_by      text        NOT NULL,
    requested_at      timestamptz NOT NULL DEFAULT now(),
    decided_by        text,
    decided_at        timestamptz,
    reason            text,
    expires_at        timestamptz,
    CONSTRAINT plugin_approvals_decision CHECK (
        (status IN ('approved', 'rejected')) = (decided_by IS NOT NULL AND decided_at IS NOT NULL)),
    -- Four eyes: nobody approves their own request.
    CONSTRAINT plugin_approvals_not_self_approved CHECK (status <> 'approved' OR decided_by <> requested_by),
    -- CASCADE: an approval request is about the plugin and goes with it.
    CONSTRAINT plugin_approvals_plugin_fkey FOREIGN KEY (plugin_id, tenant_id)
        REFERENCES plugins (id, tenant_id) ON DELETE CASCADE
);

CREATE INDEX idx_plugin_approvals_pending
    ON plugin_approvals (tenant_id, requested_at)
    WHERE status = 'pending';
CREATE INDEX idx_plugin_approvals_plugin ON plugin_approvals (plugin_id, requested_at DESC);

-- Vulnerabilities ---------------------------------------------------------------------------

CREATE TABLE plugin_vulnerabilities (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id        text        NOT NULL,
    plugin_id        bigint      NOT NULL,
    plugin_version   text        NOT NULL DEFAULT '',
    vulnerability_id text        NOT NULL CONSTRAINT plugin_vulnerabilities_id_nonempty CHECK (vulnerability_id <> ''),
    severity         text        NOT NULL
                                 CONSTRAINT plugin_vulnerabilities_severity_check CHECK (severity IN (
                                     'unknown', 'low', 'medium', 'high', 'critical')),
    cvss_score       numeric(3, 1) CONSTRAINT plugin_vulnerabilities_cvss_range
                                 CHECK (cvss_score >= 0 AND cvss_score <= 10),
    status           text        NOT NULL DEFAULT 'open'
                                 CONSTRAINT plugin_vulnerabilities_status_check CHECK (status IN (
                                     'open', 'acknowledged', 'mitigated', 'fixed', 'false_positive')),
    title            text,
    description      text,
    affected_range   text,
    fixed_version    text,
    scanner          text,
    detected_at      timestamptz NOT NULL DEFAULT now(),
    resolved_at      timestamptz,
    CONSTRAINT plugin_vulnerabilities_key UNIQUE (plugin_id, plugin_version, vulnerability_id),
    -- CASCADE: findings are about the installed plugin.
    CONSTRAINT plugin_vulnerabilities_plugin_fkey FOREIGN KEY (plugin_id, tenant_id)
        REFERENCES plugins (id, tenant_id) ON DELETE CASCADE
);

CREATE INDEX idx_plugin_vulnerabilities_open
    ON plugin_vulnerabilities (tenant_id, severity, detected_at DESC)
    WHERE status IN ('open', 'acknowledged');

-- Usage analytics -----------------------------------------------------------------------------

-- Usage (not resource) analytics per period, written by the platform; kept 1 year like the
-- resource rollups.
CREATE TABLE plugin_analytics (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id      text        NOT NULL,
    plugin_id      bigint      NOT NULL,
    environment    text        NOT NULL,
    period         text        NOT NULL
                               CONSTRAINT plugin_analytics_period_check CHECK (period IN ('hour', 'day', 'week', 'month')),
    period_start   timestamptz NOT NULL,
    invocations    bigint      NOT NULL DEFAULT 0 CONSTRAINT plugin_analytics_invocations_nonnegative CHECK (invocations >= 0),
    errors         bigint      NOT NULL DEFAULT 0 CONSTRAINT plugin_analytics_errors_nonnegative CHECK (errors >= 0),
    active_users   bigint      NOT NULL DEFAULT 0 CONSTRAINT plugin_analytics_users_nonnegative CHECK (active_users >= 0),
    latency_ms_avg double precision CONSTRAINT plugin_analytics_latency_avg_nonnegative CHECK (latency_ms_avg >= 0),
    latency_ms_p50 double precision CONSTRAINT plugin_analytics_latency_p50_nonnegative CHECK (latency_ms_p50 >= 0),
    latency_ms_p95 double precision CONSTRAINT plugin_analytics_latency_p95_nonnegative CHECK (latency_ms_p95 >= 0),
    latency_ms_p99 double precision CONSTRAINT plugin_analytics_latency_p99_nonnegative CHECK (latency_ms_p99 >= 0),
    created_at     timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT plugin_analytics_errors_le_invocations CHECK (errors <= invocations),
    CONSTRAINT plugin_analytics_period_key UNIQUE (plugin_id, environment, period, period_start),
    -- CASCADE: usage figures of a deleted plugin are not kept.
    CONSTRAINT plugin_analytics_plugin_fkey FOREIGN KEY (plugin_id, tenant_id)
        REFERENCES plugins (id, tenant_id) ON DELETE CASCADE
);

CREATE INDEX idx_plugin_analytics_tenant_period ON plugin_analytics (tenant_id, period, period_start DESC);
CREATE INDEX idx_plugin_analytics_period_start ON plugin_analytics (period_start);

-- updated_at maintenance ------------------------------------------------------------------------

CREATE FUNCTION pluginmon_touch_updated_at() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    -- Only when the statement did not set it: callers with their own clock keep theirs.
    IF NEW.updated_at IS NOT DISTINCT FROM OLD.updated_at THEN
        NEW.updated_at := now();
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER tenants_touch BEFORE UPDATE ON tenants
    FOR EACH ROW EXECUTE FUNCTION pluginmon_touch_updated_at();
CREATE TRIGGER plugins_touch BEFORE UPDATE ON plugins
    FOR EACH ROW EXECUTE FUNCTION pluginmon_touch_updated_at();
CREATE TRIGGER plugin_dependencies_touch BEFORE UPDATE ON plugin_dependencies
    FOR EACH ROW EXECUTE FUNCTION pluginmon_touch_updated_at();
CREATE TRIGGER plugin_alerts_touch BEFORE UPDATE ON plugin_alerts
    FOR EACH ROW EXECUTE FUNCTION pluginmon_touch_updated_at();
