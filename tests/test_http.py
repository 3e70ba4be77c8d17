"""HTTP endpoints against a real aiohttp server on a loopback port: metrics, probes, auth, TLS,
content coding, and the connection limits (slow heads, too many connections, no descriptors)."""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import json
import resource
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import suppress
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from pluginmon.collectors.models import PluginKey, PluginSample, Snapshot
from pluginmon.daemon.exporter import DaemonMetrics, ExporterState, MetricsRenderer, PluginCollector
from pluginmon.daemon.http import (
    BasicAuth,
    HttpLimits,
    HttpServer,
    Readiness,
    Throttle,
    accept_batch,
    connection_limit,
    tls_context,
    wants_gzip,
)
from tests.daemon_helpers import REPO, self_signed_certificate, wait_for

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


# -- content coding ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("accept_encoding", "large", "gzipped"),
    [
        (None, True, False),
        ("", True, False),
        ("gzip", True, True),
        ("gzip", False, False),  # a tie with identity: small bodies go out plain
        ("GZIP", True, True),
        ("x-gzip", True, True),
        ("gzip;q=0", True, False),
        ("gzip; q=0.0, deflate", True, False),
        ("gzip;q=0.5, identity", True, False),  # identity's q is 1
        ("gzip;q=1, identity;q=0.5", False, True),
        ("identity;q=0, gzip", False, True),  # only gzip is acceptable
        ("*", True, True),
        ("*;q=0", True, False),  # nothing acceptable: plain is all there is
        ("*;q=0, gzip;q=0.1", False, True),
        ("*, gzip;q=0", True, False),
        ("gzip;q=abc", True, False),
        ("gzip;q=nan", True, False),
        ("gzip;q=2", True, False),
        ("br, deflate", True, False),
        ("gzip;q=0, gzip", True, True),  # the highest q of a repeated coding
    ],
)
def test_wants_gzip_honours_q_values(
    accept_encoding: str | None, large: bool, gzipped: bool
) -> None:
    assert wants_gzip(accept_encoding, large=large) is gzipped


async def test_metrics_encoding_follows_q_values_and_varies() -> None:
    renderer, _ = make_renderer(plugins=2000)  # well over the gzip threshold
    async with (
        HttpServer(host="127.0.0.1", port=0, metrics=renderer, readiness=Ready()) as server,
        aiohttp.ClientSession(auto_decompress=False) as client,
    ):
        url = f"http://127.0.0.1:{server.port}/metrics"
        for accept_encoding, gzipped in [
            ("gzip", True),
            ("gzip;q=0", False),
            ("identity", False),
            ("*", True),
            ("*;q=0, identity", False),
            ("identity;q=0.2, gzip;q=0.9", True),
        ]:
            async with client.get(url, headers={"Accept-Encoding": accept_encoding}) as resp:
                assert resp.status == 200
                body = await resp.read()
                vary = {v.strip().lower() for v in resp.headers["Vary"].split(",")}
                assert {"accept-encoding", "accept"} <= vary, accept_encoding
                assert (resp.headers.get("Content-Encoding") == "gzip") is gzipped, accept_encoding
            text = (gzip.decompress(body) if gzipped else body).decode()
            assert text.count("pluginmon_plugin_up{") == 2000, accept_encoding


@pytest.mark.parametrize("scheme", ["Basic", "basic", "BASIC", "bAsIc"])
async def test_basic_auth_scheme_is_case_insensitive(scheme: str) -> None:
    renderer, _ = make_renderer()
    token = base64.b64encode(b"prom:s3cret").decode()
    wrong = base64.b64encode(b"prom:wrong").decode()
    async with (
        HttpServer(
            host="127.0.0.1",
            port=0,
            metrics=renderer,
            readiness=Ready(),
            auth=BasicAuth("prom", password="s3cret"),
        ) as server,
        aiohttp.ClientSession() as client,
    ):
        url = f"http://127.0.0.1:{server.port}/metrics"
        async with client.get(url, headers={"Authorization": f"{scheme} {token}"}) as resp:
            assert resp.status == 200
        async with client.get(url, headers={"Authorization": f"{scheme}  {token} "}) as resp:
            assert resp.status == 200
        async with client.get(url, headers={"Authorization": f"{scheme} {wrong}"}) as resp:
            assert resp.status == 401
        async with client.get(url, headers={"Authorization": f"Bearer {token}"}) as resp:
            assert resp.status == 401
        async with client.get(url, headers={"Authorization": f"{scheme}x {token}"}) as resp:
            assert resp.status == 401


