"""End to end: `pluginmon run` beside hostile processes (bad labels, a backtracking pattern).

Issue 15, reproductions 1 and 4: a process labelled PLUGINMON_PLUGIN=$'bad\\xff' beside a good
one made every scrape fail, the sample job fail, the good plugin lose its rows and
pluginmon_database_up flap; `cmdline = "(a+)+$"` with a process ending in "aaaa...!" stalled
the daemon. Here the daemon runs as a subprocess with label discovery on (it sees the whole
host, so counts of refusals are lower bounds), a real PostgreSQL and real /metrics over HTTP.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.daemon_helpers import DaemonProcess, wait_for
from tests.dbutil import create_database, drop_database, with_database

IDLE = "import sys, time; time.sleep(600)"


@pytest.fixture
def e2e_db(pg_admin_url: str) -> Iterator[str]:
    """An empty database on the test server: the daemon migrates it itself."""
    name = create_database(pg_admin_url, prefix="e2e_hostile")
    try:
        yield with_database(pg_admin_url, name)
    finally:
        drop_database(pg_admin_url, name)


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    try:
        yield started
    finally:
        for proc in started:
            proc.kill()
            proc.wait()


def test_hostile_processes_cannot_break_scrapes_sampling_or_storage(
    e2e_db: str, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    tenant = f"h{uuid.uuid4().hex[:12]}"
    base = {k: v for k, v in os.environb.items() if not k.startswith(b"PLUGINMON_")}

    def start(args: list[str], **env: bytes) -> subprocess.Popen[bytes]:
        labels = {f"PLUGINMON_{k.upper()}".encode(): v for k, v in env.items()}
        proc = subprocess.Popen(
            args,
            env={**base, **labels},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )
        processes.append(proc)
        return proc

    t = tenant.encode()
    good = start(["sleep", "600"], tenant=t, plugin=b"normal-c")
    start(["sleep", "600"], tenant=t, plugin=b"bad\xff")
    start(["sleep", "600"], tenant=t, plugin=b"L" * 100_000)
    start(["sleep", "600"], tenant=t, plugin=b"x\nERROR forged line")
    # Reproduction 4: Python's re would need ~2**40 steps on the trap's command line.
    start([sys.executable, "-c", IDLE, tenant, "a" * 40 + "!"])
    start([sys.executable, "-c", IDLE, tenant, "a" * 40])

    config = f"""
[[plugins]]
tenant = "{tenant}"
name = "backtrack"
environment = "test"
match = {{ cmdline = "(a+)+$" }}
"""
    daemon = DaemonProcess(
        tmp_path=tmp_path,
        database_url=e2e_db,
        config_text=config,
        extra_env={"PLUGINMON_LABEL_DISCOVERY": "true"},
    )
    daemon.start()
    try:
        daemon.wait_ready()
        good_labels = {"tenant": tenant, "plugin": "normal-c", "environment": "production"}

        def good_exported() -> bool:
            daemon.assert_alive()
            return daemon.metric("pluginmon_plugin_up", **good_labels) == 1

        wait_for("the good labelled plugin on /metrics", good_exported, timeout=30)
        before = daemon.metric("pluginmon_samples_total") or 0
        wait_for(
            "more sampling cycles",
            lambda: (daemon.metric("pluginmon_samples_total") or 0) >= before + 8,
            timeout=40,
        )
        # Every scrape answers (DaemonProcess.metrics asserts 200), in both formats.
        for _ in range(3):
            metrics = daemon.metrics()
        status, body = daemon.get(
            "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
        )
        assert status == 200
        assert body.endswith("# EOF\n")
        assert daemon.get("/healthz")[0] == 200

        def value(name: str, **labels: str) -> float | None:
            return metrics.get((name, tuple(sorted(labels.items()))))

        def rejected(reason: str) -> float:
            return value("pluginmon_discovery_rejected_total", reason=reason) or 0.0

        assert value("pluginmon_plugin_processes", **good_labels) == 1
        # At least ours (other labelled processes on the host may add to them).
        assert rejected("not_utf8") >= 1
        assert rejected("too_long") >= 1
        assert rejected("bad_characters") >= 1
        backtrack = {"tenant": tenant, "plugin": "backtrack", "environment": "test"}
        assert value("pluginmon_plugin_up", **backtrack) == 1
        # No failed sample job, no false "database unreachable". A probe on a loaded machine
        # may time out now and then (a real, transient outage, which the log names as such),
        # so the database must come back up, and no database error may be about the data.
        assert value("pluginmon_job_failures_total", task="sample") == 0
        wait_for(
            "pluginmon_database_up to be 1",
            lambda: daemon.metric("pluginmon_database_up") == 1,
            timeout=30,
        )
        # Nothing of the refused processes is exported under our tenant.
        ours = {
            dict(labels).get("plugin")
            for (name, labels) in metrics
            if name == "pluginmon_plugin_up" and dict(labels).get("tenant") == tenant
        }
        assert ours == {"normal-c", "backtrack"}

        # The good plugin's samples reach the database.
        def stored() -> set[str]:
            with psycopg.connect(e2e_db, connect_timeout=10) as conn:
                rows = conn.execute(
                    """SELECT DISTINCT p.name FROM plugin_samples s
                         JOIN plugins p ON p.tenant_id = s.tenant_id AND p.id = s.plugin_id
                        WHERE p.tenant_id = %s""",
                    (tenant,),
                ).fetchall()
            return {str(r[0]) for r in rows}

        wait_for("the plugins' rows", lambda: stored() >= {"normal-c", "backtrack"}, timeout=30)
        assert stored() == {"normal-c", "backtrack"}
        assert good.poll() is None
    except BaseException:
        daemon.kill()
        raise

    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(timeout=30) == 0, daemon.log_text()[-3000:]
    log = daemon.log_text()
    # The refused labels were logged escaped: no forged line, no raw undecodable byte.
    assert not any(line.startswith("ERROR forged line") for line in log.splitlines())
    # The old defect: the bad name reached asyncpg, whose encoding error read as an outage.
    unreachable = [line for line in log.splitlines() if "database unreachable" in line]
    assert not [line for line in unreachable if "encod" in line or "UTF" in line], unreachable
    messages = [str(r.get("message", "")) for r in daemon.log_records()]
    refusals = [m for m in messages if m.startswith("ignoring the labels of process")]
    assert refusals, log[-3000:]
    assert all(m.isascii() and "\n" not in m for m in refusals)
