"""Failover: a primary and a streaming standby, a multi-host URL with target_session_attrs=read-write.

Both made by the test from the embedded server package (initdb, pg_basebackup -R). The daemon
runs against both hosts; the primary stops, and while only the (read-only) standby answers,
rows spool and the firing alert stays firing; the standby is promoted and the daemon goes on
writing to it: every sample taken is a row there, and the alert is the same alert, notified
once.
"""

from __future__ import annotations

import asyncio
import json
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from pluginmon.storage.embedded import EMBEDDED_SYSTEM_USER
from pluginmon.storage.errors import is_transient
from pluginmon.storage.reachability import failure_reason
from tests.daemon_helpers import DaemonProcess, WebhookReceiver, plugin_processes, wait_for
from tests.pg_cluster import Cluster

RULE = """
[[alerts.rules]]
name = "FailoverSleeperUp"
metric = "process_count"
op = ">="
threshold = 1
for_seconds = 0
severity = "info"
"""


def embedded_bin_dir() -> Path:
    """The embedded package's server binaries, reachable by the server user when root."""
    from pluginmon.storage import embedded

    bin_dir = embedded._bin_dir()
    if not (bin_dir / "pg_basebackup").exists():
        pytest.skip(f"no pg_basebackup in {bin_dir}")
    # The embedded server's own start does this (storage/embedded.py); a test that runs
    # before any embedded server (PLUGINMON_TEST_DATABASE_URL set) must do it too.
    import os

    if os.geteuid() == 0:
        embedded._ensure_system_user(EMBEDDED_SYSTEM_USER)
        embedded._make_traversable(bin_dir)
        embedded._make_readable_tree(bin_dir.parent)
    return bin_dir


@pytest.fixture
def clusters() -> Iterator[tuple[Cluster, Cluster]]:
    """(primary, standby) streaming from it, both on loopback."""
    bin_dir = embedded_bin_dir()
    directory = Path(tempfile.mkdtemp(prefix="pluginmon-test-failover-"))
    primary = Cluster(bin_dir, directory / "primary", run_as_when_root=EMBEDDED_SYSTEM_USER)
    standby = Cluster(bin_dir, directory / "standby", run_as_when_root=EMBEDDED_SYSTEM_USER)
    try:
        primary.init(settings={"wal_level": "replica", "max_wal_senders": "4"}).start()
        with psycopg.connect(primary.url(), autocommit=True) as conn:
            conn.execute("CREATE DATABASE pluginmon")
        standby.standby_of(primary).start()
        standby.wait_accepting()
        yield primary, standby
    finally:
        standby.remove()
        primary.remove()
        import shutil

        shutil.rmtree(directory, ignore_errors=True)


