"""Signals: the first SIGTERM/SIGINT stops gracefully, a second one exits at once."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import ssl
import urllib.error
import urllib.request
from pathlib import Path

from pluginmon.daemon.lifecycle import install_signal_handlers
from tests.daemon_helpers import DaemonProcess, self_signed_certificate, wait_for


async def test_first_signal_stops_second_calls_exit() -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    second: list[int] = []
    install_signal_handlers(loop, stop, on_second=second.append)
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(stop.wait(), 5)
        assert second == []
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(50):
            if second:
                break
            await asyncio.sleep(0.02)
        assert second == [signal.SIGINT]
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        loop.remove_signal_handler(signal.SIGINT)


def test_sigint_while_waiting_for_the_database_exits_0(tmp_path: Path) -> None:
    # Nothing listens on port 1: the daemon waits for its database, retrying.
    daemon = DaemonProcess(
        tmp_path=tmp_path,
        database_url="postgresql://pluginmon:hunter2@127.0.0.1:1/pluginmon?connect_timeout=2",
        config_text="",
    ).start()
    try:
        wait_for(
            "the daemon to report the database unreachable",
            lambda: any(
                r.get("message", "").startswith("database unreachable at start-up")
                for r in daemon.log_records()
            ),
            timeout=30,
        )
        assert daemon.get("/healthz")[0] == 200  # alive while it waits
        status, text = daemon.get("/readyz")
        assert status == 503
        assert "database unreachable" in text
        daemon.signal(signal.SIGINT)
        assert daemon.wait_exit(timeout=30) == 0
    finally:
        daemon.kill()
    log = daemon.log_text()
    assert "hunter2" not in log
    assert "Traceback" not in log
    messages = [r.get("message", "") for r in daemon.log_records()]
    assert sum(m.startswith("database unreachable at start-up") for m in messages) == 1
    assert any(m.startswith("SIGINT received") for m in messages)


def test_basic_auth_and_tls_from_settings(tmp_path: Path) -> None:
    """The daemon's endpoint with http_auth_* and http_tls_* set, over real HTTPS."""
    cert, key = self_signed_certificate(tmp_path)
    daemon = DaemonProcess(
        tmp_path=tmp_path,
        database_url="postgresql://pluginmon:x@127.0.0.1:1/pluginmon?connect_timeout=2",
        config_text=f'http_tls_cert_file = "{cert}"\nhttp_tls_key_file = "{key}"\n'
        'http_auth_username = "prom"\n',
        extra_env={"PLUGINMON_HTTP_AUTH_PASSWORD": "s3cret-pw"},
    ).start()
    context = ssl.create_default_context(cafile=str(cert))

    def get(headers: dict[str, str], path: str = "/metrics") -> int:
        request = urllib.request.Request(f"https://127.0.0.1:{daemon.port}{path}", headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=5, context=context) as response:  # noqa: S310
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except OSError:
            return 0

    token = base64.b64encode(b"prom:s3cret-pw").decode()
    try:
        wait_for("HTTPS to answer", lambda: get({}) == 401, timeout=30)
        assert get({"Authorization": f"Basic {token}"}) == 200
        wrong = base64.b64encode(b"prom:nope").decode()
        assert get({"Authorization": f"Basic {wrong}"}) == 401
        # Probes answer without credentials (http_auth_probes = false by default).
        assert get({}, "/healthz") == 200
        assert get({}, "/readyz") == 503  # no database: not ready, but not 401
        assert daemon.get("/healthz")[0] == 0  # plain HTTP is not served
    finally:
        daemon.signal(signal.SIGTERM)
        assert daemon.wait_exit(timeout=30) == 0
    assert "s3cret-pw" not in daemon.log_text()


def test_second_signal_exits_1_at_once(tmp_path: Path) -> None:
    """DESIGN allows exit codes 0, 1, 2: a forced stop (second signal) is 1, not 128+n."""
    daemon = DaemonProcess(
        tmp_path=tmp_path,
        database_url="postgresql://pluginmon:x@127.0.0.1:1/pluginmon?connect_timeout=2",
        config_text="",
    ).start()
    try:
        wait_for("/healthz", lambda: daemon.get("/healthz")[0] == 200, timeout=30)
        assert daemon.proc is not None
        # Two different signals never merge into one pending signal: both are handled.
        os.kill(daemon.proc.pid, signal.SIGTERM)
        os.kill(daemon.proc.pid, signal.SIGINT)
        assert daemon.wait_exit(timeout=30) == 1
    finally:
        daemon.kill()
    messages = [r.get("message", "") for r in daemon.log_records()]
    assert any(m.startswith("second SIG") and m.endswith("exiting now") for m in messages), messages


def test_first_sigint_is_a_graceful_exit_0(tmp_path: Path) -> None:
    daemon = DaemonProcess(
        tmp_path=tmp_path,
        database_url="postgresql://pluginmon:x@127.0.0.1:1/pluginmon?connect_timeout=2",
        config_text="",
    ).start()
    try:
        wait_for("/healthz", lambda: daemon.get("/healthz")[0] == 200, timeout=30)
        daemon.signal(signal.SIGINT)
        assert daemon.wait_exit(timeout=30) == 0
    finally:
        daemon.kill()
    assert "final counts" in daemon.log_text()
