"""Health scoring, rule evaluation, alert state, notifiers and the outbox."""
