-- Alert delivery: the notification outbox, silences, delivered idempotency keys, and the
-- plugin_alerts columns the alert engine needs to survive a restart.

-- notified_at: when the instance's firing notification was queued (so a restart neither
-- re-sends nor forgets it); last_active_at: when the condition last held (keep_firing_for).
ALTER TABLE plugin_alerts
    ADD COLUMN notified_at    timestamptz,
    ADD COLUMN last_active_at timestamptz;

-- One row per notification to one receiver: written in the same transaction as the alert
-- state change that caused it, claimed by deliverers with FOR UPDATE SKIP LOCKED.
CREATE TABLE notification_outbox (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id        text        NOT NULL,
    plugin_id        bigint      NOT NULL,
    environment      text        NOT NULL,
    receiver         text        NOT NULL CONSTRAINT notification_outbox_receiver_nonempty CHECK (receiver <> ''),
    receiver_kind    text        NOT NULL
                                 CONSTRAINT notification_outbox_receiver_kind_check
                                 CHECK (receiver_kind IN ('webhook', 'alertmanager')),
    group_key        text        NOT NULL,
    status           text        NOT NULL DEFAULT 'pending'
                                 CONSTRAINT notification_outbox_status_check
                                 CHECK (status IN ('pending', 'delivered', 'failed')),
    -- Sent as the Idempotency-Key header on every attempt of this notification.
    idempotency_key  text        NOT NULL CONSTRAINT notification_outbox_idempotency_key UNIQUE,
    -- The exact bytes signed and sent (text, not jsonb: jsonb would reorder keys).
    body             text        NOT NULL,
    fingerprints     text[]      NOT NULL DEFAULT '{}',
    attempts         integer     NOT NULL DEFAULT 0
                                 CONSTRAINT notification_outbox_attempts_nonnegative CHECK (attempts >= 0),
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    last_status_code integer,
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    delivered_at     timestamptz,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT notification_outbox_delivered_at CHECK (status <> 'delivered' OR delivered_at IS NOT NULL),
    -- CASCADE: a notification about a deleted plugin has nobody left to page about.
    CONSTRAINT notification_outbox_plugin_fkey FOREIGN KEY (plugin_id, tenant_id)
        REFERENCES plugins (id, tenant_id) ON DELETE CASCADE
);

-- What deliverers poll: due pending rows.
CREATE INDEX idx_notification_outbox_due
    ON notification_outbox (next_attempt_at, id)
    WHERE status = 'pending';
-- Per receiver and group, only the oldest pending row is sent (keeps firing before resolved).
CREATE INDEX idx_notification_outbox_group_pending
    ON notification_outbox (receiver, group_key, id)
    WHERE status = 'pending';
-- The last notification per receiver and group (repeat interval after a restart).
CREATE INDEX idx_notification_outbox_group_created
    ON notification_outbox (receiver, group_key, created_at DESC);
CREATE INDEX idx_notification_outbox_plugin ON notification_outbox (plugin_id);

-- Idempotency keys whose delivery a receiver acknowledged with 2xx: a deliverer never
-- POSTs a key recorded here again, even if its outbox row was left 'pending' by a crash.
CREATE TABLE alert_notifications_sent (
    idempotency_key text        PRIMARY KEY,
    tenant_id       text        NOT NULL,
    outbox_id       bigint      REFERENCES notification_outbox (id) ON DELETE SET NULL,
    receiver        text        NOT NULL,
    status_code     integer     NOT NULL,
    attempts        integer     NOT NULL,
    delivered_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX idx_alert_notifications_sent_delivered ON alert_notifications_sent (delivered_at);

-- A silence mutes notifications for a tenant's alerts whose labels match every matcher
-- (label name -> shell glob) until ends_at. Alerts keep being evaluated and stored.
CREATE TABLE alert_silences (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- CASCADE: silences are tenant configuration.
    tenant_id   text        NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    matchers    jsonb       NOT NULL DEFAULT '{}'
                            CONSTRAINT alert_silences_matchers_object CHECK (jsonb_typeof(matchers) = 'object'),
    starts_at   timestamptz NOT NULL DEFAULT now(),
    ends_at     timestamptz NOT NULL,
    created_by  text        NOT NULL CONSTRAINT alert_silences_created_by_nonempty CHECK (created_by <> ''),
    comment     text        NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT alert_silences_window CHECK (ends_at > starts_at)
);
CREATE INDEX idx_alert_silences_tenant_ends ON alert_silences (tenant_id, ends_at);

CREATE TRIGGER notification_outbox_touch BEFORE UPDATE ON notification_outbox
    FOR EACH ROW EXECUTE FUNCTION pluginmon_touch_updated_at();

-- Row-level security like every other tenant table (003's helper). Delivery bookkeeping is
-- readable by a tenant's roles but written only by the daemon.
SELECT pluginmon_enable_tenant_rls('notification_outbox', writable => false);
SELECT pluginmon_enable_tenant_rls('alert_notifications_sent', writable => false);
SELECT pluginmon_enable_tenant_rls('alert_silences');
