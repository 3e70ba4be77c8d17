-- 127: one target's audit entries are read newest first from an index of their own.
--
-- GET /api/v1/audit?target=operation/7 lists a target's entries by id, newest first. 001's
-- (tenant_id, entity_type, entity_id) finds them but not in that order: the server then
-- chose between reading them and sorting, and walking the whole log backwards by id until a
-- page was found, and a generic plan (which a prepared statement gets after five runs)
-- chose the walk: 6,002 rows read for one entry in a log of 6,000 (tests/test_list_plans.py).
-- With id as the last column the index hands the entries over in order, under either plan.
-- It replaces 001's index (the same leading columns), so an audited write updates no more
-- indexes than before. (Built under the migration's lock on audit_log: seconds for a log of
-- millions of entries. Each statement through EXECUTE, as 123 says why.)
DO $$
BEGIN
    EXECUTE 'CREATE INDEX idx_audit_log_target ON audit_log (tenant_id, entity_type, entity_id, id)';
    EXECUTE 'DROP INDEX IF EXISTS idx_audit_log_entity';
END
$$;
