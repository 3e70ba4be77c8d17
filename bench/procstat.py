"""CPU and memory of processes from /proc, for the scale and fleet benchmarks: one process, a
PostgreSQL server with all its backends, many sleeping plugin processes."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # gone
        return None
    # After the ")" that ends the command name, the list starts at field 3 (state).
    return text.rpartition(")")[2].split()


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads)."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_mib(pid: int | str = "self", *, peak: bool = False) -> float:
    """VmRSS (or VmHWM, the peak, with ``peak``) in MiB."""
    wanted = "VmHWM:" if peak else "VmRSS:"
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(wanted):
            return int(line.split()[1]) / 1024
    return 0.0


def memory_split_mib(pid: int) -> tuple[float, float]:
    """(anonymous, file-backed) resident MiB of ``pid``: the heap and the mapped libraries."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, _, rest = line.partition(":")
        fields[name] = int(rest.split()[0]) / 1024
    return fields["Anonymous"], fields["Rss"] - fields["Anonymous"]


def server_cpu_seconds(postmaster: int) -> float:
    """CPU of a PostgreSQL server so far: the postmaster, every live child (backends,
    checkpointer, walwriter, autovacuum) and every child that has exited (their times land
    in the postmaster's cutime/cstime when it reaps them). The difference of two readings is
    what the server spent in between, short-lived connections included."""
    fields = _stat_fields(postmaster)
    if fields is None:
        return 0.0
    total = sum(int(fields[i]) for i in (11, 12, 13, 14))  # utime stime cutime cstime
    for child in children(postmaster):
        child_fields = _stat_fields(child)
        if child_fields is not None:
            total += int(child_fields[11]) + int(child_fields[12])
    return total / CLOCK_TICKS


def children(parent: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fields = _stat_fields(int(name))
        if fields is not None and int(fields[1]) == parent:
            out.append(int(name))
    return out


def postmaster_of(backend_pid: int) -> int:
    """The postmaster of a backend (its parent), read from /proc: the server must run on
    this host."""
    fields = _stat_fields(backend_pid)
    if fields is None:
        raise RuntimeError(f"backend {backend_pid} is not visible in /proc (server not local?)")
    return int(fields[1])


# -- the plugins: real sleeping processes, found by label discovery ---------------------------


@contextmanager
def sleeping_plugins(
    *, plugins: int, processes_per_plugin: int, tenant: str, environment: str = "bench"
) -> Iterator[list[int]]:
    """``plugins * processes_per_plugin`` real ``sleep`` processes, each carrying
    PLUGINMON_TENANT / PLUGINMON_PLUGIN in its environment (label discovery makes them
    plugins); their pids. Killed on exit."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i in range(plugins * processes_per_plugin):
            procs.append(
                subprocess.Popen(
                    ["sleep", "86400"],
                    env={
                        "PATH": "/usr/bin:/bin",
                        "PLUGINMON_TENANT": tenant,
                        "PLUGINMON_PLUGIN": f"plugin-{i % plugins:05d}",
                        "PLUGINMON_ENVIRONMENT": environment,
                    },
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        yield [p.pid for p in procs]
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()


# The floor: a raw read of /proc/PID/stat of the same processes once a second, no parsing,
# the sampler's syscalls (os.open / os.read / os.close). Run in its own interpreter so its
# CPU is its own; it prints its CPU seconds and the reads it made.
_FLOOR = r"""
import os, sys, time
pids = [int(p) for p in open(sys.argv[1]).read().split()]
duration, interval = float(sys.argv[2]), float(sys.argv[3])
flags = os.O_RDONLY | os.O_CLOEXEC
reads = 0
cpu0, wall0 = time.process_time(), time.monotonic()
next_tick = wall0
while time.monotonic() - wall0 < duration:
    for pid in pids:
        try:
            fd = os.open(f"/proc/{pid}/stat", flags)
        except FileNotFoundError:
            continue
        try:
            os.read(fd, 4096)
        finally:
            os.close(fd)
        reads += 1
    next_tick += interval
    time.sleep(max(0.0, next_tick - time.monotonic()))
print(time.process_time() - cpu0, time.monotonic() - wall0, reads)
"""


def floor_cpu_percent(
    pids: Sequence[int], *, duration_seconds: float, interval_seconds: float, workdir: Path
) -> tuple[float, int]:
    """(% of one core, reads per cycle) for the floor over ``pids``."""
    pid_file = workdir / "floor-pids.txt"
    pid_file.write_text(" ".join(map(str, pids)))
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            _FLOOR,
            str(pid_file),
            str(duration_seconds),
            str(interval_seconds),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    cpu, wall, reads = float(out[0]), float(out[1]), int(out[2])
    cycles = max(1, round(wall / interval_seconds))
    return 100.0 * cpu / wall, reads // cycles
