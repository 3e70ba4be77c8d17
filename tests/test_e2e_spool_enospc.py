"""End to end: the sample spool's disk fills up (ENOSPC) during a database outage.

`pluginmon run` with its spool directory on a small tmpfs of the test's own: the database
stops, rows spool, the test fills the tmpfs. The daemon keeps sampling and exporting, counts
the rows it drops (``pluginmon_dropped_samples_total{reason="spool_io_error"}``) and logs it
once; when the test frees the space it spools again (logged once), and after the database is
back every row it did not drop is in the database.

Needs root and a working ``mount -t tmpfs``; skipped (with the reason printed) otherwise.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pluginmon.storage.embedded import EmbeddedPostgres
from tests.daemon_helpers import DaemonProcess, plugin_processes, sample_rows, wait_for

TMPFS_SIZE = "1m"
DROPPING = "dropping rows for plugin_samples"
STORED_AGAIN = "rows for plugin_samples are being stored again"


@contextlib.contextmanager
def small_tmpfs(path: Path) -> Iterator[None]:
    """A tmpfs of TMPFS_SIZE mounted on ``path`` (unmounted afterwards), or a skip."""
    path.mkdir(parents=True, exist_ok=True)
    reason = None
    if os.geteuid() != 0:
        reason = "not running as root: cannot mount a tmpfs for the spool"
    else:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0700", "tmpfs", str(path)],
            capture_output=True,
            text=True,
            check=False,
        )
        if mounted.returncode != 0:
            reason = f"mount -t tmpfs failed: {mounted.stderr.strip() or mounted.returncode}"
    if reason is not None:
        print(f"SKIPPED: {reason}")
        pytest.skip(reason)
    try:
        yield
    finally:
        unmounted = subprocess.run(["umount", str(path)], capture_output=True, check=False)
        if unmounted.returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def fill(directory: Path) -> Path:
    """Write a file into ``directory`` until not one more byte fits (ENOSPC)."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        chunk = 1 << 16
        while chunk:
            try:
                os.write(fd, b"\0" * chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                chunk //= 2
    finally:
        os.close(fd)
    return filler


def metric(daemon: DaemonProcess, name: str, **labels: str) -> float:
    try:
        return daemon.metric(name, **labels) or 0.0
    except AssertionError:
        return 0.0


def messages(daemon: DaemonProcess, start: str) -> int:
    return sum(str(r.get("message", "")).startswith(start) for r in daemon.log_records())


@pytest.mark.slow
def test_a_full_spool_disk_drops_counted_rows_and_spools_again_when_space_returns(
    tmp_path: Path, server_tmp_dir: Path
) -> None:
    data_dir = tmp_path / "data"
    spool_dir = data_dir / "spool"  # the daemon's sample spool (settings.spool_dir)
    server = EmbeddedPostgres(server_tmp_dir / "pg")
    url = server.start()
    try:
        with small_tmpfs(spool_dir), plugin_processes() as plugins:
            daemon = DaemonProcess(
                tmp_path=tmp_path,
                database_url=url,
                config_text=plugins.config(tenant="enospc"),
                data_dir=data_dir,
            ).start()
            try:
                daemon.wait_ready()
                # Rows in the database, so both plugins' ids are resolved: samples of a plugin
                # without an id go to the unresolved spool, which is not on the tmpfs, and
                # the test would then wait for drops that cannot happen.
                wait_for("rows in the database", lambda: sample_rows(url) >= 6, timeout=60)

                server.stop(mode="fast")
                wait_for(
                    "rows in the spool during the outage",
                    lambda: metric(daemon, "pluginmon_spool_samples") > 0,
                    timeout=60,
                )
                filler = fill(spool_dir)
                wait_for(
                    "rows dropped for want of space",
                    lambda: (
                        metric(daemon, "pluginmon_dropped_samples_total", reason="spool_io_error")
                        > 0
                    ),
                    timeout=60,
                )
                dropped_at_first = metric(
                    daemon, "pluginmon_dropped_samples_total", reason="spool_io_error"
                )
                spooled_while_full = metric(daemon, "pluginmon_spool_samples")
                taken = metric(daemon, "pluginmon_samples_total")
                # Still sampling and exporting; every lost row counted, the state logged once.
                wait_for(
                    "more samples while the spool disk is full",
                    lambda: metric(daemon, "pluginmon_samples_total") >= taken + 8,
                    timeout=60,
                )
                wait_for(
                    "more rows counted as dropped",
                    lambda: (
                        metric(daemon, "pluginmon_dropped_samples_total", reason="spool_io_error")
                        > dropped_at_first
                    ),
                    timeout=60,
                )
                labels = {"tenant": "enospc", "plugin": "sleeper", "environment": "test"}
                assert daemon.metric("pluginmon_plugin_up", **labels) == 1
                assert daemon.metric("pluginmon_plugin_processes", **labels) == 2
                assert daemon.metric("pluginmon_database_up") == 0
                assert metric(daemon, "pluginmon_spool_samples") == spooled_while_full
                assert messages(daemon, DROPPING) == 1
                assert messages(daemon, STORED_AGAIN) == 0
                (dropping,) = [
                    r for r in daemon.log_records() if str(r.get("message")).startswith(DROPPING)
                ]
                assert "No space left on device" in dropping["message"]

                filler.unlink()
                wait_for(
                    "rows spooled again once there is space",
                    lambda: metric(daemon, "pluginmon_spool_samples") > spooled_while_full,
                    timeout=60,
                )
                wait_for("the recovery logged", lambda: messages(daemon, STORED_AGAIN) == 1)
                dropped_total = metric(
                    daemon, "pluginmon_dropped_samples_total", reason="spool_io_error"
                )
                time.sleep(2 * 0.5 + 0.5)  # a few more spooled batches: none dropped
                assert (
                    metric(daemon, "pluginmon_dropped_samples_total", reason="spool_io_error")
                    == dropped_total
                )

                server.start()
                wait_for(
                    "the spool to drain",
                    lambda: (
                        metric(daemon, "pluginmon_spool_samples") == 0
                        and daemon.metric("pluginmon_database_up") == 1
                    ),
                    timeout=120,
                )
            except BaseException:
                daemon.kill()
                raise
            daemon.signal(signal.SIGTERM)
            assert daemon.wait_exit(timeout=60) == 0, daemon.log_text()[-3000:]
        counts = daemon.final_counts()
        assert counts["rows_dropped"] == dropped_total > 0
        assert counts["rows_in_spool"] == 0
        # Every row not counted as dropped is in the database, exactly once.
        assert sample_rows(url) == counts["samples_taken"] - counts["rows_dropped"]
        assert messages(daemon, DROPPING) == 1
        assert messages(daemon, STORED_AGAIN) == 1
    finally:
        server.stop(mode="immediate")
