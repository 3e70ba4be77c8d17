"""Linux fast path: read /proc directly (one file, /proc/PID/stat, per process per cycle)."""

from __future__ import annotations

import os
import time

from pluginmon.collectors.patterns import CMDLINE_MATCH_MAX_BYTES
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

CLOCK_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

_O_RDONLY = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
_GONE_ERRORS = (FileNotFoundError, ProcessLookupError)


def _read(path: str, size: int = 8192, *, max_bytes: int | None = None) -> bytes:
    """Whole small /proc file (or its first ``max_bytes`` or a little more); translates errors
    into ProcessGone / ProcessAccessDenied."""
    try:
        fd = os.open(path, _O_RDONLY)
    except _GONE_ERRORS as exc:
        raise ProcessGone(path) from exc
    except PermissionError as exc:
        raise ProcessAccessDenied(path) from exc
    except OSError as exc:  # anything else about one process: it is unreadable, not fatal
        raise ProcessGone(path) from exc
    try:
        chunks = []
        total = 0
        while True:
            chunk = os.read(fd, size)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if len(chunk) < size:  # a short read from /proc means end of file
                break
            if max_bytes is not None and total >= max_bytes:
                break
        return b"".join(chunks)
    except PermissionError as exc:
        raise ProcessAccessDenied(path) from exc
    except OSError as exc:  # ESRCH: the task died after open
        raise ProcessGone(path) from exc
    finally:
        os.close(fd)


def _kv_ints(data: bytes, wanted: dict[bytes, str]) -> dict[str, int]:
    """`Key: 123 kB` lines (status, io, smaps_rollup) into {name: int}, only the wanted keys.

    Finds each key instead of splitting every line: status has ~60 lines, we want 2 or 3.
    None of the wanted keys is on a file's first line.
    """
    out: dict[str, int] = {}
    for key, name in wanted.items():
        at = data.find(b"\n" + key + b":")
        if at < 0:
            continue
        start = at + len(key) + 2
        end = data.find(b"\n", start)
        try:
            out[name] = int(data[start : end if end >= 0 else None].split()[0])
        except (IndexError, ValueError):  # truncated read: leave the key out
            continue
    return out


_STATUS_KEYS = {
    b"voluntary_ctxt_switches": "vol",
    b"nonvoluntary_ctxt_switches": "invol",
    b"VmSwap": "swap_kb",
}
_IO_KEYS = {b"read_bytes": "read", b"write_bytes": "write"}
_SMAPS_KEYS = {
    b"Private_Clean": "clean_kb",
    b"Private_Dirty": "dirty_kb",
    b"Private_Hugetlb": "huge_kb",
}


def parse_cgroup(data: bytes) -> str | None:
    """The path to match from /proc/PID/cgroup: the v2 one, or name=systemd's on hybrid hosts."""
    unified: str | None = None
    systemd: str | None = None
    for line in data.splitlines():
        hierarchy, _, rest = line.partition(b":")
        controllers, _, path = rest.partition(b":")
        if hierarchy == b"0":  # the unified (v2) hierarchy
            unified = os.fsdecode(path)
        elif controllers == b"name=systemd":
            systemd = os.fsdecode(path)
    # On hybrid hosts processes sit at "/" in v2 and in their unit in name=systemd.
    if unified in (None, "/") and systemd is not None:
        return systemd
    return unified


