-- 102 tenant on workers, PostgreSQL backend: nothing to do. On Citus (102_tenant_on_workers.citus.sql)
-- this version makes the tenant check work where Citus evaluates it: on the workers.
SELECT 1;
