"""End to end: `pluginmon run` scrapes a configured and a discovered plugin's own /metrics, alerts on a counter's rate, and `pluginmon status --metrics` shows it."""

from __future__ import annotations

import json
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.collector_helpers import Spawner, unique_tag
from tests.daemon_helpers import DaemonProcess, run_cli, wait_for
from tests.dbutil import create_database, drop_database, with_database
from tests.metrics_helpers import REQUESTS_PER_SECOND, start_plugin
from tests.net_helpers import free_port

pytestmark = pytest.mark.slow


@pytest.fixture
def e2e_db(pg_admin_url: str) -> Iterator[str]:
    name = create_database(pg_admin_url, prefix="e2e_pm")
    try:
        yield with_database(pg_admin_url, name)
    finally:
        drop_database(pg_admin_url, name)


@pytest.fixture
def spawner() -> Iterator[Spawner]:
    s = Spawner()
    try:
        yield s
    finally:
        s.close()


def test_run_scrapes_plugins_alerts_on_a_rate_and_status_shows_it(
    e2e_db: str, tmp_path: Path, spawner: Spawner
) -> None:
    marker = unique_tag("pm-e2e")
    tenant = "e2e_metrics"
    _, configured_url = start_plugin(spawner, "plugin", marker=f"{marker}-api")
    # A plugin nobody configured: its environment says who it is and where its metrics are.
    port = free_port()
    start_plugin(
        spawner,
        "plugin",
        port,
        marker=f"{marker}-worker",
        env={
            "PLUGINMON_TENANT": tenant,
            "PLUGINMON_PLUGIN": "worker",
            "PLUGINMON_METRICS_PORT": str(port),
        },
    )
    config = f"""
[[plugins]]
tenant = "{tenant}"
name = "api"
environment = "test"
match = {{ cmdline = "{marker}-api$" }}
metrics_url = "{configured_url}"
metrics_interval_seconds = 0.5

[plugin_metrics]
interval_seconds = 0.5
timeout_seconds = 0.4

[[alerts.rules]]
name = "ApiBusy"
metric = "requests_total"
op = ">"
threshold = {REQUESTS_PER_SECOND / 2}
severity = "info"
"""
    daemon = DaemonProcess(
        tmp_path=tmp_path,
        database_url=e2e_db,
        config_text=config,
        extra_env={"PLUGINMON_LABEL_DISCOVERY": "true"},
    )
    daemon.start()
    try:
        daemon.wait_ready()
        api = {"tenant": tenant, "plugin": "api", "environment": "test"}
        worker = {"tenant": tenant, "plugin": "worker", "environment": "production"}
        for labels in (api, worker):
            wait_for(
                f"{labels['plugin']} scraped",
                lambda labels=labels: daemon.metric("pluginmon_plugin_scrape_up", **labels) == 1.0,  # type: ignore[misc]
                timeout=40,
            )
        assert daemon.metric("pluginmon_plugin_scrape_samples", **api) == 18.0
        assert daemon.metric("pluginmon_plugin_metrics_rows_written_total") is not None

        # The rule on the counter fires on its rate (about 10/s), not on its raw value.
        wait_for(
            "ApiBusy firing",
            lambda: (
                daemon.metric(
                    "pluginmon_alerts_firing", **api, alertname="ApiBusy", severity="info"
                )
                == 1.0
            ),
            timeout=60,
        )

        def stored() -> list[str]:
            with psycopg.connect(e2e_db) as conn:
                rows = conn.execute(
                    """SELECT DISTINCT p.name FROM plugin_metrics m
                         JOIN plugins p ON p.tenant_id = m.tenant_id AND p.id = m.plugin_id
                        WHERE p.tenant_id = %s AND m.metric_name = 'queue_depth'
                        ORDER BY p.name""",
                    (tenant,),
                ).fetchall()
            names = [name for (name,) in rows]
            return names if names == ["api", "worker"] else []

        try:
            wait_for("both plugins' rows", stored, timeout=30)
        except AssertionError:
            dropped = {k: v for k, v in daemon.metrics().items() if "plugin_metrics" in k[0]}
            raise AssertionError(f"{dropped}\n{daemon.log_text()[-3000:]}") from None

        shown = run_cli(
            "status", "--metrics", "--json", "--tenant", tenant,
            env={"PLUGINMON_DATABASE_URL": e2e_db, "PLUGINMON_DATA_DIR": str(tmp_path / "cli")},
        )  # fmt: skip
        assert shown.returncode == 0, shown.stderr
        rows = {row["plugin"]: row for row in json.loads(shown.stdout)}
        rate = rows["api"]["metrics"]["requests_total/s"]
        assert REQUESTS_PER_SECOND * 0.6 < rate < REQUESTS_PER_SECOND * 1.4
        assert rows["api"]["metrics"]["queue_depth"] == 7.0
        assert rows["api"]["metrics"]["request_duration_seconds:p95"] is not None
    finally:
        daemon.signal(signal.SIGTERM)
        assert daemon.wait_exit() == 0, daemon.log_text()[-4000:]


