"""`pluginmon run` with few file descriptors, flooded with connections: the HTTP limit holds,
sampling and writing go on meanwhile, the log stays small, and it answers once they close."""

from __future__ import annotations

import asyncio
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest

from tests.daemon_helpers import REPO, DaemonProcess, plugin_processes, wait_for
from tests.dbutil import create_database, drop_database, with_database

OPEN_FILES = 128  # the HTTP limit is then a quarter of it: 32 connections
FLOOD = 300


def _few_descriptors() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (OPEN_FILES, hard))


class FewDescriptorsDaemon(DaemonProcess):
    """`pluginmon run` under RLIMIT_NOFILE = OPEN_FILES."""

    def start(self) -> FewDescriptorsDaemon:
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
            preexec_fn=_few_descriptors,
        )
        return self


@pytest.fixture
def flood_db(pg_admin_url: str) -> Iterator[str]:
    name = create_database(pg_admin_url, prefix="flood")
    try:
        yield with_database(pg_admin_url, name)
    finally:
        drop_database(pg_admin_url, name)


def rows_between(url: str, start: datetime, end: datetime) -> int:
    with psycopg.connect(url, connect_timeout=10) as conn:
        row = conn.execute(
            'SELECT count(*) FROM plugin_samples WHERE "timestamp" BETWEEN %s AND %s',
            (start, end),
        ).fetchone()
        assert row is not None
        return int(row[0])


async def test_connection_flood_under_a_low_descriptor_limit(flood_db: str, tmp_path: Path) -> None:
    with plugin_processes() as plugins:
        daemon = FewDescriptorsDaemon(
            tmp_path=tmp_path, database_url=flood_db, config_text=plugins.config()
        ).start()
        try:
            daemon.wait_ready(timeout=180)  # on Citus at load 20 it took over 90 s
            assert daemon.metric("pluginmon_http_connection_limit") == OPEN_FILES // 4
            flood_start = datetime.now(UTC)
            began = time.monotonic()
            clients = []
            for _ in range(FLOOD):
                clients.append(await asyncio.open_connection("127.0.0.1", daemon.port))
            answers = [asyncio.create_task(reader.read()) for reader, _ in clients]
            try:
                # Beyond the limit each gets one 503 at once; the 32 held say nothing.
                await refusals(answers, FLOOD - OPEN_FILES // 4)
                await asyncio.sleep(2)  # a few sampling ticks while every slot is taken
                flood_end = datetime.now(UTC)
            finally:
                for _, writer in clients:
                    writer.close()
                await asyncio.gather(*answers, return_exceptions=True)
            refused = [a.result() for a in answers if a.result().startswith(b"HTTP/1.1 503 ")]
            assert len(refused) == FLOOD - OPEN_FILES // 4
            wait_for("/healthz once the flood is gone", lambda: daemon.get("/healthz")[0] == 200)
            elapsed = time.monotonic() - began
            metrics = daemon.metrics()
            assert (
                metrics[
                    ("pluginmon_http_connections_rejected_total", (("reason", "connection_limit"),))
                ]
                >= FLOOD - OPEN_FILES // 4
            )
            assert metrics.get(("pluginmon_job_failures_total", (("task", "sample"),)), 0) == 0
            # Sampled and written while the flood held every connection the daemon allows.
            wait_for(
                "rows sampled during the flood",
                lambda: rows_between(flood_db, flood_start, flood_end) >= 2,
                timeout=60,
            )
        finally:
            daemon.kill()
    log = daemon.log_text().splitlines()
    refusals_logged = [line for line in log if "refused a connection" in line]
    assert 1 <= len(refusals_logged) <= 1 + int(elapsed // 60)
    assert not [line for line in log if "Too many open files" in line]
    # The flood is said in a line or two, not one per connection. The start-up's one line per
    # migration applied is left out: it grows with the schema (35 files; on TimescaleDB 62
    # lines in all), not with the flood.
    said = [line for line in log if "applied migration" not in line]
    assert len(said) < 40, "\n".join(said[-40:])


async def refusals(answers: list[asyncio.Task[bytes]], count: int) -> None:
    """Returns once ``count`` of ``answers`` are in; fails after 60 s."""
    pending = set(answers)
    async with asyncio.timeout(60):
        while len(answers) - len(pending) < count:
            _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
