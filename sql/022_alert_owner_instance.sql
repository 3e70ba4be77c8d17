-- Several daemons can share one database (DESIGN.md): each alert instance and each queued
-- notification records the daemon instance (its `host` setting) that owns it. A daemon loads,
-- resolves and delivers only its own rows, so it never resolves another daemon's alerts nor
-- sends another daemon's notification to its own receiver of the same name.
--
-- Rows written before this migration have no owner (''): the first daemon that starts adopts
-- the open alerts and pending notifications among them (AlertEngine.start()).
ALTER TABLE plugin_alerts
    ADD COLUMN instance text NOT NULL DEFAULT '';
ALTER TABLE notification_outbox
    ADD COLUMN instance text NOT NULL DEFAULT '';

-- What a daemon loads at start: its own open alerts.
CREATE INDEX idx_plugin_alerts_instance_open
    ON plugin_alerts (instance, id)
    WHERE status <> 'resolved';
-- What a deliverer polls: its own due pending rows (replaces idx_notification_outbox_due).
DROP INDEX idx_notification_outbox_due;
CREATE INDEX idx_notification_outbox_instance_due
    ON notification_outbox (instance, next_attempt_at, id)
    WHERE status = 'pending';
-- One notification in flight per owner, receiver and group (replaces the index without owner).
DROP INDEX idx_notification_outbox_group_pending;
CREATE INDEX idx_notification_outbox_instance_group_pending
    ON notification_outbox (instance, receiver, group_key, id)
    WHERE status = 'pending';
