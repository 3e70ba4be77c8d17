"""deploy/alertmanager.yml on a real Alertmanager: routes, inhibitions and the webhook body.

Only the receivers' URLs (a local HTTP receiver) and the grouping delays (seconds instead of
minutes) are changed from the shipped file.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.dashboards_helpers import DEPLOY_DIR, load_yaml
from tests.net_helpers import ServerThread, free_port, stop_process

ALERTMANAGER = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
pytestmark = pytest.mark.skipif(
    ALERTMANAGER is None,
    reason="Alertmanager is not installed (Debian package: prometheus-alertmanager)",
)


class _Receiver:
    """A webhook receiver: records (path, body) of every POST."""

    def __init__(self) -> None:
        self.received: list[tuple[str, dict[str, Any]]] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length))
                with outer.lock:
                    outer.received.append((self.path, body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._serving = ServerThread(Handler)
        self.url = f"http://127.0.0.1:{self._serving.port}"
        self._serving.start()

    def close(self) -> None:
        self._serving.stop()

    def alerts_by_receiver(self) -> dict[str, set[tuple[str, str]]]:
        """receiver path -> {(alertname, plugin)} delivered as firing."""
        seen: dict[str, set[tuple[str, str]]] = {}
        with self.lock:
            for path, body in self.received:
                for alert in body["alerts"]:
                    if alert["status"] == "firing":
                        labels = alert["labels"]
                        seen.setdefault(path, set()).add(
                            (labels["alertname"], labels.get("plugin", ""))
                        )
        return seen


@pytest.fixture
def receiver() -> Iterator[_Receiver]:
    running = _Receiver()
    try:
        yield running
    finally:
        running.close()


def _test_config(tmp_path: Path, receiver_url: str) -> Path:
    config = load_yaml(DEPLOY_DIR / "alertmanager.yml")

    def faster(route: dict[str, Any]) -> None:
        for key in ("group_wait", "group_interval"):
            if key in route:
                route[key] = "1s"
        for child in route.get("routes", []):
            faster(child)

    faster(config["route"])
    for receiver in config["receivers"]:
        for hook in receiver.get("webhook_configs", []):
            hook["url"] = f"{receiver_url}/{receiver['name']}"
    path = tmp_path / "alertmanager.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def _post(url: str, payload: Any) -> None:
    request = urllib.request.Request(  # noqa: S310 (http://127.0.0.1 only)
        url,
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310 (http://127.0.0.1 only)
        assert response.status == 200


def _alert(alertname: str, severity: str, **labels: str) -> dict[str, Any]:
    now = datetime.now(UTC)
    return {
        "labels": {"alertname": alertname, "severity": severity, **labels},
        "annotations": {"summary": f"{alertname} test"},
        "startsAt": now.isoformat(),
        "endsAt": (now + timedelta(minutes=10)).isoformat(),
    }


def test_routes_inhibitions_and_webhook_body(receiver: _Receiver, tmp_path: Path) -> None:
    assert ALERTMANAGER is not None
    port = free_port()
    log = (tmp_path / "alertmanager.log").open("w")
    process = subprocess.Popen(
        [
            ALERTMANAGER,
            f"--config.file={_test_config(tmp_path, receiver.url)}",
            f"--storage.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",  # no gossip port: a single test instance
            "--log.level=warn",
        ],
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{base}/-/ready", timeout=2) as response:  # noqa: S310
                    if response.status == 200:
                        break
            except OSError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.2)
        acme = {"tenant": "acme", "environment": "production", "plugin": "resizer"}
        _post(
            f"{base}/api/v2/alerts",
            [
                _alert("PluginDown", "critical", **acme),
                # inhibited by PluginDown of the same plugin
                _alert("PluginHealthLow", "warning", **acme),
                _alert(
                    "PluginCpuHigh", "warning", tenant="zeta", environment="production", plugin="x"
                ),
                _alert("PluginmonDatabaseDown", "critical", instance="h1:9464", job="pluginmon"),
            ],
        )
        expected = {
            "/platform-webhook": {
                ("PluginDown", "resizer"),
                ("PluginCpuHigh", "x"),
                ("PluginmonDatabaseDown", ""),
            },
            "/acme-webhook": {("PluginDown", "resizer")},
        }
        deadline = time.monotonic() + 30
        while receiver.alerts_by_receiver() != expected and time.monotonic() < deadline:
            time.sleep(0.25)
        assert receiver.alerts_by_receiver() == expected
        # Alertmanager's webhook body: the same shape pluginmon's own notifier sends.
        _path, body = next(item for item in receiver.received if item[0] == "/acme-webhook")
        assert body["version"] == "4"
        assert body["receiver"] == "acme-webhook"
        assert body["status"] == "firing"
        assert body["groupLabels"] == {
            "alertname": "PluginDown",
            "tenant": "acme",
            "plugin": "resizer",
            "environment": "production",
        }
        assert {
            "groupKey",
            "commonLabels",
            "commonAnnotations",
            "externalURL",
            "alerts",
        } <= body.keys()
        assert body["alerts"][0]["fingerprint"]
        # The inhibited alert is in Alertmanager, but marked inhibited.
        with urllib.request.urlopen(f"{base}/api/v2/alerts?inhibited=true", timeout=5) as response:  # noqa: S310
            states = {
                a["labels"]["alertname"]: a["status"]["state"] for a in json.loads(response.read())
            }
        assert states["PluginHealthLow"] == "suppressed"
        assert states["PluginDown"] == "active"
    finally:
        stop_process(process)
        log.close()
