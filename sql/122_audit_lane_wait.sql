-- 122: an audit entry that finds every lane of its tenant held waits for one lane, as 030
-- meant, instead of sometimes failing.
--
-- 030's pluginmon_audit_log_chain() falls back, when no lane is free, to
--     SELECT ... WHERE tenant_id = ... AND lane = floor(random() * 16)::smallint FOR UPDATE
-- random() is volatile, so it is drawn again for each of the tenant's 16 rows: with
-- probability (15/16)^16 = 36% no row matches, the entry gets a NULL lane and the INSERT
-- fails on audit_log.lane's NOT NULL (SQLSTATE 23502, no constraint name: the API answered
-- 409 "the database refused the change (constraint)"). Every lane is held at once whenever
-- audit retention runs (pluginmon_audit_expire locks every head first), so an audited API
-- write that arrived during a retention run failed about one time in three; bench/api.py
-- saw one such 409 in ~27,000 requests. The lane is now drawn once, and lane 0 is the
-- fallback should that lane not exist; either way the insert waits for the lane's holder.
-- Only the fallback changes; the hash, the lanes and verification are as before.
CREATE OR REPLACE FUNCTION pluginmon_audit_log_chain() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
AS $$
DECLARE
    head audit_chain;
    pick smallint;
BEGIN
    SELECT * INTO head FROM audit_chain WHERE tenant_id = NEW.tenant_id
     ORDER BY lane LIMIT 1 FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        INSERT INTO audit_chain (tenant_id, lane)
        SELECT NEW.tenant_id, lane FROM generate_series(0, 15) AS lane
            ON CONFLICT (tenant_id, lane) DO NOTHING;
        SELECT * INTO head FROM audit_chain WHERE tenant_id = NEW.tenant_id
         ORDER BY lane LIMIT 1 FOR UPDATE SKIP LOCKED;
        IF NOT FOUND THEN
            -- Every lane is held: wait for one, drawn once (spreads the waiters).
            pick := floor(random() * 16)::smallint;
            SELECT * INTO head FROM audit_chain
             WHERE tenant_id = NEW.tenant_id AND lane = pick FOR UPDATE;
            IF NOT FOUND THEN
                SELECT * INTO head FROM audit_chain
                 WHERE tenant_id = NEW.tenant_id AND lane = 0 FOR UPDATE;
            END IF;
        END IF;
    END IF;
    NEW.lane := head.lane;
    NEW.seq := head.head_seq + 1;
    NEW.prev_hash := head.head_hash;
    NEW.entry_hash := pluginmon_audit_entry_hash(NEW);
    UPDATE audit_chain SET head_seq = NEW.seq, head_hash = NEW.entry_hash
     WHERE tenant_id = NEW.tenant_id AND lane = head.lane;
    RETURN NEW;
END
$$;

-- CREATE OR REPLACE keeps the owner and the grants (030 revoked EXECUTE from PUBLIC) but
-- not the SET clause: pin the SECURITY DEFINER function's search path again, as 030 did.
DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION pluginmon_audit_log_chain() SET search_path = pg_catalog, %I',
                   current_schema());
END
$$;
