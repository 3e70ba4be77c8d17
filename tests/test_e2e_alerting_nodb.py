"""End to end: `pluginmon run` alerts with the database down from start to finish, then reconciles; and with it up from the start, sends, counts and records the first notification once.

A real plugin process is killed while PostgreSQL has never been reachable; the signed
PluginDown webhook must arrive in time, straight from the alert journal. Then the database
starts (same URL): the alert reaches plugin_alerts and the delivered notification the outbox,
and no second firing notification is sent.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pluginmon.storage.embedded import EmbeddedPostgres
from tests.daemon_helpers import DaemonProcess, WebhookReceiver, wait_for
from tests.dbutil import create_database, drop_database, with_database

SECRET = "nodb-webhook-secret-value"
INTERVAL = 0.5
FOR_SECONDS = 4.0


def firing_down(receiver: WebhookReceiver) -> list[tuple[dict[str, str], bytes, dict[str, Any]]]:
    out = []
    for headers, body in list(receiver.requests):
        payload = json.loads(body)
        names = {a["labels"]["alertname"] for a in payload["alerts"]}
        if payload["status"] == "firing" and "PluginDown" in names:
            out.append((headers, body, payload))
    return out


def metric(daemon: DaemonProcess, name: str, **labels: str) -> float | None:
    """The metric's value, None while /metrics does not answer (yet)."""
    try:
        return daemon.metric(name, **labels)
    except AssertionError:
        return None


def stored_alerts(url: str) -> list[tuple[Any, ...]] | None:
    """The PluginDown rows of the victim, or None while the database does not answer."""
    try:
        with psycopg.connect(url, connect_timeout=3) as conn:
            return conn.execute(
                """SELECT a.status, a.notified_at IS NOT NULL, a.labels->>'plugin'
                     FROM plugin_alerts a
                     JOIN plugins p ON p.tenant_id = a.tenant_id AND p.id = a.plugin_id
                    WHERE a.rule_name = 'PluginDown' AND p.tenant_id = 'nodb'"""
            ).fetchall()
    except psycopg.Error:
        return None


@pytest.mark.slow
def test_plugin_down_is_sent_with_the_database_down_and_recorded_once_it_is_back(
    tmp_path: Path, server_tmp_dir: Path
) -> None:
    server = EmbeddedPostgres(server_tmp_dir / "pg")
    url = server.start()
    server.stop(mode="fast")  # down from start to finish of the first half
    marker = f"pluginmon-nodb-{uuid.uuid4().hex[:10]}"
    victim = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(3600)", marker],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    config = f"""
[[plugins]]
tenant = "nodb"
name = "victim"
environment = "test"
match = {{ cmdline = "{marker}$" }}

[[alerts.rules]]
name = "PluginDown"
metric = "up"
op = "=="
threshold = 0
for_seconds = {FOR_SECONDS}
severity = "critical"
annotations = {{ summary = "Plugin {{plugin}} is down" }}

