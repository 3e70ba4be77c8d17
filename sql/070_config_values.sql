-- 070 config values: plugin configuration through the API (registry/config_values.py) with
-- secrets under envelope encryption (registry/crypto.py). The triggers of 001 stay as the
-- backstop for writers that bypass the API; this file only adds what the API and the key
-- rotation need.

-- API requests (role pluginmon_api, row-level security) read and write configuration; the
-- versioning trigger retires the previous version with an UPDATE, as the caller.
GRANT SELECT, INSERT, UPDATE ON plugin_config TO pluginmon_api;

-- A rollback writes a new version whose value is that of an older one: which one.
ALTER TABLE plugin_config
    ADD COLUMN rollback_of integer
        CONSTRAINT plugin_config_rollback_of_positive CHECK (rollback_of >= 1);

-- A stored secret is format 1 of registry/crypto.py: the format byte, two nonces, the
-- wrapped data key and at least the GCM tag of the value (89 bytes). NOT VALID: rows written
-- before this release (when nothing encrypted) are left for `pluginmon secrets status` to
-- report, new and changed rows are checked.
ALTER TABLE plugin_config
    ADD CONSTRAINT plugin_config_secret_format CHECK (
        NOT is_secret OR (get_byte(secret_ciphertext, 0) = 1 AND octet_length(secret_ciphertext) >= 89)
    ) NOT VALID;

-- `pluginmon secrets rewrap` walks the secrets not yet under the primary key, in id order,
-- history included (a retired key must encrypt nothing at all).
CREATE INDEX idx_plugin_config_secret_key
    ON plugin_config (secret_key_id, id)
    WHERE is_secret;

-- The "required" check of 001 ran for every updated row, whatever changed; a rewrap of
-- 100,000 secrets changes only ciphertexts and key ids, which cannot affect it.
DROP TRIGGER plugin_config_required ON plugin_config;
CREATE CONSTRAINT TRIGGER plugin_config_required
    AFTER INSERT OR UPDATE OF plugin_id, environment, key, value, is_secret, is_current OR DELETE
    ON plugin_config
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION pluginmon_plugin_config_required();
