"""CPU time read straight from /proc: the reference a measured CPU share is checked against.

On a loaded 2-core test machine a burner never gets a fixed share of a core, so a test that
asserts "reads about 50%" fails for the wrong reason. These helpers read what the process
really got over the same interval, so the test compares the reading with the truth instead.
"""

from __future__ import annotations

import bisect
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

CLOCK_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")
T = TypeVar("T")


def cpu_seconds(pid: int, *, reaped_children: bool = True) -> float:
    """User + system CPU time of ``pid`` from /proc/PID/stat, with (by default) the CPU
    time of its children that it has reaped."""
    with open(f"/proc/{pid}/stat", "rb") as handle:
        data = handle.read()
    # Fields after the command name (which may hold spaces and parentheses): state is
    # field 3, utime 14, stime 15, cutime 16, cstime 17.
    fields = data[data.rindex(b")") + 2 :].split()
    utime, stime, cutime, cstime = (int(value) for value in fields[11:15])
    ticks = utime + stime + (cutime + cstime if reaped_children else 0)
    return ticks / CLOCK_TICKS_PER_SECOND


@dataclass(frozen=True, slots=True)
class CpuReading:
    monotonic_seconds: float
    cpu_seconds: float


def read_cpu(pid: int, *, reaped_children: bool = True) -> CpuReading:
    return CpuReading(time.monotonic(), cpu_seconds(pid, reaped_children=reaped_children))


@dataclass(frozen=True, slots=True)
class Bracket:
    """Readings just before and just after something that read the counters itself."""

    before: CpuReading
    after: CpuReading


def bracketed(
    pid: int, action: Callable[[], T], *, reaped_children: bool = True
) -> tuple[T, Bracket]:
    """Run ``action`` (a sampler's ``sample``) between two reference readings of ``pid``."""
    before = read_cpu(pid, reaped_children=reaped_children)
    result = action()
    after = read_cpu(pid, reaped_children=reaped_children)
    return result, Bracket(before, after)


def share_bounds(first: Bracket, second: Bracket) -> tuple[float, float]:
    """The lowest and highest CPU share (percent of one core) the process can have had over
    any interval that starts inside ``first`` and ends inside ``second``: a reading taken
    then must lie between them. CPU counters only grow, so the least CPU over the longest
    span and the most CPU over the shortest span bound every such interval."""
    least_cpu = second.before.cpu_seconds - first.after.cpu_seconds
    most_cpu = second.after.cpu_seconds - first.before.cpu_seconds
    longest = second.after.monotonic_seconds - first.before.monotonic_seconds
    shortest = second.before.monotonic_seconds - first.after.monotonic_seconds
    return 100.0 * least_cpu / longest, 100.0 * most_cpu / shortest


class CpuRecorder:
    """Reads a process's CPU counter every ``interval_seconds`` in a thread, with the wall
    time of each reading, so CPU used between two wall-clock instants chosen later (the
    timestamps of another program's samples) can be bounded from both sides."""

    def __init__(self, pid: int, *, interval_seconds: float = 0.01) -> None:
        self.pid = pid
        self.interval_seconds = interval_seconds
        self.readings: list[tuple[float, float]] = []  # (time.time(), cpu seconds)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.readings.append((time.time(), cpu_seconds(self.pid)))
            self._stop.wait(self.interval_seconds)

    def __enter__(self) -> CpuRecorder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def cpu_between(self, start_wall: float, end_wall: float) -> tuple[float, float]:
        """(least, most) CPU seconds the process can have used from ``start_wall`` to
        ``end_wall``; both must lie inside the recording."""
        times = [wall for wall, _ in self.readings]
        assert times, "nothing recorded"
        assert times[0] <= start_wall < end_wall <= times[-1], (
            f"[{start_wall}, {end_wall}] is not inside the recording [{times[0]}, {times[-1]}]"
        )
        cpu = [value for _, value in self.readings]
        before_start = bisect.bisect_right(times, start_wall) - 1
        after_start = bisect.bisect_left(times, start_wall)
        before_end = bisect.bisect_right(times, end_wall) - 1
        after_end = bisect.bisect_left(times, end_wall)
        least = max(0.0, cpu[before_end] - cpu[after_start])
        most = cpu[after_end] - cpu[before_start]
        return least, most
