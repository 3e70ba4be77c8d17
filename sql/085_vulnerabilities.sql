-- 085 vulnerabilities: findings per (plugin, environment, scanner, vulnerability, package) with
-- a lifecycle (open, fixed when no longer matched, accepted with reason/actor/expiry,
-- suppressed by a VEX statement), the plugins' CycloneDX SBOMs for offline matching, and the
-- VEX statements that survive re-scans.

-- Findings: the seed's table, keyed per package and per source of truth (a scanner's report
-- replaces only what that scanner said; the offline matcher is the scanner 'osv-offline').
ALTER TABLE plugin_vulnerabilities
    ADD COLUMN environment     text NOT NULL DEFAULT 'production',
    ADD COLUMN package_name    text NOT NULL DEFAULT '',
    ADD COLUMN package_version text,
    ADD COLUMN ecosystem       text,
    ADD COLUMN cvss_vector     text,
    ADD COLUMN aliases         text[] NOT NULL DEFAULT '{}',
    ADD COLUMN last_seen_at    timestamptz,
    ADD COLUMN accepted_reason text,
    ADD COLUMN accepted_by     text,
    ADD COLUMN accepted_at     timestamptz,
    ADD COLUMN accepted_until  timestamptz,
    ADD COLUMN suppression     text;

UPDATE plugin_vulnerabilities SET scanner = '' WHERE scanner IS NULL;
ALTER TABLE plugin_vulnerabilities ALTER COLUMN scanner SET DEFAULT '',
                                   ALTER COLUMN scanner SET NOT NULL;

ALTER TABLE plugin_vulnerabilities DROP CONSTRAINT plugin_vulnerabilities_key;
ALTER TABLE plugin_vulnerabilities ADD CONSTRAINT plugin_vulnerabilities_finding_key
    UNIQUE (plugin_id, environment, scanner, vulnerability_id, package_name);

ALTER TABLE plugin_vulnerabilities DROP CONSTRAINT plugin_vulnerabilities_status_check;
ALTER TABLE plugin_vulnerabilities ADD CONSTRAINT plugin_vulnerabilities_status_check
    CHECK (status IN ('open', 'acknowledged', 'mitigated', 'fixed', 'false_positive',
                      'accepted', 'suppressed'));
-- An acceptance always says why, who and until when.
ALTER TABLE plugin_vulnerabilities ADD CONSTRAINT plugin_vulnerabilities_accepted_complete
    CHECK (status <> 'accepted'
           OR (accepted_reason IS NOT NULL AND accepted_reason <> '' AND accepted_by IS NOT NULL
               AND accepted_until IS NOT NULL));
ALTER TABLE plugin_vulnerabilities ADD CONSTRAINT plugin_vulnerabilities_environment_check
    CHECK (environment ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$');

CREATE INDEX idx_plugin_vulnerabilities_plugin
    ON plugin_vulnerabilities (plugin_id, environment, status, severity);
-- The maintenance job's expiry scan.
CREATE INDEX idx_plugin_vulnerabilities_accepted_until
    ON plugin_vulnerabilities (accepted_until) WHERE status = 'accepted';

-- One CycloneDX SBOM per plugin and environment (a new upload replaces it).
CREATE TABLE plugin_sboms (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id         text        NOT NULL,
    plugin_id         bigint      NOT NULL,
    environment       text        NOT NULL
                                  CONSTRAINT plugin_sboms_environment_check
                                  CHECK (environment ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$'),
    document          jsonb       NOT NULL,
    sha256            text        NOT NULL CONSTRAINT plugin_sboms_sha256_hex
                                  CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    -- The packages matched against advisories: [{"ecosystem","name","version","purl"}].
    components        jsonb       NOT NULL,
    component_count   integer     NOT NULL CHECK (component_count >= 0),
    subject_version   text,
    uploaded_at       timestamptz NOT NULL,
    uploaded_by       text        NOT NULL,
    -- Which advisory database (digest) it was last matched against; NULL = never, so the
    -- maintenance job scans it on its next run.
    scanned_at        timestamptz,
    scanned_db_digest text,
    CONSTRAINT plugin_sboms_key UNIQUE (plugin_id, environment),
    -- CASCADE: the SBOM describes the installed plugin.
    CONSTRAINT plugin_sboms_plugin_fkey FOREIGN KEY (plugin_id, tenant_id)
        REFERENCES plugins (id, tenant_id) ON DELETE CASCADE
);

-- CycloneDX VEX analyses (state not_affected, resolved, ...) per vulnerability and package
-- ('' = every package): applied to the findings after every import and scan.
CREATE TABLE plugin_vex_statements (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id        text        NOT NULL,
    plugin_id        bigint      NOT NULL,
    environment      text        NOT NULL,
    vulnerability_id text        NOT NULL CHECK (vulnerability_id <> ''),
    package_name     text        NOT NULL DEFAULT '',
    state            text        NOT NULL CONSTRAINT plugin_vex_statements_state_check
                                 CHECK (state IN ('resolved', 'resolved_with_pedigree', 'exploitable',
                                                  'in_triage', 'false_positive', 'not_affected')),
    justification    text,
    detail           text,
    recorded_at      timestamptz NOT NULL,
    recorded_by      text        NOT NULL,
    CONSTRAINT plugin_vex_statements_key UNIQUE (plugin_id, environment, vulnerability_id, package_name),
    CONSTRAINT plugin_vex_statements_plugin_fkey FOREIGN KEY (plugin_id, tenant_id)
        REFERENCES plugins (id, tenant_id) ON DELETE CASCADE
);

SELECT pluginmon_enable_tenant_rls('plugin_sboms');
SELECT pluginmon_enable_tenant_rls('plugin_vex_statements');

GRANT SELECT, INSERT, UPDATE ON plugin_vulnerabilities, plugin_sboms, plugin_vex_statements
    TO pluginmon_api;
