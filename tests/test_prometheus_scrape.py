"""A real Prometheus (Debian's package) scrapes a real daemon; its HTTP API returns our series."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon_helpers import DaemonProcess, plugin_processes, wait_for
from tests.dbutil import create_database, drop_database, with_database
from tests.net_helpers import free_port

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"


@pytest.fixture
def scrape_db(pg_admin_url: str) -> Iterator[str]:
    name = create_database(pg_admin_url, prefix="prom")
    try:
        yield with_database(pg_admin_url, name)
    finally:
        drop_database(pg_admin_url, name)


def query(port: int, promql: str) -> list[dict[str, object]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            body = json.load(response)
    except OSError:
        return []
    if body.get("status") != "success":
        return []
    result = body["data"]["result"]
    assert isinstance(result, list)
    return result


@pytest.mark.skipif(
    not Path(PROMETHEUS).exists(),
    reason="Debian's prometheus is not installed (apt-get install prometheus; .ci/run does)",
)
def test_prometheus_scrapes_plugin_series(scrape_db: str, tmp_path: Path) -> None:
    with plugin_processes() as plugins:
        daemon = DaemonProcess(
            tmp_path=tmp_path, database_url=scrape_db, config_text=plugins.config()
        ).start()
        prometheus: subprocess.Popen[bytes] | None = None
        try:
            daemon.wait_ready()
            prom_port = free_port()
            config = tmp_path / "prometheus.yml"
            config.write_text(
                f"""
global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: pluginmon
    static_configs:
      - targets: ["127.0.0.1:{daemon.port}"]
"""
            )
            prometheus = subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{prom_port}",
                    "--log.level=warn",
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=(tmp_path / "prometheus.log").open("wb"),
            )
            selector = (
                'pluginmon_plugin_cpu_percent{job="pluginmon",tenant="e2e",'
                'plugin="burner",environment="test"}'
            )
            result = wait_for(
                "Prometheus to have scraped pluginmon_plugin_cpu_percent",
                lambda: query(prom_port, selector),
                timeout=60,
                interval=0.5,
            )
            value = float(result[0]["value"][1])  # type: ignore[index]
            assert 0 < value <= 100
            up = wait_for("up == 1", lambda: query(prom_port, 'up{job="pluginmon"} == 1'))
            assert up[0]["metric"]["instance"] == f"127.0.0.1:{daemon.port}"  # type: ignore[index]
            rss = query(prom_port, 'pluginmon_plugin_memory_rss_bytes{plugin="sleeper"}')
            assert float(rss[0]["value"][1]) > 1024 * 1024  # type: ignore[index]
            samples = query(prom_port, 'pluginmon_samples_total{job="pluginmon"}')
            assert float(samples[0]["value"][1]) > 0  # type: ignore[index]
        finally:
            if prometheus is not None:
                prometheus.terminate()
                prometheus.wait(timeout=30)
            daemon.signal(signal.SIGTERM)
            assert daemon.wait_exit(timeout=30) == 0
