"""What the host, the daemon, PostgreSQL and the load generator did, every 50 ms, during a
benchmark: to tell what a stall of a few hundred ms was (bench/api.py --monitor).

A separate process (so its own work does not hold the load generator's GIL) records, at each
tick: the host's CPU time by kind from /proc/stat (busy, iowait, steal: time the hypervisor
gave to other guests), the CPU time of each daemon thread by name, of PostgreSQL's processes by
kind (client backends by user, autovacuum, checkpointer, WAL writer, ...: the postmaster's
children only, each process (pid and start time) counted under the kind it had when first
seen with a title of its own) and of the load generator,
and the server's sessions by state and wait event (pg_stat_activity). ``report`` then shows,
for the seconds that held the most slow requests and for a typical second, where the CPU went
and what the sessions waited on.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import statistics
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import psycopg

from bench.processes import CLOCK_TICKS, stat_fields_at

TICK_SECONDS = 0.05


def _cpu(path: str) -> int:
    """utime + stime, in clock ticks, of the stat file at ``path``."""
    fields = stat_fields_at(path)
    return int(fields[11]) + int(fields[12])


def _host() -> dict[str, int]:
    # cpu  user nice system idle iowait irq softirq steal ...
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    user, nice, system, _idle, iowait, irq, softirq, steal = values
    return {
        "host_busy": user + nice + system + irq + softirq,
        "host_iowait": iowait,
        "host_steal": steal,
    }


def _threads(pid: int, prefix: str) -> dict[str, int]:
    out: Counter[str] = Counter()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            # The main thread runs the event loop; the others (the sampler's and asyncpg's
            # workers) all carry the interpreter's name.
            name = "loop" if task.name == str(pid) else (task / "comm").read_text().strip()
            out[f"{prefix}:{name}"] += _cpu(str(task / "stat"))
        except (FileNotFoundError, ProcessLookupError):
            continue
    return dict(out)


# PostgreSQL's own processes, by the start of their title after "postgres: " (and after the
# server's cluster_name, which Debian sets, e.g. "postgres: 16/main: checkpointer"). A client
# backend's title is "user database host state", the host "[local]" or "address(port)"; its
# state changes, so it is named by its user. Any other title (an extension's background
# worker, say) is named by its first two words.
_SERVER_PROCESSES = (
    "checkpointer",
    "background writer",
    "walwriter",
    "autovacuum launcher",
    "autovacuum worker",
    "logical replication launcher",
    "logical replication apply worker",
    "logical replication tablesync worker",
    "logical replication parallel apply worker",
    "io worker",
    "parallel worker",
    "walsender",
    "walreceiver",
    "walsummarizer",
    "slotsync worker",
    "archiver",
    "logger",
    "startup",
    "stats collector",
)


def _kind(title: str, cluster_name: str = "") -> str | None:
    """The kind of a server process by its title; None while it has none of its own yet (a
    child just forked still shows the postmaster's command line)."""
    if not title.startswith("postgres: "):
        return None
    rest = title.removeprefix("postgres: ")
    if cluster_name:
        rest = rest.removeprefix(f"{cluster_name}: ")
    words = rest.split(" ")
    if len(words) >= 3 and (words[2].startswith("[local]") or "(" in words[2]):
        return f"client {words[0]}"
    for name in _SERVER_PROCESSES:
        if rest == name or rest.startswith(f"{name} "):
            return name
    return " ".join(words[:2])


def _postgres(
    postmaster: int, kinds: dict[str, str], cluster_name: str = ""
) -> dict[str, list[Any]]:
    """CPU of the postmaster and of each of its children: {"pid:start": [kind, utime + stime]}.
    Only the postmaster's children are read (not every process of the host). Each process
    keeps the kind it had when first seen with a title of its own (a client backend's title
    changes with its state); the start time in the key keeps a reused pid apart."""
    out: dict[str, list[Any]] = {"postmaster": ["postmaster", _cpu(f"/proc/{postmaster}/stat")]}
    try:
        text = Path(f"/proc/{postmaster}/task/{postmaster}/children").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return out
    for pid in text.split():
        try:
            fields = stat_fields_at(f"/proc/{pid}/stat")
            key = f"{pid}:{fields[19]}"  # stat field 22, the start time
            kind = kinds.get(key)
            if kind is None:
                title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
                kind = _kind(title.decode(errors="replace"), cluster_name)
                if kind is None:
                    continue
                kinds[key] = kind
            out[key] = [kind, int(fields[11]) + int(fields[12])]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
    return out


def _record(
    out_path: str, pids: dict[str, int], postmaster: int | None, database_url: str, stop: Any
) -> None:
    conn = psycopg.connect(database_url, autocommit=True)
    row_ = conn.execute("SHOW cluster_name").fetchone()
    cluster_name = str(row_[0]) if row_ is not None else ""
    kinds: dict[str, str] = {}
    with open(out_path, "w") as out:
        next_at = time.monotonic()
        while not stop.is_set():
            row: dict[str, Any] = {"t": time.time(), **_host()}
            for name, pid in pids.items():
                with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                    row.update(_threads(pid, name))
            if postmaster is not None:
                row["pg"] = _postgres(postmaster, kinds, cluster_name)
            sessions = conn.execute(
                "SELECT state, coalesce(wait_event_type || ':' || wait_event, 'cpu'), count(*)"
                " FROM pg_stat_activity WHERE backend_type = 'client backend'"
                " AND pid <> pg_backend_pid() GROUP BY 1, 2"
            ).fetchall()
            row["sessions"] = {f"{s}/{w}": int(n) for s, w, n in sessions}
            out.write(json.dumps(row) + "\n")
            next_at += TICK_SECONDS
            time.sleep(max(0.0, next_at - time.monotonic()))
    conn.close()


class Monitor:
    """Start with the pids to follow ({"daemon": pid, "client": os.getpid()}) and the
    server's postmaster; ``stop()`` returns the ticks recorded."""

    def __init__(
        self, out_path: Path, pids: dict[str, int], postmaster: int | None, database_url: str
    ) -> None:
        self._path = out_path
        self._stop = multiprocessing.Event()
        self._process = multiprocessing.Process(
            target=_record,
            args=(str(out_path), pids, postmaster, database_url, self._stop),
            daemon=True,
        )
        self._process.start()

    def stop(self) -> list[dict[str, Any]]:
        self._stop.set()
        self._process.join(timeout=10)
        return [json.loads(line) for line in self._path.read_text().splitlines() if line]


def _second(ticks: list[dict[str, Any]], second: int) -> dict[str, Any] | None:
    """CPU by key (% of one core) and mean sessions by state/wait over one wall-clock second."""
    inside = [t for t in ticks if second <= t["t"] < second + 1]
    before = [t for t in ticks if t["t"] < second]
    if not inside or not before:
        return None
    first, last = before[-1], inside[-1]
    span = last["t"] - first["t"]
    if span <= 0:
        return None
    cpu = {
        key: (last.get(key, 0) - first.get(key, 0)) / CLOCK_TICKS / span * 100
        for key in last
        if key not in {"t", "sessions", "pg"}
    }
    # PostgreSQL's processes by kind: a process alive at the end of the second counts from
    # its CPU at the start, or from zero if it started within the second (one that exited
    # within it is not seen: its last CPU time is gone with it).
    then = first.get("pg", {})
    for proc, (kind, ticks_now) in last.get("pg", {}).items():
        before_ticks = then[proc][1] if proc in then else 0
        key = f"pg:{kind}"
        cpu[key] = cpu.get(key, 0.0) + (ticks_now - before_ticks) / CLOCK_TICKS / span * 100
    waits: Counter[str] = Counter()
    for tick in inside:
        waits.update(tick["sessions"])
    return {
        "cpu": cpu,
        "sessions": {k: v / len(inside) for k, v in waits.items()},
        "gap_ms": max(b["t"] - a["t"] for a, b in zip([first, *inside], inside, strict=False))
        * 1000,
    }


def _format(label: str, summary: dict[str, Any]) -> str:
    cpu = {k: v for k, v in summary["cpu"].items() if v >= 2.0 or k.startswith("host_")}
    cpu_text = ", ".join(f"{k} {v:.0f}%" for k, v in sorted(cpu.items(), key=lambda kv: -kv[1]))
    waits = {k: v for k, v in summary["sessions"].items() if not k.startswith("idle/") and v >= 0.1}
    wait_text = ", ".join(f"{k} {v:.1f}" for k, v in sorted(waits.items(), key=lambda kv: -kv[1]))
    return (
        f"  {label}: CPU (% of one core) {cpu_text}; busy sessions (mean) {wait_text or 'none'};"
        f" longest gap between ticks {summary['gap_ms']:.0f} ms"
    )


def report(ticks: list[dict[str, Any]], slow_seconds: Iterable[int], first: float) -> list[str]:
    """Lines describing each of ``slow_seconds`` (and the second before it) against the median
    second of the run."""
    lines = []
    seconds = sorted({int(t["t"]) for t in ticks})[1:-1]
    summaries = {s: _second(ticks, s) for s in seconds}
    usable = [v for v in summaries.values() if v is not None]
    if usable:
        keys = set().union(*(v["cpu"] for v in usable))
        typical = {
            "cpu": {k: statistics.median(v["cpu"].get(k, 0.0) for v in usable) for k in keys},
            "sessions": {
                k: statistics.median(v["sessions"].get(k, 0.0) for v in usable)
                for k in set().union(*(v["sessions"] for v in usable))
            },
            "gap_ms": statistics.median(v["gap_ms"] for v in usable),
        }
        lines.append(_format("median second", typical))
    for second in slow_seconds:
        for label, s in (("before", second - 1), ("during", second)):
            summary = summaries.get(s)
            if summary is not None:
                lines.append(_format(f"{label} the slow second at {s - int(first)} s", summary))
    return lines


STEAL_SECOND_PERCENT = 20.0


def steal_split(ticks: list[dict[str, Any]], slow_per_second: Mapping[int, int]) -> str:
    """How the slow requests fall between the seconds in which the hypervisor took at least
    STEAL_SECOND_PERCENT of a core from this guest (steal time) and the other seconds."""
    seconds = sorted({int(t["t"]) for t in ticks})[1:-1]
    stolen: list[int] = []
    other: list[int] = []
    for second in seconds:
        summary = _second(ticks, second)
        if summary is None:
            continue
        steal = summary["cpu"].get("host_steal", 0.0)
        (stolen if steal >= STEAL_SECOND_PERCENT else other).append(second)
    slow = sum(slow_per_second.values())
    in_stolen = sum(slow_per_second.get(s, 0) for s in stolen)
    in_other = sum(slow_per_second.get(s, 0) for s in other)
    return (
        f"  steal >= {STEAL_SECOND_PERCENT:.0f}% of a core in {len(stolen)} of "
        f"{len(stolen) + len(other)} seconds, holding {in_stolen} of the {slow} slow requests "
        f"({in_other} in the other seconds, {slow - in_stolen - in_other} outside the ticks)"
    )
