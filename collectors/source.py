"""The process-source interface the sampler reads through: one /proc scan per cycle, metadata, extras."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

# Opt-in per-process fields beyond the lean default (which is everything /proc/PID/stat gives).
FIELD_FDS = "fds"
FIELD_IO = "io"
FIELD_CTX_SWITCHES = "ctx_switches"
FIELD_USS = "uss"
FIELD_SWAP = "swap"
OPTIONAL_FIELDS = frozenset({FIELD_FDS, FIELD_IO, FIELD_CTX_SWITCHES, FIELD_USS, FIELD_SWAP})

# One row per live process, a plain tuple because the scan builds one per process per cycle:
# (pid, ppid, start_ticks, cpu_ticks, children_cpu_ticks, threads, vms_bytes, rss_bytes, comm_raw,
#  state)
#   start_ticks        start time since boot, in ticks (1 / source.ticks_per_second); with the pid
#                      it is the process's identity
#   cpu_ticks          user + system time of the process's own threads
#   children_cpu_ticks user + system time of its reaped (waited-for) children
#   comm_raw           b"PID (COMM": the stat line up to its last ") "; compared as is to
#                      notice exec (cheaper than cutting it), see comm_of()
#   state              raw state letter from /proc/PID/stat (b"Z" = zombie)
StatRow = tuple[int, int, float, float, float, int, int, int, bytes, bytes]


def comm_of(comm_raw: bytes) -> bytes:
    """The process name (kernel comm) inside a row's comm_raw."""
    return comm_raw[comm_raw.find(b"(") + 1 :]


class ProcessGone(Exception):
    """The process exited (or its pid was never there) while we were reading it."""


class ProcessAccessDenied(Exception):
    """We may not read this file of this process."""


@dataclass(frozen=True, slots=True)
class ScanResult:
    rows: list[StatRow]
    gone: int  # listed, then gone before its stat could be read
    denied: int


@dataclass(frozen=True, slots=True)
class Extras:
    """Opt-in fields of one process; None = not requested or not readable."""

    fds: int | None = None
    read_bytes: int | None = None
    write_bytes: int | None = None
    ctx_switches_voluntary: int | None = None
    ctx_switches_involuntary: int | None = None
    uss_bytes: int | None = None
    swap_bytes: int | None = None
    gone: bool = False  # some file vanished: the process exited mid-read
    denied: bool = False  # some file was not readable


class ProcessSource(Protocol):
    """Where process data comes from: the Linux /proc fast path or psutil (portable)."""

    ticks_per_second: float

    def scan(self) -> ScanResult:
        """Every process's stat row; never raises for one process."""
        ...

    def boot_time(self) -> float:
        """Wall-clock (epoch seconds) boot time, to turn start ticks into datetimes."""
        ...

    def cmdline(self, pid: int) -> list[str]: ...

    def exe(self, pid: int) -> str: ...

    def environ(self, pid: int) -> dict[str, str]: ...

    def cgroup(self, pid: int) -> str | None:
        """The cgroup v2 path (the name=systemd v1 path on hybrid hosts where v2 is "/");
        None where cgroups don't exist."""
        ...

    def extras(self, pid: int, fields: frozenset[str]) -> Extras: ...
