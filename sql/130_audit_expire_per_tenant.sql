-- 130: audit retention one tenant at a time, in bounded steps, and never holding a lane that
-- it is not cutting.
--
-- 030's pluginmon_audit_expire() locks the head of every lane of every tenant first and holds
-- them all until it has removed everything past the horizon everywhere. Every audited write
-- meanwhile, of any tenant, waits for it: an API write, and a plugin or tenant an agent sees
-- for the first time (audited in its creating transaction since d824b51), whose id lookup
-- gives up after 3 s and spools its samples with a "database unreachable" warning. That is
-- every maintenance pass, and when a day's entries expire, for as long as their DELETE takes.
--
-- pluginmon_audit_expire_tenant(tenant, horizon, max_rows) cuts one tenant's chains by at
-- most max_rows entries in the caller's transaction: lane by lane, it locks the head of a lane
-- whose next entry is past the horizon, and no other; removes that lane's prefix past the
-- horizon (within what is left of max_rows); moves the anchor; and records what it removed as
-- one audit.expire entry in the tenant's chain, as 030 does per tenant. A writer of the tenant
-- meanwhile takes a lane nobody holds (pluginmon_audit_log_chain skips held ones), so it waits
-- only if all 16 are held at once; writers of other tenants never meet it. storage/backend.py
-- calls it for each tenant with entries to cut, one short transaction per call, until a call
-- removes fewer than max_rows. What is removed is what 030 removes: each lane's oldest entries
-- past the horizon, never a hole, an anchor kept. A lane that misses an entry of its cut (or
-- its first entry) is left alone with a warning; 030 noticed only a missing cut entry and
-- removed a hole before it, erasing the evidence. 030's function stays (a daemon of an
-- earlier version calls it).
-- On Citus nothing here is propagated to the workers: the audit tables stay on the
-- coordinator and retention runs there, and a grant made while acting as
-- pluginmon_audit_retention, a NOLOGIN role, cannot be sent to them (their connection as that
-- role is refused; 031's Citus variant says the same). On the other backends the setting is a
-- placeholder that ends with the migration's transaction.
SET LOCAL citus.enable_ddl_propagation TO off;
-- The migrating role acts as the retention role until the end of this file (see below).
GRANT pluginmon_audit_retention TO CURRENT_USER;
CREATE FUNCTION pluginmon_audit_expire_tenant(chain_tenant text, horizon timestamptz,
                                              max_rows bigint) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER
AS $$
DECLARE
    lane_no smallint;
    anchor bigint;
    head bigint;
    next_at timestamptz;
    cut bigint;
    cut_hash bytea;
    present bigint;
    removed bigint;
    total bigint := 0;
    lanes jsonb := '{}';
BEGIN
    IF max_rows IS NULL OR max_rows < 1 THEN
        RAISE EXCEPTION 'max_rows must be at least 1, not %', max_rows
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOR lane_no, anchor, head IN SELECT c.lane, c.anchor_seq, c.head_seq FROM audit_chain c
                                  WHERE c.tenant_id = chain_tenant ORDER BY c.lane LOOP
        EXIT WHEN total >= max_rows;
        CONTINUE WHEN head <= anchor;
        -- A lane whose next entry is not past the horizon has nothing to cut (only a prefix
        -- is ever removed): looked at without taking its lock.
        SELECT l.occurred_at INTO next_at FROM audit_log l
         WHERE l.tenant_id = chain_tenant AND l.lane = lane_no AND l.seq = anchor + 1;
        IF NOT FOUND THEN
            RAISE WARNING 'audit retention: tenant % lane % has no entry % in its chain; nothing removed (run pluginmon audit verify)',
                chain_tenant, lane_no, anchor + 1;
            CONTINUE;
        END IF;
        CONTINUE WHEN next_at >= horizon;
        -- This lane's head only, held to the end of the transaction (in lane order, and
        -- writers never wait for a lane while they hold one: no deadlock).
        SELECT c.anchor_seq, c.head_seq INTO anchor, head FROM audit_chain c
         WHERE c.tenant_id = chain_tenant AND c.lane = lane_no FOR UPDATE;
        -- A lane's seq runs without a gap from anchor + 1 to head, so at most the next
        -- (max_rows - total) entries are looked at and cut: up to the first one inside the
        -- horizon.
        cut := least(head, anchor + (max_rows - total));
        SELECT least(cut, min(l.seq) - 1) INTO cut FROM audit_log l
         WHERE l.tenant_id = chain_tenant AND l.lane = lane_no
           AND l.seq > anchor AND l.seq <= cut AND l.occurred_at >= horizon;
        CONTINUE WHEN cut <= anchor;
        -- Every entry of the cut present (one missing is evidence of tampering: never
        -- erased, whichever step's range it falls in), and the cut entry's hash for the anchor.
        SELECT count(*) INTO present FROM audit_log l
         WHERE l.tenant_id = chain_tenant AND l.lane = lane_no AND l.seq > anchor AND l.seq <= cut;
        SELECT l.entry_hash INTO cut_hash FROM audit_log l
         WHERE l.tenant_id = chain_tenant AND l.lane = lane_no AND l.seq = cut;
        IF present <> cut - anchor OR cut_hash IS NULL THEN
            RAISE WARNING 'audit retention: tenant % lane % is missing entries between % and % of its chain; nothing removed (run pluginmon audit verify)',
                chain_tenant, lane_no, anchor + 1, cut;
            CONTINUE;
        END IF;
        DELETE FROM audit_log l
         WHERE l.tenant_id = chain_tenant AND l.lane = lane_no AND l.seq > anchor AND l.seq <= cut;
        GET DIAGNOSTICS removed = ROW_COUNT;
        UPDATE audit_chain SET anchor_seq = cut, anchor_hash = cut_hash, anchored_at = now()
         WHERE tenant_id = chain_tenant AND lane = lane_no;
        total := total + removed;
        lanes := lanes || jsonb_build_object(lane_no::text, cut);
    END LOOP;
    IF total > 0 THEN
        INSERT INTO audit_log (tenant_id, actor, action, entity_type, details)
        VALUES (chain_tenant, 'daemon', 'audit.expire', 'audit_log',
                jsonb_build_object('removed', total, 'anchors', lanes, 'horizon', horizon));
    END IF;
    RETURN total;
END
$$;

-- As 030 and 031 do for pluginmon_audit_expire(): the search path pinned (pg_temp last, 126),
-- the function handed to pluginmon_audit_retention (whose policies let it read and delete
-- every tenant's entries), and EXECUTE for the daemon's role alone, granted as the new
-- owner. The migrating role acts as the retention role for this file only
-- (storage/cluster_roles.py checks up front that it may).
DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION pluginmon_audit_expire_tenant(text, timestamptz, bigint)'
                   ' SET search_path = pg_catalog, %I, pg_temp', current_schema());
END
$$;
REVOKE ALL ON FUNCTION pluginmon_audit_expire_tenant(text, timestamptz, bigint) FROM PUBLIC;
DO $$
BEGIN
    EXECUTE format('GRANT CREATE ON SCHEMA %I TO pluginmon_audit_retention', current_schema());
END
$$;
ALTER FUNCTION pluginmon_audit_expire_tenant(text, timestamptz, bigint) OWNER TO pluginmon_audit_retention;
DO $$
BEGIN
    EXECUTE format('REVOKE CREATE ON SCHEMA %I FROM pluginmon_audit_retention', current_schema());
END
$$;
SET LOCAL ROLE pluginmon_audit_retention;
GRANT EXECUTE ON FUNCTION pluginmon_audit_expire_tenant(text, timestamptz, bigint) TO SESSION_USER;
RESET ROLE;
REVOKE pluginmon_audit_retention FROM CURRENT_USER;
