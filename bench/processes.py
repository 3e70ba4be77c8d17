"""Shared bench helpers for real processes: labelled sleepers to sample, CPU and RSS from /proc, /metrics text."""

from __future__ import annotations

import os
import subprocess
import urllib.request
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def start_processes(count: int, plugins: int, tenant: str) -> list[subprocess.Popen[bytes]]:
    """``count`` sleeping processes spread over ``plugins`` plugins of ``tenant`` (environment
    ``bench``), labelled the way label discovery finds them."""
    procs = []
    for i in range(count):
        env = {
            "PATH": "/usr/bin:/bin",
            "PLUGINMON_TENANT": tenant,
            "PLUGINMON_PLUGIN": f"plugin-{i % plugins:04d}",
            "PLUGINMON_ENVIRONMENT": "bench",
        }
        procs.append(
            subprocess.Popen(
                ["sleep", "3600"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    return procs


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    # utime and stime are fields 14 and 15 of stat; after ")" the list starts at field 3.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_mib(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def scrape(port: int) -> str:
    """The daemon's /metrics text on 127.0.0.1:``port``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        body: bytes = response.read()
        return body.decode()


def daemon_env(database_url: str, data_dir: str, port: int, **extra: str) -> dict[str, str]:
    """The environment of a bench's `pluginmon run`: this one without PLUGINMON_* settings,
    then the database, data directory, loopback port, a 1 s interval, label discovery and
    warnings only; ``extra`` adds or overrides PLUGINMON_* variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLUGINMON_")}
    env.update(
        PLUGINMON_DATABASE_URL=database_url,
        PLUGINMON_DATA_DIR=data_dir,
        PLUGINMON_HTTP_HOST="127.0.0.1",
        PLUGINMON_HTTP_PORT=str(port),
        PLUGINMON_SAMPLE_INTERVAL_SECONDS="1",
        PLUGINMON_LABEL_DISCOVERY="true",
        PLUGINMON_LOG_LEVEL="WARNING",
    )
    env.update(extra)
    return env


def stat_fields_at(path: str | Path) -> list[str]:
    """The fields of a /proc stat file (a process's or a thread's) after the command name,
    which may hold spaces and ")": item 1 is the ppid, 11 and 12 utime and stime."""
    return Path(path).read_text().rpartition(")")[2].split()


def _stat_fields(pid: int) -> list[str]:
    return stat_fields_at(f"/proc/{pid}/stat")


def server_cpu_seconds(postmaster_pid: int) -> float:
    """CPU seconds of a local PostgreSQL server: the postmaster, its live children, and the
    children it has reaped (cutime/cstime), so a backend that exited is still counted."""
    fields = _stat_fields(postmaster_pid)
    # After ")": utime, stime, cutime, cstime are items 11-14.
    total = sum(int(f) for f in fields[11:15])
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            child = _stat_fields(int(entry.name))
        except (FileNotFoundError, ProcessLookupError):
            continue
        # ppid is field 4 of stat: item 1 after ")".
        if int(child[1]) == postmaster_pid:
            total += int(child[11]) + int(child[12])
    return total / CLOCK_TICKS


def postmaster_of(backend_pid: int) -> int:
    """The postmaster of a local server, from one of its backends' pid."""
    return int(_stat_fields(backend_pid)[1])
