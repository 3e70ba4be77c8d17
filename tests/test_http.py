"""HTTP endpoints against a real aiohttp server on a loopback port: metrics, probes, auth, TLS."""

from __future__ import annotations

import base64
import gzip
import hashlib
import ssl
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from pluginmon.collectors.models import PluginKey, PluginSample, Snapshot
from pluginmon.daemon.exporter import DaemonMetrics, ExporterState, MetricsRenderer, PluginCollector
from pluginmon.daemon.http import BasicAuth, HttpServer, Readiness, tls_context
from tests.daemon_helpers import self_signed_certificate

KEY = PluginKey("acme", "resizer", "production")


def make_renderer(plugins: int = 1) -> tuple[MetricsRenderer, ExporterState]:
    state = ExporterState(grace_seconds=60)
    now = datetime.now(UTC)
    samples = tuple(
        PluginSample(
            key=PluginKey("acme", f"p{i}", "production") if i else KEY,
            timestamp=now,
            up=True,
            process_count=1,
            cpu_percent=12.5,
            rss_bytes=1000,
            vms_bytes=2000,
            threads=2,
        )
        for i in range(plugins)
    )
    state.update_snapshot(Snapshot(timestamp=now, host="h", samples=samples, duration_seconds=0.1))
    registry = CollectorRegistry()
    DaemonMetrics(registry, version="test")
    return MetricsRenderer(registry, PluginCollector(state)), state


class Ready:
    def __init__(self) -> None:
        self.value = Readiness(ready=False, reasons=("database unreachable",))

    async def __call__(self) -> Readiness:
        return self.value


async def test_metrics_healthz_readyz() -> None:
    renderer, _ = make_renderer()
    ready = Ready()
    hooks: list[int] = []
    async with (
        HttpServer(
            host="127.0.0.1",
            port=0,
            metrics=renderer,
            readiness=ready,
            before_render=lambda: hooks.append(1),
        ) as server,
        aiohttp.ClientSession() as client,
    ):
        base = f"http://127.0.0.1:{server.port}"
        async with client.get(base + "/metrics") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            text = await resp.text()
        families = {f.name: f for f in text_string_to_metric_families(text)}
        cpu = families["pluginmon_plugin_cpu_percent"].samples[0]
        assert cpu.value == 12.5
        assert cpu.labels == {"tenant": "acme", "plugin": "resizer", "environment": "production"}
        assert "pluginmon_build_info" in families
        assert hooks == [1]

        async with client.get(
            base + "/metrics",
            headers={"Accept": "application/openmetrics-text; version=1.0.0"},
        ) as resp:
            assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
            assert (await resp.text()).endswith("# EOF\n")

        async with client.get(base + "/healthz") as resp:
            assert resp.status == 200
        async with client.get(base + "/readyz") as resp:
            assert resp.status == 503
            assert "database unreachable" in await resp.text()
        ready.value = Readiness(ready=True)
        async with client.get(base + "/readyz") as resp:
            assert resp.status == 200


async def test_large_exposition_is_gzipped() -> None:
    renderer, _ = make_renderer(plugins=2000)
    async with (
        HttpServer(host="127.0.0.1", port=0, metrics=renderer, readiness=Ready()) as server,
        aiohttp.ClientSession(auto_decompress=False) as client,
    ):
        resp = await client.get(
            f"http://127.0.0.1:{server.port}/metrics", headers={"Accept-Encoding": "gzip"}
        )
        assert resp.headers["Content-Encoding"] == "gzip"
        body = gzip.decompress(await resp.read()).decode()
        resp.release()
    assert body.count("pluginmon_plugin_up{") == 2000


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


@pytest.mark.parametrize("hashed", [False, True])
async def test_basic_auth(hashed: bool) -> None:
    renderer, _ = make_renderer()
    auth = (
        BasicAuth("prom", password_sha256=hashlib.sha256(b"s3cret").hexdigest())
        if hashed
        else BasicAuth("prom", password="s3cret")
    )
    async with (
        HttpServer(
            host="127.0.0.1", port=0, metrics=renderer, readiness=Ready(), auth=auth
        ) as server,
        aiohttp.ClientSession() as client,
    ):
        url = f"http://127.0.0.1:{server.port}/metrics"
        async with client.get(url) as resp:
            assert resp.status == 401
            assert resp.headers["WWW-Authenticate"].startswith("Basic")
        async with client.get(url, headers=basic("prom", "wrong")) as resp:
            assert resp.status == 401
        async with client.get(url, headers=basic("other", "s3cret")) as resp:
            assert resp.status == 401
        async with client.get(url, headers=basic("prom", "s3cret")) as resp:
            assert resp.status == 200
            assert "pluginmon_plugin_up" in await resp.text()


@pytest.mark.parametrize("auth_probes", [False, True])
async def test_probes_exempt_from_basic_auth_unless_asked(auth_probes: bool) -> None:
    """Orchestrator probes carry no credentials: /healthz and /readyz skip auth by default."""
    renderer, _ = make_renderer()
    ready = Ready()
    ready.value = Readiness(ready=True)
    async with (
        HttpServer(
            host="127.0.0.1",
            port=0,
            metrics=renderer,
            readiness=ready,
            auth=BasicAuth("prom", password="s3cret"),
            auth_probes=auth_probes,
        ) as server,
        aiohttp.ClientSession() as client,
    ):
        base = f"http://127.0.0.1:{server.port}"
        probe_status = 401 if auth_probes else 200
        for path in ("/healthz", "/readyz"):
            async with client.get(base + path) as resp:
                assert resp.status == probe_status, path
            async with client.get(base + path, headers=basic("prom", "s3cret")) as resp:
                assert resp.status == 200, path
        # /metrics always needs the credentials.
        async with client.get(base + "/metrics") as resp:
            assert resp.status == 401
        async with client.get(base + "/metrics", headers=basic("prom", "s3cret")) as resp:
            assert resp.status == 200


@pytest.fixture
def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    return self_signed_certificate(tmp_path)


async def test_tls(self_signed: tuple[Path, Path]) -> None:
    cert, key = self_signed
    renderer, _ = make_renderer()
    client_ctx = ssl.create_default_context(cafile=str(cert))
    async with (
        HttpServer(
            host="127.0.0.1",
            port=0,
            metrics=renderer,
            readiness=Ready(),
            ssl_context=tls_context(cert, key),
        ) as server,
        aiohttp.ClientSession() as client,
    ):
        async with client.get(f"https://127.0.0.1:{server.port}/healthz", ssl=client_ctx) as resp:
            assert resp.status == 200
        with pytest.raises(aiohttp.ClientError):
            async with client.get(f"http://127.0.0.1:{server.port}/healthz") as resp:
                await resp.read()
