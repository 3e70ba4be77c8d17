-- 123: the partial index of a tenant's open operations covers every open status, and the
-- API's list reads through it.
--
-- GET /api/v1/operations?status=pending (and the plugin's own list) filtered with
-- "($2 IS NULL OR o.status = $2)": under a generic plan no index on status applies, so the
-- few pending operations were found by reading every operation of the tenant, newest first
-- (bench/api.py: 1,855 pages for 7 rows after a minute of load, more with each operation
-- recorded). registry/operations.py now sends only the filters given, and for an open
-- status also this index's predicate as constants, which a generic plan can match. 001's
-- index left out awaiting_approval (030 added that status); the API lists it too.
-- (A plain DROP and CREATE: they lock plugin_operations until the migration commits, a short
-- while for a table of operations; CONCURRENTLY cannot run in the migration's transaction.
-- Each through EXECUTE: Citus sends an index's CREATE to the shards as the statement's text,
-- which in a file of two statements is both of them, and the workers refuse a prepared
-- statement of two commands.)
DO $$
BEGIN
    EXECUTE 'DROP INDEX IF EXISTS idx_plugin_operations_open';
    EXECUTE 'CREATE INDEX idx_plugin_operations_open ON plugin_operations (tenant_id, status)'
            ' WHERE status IN (''pending'', ''awaiting_approval'', ''running'', ''retrying'')';
END
$$;
