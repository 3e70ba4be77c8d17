"""Helpers for the end-to-end tests: real plugin processes, `pluginmon run` as a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.net_helpers import ServerThread, free_port

REPO = Path(__file__).resolve().parent.parent
T = TypeVar("T")

# Burns about 30% of one core: 3 ms busy, 7 ms asleep.
BURNER = """
import sys, time
while True:
    end = time.perf_counter() + 0.003
    while time.perf_counter() < end:
        pass
    time.sleep(0.007)
"""
# A parent with one child: both belong to the plugin.
SLEEPER = """
import subprocess, sys, time
child = subprocess.Popen(["sleep", "3600"])
try:
    time.sleep(3600)
finally:
    child.kill()
"""


def wait_for(
    what: str, probe: Callable[[], T | None], *, timeout: float = 30.0, interval: float = 0.2
) -> T:
    """Poll ``probe`` until it returns something truthy; fail with ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what} (last: {last!r})")


class PluginProcesses:
    """Real processes the daemon's config names by a unique cmdline marker."""

    def __init__(self) -> None:
        self.marker = f"pluginmon-e2e-{uuid.uuid4().hex[:10]}"
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, code: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-c", code, f"{self.marker}-{name}"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def config(self, tenant: str = "e2e") -> str:
        return "".join(
            f"""
[[plugins]]
tenant = "{tenant}"
name = "{name}"
environment = "test"
match = {{ cmdline = "{self.marker}-{name}$" }}
"""
            for name in ("burner", "sleeper")
        )

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@contextmanager
def plugin_processes() -> Iterator[PluginProcesses]:
    plugins = PluginProcesses()
    try:
        plugins.start("burner", BURNER)
        plugins.start("sleeper", SLEEPER)
        yield plugins
    finally:
        plugins.stop()


class DaemonProcess:
    """`pluginmon run` in a subprocess with JSON logs in a file."""

    def __init__(
        self,
        *,
        tmp_path: Path,
        database_url: str,
        config_text: str,
        data_dir: Path | None = None,
        interval: float = 0.5,
        extra_env: dict[str, str] | None = None,
        name: str = "daemon",
    ) -> None:
        self.port = free_port()
        self.data_dir = data_dir or tmp_path / "data"
        self.config_path = tmp_path / f"{name}.toml"
        self.config_path.write_text(config_text)
        self.log_path = tmp_path / f"{name}-{uuid.uuid4().hex[:6]}.log"
        base = {k: v for k, v in os.environ.items() if not k.startswith("PLUGINMON_")}
        self.env = {
            **base,
            "PLUGINMON_DATABASE_URL": database_url,
            "PLUGINMON_DATA_DIR": str(self.data_dir),
            "PLUGINMON_HTTP_HOST": "127.0.0.1",
            "PLUGINMON_HTTP_PORT": str(self.port),
            "PLUGINMON_LOG_FORMAT": "json",
            "PLUGINMON_SAMPLE_INTERVAL_SECONDS": str(interval),
            "PLUGINMON_FLUSH_INTERVAL_SECONDS": str(interval),
            "PLUGINMON_OUTBOX_INTERVAL_SECONDS": "1",
            "PLUGINMON_LABEL_DISCOVERY": "false",
            "PLUGINMON_SHUTDOWN_DEADLINE_SECONDS": "15",
            **(extra_env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> DaemonProcess:
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pluginmon.daemon.cli",
                "run",
                "--config",
                str(self.config_path),
            ],
            env=self.env,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        def ready() -> bool:
            self.assert_alive()
            return self.get("/readyz")[0] == 200

        wait_for("the daemon to be ready", ready, timeout=timeout)

    def wait_metric(
        self, what: str, predicate: Callable[[float], bool], name: str, timeout: float = 30.0
    ) -> None:
        """Wait until ``predicate(value of name)``; on timeout, fail with the daemon's log."""

        def probe() -> bool:
            self.assert_alive()
            status, _ = self.get("/healthz")
            if status != 200:
                return False
            return predicate(self.metric(name) or 0.0)

        try:
            wait_for(what, probe, timeout=timeout)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- daemon log ---\n{self.log_text()[-6000:]}") from None

    def assert_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(
                f"daemon exited with {self.proc.returncode}:\n{self.log_text()[-4000:]}"
            )

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
        request = urllib.request.Request(self.url + path, headers=headers or {})  # noqa: S310
        try:
            with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
                return int(response.status), response.read().decode()
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read().decode()
        except OSError:
            return 0, ""

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        status, text = self.get("/metrics")
        assert status == 200, text
        out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
        return out

    def metric(self, name: str, **labels: str) -> float | None:
        return self.metrics().get((name, tuple(sorted(labels.items()))))

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait_exit(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None
        return code

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_records(self) -> list[dict[str, Any]]:
        records = []
        for line in self.log_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records

    def final_counts(self) -> dict[str, Any]:
        for record in reversed(self.log_records()):
            if "samples_taken" in record:
                return dict(record)
        raise AssertionError(f"no final counts in the log:\n{self.log_text()[-4000:]}")


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``pluginmon ARGS`` in a subprocess, without the caller's PLUGINMON_* variables."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("PLUGINMON_")}
    base.setdefault("XDG_STATE_HOME", "/tmp/pluginmon-cli-test-state")
    return subprocess.run(
        [sys.executable, "-m", "pluginmon.daemon.cli", *args],
        env={**base, **(env or {})},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def sample_rows(database_url: str) -> int:
    with psycopg.connect(database_url, connect_timeout=10) as conn:
        row = conn.execute("SELECT count(*) FROM plugin_samples").fetchone()
        assert row is not None
        return int(row[0])


class WebhookReceiver:
    """A real HTTP server in a thread that records every POST (headers and body)."""

    def __init__(self) -> None:
        import http.server

        self.requests: list[tuple[dict[str, str], bytes]] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                receiver.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                return

        self._serving = ServerThread(Handler)
        self.port = self._serving.port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def __enter__(self) -> WebhookReceiver:
        self._serving.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._serving.stop()


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """(cert.pem, key.pem) in ``directory``: a one-day self-signed certificate for 127.0.0.1
    made with openssl; skips the calling test when openssl is not installed."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: cannot make a test certificate")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key
