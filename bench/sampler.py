"""Sampler cost per process-sample vs the raw /proc floor, process-exporter and psutil.

Starts GROUPS plugin groups (one `sh` root matched by cmdline + CHILDREN `sleep` children
each, 1,000 processes by default), then measures over the same live processes:

  ours      Sampler.sample() at its default field set (CPU time of this process)
  floor     listing /proc and reading (no parsing) exactly the files that field set needs
            (/proc/PID/stat), with the same syscalls the sampler uses
  exporter  prometheus-process-exporter with a config matching the same groups, scraped
            N times on a loopback port; its CPU from /proc/<its pid>/stat
  psutil    psutil.process_iter with the same fields (reference)
  opt-in    the extra cost of each optional field, per plugin process

All figures are CPU microseconds per process per sample, normalised by the number of
processes each tool read in one cycle (every process on the host: discovery needs all).
Each measurement runs ROUNDS times interleaved; the minimum is kept (the host is shared).

Run: .venv/bin/python bench/sampler.py [--groups 100 --children 9 --cycles 50]
Last line: sampler_vs_proc_floor=<ratio>.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.scratch import free_port
from pluginmon.collectors.procfs import CLOCK_TICKS_PER_SECOND, ProcfsSource
from pluginmon.collectors.psutil_source import PsutilSource
from pluginmon.collectors.sampler import Sampler
from pluginmon.daemon.config_sections import parse_plugin_specs

EXPORTER = "prometheus-process-exporter"
# Unique per run, so two runs at once (or other processes) never join each other's groups.
TAG = f"pmbench{os.getpid()}-g"


def _group_name(index: int) -> str:
    return f"{TAG}{index:03d}"


@contextmanager
def plugin_groups(groups: int, children: int) -> Iterator[list[subprocess.Popen[bytes]]]:
    """GROUPS `sh` roots, each with CHILDREN sleeping children; all killed on exit."""
    script = f"for i in $(seq {children}); do sleep 100000 & done; wait"
    roots: list[subprocess.Popen[bytes]] = []
    try:
        for index in range(groups):
            roots.append(
                subprocess.Popen(
                    ["sh", "-c", script, _group_name(index)],
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )
        want = groups * (children + 1)
        deadline = time.monotonic() + 60
        root_pids = {p.pid for p in roots}
        while time.monotonic() < deadline:
            alive = sum(
                1 for p in psutil.process_iter(["ppid"]) if p.info["ppid"] in root_pids
            ) + len(root_pids)
            if alive >= want:
                break
            time.sleep(0.2)
        else:
            raise RuntimeError(f"only {alive} of {want} benchmark processes started")
        yield roots
    finally:
        for p in roots:
            with suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
        for p in roots:
            p.wait()


def specs_for(groups: int) -> list[dict[str, object]]:
    return [
        {"tenant": "bench", "name": _group_name(i), "match": {"cmdline": rf"\b{_group_name(i)}$"}}
        for i in range(groups)
    ]


def cpu_per_call(fn: Callable[[], int], cycles: int) -> float:
    """CPU seconds of this process per item, over `cycles` calls each returning its item count."""
    items = 0
    started = time.process_time()
    for _ in range(cycles):
        items += fn()
    return (time.process_time() - started) / max(items, 1)


def floor_reader(proc_root: str = "/proc") -> Callable[[], int]:
    """The floor: list /proc and read every process's stat, without parsing."""
    flags = os.O_RDONLY | os.O_CLOEXEC

    def read_all() -> int:
        n = 0
        for name in os.listdir(proc_root):
            if not name.isdigit():
                continue
            try:
                fd = os.open(f"{proc_root}/{name}/stat", flags)
            except FileNotFoundError:
                continue
            try:
                os.read(fd, 4096)
            finally:
                os.close(fd)
            n += 1
        return n

    return read_all


def psutil_reader() -> Callable[[], int]:
    attrs = ["cpu_times", "memory_info", "num_threads", "ppid", "create_time"]

    def read_all() -> int:
        n = 0
        for _ in psutil.process_iter(attrs):
            n += 1
        return n

    return read_all


def sampler_reader(sampler: Sampler) -> Callable[[], int]:
    def read_all() -> int:
        return sampler.sample().processes_seen

    return read_all