def _log_messages(daemon: DaemonProcess) -> list[str]:
    return [str(r.get("message", "")) for r in daemon.log_records()]


def test_sighup_starts_and_stops_scraping_a_plugin(
    e2e_db: str, tmp_path: Path, spawner: Spawner
) -> None:
    marker = unique_tag("pm-hup")
    tenant = "e2e_reload"
    _, url = start_plugin(spawner, "plugin", marker=f"{marker}-api")
    head = """
[plugin_metrics]
interval_seconds = 0.5
timeout_seconds = 0.4
"""
    plugin = f"""
[[plugins]]
tenant = "{tenant}"
name = "api"
environment = "test"
match = {{ cmdline = "{marker}-api$" }}
"""
    labels = {"tenant": tenant, "plugin": "api", "environment": "test"}
    daemon = DaemonProcess(tmp_path=tmp_path, database_url=e2e_db, config_text=head + plugin)
    daemon.start()
    try:
        daemon.wait_ready()
        # (Whether its process matches does not matter: a scrape target is the plugin's URL.)
        wait_for(
            "the plugin in /metrics",
            lambda: daemon.metric("pluginmon_plugin_up", **labels) is not None,
        )
        assert daemon.metric("pluginmon_plugin_scrape_up", **labels) is None  # no metrics_url

        # The plugin gains a metrics_url: scraped without a restart.
        daemon.config_path.write_text(head + plugin + f'metrics_url = "{url}"\n')
        daemon.signal(signal.SIGHUP)
        wait_for(
            "the reload line",
            lambda: [m for m in _log_messages(daemon) if m.startswith("configuration reloaded:")],
        )
        reloaded = [m for m in _log_messages(daemon) if m.startswith("configuration reloaded:")]
        assert reloaded == [f"configuration reloaded: scrape targets +{tenant}/api/test"]
        wait_for(
            "the plugin scraped",
            lambda: daemon.metric("pluginmon_plugin_scrape_up", **labels) == 1.0,
            timeout=40,
        )
        assert daemon.metric("pluginmon_plugin_scrape_samples", **labels) == 18.0

        # A changed limit applies at once (the scrape is refused), then losing the URL stops it.
        daemon.config_path.write_text(
            head + "max_series = 5\n" + plugin + f'metrics_url = "{url}"\n'
        )
        daemon.signal(signal.SIGHUP)
        wait_for(
            "the scrape refused for too many series",
            lambda: (
                (
                    daemon.metric(
                        "pluginmon_plugin_scrape_rejected_total", **labels, reason="too_many_series"
                    )
                    or 0
                )
                >= 1
            ),
            timeout=40,
        )
        assert daemon.metric("pluginmon_plugin_scrape_up", **labels) == 0.0
        daemon.config_path.write_text(head + plugin)
        daemon.signal(signal.SIGHUP)
        wait_for(
            "the plugin no longer a scrape target",
            lambda: daemon.metric("pluginmon_plugin_scrape_up", **labels) is None,
            timeout=40,
        )
        assert daemon.metric("pluginmon_plugin_up", **labels) is not None  # still a plugin
        assert daemon.metric("pluginmon_config_last_reload_successful") == 1
    finally:
        daemon.signal(signal.SIGTERM)
        assert daemon.wait_exit() == 0, daemon.log_text()[-4000:]