class ProcfsSource:
    """Reads processes from a /proc mount (or a copy of one, for tests)."""

    ticks_per_second: float = float(CLOCK_TICKS_PER_SECOND)

    def __init__(
        self,
        proc_root: str = "/proc",
        *,
        page_size: int = PAGE_SIZE,
        reuse_unchanged: bool = True,
    ) -> None:
        self._root = proc_root.rstrip("/") or "/"
        self._page_size = page_size
        self._reuse_unchanged = reuse_unchanged
        # Last cycle's stat lines and their parsed rows. A process that did nothing since
        # (most processes, most of the time) has a byte-identical line: no need to parse it.
        self._parsed: dict[bytes, StatRow] = {}

    @property
    def proc_root(self) -> str:
        return self._root

    def scan(self) -> ScanResult:
        # The hot loop: every process, every cycle. Kept flat on purpose (no per-row calls
        # beyond the syscalls), because its cost is the sampler's cost.
        root = self._root
        page_size = self._page_size
        rows: list[StatRow] = []
        append = rows.append
        gone = denied = 0
        os_open, os_read, os_close = os.open, os.read, os.close
        previous = self._parsed if self._reuse_unchanged else {}
        parsed: dict[bytes, StatRow] = {}
        for name in os.listdir(root):
            if not name.isdigit():
                continue
            try:
                fd = os_open(f"{root}/{name}/stat", _O_RDONLY)
            except _GONE_ERRORS:
                gone += 1
                continue
            except PermissionError:
                denied += 1
                continue
            except OSError:  # e.g. out of file descriptors: this process is skipped
                gone += 1
                continue
            try:
                data = os_read(fd, 4096)
            except OSError:  # ESRCH: the task died after open
                gone += 1
                continue
            finally:
                os_close(fd)
            if not data:
                gone += 1
                continue
            # The line holds the pid and start time, so equal bytes mean the same process
            # in the same state.
            row = previous.get(data)
            if row is None:
                # comm may hold spaces and ")": the fields start after the last ") ".
                head, _, tail = data.rpartition(b") ")
                fields = tail.split(None, 22)
                try:
                    row = (
                        int(name),
                        int(fields[1]),
                        int(fields[19]),
                        int(fields[11]) + int(fields[12]),
                        int(fields[13]) + int(fields[14]),
                        int(fields[17]),
                        int(fields[20]),
                        int(fields[21]) * page_size,
                        head,
                        fields[0],
                    )
                except (IndexError, ValueError):  # truncated file: treat as gone mid-read
                    gone += 1
                    continue
            parsed[data] = row
            append(row)
        if self._reuse_unchanged:
            self._parsed = parsed
        return ScanResult(rows=rows, gone=gone, denied=denied)

    def boot_time(self) -> float:
        try:
            for line in _read(f"{self._root}/stat").splitlines():
                if line.startswith(b"btime "):
                    return float(line.split()[1])
        except (ProcessGone, ProcessAccessDenied, ValueError, IndexError):
            pass
        # A proc_root without a stat file (a test copy): derive it from the boot clock.
        return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)

    def cmdline(self, pid: int) -> list[str]:
        # Only the start: patterns see CMDLINE_MATCH_MAX_BYTES, and a process can make its
        # command line megabytes long.
        data = _read(
            f"{self._root}/{pid}/cmdline",
            CMDLINE_MATCH_MAX_BYTES,
            max_bytes=CMDLINE_MATCH_MAX_BYTES,
        )
        if not data:
            return []
        if data.endswith(b"\0"):
            data = data[:-1]
        args = data.split(b"\0")
        if len(args) == 1 and b" " in args[0]:
            # setproctitle-style: the process rewrote argv as one space-separated string.
            args = args[0].split(b" ")
        return [os.fsdecode(a) for a in args]

    def exe(self, pid: int) -> str:
        try:
            target = os.readlink(f"{self._root}/{pid}/exe")
        except PermissionError as exc:
            raise ProcessAccessDenied(pid) from exc
        except OSError as exc:  # gone, or a kernel thread (no exe)
            raise ProcessGone(pid) from exc
        if target.endswith(" (deleted)") and not os.path.exists(target):
            target = target[: -len(" (deleted)")]
        return target

    def environ(self, pid: int) -> dict[str, str]:
        env: dict[str, str] = {}
        try:
            data = _read(f"{self._root}/{pid}/environ", 65536)
        except ProcessGone:
            # Kernel threads have no environment: reading it fails with ESRCH although the
            # process is there.
            if os.path.exists(f"{self._root}/{pid}/stat"):
                return env
            raise
        for item in data.split(b"\0"):
            key, sep, value = item.partition(b"=")
            if sep and key:
                env[os.fsdecode(key)] = os.fsdecode(value)
        return env

    def cgroup(self, pid: int) -> str | None:
        return parse_cgroup(_read(f"{self._root}/{pid}/cgroup"))

    def extras(self, pid: int, fields: frozenset[str]) -> Extras:
        base = f"{self._root}/{pid}"
        gone = denied = False
        fds = read_bytes = write_bytes = vol = invol = uss = swap = None
        if FIELD_FDS in fields:
            try:
                fds = len(os.listdir(f"{base}/fd"))
            except PermissionError:
                denied = True
            except OSError:
                gone = True
        if FIELD_IO in fields:
            try:
                io = _kv_ints(_read(f"{base}/io"), _IO_KEYS)
                read_bytes, write_bytes = io.get("read"), io.get("write")
            except ProcessGone:
                gone = True
            except ProcessAccessDenied:
                denied = True
        if FIELD_CTX_SWITCHES in fields or FIELD_SWAP in fields:
            try:
                status = _kv_ints(_read(f"{base}/status"), _STATUS_KEYS)
                if FIELD_CTX_SWITCHES in fields:
                    vol, invol = status.get("vol"), status.get("invol")
                if FIELD_SWAP in fields:
                    # Kernel threads have no VmSwap line: they use no swap.
                    swap = status.get("swap_kb", 0) * 1024
            except ProcessGone:
                gone = True
            except ProcessAccessDenied:
                denied = True
        if FIELD_USS in fields:
            try:
                smaps = _kv_ints(_read(f"{base}/smaps_rollup"), _SMAPS_KEYS)
                uss = (
                    smaps.get("clean_kb", 0) + smaps.get("dirty_kb", 0) + smaps.get("huge_kb", 0)
                ) * 1024
            except ProcessGone:
                gone = True
            except ProcessAccessDenied:
                denied = True
        return Extras(
            fds=fds,
            read_bytes=read_bytes,
            write_bytes=write_bytes,
            ctx_switches_voluntary=vol,
            ctx_switches_involuntary=invol,
            uss_bytes=uss,
            swap_bytes=swap,
            gone=gone,
            denied=denied,
        )
