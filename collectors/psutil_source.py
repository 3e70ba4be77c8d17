"""Portable path: the same process rows and metadata through psutil (any OS psutil supports)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import psutil

from pluginmon.collectors.procfs import parse_cgroup
from pluginmon.collectors.source import (
    FIELD_CTX_SWITCHES,
    FIELD_FDS,
    FIELD_IO,
    FIELD_SWAP,
    FIELD_USS,
    Extras,
    ProcessAccessDenied,
    ProcessGone,
    ScanResult,
    StatRow,
)

# psutil reports seconds; rows carry them as "ticks" of one second.
_ZOMBIE = psutil.STATUS_ZOMBIE


@contextlib.contextmanager
def _translated(pid: int) -> Iterator[None]:
    try:
        yield
    except psutil.ZombieProcess as exc:  # a subclass of NoSuchProcess: its metadata is gone
        raise ProcessGone(pid) from exc
    except psutil.NoSuchProcess as exc:
        raise ProcessGone(pid) from exc
    except psutil.AccessDenied as exc:
        raise ProcessAccessDenied(pid) from exc


class PsutilSource:
    """Process rows from psutil; slower than /proc (see docs/BENCHMARKS.md) but portable."""

    ticks_per_second: float = 1.0

    def __init__(self) -> None:
        self._boot_time = psutil.boot_time()
        self._cache: dict[int, psutil.Process] = {}

    def _process(self, pid: int) -> psutil.Process:
        proc = self._cache.get(pid)
        if proc is None:
            proc = psutil.Process(pid)
        return proc

    def scan(self) -> ScanResult:
        rows: list[StatRow] = []
        gone = denied = 0
        boot = self._boot_time
        cache: dict[int, psutil.Process] = {}
        for pid in psutil.pids():
            try:
                proc = self._cache.get(pid)
                if proc is None or not proc.is_running():
                    proc = psutil.Process(pid)
                with proc.oneshot():
                    status = proc.status()
                    start = round(proc.create_time() - boot, 2)
                    if status == _ZOMBIE:
                        rows.append((pid, proc.ppid(), start, 0.0, 0.0, 0, 0, 0, b"", b"Z"))
                        continue
                    cpu = proc.cpu_times()
                    mem = proc.memory_info()
                    rows.append(
                        (
                            pid,
                            proc.ppid(),
                            start,
                            cpu.user + cpu.system,
                            cpu.children_user + cpu.children_system,
                            proc.num_threads(),
                            mem.vms,
                            mem.rss,
                            f"{pid} ({proc.name()}".encode(errors="replace"),
                            b"R",
                        )
                    )
                cache[pid] = proc
            except psutil.ZombieProcess:
                rows.append((pid, 0, 0.0, 0.0, 0.0, 0, 0, 0, b"", b"Z"))
            except psutil.NoSuchProcess:
                gone += 1
            except psutil.AccessDenied:
                denied += 1
        self._cache = cache
        return ScanResult(rows=rows, gone=gone, denied=denied)

    def boot_time(self) -> float:
        return self._boot_time

    def cmdline(self, pid: int) -> list[str]:
        with _translated(pid):
            return self._process(pid).cmdline()

    def exe(self, pid: int) -> str:
        with _translated(pid):
            return self._process(pid).exe()

    def environ(self, pid: int) -> dict[str, str]:
        with _translated(pid):
            return self._process(pid).environ()

    def cgroup(self, pid: int) -> str | None:
        # psutil has no cgroup API; on Linux the file is still there to read.
        try:
            with open(f"/proc/{pid}/cgroup", "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        except PermissionError as exc:
            raise ProcessAccessDenied(pid) from exc
        return parse_cgroup(data)

    def extras(self, pid: int, fields: frozenset[str]) -> Extras:
        gone = denied = False
        values: dict[str, int | None] = {}
        try:
            proc = self._process(pid)
        except psutil.NoSuchProcess:
            return Extras(gone=True)
        with proc.oneshot():
            for field in sorted(fields):
                try:
                    if field == FIELD_FDS:
                        values["fds"] = proc.num_fds()
                    elif field == FIELD_IO:
                        io = proc.io_counters()
                        values["read_bytes"], values["write_bytes"] = io.read_bytes, io.write_bytes
                    elif field == FIELD_CTX_SWITCHES:
                        ctx = proc.num_ctx_switches()
                        values["ctx_switches_voluntary"] = ctx.voluntary
                        values["ctx_switches_involuntary"] = ctx.involuntary
                    elif field in (FIELD_USS, FIELD_SWAP):
                        full = proc.memory_full_info()
                        values["uss_bytes"] = full.uss
                        values["swap_bytes"] = getattr(full, "swap", None)
                except (psutil.NoSuchProcess, psutil.ZombieProcess):
                    gone = True
                except psutil.AccessDenied:
                    denied = True
                except (AttributeError, NotImplementedError):  # not offered on this OS
                    pass
        if FIELD_USS not in fields:
            values.pop("uss_bytes", None)
        if FIELD_SWAP not in fields:
            values.pop("swap_bytes", None)
        return Extras(gone=gone, denied=denied, **values)
