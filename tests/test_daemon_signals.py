"""Signals: the first SIGTERM/SIGINT stops gracefully, a second one exits at once."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

from daemon.app import install_signal_handlers
from tests.daemon_helpers import DaemonProcess, wait_for


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
        assert "database not connected yet" in text
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
