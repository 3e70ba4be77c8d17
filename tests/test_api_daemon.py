"""`pluginmon run` with the management API on its port: the catalogue's usage columns kept
current from samples, a failed operation becoming an alert and a health component, the
deadline enforced by the daemon, bearer tokens beside basic auth on /metrics."""

from __future__ import annotations

import base64
import json
import signal
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.daemon_helpers import DaemonProcess, plugin_processes, run_cli, wait_for

pytestmark = pytest.mark.slow

BASIC = "Basic " + base64.b64encode(b"prom:scrape-secret").decode()


def _call(base: str, method: str, path: str, token: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data, method=method)  # noqa: S310
    request.add_header("Authorization", "Bearer " + token)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def test_daemon_serves_the_api_and_keeps_the_catalogue_current(
    migrated_db: str, tmp_path: Path
) -> None:
    with plugin_processes() as plugins:
        daemon = DaemonProcess(
            tmp_path=tmp_path,
            database_url=migrated_db,
            config_text="maintenance_interval_seconds = 1\n"
            'http_auth_username = "prom"\n' + plugins.config(tenant="acme"),
            extra_env={"PLUGINMON_HTTP_AUTH_PASSWORD": "scrape-secret"},
        ).start()
        try:
            daemon.wait_ready()
            created = run_cli(
                "token", "create", "--tenant", "acme", "--role", "admin", "--name", "ann",
                env={"PLUGINMON_DATABASE_URL": migrated_db},
            )  # fmt: skip
            assert created.returncode == 0, created.stderr
            token = created.stdout.splitlines()[-1]
            base = daemon.url

            # Basic auth guards /metrics; the API takes bearer tokens instead.
            assert daemon.get("/metrics")[0] == 401
            assert _call(base, "GET", "/api/v1/plugins", token)[0] == 200
            assert _call(base, "GET", "/api/v1/plugins", "pmt_wrong")[0] == 401

            def burner_measured() -> dict[str, Any] | None:
                status, plugin = _call(base, "GET", "/api/v1/plugins/burner", token)
                if status != 200 or plugin["cpu_usage"] is None:
                    return None
                environments = {e["environment"]: e for e in plugin["environments"]}
                test = environments.get("test")
                if test is None or test["health_score"] is None:
                    return None
                result: dict[str, Any] = plugin
                return result

            plugin = wait_for("burner's usage in the catalogue", burner_measured, timeout=60)
            assert plugin["memory_usage"] > 1_000_000
            assert plugin["health_score"] is not None  # the alert engine's
            (test_env,) = [e for e in plugin["environments"] if e["environment"] == "test"]
            assert test_env["cpu_usage"] is not None
            assert 0 <= test_env["health_score"] <= 100

            # A failed operation (no retries): a gauge, an alert and a health component.
            status, op = _call(
                base,
                "POST",
                "/api/v1/plugins/burner/operations",
                token,
                {"type": "configure", "environment": "test", "retry_limit": 0},
            )
            assert status == 201, op
            _call(base, "PATCH", f"/api/v1/operations/{op['id']}", token, {"status": "running"})
            status, failed = _call(
                base,
                "PATCH",
                f"/api/v1/operations/{op['id']}",
                token,
                {"status": "failed", "error": "exit 1"},
            )
            assert (status, failed["status"], failed["status_reason"]) == (
                200,
                "failed",
                "retries_exhausted",
            )

            def operation_alert() -> list[dict[str, Any]] | None:
                _, alerts = _call(base, "GET", "/api/v1/alerts?plugin=burner", token)
                firing = [a for a in alerts["items"] if a["rule"] == "PluginOperationFailed"]
                return firing or None

            (alert,) = wait_for("PluginOperationFailed for burner", operation_alert, timeout=60)
            assert (alert["environment"], alert["status"], alert["value"]) == (
                "test",
                "firing",
                1.0,
            )

            def operations_component() -> tuple[str, float] | None:
                # The daemon exports a cycle's scores after persisting it: the alert is in the
                # database (and the API) while the health rows of the same cycle are written,
                # a window of one statement (wider on Citus), before /metrics shows the cycle.
                # (Before that cycle the component is 100, or absent while no value was read.)
                text = daemon.get("/metrics", headers={"Authorization": BASIC})[1]
                lines = [
                    line
                    for line in text.splitlines()
                    if line.startswith("pluginmon_plugin_health_component_score{")
                    and 'plugin="burner"' in line
                    and 'component="metric:operations_failed"' in line
                ]
                assert len(lines) <= 1, lines
                value = float(lines[0].rsplit(" ", 1)[1]) if lines else 100.0
                return None if value == 100 else (text, value)

            metrics_text, component = wait_for(
                "the failed operation in burner's health component", operations_component
            )
            # One failed operation of the three that cost everything: 2/3 of the component.
            assert component == pytest.approx(66.67, abs=0.01)
            assert (
                'pluginmon_operations_total{status="failed",tenant="acme",type="configure"} 1.0'
                in (metrics_text)
            )

            # The daemon enforces the deadline.
            status, slow = _call(
                base,
                "POST",
                "/api/v1/plugins/sleeper/operations",
                token,
                {"type": "restore", "environment": "test", "deadline_seconds": 1},
            )
            _call(base, "PATCH", f"/api/v1/operations/{slow['id']}", token, {"status": "running"})

            def deadline_failed() -> dict[str, Any] | None:
                _, read = _call(base, "GET", f"/api/v1/operations/{slow['id']}", token)
                result: dict[str, Any] | None = read if read["status"] == "failed" else None
                return result

            read = wait_for("the deadline sweep", deadline_failed, timeout=30)
            assert read["status_reason"] == "deadline_exceeded"
            with psycopg.connect(migrated_db) as conn:
                entry = conn.execute(
                    "SELECT actor FROM audit_log WHERE action = 'operation.deadline_exceeded'"
                ).fetchone()
            assert entry == ("daemon",)
        finally:
            daemon.kill()
    verify = run_cli("audit", "verify", env={"PLUGINMON_DATABASE_URL": migrated_db})
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "tenant acme: intact" in verify.stdout