# -- connection limits ------------------------------------------------------------------------


def test_throttle_allows_one_event_per_interval() -> None:
    now = [100.0]
    throttle = Throttle(60.0, clock=lambda: now[0])
    assert throttle.ready() == 0
    assert throttle.ready() is None
    now[0] += 59.9
    assert throttle.ready() is None
    now[0] += 0.2
    assert throttle.ready() == 2  # two held back since the last one let through
    assert throttle.ready() is None


def test_connection_limit_is_a_quarter_of_the_descriptor_limit() -> None:
    assert connection_limit(256, open_files_limit=1024) == 256
    assert connection_limit(256, open_files_limit=128) == 32
    assert connection_limit(256, open_files_limit=2) == 1
    assert connection_limit(10, open_files_limit=resource.RLIM_INFINITY) == 10
    assert accept_batch(1024) == 100
    assert accept_batch(128) == 16
    assert accept_batch(2) == 1
    assert accept_batch(resource.RLIM_INFINITY) == 100
    with pytest.raises(ValueError, match="header_timeout_seconds"):
        HttpLimits(header_timeout_seconds=float("inf"))
    with pytest.raises(ValueError, match="max_connections"):
        HttpLimits(max_connections=0)


async def read_until_closed(reader: asyncio.StreamReader, within_seconds: float) -> bytes:
    """Everything the server sends until it closes the connection (fails on timeout)."""
    async with asyncio.timeout(within_seconds):
        return await reader.read()


async def test_slow_headers_are_cut_after_the_header_timeout() -> None:
    renderer, _ = make_renderer()
    registry = CollectorRegistry()
    limits = HttpLimits(header_timeout_seconds=1.0, keepalive_timeout_seconds=30.0)
    async with HttpServer(
        host="127.0.0.1",
        port=0,
        metrics=renderer,
        readiness=Ready(),
        limits=limits,
        registry=registry,
    ) as server:
        clients = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(50)]
        opened = time.monotonic()
        stop = asyncio.Event()

        async def trickle(writer: asyncio.StreamWriter) -> None:
            # A header line every 0.2 s: never idle, never done (slowloris).
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            with suppress(ConnectionError):
                while not stop.is_set():
                    writer.write(b"X-Slow: a\r\n")
                    await writer.drain()
                    await asyncio.sleep(0.2)

        trickles = [asyncio.create_task(trickle(w)) for _, w in clients]
        try:
            received = await asyncio.gather(*(read_until_closed(r, 30) for r, _ in clients))
            closed_after = time.monotonic() - opened
        finally:
            stop.set()
            await asyncio.gather(*trickles, return_exceptions=True)
            for _, writer in clients:
                writer.close()
        assert received == [b""] * 50  # closed by the server, without an answer
        assert closed_after >= 0.9  # ... and not before the timeout
        rejected = registry.get_sample_value(
            "pluginmon_http_connections_rejected_total", {"reason": "header_timeout"}
        )
        assert rejected == 50
        async with (
            aiohttp.ClientSession() as client,
            client.get(f"http://127.0.0.1:{server.port}/healthz") as resp,
        ):
            assert resp.status == 200


