-- 103 tenant conflict keys, Citus backend: nothing to create. 100 appended tenant_id to every
-- key of a distributed table, so ON CONFLICT (tenant_id, ...) (what the statements name since
-- 103) matches those keys as they are.
SELECT 1;
