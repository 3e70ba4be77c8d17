-- 030 api: the management API's tables and rules. API tokens (hashes only), per-environment
-- plugin state, the operation lifecycle (approval gate, retries with backoff, deadline),
-- approvals with one decision row per identity, and the append-only, hash-chained audit log.
--
-- Roles (cluster-wide, created when missing, like 003's):
--   * pluginmon_api: what every API request runs as (SET LOCAL ROLE inside its transaction),
--     subject to row-level security with pluginmon.tenant_id set to the token's tenant. It is
--     a member of neither tenant group, so pluginmon_current_tenant() follows the setting.
--   * pluginmon_audit_retention: owns pluginmon_audit_expire(), the only way audit rows are
--     ever deleted. The audit_log trigger refuses every UPDATE, and every DELETE by anyone
--     else, the table owner included (short of disabling triggers, which the hash chain and
--     `pluginmon audit verify` then expose).

DO $$
DECLARE
    role_to_create text;
BEGIN
    FOREACH role_to_create IN ARRAY ARRAY['pluginmon_api', 'pluginmon_audit_retention'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = role_to_create) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', role_to_create);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL;
            END;
        END IF;
    END LOOP;
    -- The daemon's login (the migrating role) switches to pluginmon_api per request.
    IF NOT (SELECT r.rolsuper FROM pg_roles r WHERE r.rolname = current_user) THEN
        EXECUTE format('GRANT pluginmon_api TO %I', current_user);
    END IF;
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO pluginmon_api, pluginmon_audit_retention',
                   current_schema());
END
$$;

-- Tokens --------------------------------------------------------------------------------------

-- A token is "pmt_<key_id>_<secret>": key_id finds the row, the SHA-256 of the 32 random
-- secret bytes is compared in constant time by the application. The secret is never stored.
-- Names are never reused (revoked tokens keep theirs), so a name in the audit trail or on an
-- approval always means one token.
CREATE TABLE api_tokens (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name          text        NOT NULL
                              CONSTRAINT api_tokens_name_format
                              CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9._@:-]{0,127}$'),
    -- NULL: an operator token, which names the tenant per request.
    tenant_id     text        REFERENCES tenants (id) ON DELETE RESTRICT,
    role          text        NOT NULL
                              CONSTRAINT api_tokens_role_check CHECK (role IN ('reader', 'writer', 'admin')),
    key_id        text        NOT NULL CONSTRAINT api_tokens_key_id_format CHECK (key_id ~ '^[0-9a-f]{16}$'),
    secret_sha256 bytea       NOT NULL CONSTRAINT api_tokens_secret_sha256_length CHECK (octet_length(secret_sha256) = 32),
    created_by    text        NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    revoked_at    timestamptz,
    revoked_by    text,
    CONSTRAINT api_tokens_name_key UNIQUE (name),
    CONSTRAINT api_tokens_key_id_key UNIQUE (key_id),
    CONSTRAINT api_tokens_revoked CHECK ((revoked_at IS NULL) = (revoked_by IS NULL))
);

-- Row security like every tenant table; no grants at all: only the daemon's own role reads
-- tokens (before it switches to pluginmon_api) and only the CLI writes them.
ALTER TABLE api_tokens ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON api_tokens
    USING (tenant_id = (SELECT pluginmon_current_tenant()));

-- Per-environment plugin state ------------------------------------------------------------------

