"""Daemon benchmark: /metrics at 10,000 plugins, and the daemon's CPU at 1,000 processes / 1 s.

  render     10,000 synthetic plugins (default field set, a health score with 5 components
             each, 1% of them with a firing alert) in the exporter; /metrics rendered in the
             text format and in OpenMetrics (what Prometheus asks for), RENDER_ROUNDS times
             each, plus once through the real aiohttp server. RSS of this process (the
             daemon's modules and the exporter state for 10,000 plugins) is reported too.
  sustained  PROCESSES real processes (`sleep`), grouped into PLUGINS plugins by label
             discovery (PLUGINMON_TENANT / PLUGINMON_PLUGIN in their environment), watched by
             `pluginmon run` at a 1 s interval against a real PostgreSQL (embedded, in a
             temporary directory, unless --database-url). After WARMUP seconds, the daemon's
             CPU time is read from /proc/<pid>/stat over DURATION seconds, with /metrics
             scraped every 15 s as Prometheus would; RSS from /proc/<pid>/status.

Run: .venv/bin/python bench/daemon.py [--processes 1000] [--plugins 100] [--duration 60]
Last line: metrics_render_10k_ms=<median ms, text format>.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

from bench.processes import cpu_seconds, daemon_env, rss_mib, scrape, start_processes
from bench.scratch import free_port, scratch_database
from pluginmon.collectors.models import PluginKey, PluginSample, Snapshot
from pluginmon.daemon.exporter import (
    DaemonMetrics,
    ExporterState,
    FiringAlert,
    HealthView,
    MetricsRenderer,
    PluginCollector,
)
from pluginmon.daemon.http import HttpServer, Readiness

REPO = Path(__file__).resolve().parent.parent
OPENMETRICS = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"


# -- render ---------------------------------------------------------------------------------


def build_exporter(plugins: int) -> tuple[MetricsRenderer, ExporterState]:
    now = datetime.now(UTC)
    samples = tuple(
        PluginSample(
            key=PluginKey(f"tenant-{i % 50:02d}", f"plugin-{i:05d}", "production"),
            timestamp=now,
            up=True,
            process_count=1 + i % 4,
            cpu_percent=(i % 997) / 10.0,
            rss_bytes=50_000_000 + i * 1013,
            vms_bytes=500_000_000 + i * 4099,
            threads=4 + i % 16,
            restarts=0,
            oldest_start_time=now,
        )
        for i in range(plugins)
    )
    state = ExporterState(grace_seconds=300)
    state.update_snapshot(
        Snapshot(timestamp=now, host="bench", samples=samples, duration_seconds=0.5)
    )
    state.update_health(
        {
            s.key: HealthView(
                score=87.5,
                components=(
                    ("up", 100.0),
                    ("cpu", 91.0),
                    ("memory", 80.0),
                    ("restarts", 100.0),
                    ("leak", 66.5),
                ),
            )
            for s in samples
        }
    )
    state.update_alerts([FiringAlert(s.key, "PluginCpuHigh", "warning") for s in samples[::100]])
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    DaemonMetrics(registry, version="bench")
    return MetricsRenderer(registry, PluginCollector(state)), state


def time_render(
    renderer: MetricsRenderer,
    state: ExporterState,
    accept: str | None,
    rounds: int,
    *,
    cold: bool = True,
) -> tuple[list[float], list[float], int]:
    """Wall and CPU milliseconds per render; ``cold``: the state changed before each one
    (as when a new snapshot arrived since the last scrape), so nothing is reused."""
    firing = list(state.view().alerts)
    walls, cpus = [], []
    size = 0
    renderer.render_chunks(accept)
    for _ in range(rounds):
        if cold:
            state.update_alerts(firing)  # a new view: the exporter's cache is invalid
        started, cpu = time.perf_counter(), time.process_time()
        chunks, _ = renderer.render_chunks(accept)
        walls.append((time.perf_counter() - started) * 1000)
        cpus.append((time.process_time() - cpu) * 1000)
        size = sum(map(len, chunks))
    return walls, cpus, size


async def time_http(renderer: MetricsRenderer) -> tuple[float, float]:
    """(ms for one GET /metrics as Prometheus sends it, longest event-loop stall meanwhile).

    The client runs in another thread, so the stall is the server's alone.
    """

    async def ready() -> Readiness:
        return Readiness(ready=True)

    stall = 0.0

    async def ticker(stop: asyncio.Event) -> None:
        nonlocal stall
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            stall = max(stall, (now - last) * 1000)
            last = now

    def get(port: int) -> float:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/metrics",
            headers={"Accept": OPENMETRICS, "Accept-Encoding": "gzip"},
        )
        started = time.perf_counter()
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
            response.read()
        return (time.perf_counter() - started) * 1000

    async with HttpServer(host="127.0.0.1", port=0, metrics=renderer, readiness=ready) as server:
        stop = asyncio.Event()
        tick = asyncio.create_task(ticker(stop))
        await asyncio.sleep(0.05)
        elapsed = await asyncio.to_thread(get, server.port)
        stop.set()
        await tick
    return elapsed, stall


def time_baseline(state: ExporterState, rounds: int) -> list[float]:
    """The baseline: prometheus-client's own ``generate_latest`` over the same per-plugin
    families (the collector's ``collect()``), in the same run."""
    registry = CollectorRegistry()
    registry.register(PluginCollector(state))
    firing = list(state.view().alerts)
    walls = []
    for _ in range(rounds):
        state.update_alerts(firing)
        started = time.perf_counter()
        generate_latest(registry)
        walls.append((time.perf_counter() - started) * 1000)
    return walls


def bench_render(plugins: int, rounds: int) -> float:
    renderer, state = build_exporter(plugins)
    text_times, text_cpu, text_size = time_render(renderer, state, None, rounds)
    om_times, om_cpu, om_size = time_render(renderer, state, OPENMETRICS, rounds)
    warm_times, _, _ = time_render(renderer, state, OPENMETRICS, rounds, cold=False)
    http_ms, stall_ms = asyncio.run(time_http(renderer))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    text_median = statistics.median(text_times)

    def p95(values: list[float]) -> float:
        return sorted(values)[int(0.95 * (len(values) - 1))]

    print(f"render: {plugins} plugins (~{15 * plugins // 1000}k series), {rounds} rounds each")
    print(
        f"  text format, cold: median {text_median:.1f} ms "
        f"(CPU {statistics.median(text_cpu):.1f} ms), p95 {p95(text_times):.1f} ms, "
        f"{text_size / 1e6:.1f} MB"
    )
    print(
        f"  OpenMetrics, cold: median {statistics.median(om_times):.1f} ms "
        f"(CPU {statistics.median(om_cpu):.1f} ms), p95 {p95(om_times):.1f} ms, "
        f"{om_size / 1e6:.1f} MB"
    )
    print(
        "  OpenMetrics, state unchanged since the previous scrape: median "
        f"{statistics.median(warm_times):.1f} ms"
    )
    print(
        f"  GET /metrics (OpenMetrics, gzip) through the aiohttp server: {http_ms:.1f} ms; "
        f"longest event-loop stall meanwhile {stall_ms:.1f} ms"
    )
    print(f"  RSS with 10k plugins' exporter state: {rss_mib():.1f} MiB (peak {peak:.1f} MiB)")
    # After the RSS peak above was read: the baseline's own strings would inflate it.
    baseline = statistics.median(time_baseline(state, max(3, rounds // 5)))
    print(
        f"  baseline, prometheus-client generate_latest over the same families: median "
        f"{baseline:.1f} ms; ours / baseline = {text_median / baseline:.3f}"
    )
    return text_median


# -- sustained run ---------------------------------------------------------------------------


def bench_sustained(
    database_url: str,
    *,
    processes: int,
    plugins: int,
    warmup: float,
    duration: float,
    evaluate_interval: float | None = None,
) -> tuple[float, float]:
    tenant = f"bench-{uuid.uuid4().hex[:6]}"
    procs = start_processes(processes, plugins, tenant)
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="pluginmon-bench-daemon-") as data_dir:
        env = daemon_env(database_url, data_dir, port)
        if evaluate_interval is not None:
            env["PLUGINMON_EVALUATE_INTERVAL_SECONDS"] = str(evaluate_interval)
        log = Path(data_dir) / "daemon.log"
        with log.open("wb") as log_file:
            daemon = subprocess.Popen(
                [sys.executable, "-m", "pluginmon.daemon.cli", "run"],
                env=env,
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    scrape(port)
                    break
                except OSError:
                    time.sleep(0.5)
            time.sleep(warmup)
            if daemon.poll() is not None:
                raise RuntimeError(f"daemon exited:\n{log.read_text()[-3000:]}")
            cpu_start, wall_start = cpu_seconds(daemon.pid), time.monotonic()
            next_scrape = wall_start
            while time.monotonic() - wall_start < duration:
                if time.monotonic() >= next_scrape:
                    scrape(port)
                    next_scrape += 15
                time.sleep(0.5)
            cpu_used = cpu_seconds(daemon.pid) - cpu_start
            wall = time.monotonic() - wall_start
            rss = rss_mib(daemon.pid)
            body = (
                urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10)
                .read()
                .decode()
            )
            seen = [
                line
                for line in body.splitlines()
                if line.startswith("pluginmon_plugin_processes{") and f'tenant="{tenant}"' in line
            ]
            watched = sum(int(float(line.rsplit(" ", 1)[1])) for line in seen)
        finally:
            daemon.send_signal(signal.SIGTERM)
            code = daemon.wait(timeout=60)
            for proc in procs:
                proc.kill()
            for proc in procs:
                proc.wait()
    share = 100 * cpu_used / wall
    print(
        f"sustained: {processes} processes in {plugins} plugins, 1 s interval, {wall:.0f} s "
        f"measured after {warmup:.0f} s warm-up"
    )
    print(f"  plugins exported: {len(seen)}, processes attributed: {watched}; exit code {code}")
    print(f"  daemon CPU: {cpu_used:.2f} s over {wall:.1f} s = {share:.2f}% of one core")
    print(f"  daemon RSS: {rss:.1f} MiB")
    return share, rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", help="admin URL of a server to create a database on")
    parser.add_argument("--render-plugins", type=int, default=10_000)
    parser.add_argument("--render-rounds", type=int, default=20)
    parser.add_argument("--processes", type=int, default=1000)
    parser.add_argument("--plugins", type=int, default=100)
    parser.add_argument("--warmup", type=float, default=15.0)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--skip-sustained", action="store_true")
    parser.add_argument(
        "--evaluate-interval",
        type=float,
        help="evaluate_interval_seconds for the sustained run (default: the sample interval)",
    )
    args = parser.parse_args()

    render_ms = bench_render(args.render_plugins, args.render_rounds)

    if not args.skip_sustained:
        with scratch_database(
            args.database_url or None,
            server_dir_prefix="pluginmon-bench-pg-",
            database_prefix="pluginmon_bench_daemon",
            migrated=False,
        ) as url:
            bench_sustained(
                url,
                processes=args.processes,
                plugins=args.plugins,
                warmup=args.warmup,
                duration=args.duration,
                evaluate_interval=args.evaluate_interval,
            )
    print(f"metrics_render_10k_ms={render_ms:.1f}")


if __name__ == "__main__":
    main()