def _http(
    url: str, *, token: str, data: bytes | None = None, method: str = "GET"
) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=data, method=method)  # noqa: S310 - loopback
    request.add_header("Authorization", "Bearer " + token)
    if data is not None:
        request.add_header("Content-Type", "text/plain; version=0.0.4")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def test_run_takes_a_push_and_writes_it_again_until_it_expires(e2e_db: str, tmp_path: Path) -> None:
    tenant = "e2e_push"
    daemon = DaemonProcess(
        tmp_path=tmp_path,
        database_url=e2e_db,
        config_text="[plugin_metrics]\ninterval_seconds = 0.5\n",
    )
    daemon.start()
    try:
        daemon.wait_ready()
        wait_for("the API ready", lambda: daemon.get("/readyz")[0] == 200)
        created = run_cli(
            "token", "create", "--tenant", tenant, "--role", "writer", "--name", "batch",
            env={"PLUGINMON_DATABASE_URL": e2e_db},
        )  # fmt: skip
        assert created.returncode == 0, created.stderr
        token = created.stdout.splitlines()[-1]
        base = daemon.url + "/api/v1/plugins"
        status, _ = _http(
            base, token=token, method="POST", data=json.dumps({"name": "exporter"}).encode()
        )
        # (The catalogue route parses its body as JSON whatever the Content-Type.)
        assert status == 201
        status, body = _http(
            base + "/exporter/metrics?ttl_seconds=3",
            token=token,
            method="POST",
            data=b"# TYPE rows_exported_total counter\nrows_exported_total 1200\n",
        )
        assert status == 200, body
        assert body["series"] == 1

        def rows() -> int:
            with psycopg.connect(e2e_db) as conn:
                row = conn.execute(
                    "SELECT count(*) FROM plugin_metrics WHERE tenant_id = %s"
                    " AND metric_name = 'rows_exported_total' AND value = 1200",
                    (tenant,),
                ).fetchone()
            assert row is not None
            return int(row[0])

        # Written at the push, then again by the daemon every 0.5 s until 3 s after it.
        wait_for("the pushed series re-emitted", lambda: rows() >= 3, timeout=30)
        wait_for(
            "the pushed series expired",
            lambda: daemon.metric("pluginmon_plugin_push_expired_series_total") == 1.0,
            timeout=30,
        )
        settled = rows()
        assert daemon.metric("pluginmon_plugin_push_live_series") == 0.0
        assert daemon.metric("pluginmon_plugin_pushes_total") == 1.0
        # Nothing re-writes an expired series (allowing for re-emissions queued in the writer
        # before the expiry, flushed every 0.5 s).
        time.sleep(1.5)
        assert rows() <= settled + 2
        status, body = _http(base + "/exporter/metrics", token=token)
        assert status == 200, body
        (item,) = body["items"]
        assert (item["metric"], item["kind"], item["value"]) == (
            "rows_exported_total",
            "counter",
            1200.0,
        )
        assert item["rate_per_second"] == 0.0  # pushed again unchanged: a rate of 0
        audit = run_cli(
            "audit", "verify", "--tenant", tenant, env={"PLUGINMON_DATABASE_URL": e2e_db}
        )
        assert audit.returncode == 0, audit.stderr
    finally:
        daemon.signal(signal.SIGTERM)
        assert daemon.wait_exit() == 0, daemon.log_text()[-4000:]