-- plugins has one row per (tenant, name); what runs where is per environment: 2.0 in staging
-- and 1.4 in production. Succeeded operations move it; the daemon keeps the health columns.
CREATE TABLE plugin_environments (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id         text        NOT NULL,
    plugin_id         bigint      NOT NULL,
    environment       text        NOT NULL
                                  CONSTRAINT plugin_environments_environment_format
                                  CHECK (environment ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$'),
    version           text,
    status            text        NOT NULL DEFAULT 'installed'
                                  CONSTRAINT plugin_environments_status_check CHECK (status IN (
                                      'discovered', 'installing', 'installed', 'updating',
                                      'failed', 'uninstalling', 'uninstalled')),
    enabled           boolean     NOT NULL DEFAULT true,
    health_score      real        CONSTRAINT plugin_environments_health_score_range
                                  CHECK (health_score >= 0 AND health_score <= 100),
    last_health_check timestamptz,
    cpu_usage         double precision
                                  CONSTRAINT plugin_environments_cpu_usage_nonnegative CHECK (cpu_usage >= 0),
    memory_usage      bigint      CONSTRAINT plugin_environments_memory_usage_nonnegative CHECK (memory_usage >= 0),
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT plugin_environments_plugin_environment_key UNIQUE (plugin_id, environment),
    -- CASCADE: an environment's state is part of the plugin.
    CONSTRAINT plugin_environments_plugin_fkey FOREIGN KEY (plugin_id, tenant_id)
        REFERENCES plugins (id, tenant_id) ON DELETE CASCADE
);

CREATE INDEX idx_plugin_environments_tenant_environment
    ON plugin_environments (tenant_id, environment, status);

SELECT pluginmon_enable_tenant_rls('plugin_environments');

-- Operations ------------------------------------------------------------------------------------

-- started_at: when the current (or last) attempt started running (the creation time until
-- then); duration_ms: finished_at - started_at of the last attempt, set with finished_at.
-- deadline_at: first start + deadline_seconds; past it the daemon fails the operation with
-- status_reason 'deadline_exceeded'. not_before: a retry waits for its backoff. updated_at is
-- set by the writer (registry.operations), whose clock the tests control: no touch trigger.
ALTER TABLE plugin_operations
    ADD COLUMN requested_by_token_id bigint,
    ADD COLUMN target_version        text,
    ADD COLUMN deadline_seconds      integer
        CONSTRAINT plugin_operations_deadline_positive CHECK (deadline_seconds > 0),
    ADD COLUMN deadline_at           timestamptz,
    ADD COLUMN not_before            timestamptz,
    ADD COLUMN status_reason         text,
    ADD COLUMN updated_at            timestamptz NOT NULL DEFAULT now(),
    ADD CONSTRAINT plugin_operations_id_tenant_key UNIQUE (id, tenant_id);

ALTER TABLE plugin_operations DROP CONSTRAINT plugin_operations_status_check;
ALTER TABLE plugin_operations ADD CONSTRAINT plugin_operations_status_check CHECK (status IN (
    'pending', 'awaiting_approval', 'running', 'retrying', 'succeeded', 'failed', 'cancelled'));

-- What the daemon sweeps: open operations by deadline, and stuck detection.
CREATE INDEX idx_plugin_operations_active_deadline
    ON plugin_operations (deadline_at)
    WHERE status IN ('pending', 'running', 'awaiting_approval');
CREATE INDEX idx_plugin_operations_tenant_created
    ON plugin_operations (tenant_id, created_at DESC);

-- Approvals ----------------------------------------------------------------------------------------

ALTER TABLE plugin_approvals
    ADD COLUMN operation_id          bigint,
    ADD COLUMN required_approvals    integer NOT NULL DEFAULT 1
        CONSTRAINT plugin_approvals_required_positive CHECK (required_approvals >= 1),
    ADD COLUMN requested_by_token_id bigint,
    ADD CONSTRAINT plugin_approvals_id_tenant_key UNIQUE (id, tenant_id),
    -- CASCADE: the approval gates this operation and nothing else.
    ADD CONSTRAINT plugin_approvals_operation_fkey FOREIGN KEY (operation_id, tenant_id)
        REFERENCES plugin_operations (id, tenant_id) ON DELETE CASCADE;

-- Every operation type can be gated by a policy.
ALTER TABLE plugin_approvals DROP CONSTRAINT plugin_approvals_request_type_check;
ALTER TABLE plugin_approvals ADD CONSTRAINT plugin_approvals_request_type_check CHECK (request_type IN (
    'install', 'update', 'uninstall', 'enable', 'config_change', 'disable', 'configure',
    'rollback', 'backup', 'restore', 'health_check'));

CREATE UNIQUE INDEX idx_plugin_approvals_operation
    ON plugin_approvals (operation_id)
    WHERE operation_id IS NOT NULL;
CREATE INDEX idx_plugin_approvals_pending_expiry
    ON plugin_approvals (expires_at)
    WHERE status = 'pending';

-- One row per identity (token) that decided. required_approvals distinct approvers approve;
-- one rejection rejects.
CREATE TABLE plugin_approval_decisions (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id           text        NOT NULL,
    approval_id         bigint      NOT NULL,
    decision            text        NOT NULL
                                    CONSTRAINT plugin_approval_decisions_decision_check
                                    CHECK (decision IN ('approved', 'rejected')),
    decided_by          text        NOT NULL,
    decided_by_token_id bigint      NOT NULL,
    comment             text        NOT NULL DEFAULT '',
    decided_at          timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT plugin_approval_decisions_identity_key UNIQUE (approval_id, decided_by_token_id),
    -- CASCADE: decisions belong to their approval.
    CONSTRAINT plugin_approval_decisions_approval_fkey FOREIGN KEY (approval_id, tenant_id)
        REFERENCES plugin_approvals (id, tenant_id) ON DELETE CASCADE
);

-- Four eyes in the database too: the requesting token never decides its own request.
CREATE FUNCTION pluginmon_approval_decision_check() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM plugin_approvals a
                WHERE a.id = NEW.approval_id
                  AND (a.requested_by_token_id = NEW.decided_by_token_id
                       OR a.requested_by = NEW.decided_by)) THEN
        RAISE EXCEPTION 'plugin_approval_decisions: the requester cannot decide approval %',
                NEW.approval_id
            USING ERRCODE = 'check_violation', CONSTRAINT = 'plugin_approval_decisions_not_requester';
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER plugin_approval_decisions_check
    BEFORE INSERT OR UPDATE ON plugin_approval_decisions
    FOR EACH ROW EXECUTE FUNCTION pluginmon_approval_decision_check();