def query(cluster: Cluster, statement: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(cluster.url("pluginmon"), connect_timeout=5) as conn:
        return conn.execute(statement.encode()).fetchall()


def refused_by_both_drivers(url: str) -> list[BaseException]:
    """What psycopg (libpq) and asyncpg raise connecting to ``url``."""
    refused: list[BaseException] = []
    with pytest.raises(psycopg.OperationalError) as libpq:
        psycopg.connect(url, connect_timeout=5).close()
    refused.append(libpq.value)

    async def connect() -> None:
        conn = await asyncpg.connect(url, timeout=5)
        await conn.close()

    with pytest.raises(asyncpg.exceptions.TargetServerAttributeNotMatched) as native:
        asyncio.run(connect())
    refused.append(native.value)
    return refused


def rows_written(daemon: DaemonProcess) -> float:
    daemon.assert_alive()
    return daemon.metric("pluginmon_rows_written_total", table="plugin_samples") or 0.0


def firing_posts(receiver: WebhookReceiver) -> list[dict[str, Any]]:
    out = []
    for _headers, body in list(receiver.requests):
        payload = json.loads(body)
        if payload["status"] == "firing":
            out.append(payload)
    return out


def test_daemon_follows_a_promoted_standby_and_loses_nothing(
    clusters: tuple[Cluster, Cluster], tmp_path: Path
) -> None:
    started = time.monotonic()
    primary, standby = clusters
    assert query(standby, "SELECT pg_is_in_recovery()") == [(True,)]
    url = (
        f"postgresql://postgres:{primary.password}@127.0.0.1:{primary.port},"
        f"127.0.0.1:{standby.port}/pluginmon?target_session_attrs=read-write"
    )
    with plugin_processes() as plugins, WebhookReceiver() as receiver:
        webhook = f'\n[[alerts.webhooks]]\nname = "failover"\nurl = "{receiver.url}"\n'
        daemon = DaemonProcess(
            tmp_path=tmp_path,
            database_url=url,
            config_text=plugins.config() + RULE + webhook,
            extra_env={"PLUGINMON_DATABASE_RETRY_MAX_SECONDS": "1"},
        ).start()
        try:
            daemon.wait_ready()
            firing = (
                "SELECT fingerprint, started_at, status FROM plugin_alerts"
                " WHERE rule_name = 'FailoverSleeperUp' ORDER BY fingerprint"
            )
            # Both plugins have a process: one alert each.
            before = wait_for(
                "both alerts to be firing in plugin_alerts on the primary",
                lambda: (
                    [r for r in query(primary, firing) if r[2] == "firing"][1:]
                    and query(primary, firing)
                ),
            )
            wait_for("both firing notifications", lambda: firing_posts(receiver)[1:])
            wait_for("rows on the primary", lambda: rows_written(daemon) >= 8)

            # The primary goes away: only the read-only standby answers.
            primary.stop(mode="fast")
            daemon.wait_metric("rows in the spool", lambda v: v >= 4, "pluginmon_spool_samples")
            assert query(standby, "SELECT pg_is_in_recovery()") == [(True,)]
            assert daemon.metric("pluginmon_database_up") == 0
            # Named by the next probe (every 5 s): the host that answers is read-only (the
            # refused primary is not the news).
            wait_for(
                "pluginmon_database_error_info to say read_only",
                lambda: daemon.metric("pluginmon_database_error_info", reason="read_only") == 1,
                timeout=15,
            )
            assert daemon.metric("pluginmon_database_error_info", reason="unreachable") is None
            assert "database read_only" in daemon.get("/readyz")[1]
            # Only a read-only server answers: both drivers refuse it for read-write, and
            # either way it is the named, transient read_only condition.
            read_write_standby = (
                f"postgresql://postgres:{standby.password}@127.0.0.1:{standby.port}"
                "/pluginmon?target_session_attrs=read-write"
            )
            refusals = refused_by_both_drivers(read_write_standby)
            assert [failure_reason(e) for e in refusals] == ["read_only", "read_only"]
            assert is_transient(refusals[1])
            assert daemon.get("/readyz")[0] == 503
            # The alert engine kept its state in memory: still firing, not re-fired.
            assert (
                daemon.metric(
                    "pluginmon_alerts_firing",
                    tenant="e2e",
                    plugin="sleeper",
                    environment="test",
                    alertname="FailoverSleeperUp",
                    severity="info",
                )
                == 1
            )

            standby.promote()
            wait_for(
                "the spool to drain into the promoted standby",
                lambda: (
                    daemon.metric("pluginmon_spool_samples") == 0
                    and daemon.metric("pluginmon_database_up") == 1
                ),
                timeout=40,
            )
            written = rows_written(daemon)
            wait_for("rows on the new primary", lambda: rows_written(daemon) >= written + 4)
        except BaseException:
            daemon.kill()
            raise
        daemon.signal(signal.SIGTERM)
        assert daemon.wait_exit(timeout=30) == 0, daemon.log_text()[-3000:]

    counts = daemon.final_counts()
    assert counts["rows_in_spool"] == 0
    assert counts["rows_dropped"] == 0
    rows = query(standby, "SELECT count(*) FROM plugin_samples")[0][0]
    assert rows == counts["samples_taken"], (rows, counts)
    duplicates = query(
        standby,
        'SELECT count(*) FROM (SELECT plugin_id, "timestamp" FROM plugin_samples'
        " GROUP BY 1, 2 HAVING count(*) > 1) d",
    )[0][0]
    assert duplicates == 0
    assert [r[2] for r in before] == ["firing", "firing"]
    # The same alerts on the new primary: same fingerprints, same starts, still firing.
    assert query(standby, firing) == before
    # Each notified once, not again after the failover.
    posted = sorted(p["groupLabels"]["plugin"] for p in firing_posts(receiver))
    assert posted == ["burner", "sleeper"]
    assert primary.password not in daemon.log_text()
    assert time.monotonic() - started < 90