async def test_tls_handshake_and_head_each_get_the_header_timeout(
    self_signed: tuple[Path, Path],
) -> None:
    cert, key = self_signed
    renderer, _ = make_renderer()
    client_ctx = ssl.create_default_context(cafile=str(cert))
    limits = HttpLimits(header_timeout_seconds=1.0)
    async with HttpServer(
        host="127.0.0.1",
        port=0,
        metrics=renderer,
        readiness=Ready(),
        ssl_context=tls_context(cert, key),
        limits=limits,
    ) as server:
        # Plain TCP, no handshake ever started.
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        opened = time.monotonic()
        try:
            assert await read_until_closed(reader, 30) == b""
            assert time.monotonic() - opened >= 0.9
        finally:
            writer.close()
        # Handshake done, then silence.
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", server.port, ssl=client_ctx, server_hostname="127.0.0.1"
        )
        opened = time.monotonic()
        try:
            assert await read_until_closed(reader, 30) == b""
            assert time.monotonic() - opened >= 0.9
        finally:
            writer.close()
        async with (
            aiohttp.ClientSession() as client,
            client.get(f"https://127.0.0.1:{server.port}/healthz", ssl=client_ctx) as resp,
        ):
            assert resp.status == 200


async def test_idle_keep_alive_connection_is_closed() -> None:
    renderer, _ = make_renderer()
    limits = HttpLimits(header_timeout_seconds=5.0, keepalive_timeout_seconds=1.0)
    async with HttpServer(
        host="127.0.0.1", port=0, metrics=renderer, readiness=Ready(), limits=limits
    ) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            answered = time.monotonic()
            rest = await read_until_closed(reader, 30)
            idle = time.monotonic() - answered
        finally:
            writer.close()
        assert rest.startswith(b"HTTP/1.1 200")
        assert rest.endswith(b"ok\n")
        assert idle >= 0.9  # kept alive for the timeout, then closed


async def test_connection_limit_holds_and_frees_up() -> None:
    renderer, _ = make_renderer()
    registry = CollectorRegistry()
    limits = HttpLimits(header_timeout_seconds=5.0, max_connections=10)
    async with HttpServer(
        host="127.0.0.1",
        port=0,
        metrics=renderer,
        readiness=Ready(),
        limits=limits,
        registry=registry,
    ) as server:
        clients = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(30)]
        try:
            # Over the limit: one 503 each, at once. Connections are taken in order.
            refused = await asyncio.gather(*(read_until_closed(r, 30) for r, _ in clients[10:]))
            assert all(answer.startswith(b"HTTP/1.1 503 ") for answer in refused)
            assert all(answer.endswith(b"too many connections\n") for answer in refused)
            assert registry.get_sample_value("pluginmon_http_connections") == 10
            # The ten held ones say nothing and are cut by the header timeout.
            held = await asyncio.gather(*(read_until_closed(r, 30) for r, _ in clients[:10]))
            assert held == [b""] * 10
        finally:
            for _, writer in clients:
                writer.close()
        rejected = "pluginmon_http_connections_rejected_total"
        assert registry.get_sample_value(rejected, {"reason": "connection_limit"}) == 20
        assert registry.get_sample_value(rejected, {"reason": "header_timeout"}) == 10
        async with aiohttp.ClientSession() as client:
            async with client.get(f"http://127.0.0.1:{server.port}/healthz") as resp:
                assert resp.status == 200
            async with client.get(f"http://127.0.0.1:{server.port}/metrics") as resp:
                assert resp.status == 200


