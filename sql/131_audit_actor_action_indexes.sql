-- 131: one actor's, or one action's, audit entries are read newest first from an index of
-- their own.
--
-- GET /api/v1/audit?actor=alice (who did what) and ?action=token.revoke (who revoked tokens)
-- are an audit log's everyday questions. Without an index on either column the server walked
-- the tenant's whole log backwards by id until it had a page: for an actor with a few entries
-- among millions, every one of them (tests/test_list_plans.py). With id as the last column
-- each index hands the entries over in order, under a generic plan too, as 127's target
-- index does. Each audited write updates two more indexes (one entry per write).
-- (Built under the migration's lock on audit_log: seconds for a log of millions of entries,
-- during which audited writes wait. Each statement through EXECUTE, as 123 says why.)
DO $$
BEGIN
    EXECUTE 'CREATE INDEX idx_audit_log_actor ON audit_log (tenant_id, actor, id)';
    EXECUTE 'CREATE INDEX idx_audit_log_action ON audit_log (tenant_id, action, id)';
END
$$;
