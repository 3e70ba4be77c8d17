-- 031 audit expire execute: give the daemon's role back EXECUTE on pluginmon_audit_expire().
--
-- 030 granted EXECUTE to the migrating role and then handed the function to
-- pluginmon_audit_retention. ALTER ... OWNER moves the old owner's own entry in the ACL to
-- the new owner, and the migrating role's grant was that entry (a grant to oneself is the
-- owner's entry): a migrating role that is no superuser was left unable to call it, so the
-- daemon's audit retention failed with "permission denied for function
-- pluginmon_audit_expire". Superusers never noticed. The grant is made as the function's
-- owner, which the migrating role may act as only for this moment (like 030, which needs the
-- ADMIN option on the role: storage/cluster_roles.py checks it before any file runs).
GRANT pluginmon_audit_retention TO CURRENT_USER;
SET LOCAL ROLE pluginmon_audit_retention;
GRANT EXECUTE ON FUNCTION pluginmon_audit_expire(timestamptz) TO SESSION_USER;
RESET ROLE;
REVOKE pluginmon_audit_retention FROM CURRENT_USER;
