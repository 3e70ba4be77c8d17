-- 031 audit expire execute, Citus backend: 031_audit_expire_execute.sql with the grant kept on
-- the coordinator.
--
-- Citus propagates GRANT ... ON FUNCTION to the workers over a connection as the current
-- user, and the common file grants while acting as pluginmon_audit_retention, a NOLOGIN role:
-- the worker refuses the connection. pluginmon_audit_expire() runs on the coordinator only
-- (the maintenance job calls it there), so the grant is not propagated.
SET LOCAL citus.enable_ddl_propagation TO off;
GRANT pluginmon_audit_retention TO CURRENT_USER;
SET LOCAL ROLE pluginmon_audit_retention;
GRANT EXECUTE ON FUNCTION pluginmon_audit_expire(timestamptz) TO SESSION_USER;
RESET ROLE;
REVOKE pluginmon_audit_retention FROM CURRENT_USER;
