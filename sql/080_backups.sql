-- 080 backups: verification results, restore points bound to their backup's plugin, and the
-- grants the API role needs to register, verify and restore through /api/v1.

-- A restore point's backup must belong to the same plugin and tenant. 001's foreign key
-- carries (backup_id, tenant_id) only, so a restore point of plugin A could name plugin B's
-- backup; this one carries plugin_id too. NOT VALID first so that it holds for every new row
-- at once; existing rows are then checked, and a database that already holds such a mix-up
-- keeps running (with a warning) rather than failing its upgrade.
ALTER TABLE plugin_backups
    ADD CONSTRAINT plugin_backups_id_plugin_tenant_key UNIQUE (id, plugin_id, tenant_id);
ALTER TABLE plugin_restore_points
    ADD CONSTRAINT plugin_restore_points_backup_plugin_fkey
        FOREIGN KEY (backup_id, plugin_id, tenant_id)
        REFERENCES plugin_backups (id, plugin_id, tenant_id) ON DELETE RESTRICT NOT VALID;
DO $$
BEGIN
    ALTER TABLE plugin_restore_points VALIDATE CONSTRAINT plugin_restore_points_backup_plugin_fkey;
EXCEPTION WHEN foreign_key_violation THEN
    RAISE WARNING 'plugin_restore_points holds restore points whose backup is another plugin''s; '
                  'new ones are refused, the existing ones need fixing by hand';
END
$$;

-- The latest verification of each backup, for the scheduler (what is due) and the rules.
-- verified_at (001) stays "last successful verification".
ALTER TABLE plugin_backups
    ADD COLUMN last_verification_at     timestamptz,
    ADD COLUMN last_verification_status text
        CONSTRAINT plugin_backups_last_verification_status_check
        CHECK (last_verification_status IN ('verified', 'failed', 'unverifiable')),
    ADD COLUMN last_verification_result text,
    ADD COLUMN last_verification_transient boolean NOT NULL DEFAULT false,
    ADD COLUMN last_verification_reason text;

CREATE INDEX idx_plugin_backups_verification_due
    ON plugin_backups (provider, last_verification_at NULLS FIRST)
    WHERE status = 'completed';
CREATE INDEX idx_plugin_backups_expires
    ON plugin_backups (expires_at)
    WHERE expires_at IS NOT NULL;

-- Every verification (the endpoint's and the scheduler's): what was read and what it gave.
-- CASCADE: the history is about the backup record and goes with it when retention removes it.
CREATE TABLE plugin_backup_verifications (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id           text        NOT NULL,
    plugin_id           bigint      NOT NULL,
    backup_id           bigint      NOT NULL,
    started_at          timestamptz NOT NULL,
    duration_ms         integer     CONSTRAINT plugin_backup_verifications_duration_nonnegative
                                    CHECK (duration_ms >= 0),
    status              text        NOT NULL
                                    CONSTRAINT plugin_backup_verifications_status_check
                                    CHECK (status IN ('verified', 'failed', 'unverifiable')),
    result              text        NOT NULL
                                    CONSTRAINT plugin_backup_verifications_result_format
                                    CHECK (result ~ '^[a-z_]{1,40}$'),
    transient           boolean     NOT NULL DEFAULT false,
    reason              text,
    observed_size_bytes bigint,
    observed_checksum   text        CONSTRAINT plugin_backup_verifications_checksum_format
                                    CHECK (observed_checksum ~ '^sha256:[0-9a-f]{64}$'),
    actor               text        NOT NULL,
    CONSTRAINT plugin_backup_verifications_backup_fkey FOREIGN KEY (backup_id, plugin_id, tenant_id)
        REFERENCES plugin_backups (id, plugin_id, tenant_id) ON DELETE CASCADE
);

CREATE INDEX idx_plugin_backup_verifications_backup
    ON plugin_backup_verifications (backup_id, started_at DESC);

SELECT pluginmon_enable_tenant_rls('plugin_backup_verifications');

GRANT SELECT, INSERT, UPDATE ON plugin_backups, plugin_restore_points TO pluginmon_api;
GRANT SELECT, INSERT ON plugin_backup_verifications TO pluginmon_api;