[[alerts.webhooks]]
name = "oncall"
"""
    try:
        with WebhookReceiver() as receiver:
            config += f'url = "{receiver.url}"\nsecret = "{SECRET}"\n'
            daemon = DaemonProcess(
                tmp_path=tmp_path, database_url=url, config_text=config, interval=INTERVAL
            ).start()
            try:
                labels = {"tenant": "nodb", "plugin": "victim", "environment": "test"}

                def sampled_and_scored() -> bool:
                    daemon.assert_alive()
                    up = metric(daemon, "pluginmon_plugin_up", **labels)
                    # Evaluated (health scored) while up, with no database.
                    score = metric(daemon, "pluginmon_plugin_health_score", **labels)
                    return up == 1 and score is not None and score > 0

                wait_for("the victim sampled and scored as up", sampled_and_scored, timeout=60)
                assert daemon.metric("pluginmon_database_up") == 0

                victim.kill()
                killed_at = time.monotonic()
                victim.wait(timeout=10)
                deadline = FOR_SECONDS + 2 * INTERVAL + 3.0
                (headers, body, payload), *_ = wait_for(
                    "the signed PluginDown webhook",
                    lambda: firing_down(receiver),
                    timeout=30,
                    interval=0.05,
                )
                took = time.monotonic() - killed_at
                assert took <= deadline, f"PluginDown took {took:.1f} s (> {deadline:g} s)"

                expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
                assert headers["x-pluginmon-signature"] == expected
                (alert,) = payload["alerts"]
                assert {k: alert["labels"][k] for k in (*labels, "alertname", "severity")} == {
                    **labels,
                    "alertname": "PluginDown",
                    "severity": "critical",
                }
                assert alert["annotations"]["summary"] == "Plugin victim is down"
                assert payload["receiver"] == "oncall"
                key = headers["idempotency-key"]
                assert stored_alerts(url) is None  # still no database
                assert (
                    daemon.metric(
                        "pluginmon_journal_notifications_total",
                        receiver="oncall",
                        outcome="delivered",
                    )
                    == 1
                )
                assert (
                    daemon.metric(
                        "pluginmon_alerts_firing",
                        **labels,
                        alertname="PluginDown",
                        severity="critical",
                    )
                    == 1
                )

                # The database starts, same URL: migrations, then the state is reconciled.
                server.start()
                rows = wait_for(
                    "PluginDown in plugin_alerts", lambda: stored_alerts(url), timeout=120
                )
                assert rows == [("firing", True, "victim")]
                with psycopg.connect(url) as conn:
                    outbox = conn.execute(
                        """SELECT o.idempotency_key, o.status, o.attempts, s.idempotency_key
                             FROM notification_outbox o
                             LEFT JOIN alert_notifications_sent s
                                  USING (tenant_id, idempotency_key)"""
                    ).fetchall()
                assert outbox == [(key, "delivered", 1, key)]
                # The outbox deliverer polls every second (and at once when woken): let it
                # run a few times, then nothing may have been sent twice.
                polled = daemon.metric(
                    "pluginmon_job_last_success_timestamp_seconds", task="outbox"
                )
                wait_for(
                    "the outbox job to run a few times after the reconciliation",
                    lambda: (
                        (
                            daemon.metric(
                                "pluginmon_job_last_success_timestamp_seconds", task="outbox"
                            )
                            or 0
                        )
                        >= (polled or time.time()) + 4
                    ),
                    timeout=60,
                )
                daemon.wait_ready(timeout=60)
            except BaseException:
                daemon.kill()
                raise
            daemon.signal(signal.SIGTERM)
            assert daemon.wait_exit(timeout=60) == 0, daemon.log_text()[-3000:]

            by_key = Counter(h["idempotency-key"] for h, _ in receiver.requests)
            assert by_key == {key: 1}, by_key
            assert len(firing_down(receiver)) == 1
        assert SECRET not in daemon.log_text()
    finally:
        if victim.poll() is None:
            victim.kill()
        server.stop(mode="immediate")


@pytest.mark.slow
def test_with_the_database_up_the_first_notification_is_counted_recorded_and_sent_once(
    tmp_path: Path, pg_admin_url: str
) -> None:
    """The case the first merge of this work broke on CI: the database is up, an alert fires
    at the first sample (before migrations end, before the plugin has an id), so its
    notification goes out from the journal. It must be counted where every delivery is
    (pluginmon_notifications_total), its alert written to plugin_alerts and its row to the
    outbox as delivered once the plugin has an id, and it must not be sent again."""
    database = create_database(pg_admin_url, prefix="nodbup")
    url = with_database(pg_admin_url, database)
    marker = f"pluginmon-nodb-up-{uuid.uuid4().hex[:10]}"
    config = f"""
[[plugins]]
tenant = "nodb"
name = "victim"
environment = "test"
match = {{ cmdline = "{marker}$" }}

[[alerts.rules]]
name = "PluginDown"
metric = "up"
op = "=="
threshold = 0
for_seconds = 0
severity = "critical"

[[alerts.webhooks]]
name = "oncall"
"""
    try:
        with WebhookReceiver() as receiver:
            config += f'url = "{receiver.url}"\nsecret = "{SECRET}"\n'
            daemon = DaemonProcess(
                tmp_path=tmp_path, database_url=url, config_text=config, interval=INTERVAL
            ).start()
            try:
                daemon.wait_ready()
                delivered = wait_for(
                    "the first notification counted as delivered",
                    lambda: metric(
                        daemon,
                        "pluginmon_notifications_total",
                        receiver="oncall",
                        outcome="delivered",
                    ),
                    timeout=60,
                )
                assert delivered == 1
                (headers, body, _payload), *_ = wait_for(
                    "the signed PluginDown webhook", lambda: firing_down(receiver), timeout=10
                )
                expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
                assert headers["x-pluginmon-signature"] == expected
                key = headers["idempotency-key"]
                rows = wait_for(
                    "PluginDown in plugin_alerts", lambda: stored_alerts(url), timeout=60
                )
                assert rows == [("firing", True, "victim")]
                outbox = wait_for(
                    "the notification reconciled into the outbox",
                    lambda: _outbox_rows(url) or None,
                    timeout=60,
                )
                assert outbox == [(key, "delivered", 1, key)]
                polled = daemon.metric(
                    "pluginmon_job_last_success_timestamp_seconds", task="outbox"
                )
                wait_for(
                    "the outbox job to run a few times after the reconciliation",
                    lambda: (
                        (
                            metric(
                                daemon,
                                "pluginmon_job_last_success_timestamp_seconds",
                                task="outbox",
                            )
                            or 0
                        )
                        >= (polled or time.time()) + 3
                    ),
                    timeout=60,
                )
                assert (
                    daemon.metric(
                        "pluginmon_notifications_total", receiver="oncall", outcome="delivered"
                    )
                    == 1
                )
            finally:
                daemon.kill()
            by_key = Counter(h["idempotency-key"] for h, _ in receiver.requests)
            assert by_key == {key: 1}, by_key
    finally:
        drop_database(pg_admin_url, database)


def _outbox_rows(url: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, connect_timeout=3) as conn:
        return conn.execute(
            """SELECT o.idempotency_key, o.status, o.attempts, s.idempotency_key
                 FROM notification_outbox o
                 LEFT JOIN alert_notifications_sent s USING (tenant_id, idempotency_key)"""
        ).fetchall()