@pytest.mark.parametrize(("choice", "kind"), [("auto", "uvloop"), ("asyncio", "asyncio")])
def test_the_daemon_on_each_event_loop(
    migrated_db: str, tmp_path: Path, choice: str, kind: str
) -> None:
    """The same daemon on uvloop (the default where installed) and on asyncio's loop: it
    says which at start, serves the API and /metrics, and stops cleanly on SIGTERM."""
    with plugin_processes() as plugins:
        daemon = DaemonProcess(
            tmp_path=tmp_path,
            database_url=migrated_db,
            config_text=f'event_loop = "{choice}"\n' + plugins.config(tenant="loops"),
        ).start()
        try:
            daemon.wait_ready()
            starting = [r["message"] for r in daemon.log_records() if "starting" in r["message"]]
            assert any(m.endswith(f"(event loop: {kind})") for m in starting), starting
            created = run_cli(
                "token", "create", "--tenant", "loops", "--role", "writer", "--name", choice,
                env={"PLUGINMON_DATABASE_URL": migrated_db},
            )  # fmt: skip
            assert created.returncode == 0, created.stderr
            token = created.stdout.splitlines()[-1]
            status, body = _call(
                daemon.url, "POST", "/api/v1/plugins", token, {"name": f"made-on-{kind}"}
            )
            assert (status, body["name"]) == (201, f"made-on-{kind}")
            status, body = _call(daemon.url, "GET", "/api/v1/plugins", token)
            assert status == 200
            assert f"made-on-{kind}" in {p["name"] for p in body["items"]}
            daemon.wait_metric(
                "samples counted on /metrics", lambda v: v > 0, "pluginmon_samples_total"
            )
            daemon.signal(signal.SIGTERM)
            assert daemon.wait_exit() == 0
        finally:
            daemon.kill()
