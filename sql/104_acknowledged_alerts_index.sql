-- 104: the acknowledged open alerts, for the alert engine's read of them every cycle.
--
-- Every agent reads the acknowledged open alerts of the database each evaluation
-- (storage/alert_state.acknowledged): as a bitmap scan of every open alert (the partial
-- fingerprint index of 001), 2.1 ms a call at 100 agents of 1,000 plugins and 0.3 ms at 25 in
-- bench/fleet.py, a total growing with the square of the fleet. This index holds only the
-- acknowledged open alerts (a handful): on a scratch table of 10,000 open and 30,000 resolved
-- alerts the read took 0.92 ms of backend CPU without it and 0.04 ms with it.
-- plugin_alerts is a plain table on every backend (distributed by tenant on Citus, where the
-- index is created on every shard); building it reads the open alerts once.
CREATE INDEX idx_plugin_alerts_acknowledged_open
    ON plugin_alerts (fingerprint)
    WHERE status <> 'resolved' AND acknowledged_at IS NOT NULL;