SELECT pluginmon_enable_tenant_rls('plugin_approval_decisions');

-- Audit: hash chain -----------------------------------------------------------------------------------

-- Each tenant's entries form hash chains: an entry takes a lane (0, 1, 2...) of its tenant;
-- within a (tenant, lane) chain seq counts 1, 2, 3..., prev_hash is the previous entry's
-- entry_hash (the anchor's for the first kept entry) and entry_hash is SHA-256 over a
-- canonical, length-prefixed encoding of every column (pluginmon_audit_entry_hash;
-- registry/audit.py recomputes it independently). A changed row breaks its own hash, a
-- removed or reordered row breaks the sequence and the links, a removed tail no longer meets
-- the head.
--
-- Why lanes: appending locks the lane's head until commit, and a commit waits for the WAL
-- flush. With one chain per tenant, a tenant's writes would commit strictly one after another
-- (about one per flush). An entry takes the first lane no other transaction holds (SKIP
-- LOCKED), so concurrent requests chain side by side; sequential ones all use lane 0.
-- Verification checks each lane from its anchor to its head.
ALTER TABLE audit_log
    ADD COLUMN source_address text,
    ADD COLUMN before_state   jsonb,
    ADD COLUMN after_state    jsonb,
    ADD COLUMN lane           smallint,
    ADD COLUMN seq            bigint,
    ADD COLUMN prev_hash      bytea,
    ADD COLUMN entry_hash     bytea;

-- Per (tenant, lane): the head (last entry) and the anchor (last entry removed by retention).
-- Only the owner and the retention role touch it.
CREATE TABLE audit_chain (
    tenant_id   text        NOT NULL,
    lane        smallint    NOT NULL DEFAULT 0
                            CONSTRAINT audit_chain_lane_range CHECK (lane >= 0 AND lane < 64),
    head_seq    bigint      NOT NULL DEFAULT 0 CONSTRAINT audit_chain_head_nonnegative CHECK (head_seq >= 0),
    head_hash   bytea       NOT NULL DEFAULT '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea,
    anchor_seq  bigint      NOT NULL DEFAULT 0 CONSTRAINT audit_chain_anchor_nonnegative CHECK (anchor_seq >= 0),
    anchor_hash bytea       NOT NULL DEFAULT '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea,
    anchored_at timestamptz,
    CONSTRAINT audit_chain_pkey PRIMARY KEY (tenant_id, lane),
    CONSTRAINT audit_chain_anchor_not_past_head CHECK (anchor_seq <= head_seq)
);
ALTER TABLE audit_chain ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON audit_chain
    USING (tenant_id = (SELECT pluginmon_current_tenant()));

-- One field of the canonical encoding: N; for NULL, else <bytes>:<text>;
CREATE FUNCTION pluginmon_audit_field(value text) RETURNS text
LANGUAGE sql IMMUTABLE
AS $$
    SELECT CASE WHEN value IS NULL THEN 'N;' ELSE octet_length(value)::text || ':' || value || ';' END
$$;

CREATE FUNCTION pluginmon_audit_entry_hash(entry audit_log) RETURNS bytea
LANGUAGE sql STABLE
AS $$
    SELECT sha256(convert_to(
        'pluginmon-audit-v1;'
        || pluginmon_audit_field(entry.lane::text)
        || pluginmon_audit_field(entry.seq::text)
        || pluginmon_audit_field(entry.id::text)
        || pluginmon_audit_field(entry.tenant_id)
        || pluginmon_audit_field(((extract(epoch FROM entry.occurred_at) * 1000000)::bigint)::text)
        || pluginmon_audit_field(entry.actor)
        || pluginmon_audit_field(entry.action)
        || pluginmon_audit_field(entry.entity_type)
        || pluginmon_audit_field(entry.entity_id)
        || pluginmon_audit_field(entry.plugin_id::text)
        || pluginmon_audit_field(entry.plugin_name)
        || pluginmon_audit_field(entry.environment)
        || pluginmon_audit_field(entry.outcome)
        || pluginmon_audit_field(entry.request_id)
        || pluginmon_audit_field(entry.source_address)
        || pluginmon_audit_field(entry.details::text)
        || pluginmon_audit_field(entry.before_state::text)
        || pluginmon_audit_field(entry.after_state::text)
        || pluginmon_audit_field(encode(entry.prev_hash, 'hex')),
        'UTF8'))
$$;

-- Chain the entries that exist already: lane 0 of their tenant, in time order.
DO $$
DECLARE
    entry audit_log;
    previous_tenant text := NULL;
    position bigint := 0;
    previous bytea;
    genesis constant bytea := '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea;
BEGIN
    FOR entry IN SELECT * FROM audit_log ORDER BY tenant_id, occurred_at, id LOOP
        IF previous_tenant IS DISTINCT FROM entry.tenant_id THEN
            IF previous_tenant IS NOT NULL THEN
                INSERT INTO audit_chain (tenant_id, lane, head_seq, head_hash)
                    VALUES (previous_tenant, 0, position, previous);
            END IF;
            previous_tenant := entry.tenant_id;
            position := 0;
            previous := genesis;
        END IF;
        position := position + 1;
        entry.lane := 0;
        entry.seq := position;
        entry.prev_hash := previous;
        entry.entry_hash := pluginmon_audit_entry_hash(entry);
        UPDATE audit_log
           SET lane = 0, seq = entry.seq, prev_hash = entry.prev_hash, entry_hash = entry.entry_hash
         WHERE id = entry.id;
        previous := entry.entry_hash;
    END LOOP;
    IF previous_tenant IS NOT NULL THEN
        INSERT INTO audit_chain (tenant_id, lane, head_seq, head_hash)
            VALUES (previous_tenant, 0, position, previous);
    END IF;
END
$$;

ALTER TABLE audit_log
    ALTER COLUMN lane SET NOT NULL,
    ALTER COLUMN seq SET NOT NULL,
    ALTER COLUMN prev_hash SET NOT NULL,
    ALTER COLUMN entry_hash SET NOT NULL,
    ADD CONSTRAINT audit_log_tenant_lane_seq_key UNIQUE (tenant_id, lane, seq),
    ADD CONSTRAINT audit_log_seq_positive CHECK (seq >= 1);

-- Every insert takes the next link of a lane, whatever the inserter supplied for lane, seq
-- and the hashes. SECURITY DEFINER: the chain heads are the owner's; an API request
-- (pluginmon_api) or the retention role appends through it. The lane: one this transaction
-- holds already, or the first one nobody holds. A tenant's 16 lanes are created together
-- when none is free (its first entry; or lane 0 alone, from before lanes, is busy): lanes
-- created one at a time would be invisible to concurrent writers until commit, and those would
-- queue on the creating transaction instead of taking another lane. When all 16 are held, it
-- waits for one. A transaction that holds a lane of the tenant never waits for another.
CREATE FUNCTION pluginmon_audit_log_chain() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
AS $$
DECLARE
    head audit_chain;
BEGIN
    SELECT * INTO head FROM audit_chain WHERE tenant_id = NEW.tenant_id
     ORDER BY lane LIMIT 1 FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        INSERT INTO audit_chain (tenant_id, lane)
        SELECT NEW.tenant_id, lane FROM generate_series(0, 15) AS lane
            ON CONFLICT (tenant_id, lane) DO NOTHING;
        SELECT * INTO head FROM audit_chain WHERE tenant_id = NEW.tenant_id
         ORDER BY lane LIMIT 1 FOR UPDATE SKIP LOCKED;
        IF NOT FOUND THEN
            SELECT * INTO head FROM audit_chain
             WHERE tenant_id = NEW.tenant_id AND lane = floor(random() * 16)::smallint
               FOR UPDATE;
        END IF;
    END IF;
    NEW.lane := head.lane;
    NEW.seq := head.head_seq + 1;
    NEW.prev_hash := head.head_hash;
    NEW.entry_hash := pluginmon_audit_entry_hash(NEW);
    UPDATE audit_chain SET head_seq = NEW.seq, head_hash = NEW.entry_hash
     WHERE tenant_id = NEW.tenant_id AND lane = head.lane;
    RETURN NEW;
END
$$;

CREATE TRIGGER audit_log_chain
    BEFORE INSERT ON audit_log
    FOR EACH ROW EXECUTE FUNCTION pluginmon_audit_log_chain();

-- Append-only: no UPDATE ever; DELETE only inside pluginmon_audit_expire() (whose owner is
-- the retention role, so current_user says who is deleting); no TRUNCATE.
CREATE FUNCTION pluginmon_audit_log_append_only() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF TG_OP = 'DELETE' AND current_user = 'pluginmon_audit_retention' THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'audit_log is append-only: % is not allowed (entries leave only through retention, pluginmon_audit_expire)', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;

CREATE TRIGGER audit_log_append_only
    BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION pluginmon_audit_log_append_only();
CREATE TRIGGER audit_log_no_truncate
    BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION pluginmon_audit_log_append_only();

-- Retention: per (tenant, lane) chain, delete the longest prefix older than ``horizon``
-- (never a hole in the middle: entries are chained in insertion order, not by occurred_at),
-- move the anchor to the last removed entry, and record the run as one entry of each tenant
-- whose entries it removed. A chain whose cut entry is missing is left alone with a warning:
-- retention must not erase evidence of tampering. Returns the number of entries removed.
CREATE FUNCTION pluginmon_audit_expire(horizon timestamptz) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER
AS $$
DECLARE
    chain record;
    cut bigint;
    cut_hash bytea;
    removed bigint;
    tenant_removed bigint := 0;
    tenant_lanes jsonb := '{}';
    current_tenant text := NULL;
    total bigint := 0;
BEGIN
    -- Every head is locked first, in one order, so that appends wait rather than deadlock.
    PERFORM 1 FROM audit_chain ORDER BY tenant_id, lane FOR UPDATE;
    FOR chain IN SELECT c.tenant_id, c.lane, c.anchor_seq, c.head_seq FROM audit_chain c
                  ORDER BY c.tenant_id, c.lane LOOP
        IF current_tenant IS DISTINCT FROM chain.tenant_id THEN
            IF tenant_removed > 0 THEN
                INSERT INTO audit_log (tenant_id, actor, action, entity_type, details)
                VALUES (current_tenant, 'daemon', 'audit.expire', 'audit_log',
                        jsonb_build_object('removed', tenant_removed, 'anchors', tenant_lanes,
                                           'horizon', horizon));
            END IF;
            current_tenant := chain.tenant_id;
            tenant_removed := 0;
            tenant_lanes := '{}';
        END IF;
        SELECT min(l.seq) - 1 INTO cut FROM audit_log l
         WHERE l.tenant_id = chain.tenant_id AND l.lane = chain.lane AND l.occurred_at >= horizon;
        IF cut IS NULL THEN
            cut := chain.head_seq;
        END IF;
        CONTINUE WHEN cut <= chain.anchor_seq;
        SELECT l.entry_hash INTO cut_hash FROM audit_log l
         WHERE l.tenant_id = chain.tenant_id AND l.lane = chain.lane AND l.seq = cut;
        IF cut_hash IS NULL THEN
            RAISE WARNING 'audit retention: tenant % lane % has no entry % in its chain; nothing removed (run pluginmon audit verify)',
                chain.tenant_id, chain.lane, cut;
            CONTINUE;
        END IF;
        DELETE FROM audit_log l
         WHERE l.tenant_id = chain.tenant_id AND l.lane = chain.lane AND l.seq <= cut;
        GET DIAGNOSTICS removed = ROW_COUNT;
        UPDATE audit_chain SET anchor_seq = cut, anchor_hash = cut_hash, anchored_at = now()
         WHERE tenant_id = chain.tenant_id AND lane = chain.lane;
        tenant_removed := tenant_removed + removed;
        tenant_lanes := tenant_lanes || jsonb_build_object(chain.lane::text, cut);
        total := total + removed;
    END LOOP;
    IF tenant_removed > 0 THEN
        INSERT INTO audit_log (tenant_id, actor, action, entity_type, details)
        VALUES (current_tenant, 'daemon', 'audit.expire', 'audit_log',
                jsonb_build_object('removed', tenant_removed, 'anchors', tenant_lanes,
                                   'horizon', horizon));
    END IF;
    RETURN total;
END
$$;

-- The retention role reads and deletes every tenant's entries (permissive policies add to the
-- tenant one) and appends its own record of the run.
GRANT SELECT, INSERT, DELETE ON audit_log TO pluginmon_audit_retention;
GRANT SELECT, UPDATE ON audit_chain TO pluginmon_audit_retention;
CREATE POLICY audit_retention ON audit_log TO pluginmon_audit_retention USING (true) WITH CHECK (true);
CREATE POLICY audit_retention ON audit_chain TO pluginmon_audit_retention USING (true) WITH CHECK (true);