# A server alone in a process whose descriptors the test can use up ("fill") and give back.
_SERVER_SCRIPT = r"""
import asyncio, json, os, sys
from prometheus_client import CollectorRegistry, generate_latest
from pluginmon.daemon.http import HttpLimits, HttpServer, Readiness
from pluginmon.daemon.logs import configure_logging

class Source:
    def __init__(self, registry):
        self.registry = registry
    def render_chunks(self, accept):
        return [generate_latest(self.registry)], "text/plain; version=0.0.4"

async def ready():
    return Readiness(ready=True)

def say(**fields):
    print(json.dumps(fields), flush=True)

async def main():
    configure_logging(log_format="json")
    registry = CollectorRegistry()
    loop = asyncio.get_running_loop()
    limits = HttpLimits(header_timeout_seconds=1.0)
    async with HttpServer(host="127.0.0.1", port=0, metrics=Source(registry),
                          readiness=ready, registry=registry, limits=limits) as server:
        say(port=server.port, limit=server.connections.limit)
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        hog = []
        while command := (await reader.readline()).decode().strip():
            if command == "fill":
                try:
                    while True:
                        hog.append(os.open("/dev/null", os.O_RDONLY))
                except OSError:
                    pass
                say(filled=len(hog))
            elif command == "release":
                for fd in hog:
                    os.close(fd)
                hog.clear()
                say(released=True)
            elif command == "stats":
                say(accept_errors=server.connections.accept_errors)

asyncio.run(main())
"""


def _low_descriptor_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))


@pytest.fixture
def fd_starved_server() -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _SERVER_SCRIPT],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_low_descriptor_limit,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def _ask(proc: subprocess.Popen[str], command: str) -> dict[str, object]:
    assert proc.stdin is not None
    assert proc.stdout is not None
    proc.stdin.write(command + "\n")
    proc.stdin.flush()
    answer: dict[str, object] = json.loads(proc.stdout.readline())
    return answer


def _emfile_errors(proc: subprocess.Popen[str]) -> int:
    errors = _ask(proc, "stats")["accept_errors"]
    assert isinstance(errors, dict)
    return int(errors.get("emfile", 0))


def test_out_of_descriptors_is_counted_logged_once_and_recovers(
    fd_starved_server: subprocess.Popen[str],
) -> None:
    proc = fd_starved_server
    assert proc.stdout is not None
    assert proc.stderr is not None
    started = json.loads(proc.stdout.readline())
    port = int(started["port"])
    assert started["limit"] == 16  # a quarter of the 64 descriptors
    filled = _ask(proc, "fill")["filled"]
    assert isinstance(filled, int)
    assert filled > 0
    began = time.monotonic()
    clients = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(20)]
    try:
        # accept() fails for want of a descriptor; asyncio retries it each second.
        wait_for("three failed accept() rounds", lambda: _emfile_errors(proc) >= 3, timeout=60)
    finally:
        for client in clients:
            client.close()
    assert _ask(proc, "release") == {"released": True}

    def healthz() -> bool:
        with (
            suppress(OSError),
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp,
        ):
            return bool(resp.status == 200)
        return False

    wait_for("the server to answer again", healthz, timeout=60)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        metrics = resp.read().decode()
    counted = [
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith('pluginmon_http_accept_errors_total{reason="emfile"}')
    ]
    assert counted
    assert counted[0] >= 3
    elapsed = time.monotonic() - began
    assert proc.stdin is not None
    proc.stdin.close()
    assert proc.wait(timeout=30) == 0
    log = proc.stderr.read().splitlines()
    accept_lines = [line for line in log if "cannot accept connections" in line]
    # At most one line a minute, however many failures (each is in the counter).
    assert 1 <= len(accept_lines) <= 1 + int(elapsed // 60)
    assert len(log) <= 10, log


async def test_a_readiness_check_that_raises_is_503_with_its_kind_never_500() -> None:
    """Issue 15: /readyz says why and never answers 500. `pluginmon run`'s readiness catches
    everything itself; `pluginmon api`'s catches database errors only (an asyncpg
    InterfaceError from a closing pool was a 500 with aiohttp's error page)."""
    renderer, _ = make_renderer()

    async def broken() -> Readiness:
        raise RuntimeError("the pool is closing: secret-free but unexpected")

    async with (
        HttpServer(host="127.0.0.1", port=0, metrics=renderer, readiness=broken) as server,
        aiohttp.ClientSession() as client,
        client.get(f"http://127.0.0.1:{server.port}/readyz") as resp,
    ):
        assert resp.status == 503
        assert await resp.text() == "not ready: readiness check failed: RuntimeError\n"