def _ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    fields = data[data.rfind(b")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


def exporter_cost(groups: int, scrapes: int, extra_args: list[str]) -> tuple[float, int]:
    """(CPU seconds per process per scrape, processes in its groups) of process-exporter."""
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "process-exporter.yml"
        config.write_text(
            "process_names:\n"
            '  - name: "{{.Matches.group}}"\n'
            "    cmdline:\n"
            f"    - '\\b(?P<group>{TAG}\\d+)$'\n"
        )
        port = free_port()
        exporter = subprocess.Popen(
            [
                EXPORTER,
                "-config.path",
                str(config),
                "-web.listen-address",
                f"127.0.0.1:{port}",
                *extra_args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            url = f"http://127.0.0.1:{port}/metrics"
            deadline = time.monotonic() + 30
            while True:
                try:
                    body = urllib.request.urlopen(url, timeout=30).read().decode()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            tracked = 0
            for line in body.splitlines():
                if line.startswith("namedprocess_namegroup_num_procs{"):
                    tracked += int(float(line.rsplit(" ", 1)[1]))
            before = _ticks(exporter.pid)
            processes = 0
            for _ in range(scrapes):
                processes += len([n for n in os.listdir("/proc") if n.isdigit()])
                urllib.request.urlopen(url, timeout=60).read()
            used = (_ticks(exporter.pid) - before) / CLOCK_TICKS_PER_SECOND
            return used / max(processes, 1), tracked
        finally:
            exporter.terminate()
            exporter.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=100)
    parser.add_argument("--children", type=int, default=9)
    parser.add_argument("--cycles", type=int, default=50)
    parser.add_argument("--scrapes", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    specs = parse_plugin_specs(specs_for(args.groups))
    us = 1e6
    with plugin_groups(args.groups, args.children):
        ours = Sampler(specs)
        first_started = time.process_time()
        first = ours.sample()
        first_cost = (time.process_time() - first_started) / first.processes_seen
        # Other processes on the host may be plugins too (env labels): they count, since the
        # sampler reads their opt-in fields as well, but only ours are checked.
        plugin_procs = sum(s.process_count for s in first.samples)
        ours_procs = sum(s.process_count for s in first.samples if s.key.tenant == "bench")
        print(
            f"processes on host: {first.processes_seen}, in plugins: {plugin_procs} "
            f"(the benchmark's: {ours_procs} in {args.groups} plugins)"
        )
        assert ours_procs == args.groups * (args.children + 1), "attribution is off"
        print(f"ours, first cycle (discovery + matching + env labels): {first_cost * us:.1f} us")
        second_started = time.process_time()
        second = ours.sample()
        second_cost = (time.process_time() - second_started) / second.processes_seen
        print(f"ours, second cycle (new processes confirmed): {second_cost * us:.1f} us")

        optional = ["fds", "io", "ctx_switches", "swap", "uss"]
        with_field = {f: Sampler(specs, fields=frozenset({f})) for f in optional}
        psutil_ours = Sampler(specs, source=PsutilSource())
        # Worst case for the fast path: every stat line changed, so every one is parsed.
        parse_all = Sampler(specs, source=ProcfsSource(reuse_unchanged=False))
        for sampler in [*with_field.values(), psutil_ours, parse_all]:
            sampler.sample()  # steady state = after the first two cycles
            sampler.sample()

        results: dict[str, list[float]] = {}
        for _ in range(args.rounds):
            results.setdefault("floor", []).append(cpu_per_call(floor_reader(), args.cycles))
            results.setdefault("ours", []).append(cpu_per_call(sampler_reader(ours), args.cycles))
            results.setdefault("ours_parse_all", []).append(
                cpu_per_call(sampler_reader(parse_all), args.cycles)
            )
            results.setdefault("psutil", []).append(cpu_per_call(psutil_reader(), args.cycles))
            results.setdefault("ours_psutil_backend", []).append(
                cpu_per_call(sampler_reader(psutil_ours), max(args.cycles // 5, 3))
            )
            for field, sampler in with_field.items():
                results.setdefault(f"ours+{field}", []).append(
                    cpu_per_call(sampler_reader(sampler), args.cycles)
                )
        best = {name: min(values) * us for name, values in results.items()}

        exporter_default = exporter_lean = None
        tracked = 0
        if shutil.which(EXPORTER):
            exporter_default, tracked = exporter_cost(args.groups, args.scrapes, [])
            exporter_lean, _ = exporter_cost(
                args.groups, args.scrapes, ["-gather-smaps=false", "-threads=false"]
            )
        else:
            print(f"{EXPORTER} not installed: skipped")

    print(f"floor (list /proc + raw read of stat):   {best['floor']:.2f} us/process")
    print(f"ours (default fields, steady state):     {best['ours']:.2f} us/process")
    print(f"ours, every stat line parsed (worst case): {best['ours_parse_all']:.2f} us/process")
    print(f"psutil (same fields, reference):         {best['psutil']:.2f} us/process")
    print(f"ours on the psutil backend:              {best['ours_psutil_backend']:.2f} us/process")
    for field in ["fds", "io", "ctx_switches", "swap", "uss"]:
        extra_total = (best[f"ours+{field}"] - best["ours"]) * first.processes_seen / plugin_procs
        print(f"opt-in {field:<13} +{max(extra_total, 0.0):.2f} us per plugin process")
    ratio_floor = best["ours"] / best["floor"]
    print(f"ours / floor:     {ratio_floor:.2f}x (target <= 1.5x)")
    print(f"ours (every line parsed) / floor: {best['ours_parse_all'] / best['floor']:.2f}x")
    print(f"psutil / floor:   {best['psutil'] / best['floor']:.2f}x")
    if exporter_default is not None and exporter_lean is not None:
        print(f"process-exporter tracked {tracked} processes in its groups")
        print(
            f"process-exporter (defaults):                  {exporter_default * us:.1f} us/process"
        )
        print(
            f"process-exporter (-gather-smaps=false -threads=false): {exporter_lean * us:.1f} us/process"
        )
        print(
            f"ours / process-exporter (defaults): {best['ours'] / (exporter_default * us):.3f}x (target <= 0.25x)"
        )
        print(f"ours / process-exporter (lean):     {best['ours'] / (exporter_lean * us):.3f}x")
    print(f"sampler_vs_proc_floor={ratio_floor:.2f}")


if __name__ == "__main__":
    main()