-- Pin search paths (SECURITY DEFINER functions above all), hand the retention function to
-- the retention role, and let only the daemon's role call it. ALTER ... OWNER needs the new
-- owner to be SET-able and to have CREATE on the schema: granted for the moment, then taken
-- back, so that afterwards nobody but a superuser can act as the retention role.
DO $$
DECLARE
    me name := current_user;
    superuser boolean := (SELECT r.rolsuper FROM pg_roles r WHERE r.rolname = current_user);
    schema_name text := current_schema();
BEGIN
    EXECUTE format('ALTER FUNCTION pluginmon_audit_log_chain() SET search_path = pg_catalog, %I', schema_name);
    EXECUTE format('ALTER FUNCTION pluginmon_audit_expire(timestamptz) SET search_path = pg_catalog, %I', schema_name);
    EXECUTE format('ALTER FUNCTION pluginmon_audit_entry_hash(audit_log) SET search_path = pg_catalog, %I', schema_name);
    EXECUTE format('ALTER FUNCTION pluginmon_audit_field(text) SET search_path = pg_catalog, %I', schema_name);
    EXECUTE format('ALTER FUNCTION pluginmon_audit_log_append_only() SET search_path = pg_catalog, %I', schema_name);
    EXECUTE format('ALTER FUNCTION pluginmon_approval_decision_check() SET search_path = pg_catalog, %I', schema_name);
    REVOKE ALL ON FUNCTION pluginmon_audit_expire(timestamptz) FROM PUBLIC;
    EXECUTE format('GRANT EXECUTE ON FUNCTION pluginmon_audit_expire(timestamptz) TO %I', me);
    REVOKE ALL ON FUNCTION pluginmon_audit_log_chain() FROM PUBLIC;
    IF NOT superuser THEN
        EXECUTE format('GRANT pluginmon_audit_retention TO %I', me);
        EXECUTE format('GRANT CREATE ON SCHEMA %I TO pluginmon_audit_retention', schema_name);
    END IF;
    ALTER FUNCTION pluginmon_audit_expire(timestamptz) OWNER TO pluginmon_audit_retention;
    IF NOT superuser THEN
        EXECUTE format('REVOKE CREATE ON SCHEMA %I FROM pluginmon_audit_retention', schema_name);
        EXECUTE format('REVOKE pluginmon_audit_retention FROM %I', me);
    END IF;
END
$$;

-- What an API request may do, under row-level security (the tenant_isolation policies).
GRANT SELECT ON tenants TO pluginmon_api;
GRANT SELECT, INSERT, UPDATE ON plugins, plugin_environments, plugin_operations, plugin_approvals
    TO pluginmon_api;
GRANT SELECT, INSERT ON plugin_approval_decisions TO pluginmon_api;
GRANT SELECT, UPDATE ON plugin_alerts TO pluginmon_api;
GRANT SELECT, INSERT, UPDATE ON alert_silences TO pluginmon_api;
GRANT SELECT, INSERT ON audit_log TO pluginmon_api;
