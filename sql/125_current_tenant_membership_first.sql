-- 125: pluginmon_current_tenant() (003) asks whether the session is a tenant-group member
-- before it reads pg_roles: the same answers, the expensive part only when it can matter.
--
-- Every statement on a tenant table evaluates the function once per table under row-level
-- security: about 7 times per API write (bench/api.py, pg_stat_statements: 66,528 calls for
-- 11,952 requests). 003 read pg_roles (a view joining pg_authid and pg_db_role_setting) on
-- every call of an unbound session, 11 us of its 15; only a member of a tenant group needs
-- the superuser check (superusers count as members of every role), and pg_has_role() is a
-- lookup in the role-membership cache. The application's login role is no such member, so
-- its calls no longer read pg_roles. Same truth table: a bound login role gets its tenant, an
-- unbound member of the tenant groups (not a superuser) gets NULL, anyone else gets
-- pluginmon.tenant_id.
CREATE OR REPLACE FUNCTION pluginmon_current_tenant() RETURNS text
LANGUAGE plpgsql STABLE SECURITY DEFINER
AS $$
DECLARE
    bound text;
BEGIN
    -- session_user, not current_user: SET ROLE cannot escape a binding, and inside this
    -- SECURITY DEFINER function current_user is the owner anyway.
    SELECT b.tenant_id INTO bound FROM tenant_role_bindings b WHERE b.role_name = session_user;
    IF bound IS NOT NULL THEN
        RETURN bound;
    END IF;
    -- Tenant group members choose nothing themselves: unbound means no rows. (Superusers
    -- count as members of every role; they are not tenant roles.) AND evaluates left to
    -- right and stops at the first false: pg_roles is read for members only.
    IF (pg_has_role(session_user, 'pluginmon_tenant_reader', 'MEMBER')
        OR pg_has_role(session_user, 'pluginmon_tenant_writer', 'MEMBER'))
       AND NOT (SELECT r.rolsuper FROM pg_roles r WHERE r.rolname = session_user) THEN
        RETURN NULL;
    END IF;
    RETURN nullif(current_setting('pluginmon.tenant_id', true), '');
END
$$;

-- CREATE OR REPLACE keeps the owner and the grants but not the SET clause: pin the SECURITY
-- DEFINER function's search path again, as 003 did.
DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION pluginmon_current_tenant() SET search_path = pg_catalog, %I, pg_temp',
                   current_schema());
END
$$;
