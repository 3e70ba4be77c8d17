"""Scale benchmark: the full daemon at 10,000 single-process plugins and a 1 s interval, against
the /proc floor of the same processes.

For each SHAPE (plugins x processes per plugin; default 10000x1, then 1000x1 and 100x10 to
show how the cost grows) the script starts that many real `sleep` processes carrying
PLUGINMON_TENANT / PLUGINMON_PLUGIN (label discovery makes each group a plugin), then, over
the same processes:

  floor   a raw read of /proc/PID/stat of every one of them once a second, no parsing
          (bench/procstat.py), in its own interpreter, for FLOOR seconds;
  daemon  `pluginmon run` at a 1 s interval (sampling, writing, scoring, evaluating,
          exporting) against a fresh database, /metrics scraped every 15 s as Prometheus
          would. Once every plugin has its id in the database and after WARMUP seconds,
          DURATION seconds are measured: the daemon's CPU from /proc/<pid>/stat, its RSS
          (and peak), the database server's CPU (postmaster + every backend + exited ones,
          bench/procstat.py), sampling cycles run vs expected, and any "run(s) skipped"
          warning of the scheduler.

With --baseline-tree DIR (a checkout of another commit, e.g. `git archive <commit> | tar -x
-C DIR`) the same shape is also run with that tree's daemon, interleaved with this one's, on
the same processes and the same server: the comparison of a change is made within one
invocation on this shared machine. --profile DIR records the measured window of this tree's
daemon with py-spy (collapsed stacks; py-spy costs a core's share itself, so profile and
measure in separate invocations).

Run: .venv/bin/python bench/scale.py [--shapes 10000x1,1000x1,100x10] [--database-url URL]
Without --database-url an embedded PostgreSQL 18 is started in a temporary directory (its
CPU is then all this benchmark's). Last line: daemon_vs_floor_10k=<daemon CPU / floor CPU>
for the 10,000x1 shape; a run without that shape names the first shape's size instead
(daemon_vs_floor_1000x1=...).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.procstat import (
    cpu_seconds,
    floor_cpu_percent,
    memory_split_mib,
    postmaster_of,
    rss_mib,
    server_cpu_seconds,
    sleeping_plugins,
)
from bench.scratch import free_port, with_database
from pluginmon.storage.embedded import EmbeddedPostgres

REPO = Path(__file__).resolve().parent.parent
SCRAPE_EVERY_SECONDS = 15.0


@dataclass(frozen=True, slots=True)
class Shape:
    plugins: int
    per_plugin: int

    @property
    def processes(self) -> int:
        return self.plugins * self.per_plugin

    def __str__(self) -> str:
        return f"{self.processes} processes in {self.plugins} plugins"


@dataclass(frozen=True, slots=True)
class DaemonRun:
    tree: str
    cpu_percent: float
    rss_mib: float
    peak_rss_mib: float
    anon_mib: float  # of rss_mib: the heap (the rest is mapped libraries and files)
    database_cpu_percent: float
    wall_seconds: float
    cycles: int
    expected_cycles: int
    skip_warnings: tuple[str, ...]
    rows_written: int
    plugins_exported: int
    exit_code: int
    settle_seconds: float  # from start until every plugin had an id and the spools were empty

    @property
    def cycles_skipped(self) -> int:
        # One cycle either way is the window's edges, not a skip.
        return max(0, self.expected_cycles - self.cycles - 1)


def parse_shape(text: str) -> Shape:
    plugins, _, per = text.partition("x")
    return Shape(int(plugins), int(per or 1))


# -- the database server ------------------------------------------------------------------------


@contextlib.contextmanager
def database_server(database_url: str | None) -> Iterator[tuple[str, int]]:
    """(admin URL, postmaster pid): an embedded server started for the run, or the given one
    (which must run on this host for its CPU to be read)."""
    if database_url is not None:
        yield database_url, _postmaster(database_url)
        return
    with tempfile.TemporaryDirectory(prefix="pluginmon-bench-scale-pg-") as directory:
        server = EmbeddedPostgres(Path(directory))
        url = server.start()
        try:
            admin = with_database(url, "postgres")
            yield admin, _postmaster(admin)
        finally:
            server.stop()


def _postmaster(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
        assert row is not None
        return postmaster_of(int(row[0]))  # while the backend is there to be read


@contextlib.contextmanager
def fresh_database(admin_url: str) -> Iterator[str]:
    name = f"pluginmon_bench_scale_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield with_database(admin_url, name)
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


# -- the daemon ---------------------------------------------------------------------------------


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        return str(response.read().decode())


def metric_value(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name)] in " {":
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_until(what: str, probe: object, timeout: float, daemon: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            raise RuntimeError(f"daemon exited with {daemon.returncode} while waiting for {what}")
        try:
            if probe():  # type: ignore[operator]
                return
        except (OSError, psycopg.Error):
            pass
        time.sleep(1.0)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")


def plugins_in_database(url: str, tenant: str) -> int:
    with psycopg.connect(url, connect_timeout=5) as conn:
        row = conn.execute(
            "SELECT count(*) FROM plugins WHERE tenant_id = %s", (tenant,)
        ).fetchone()
    return 0 if row is None else int(row[0])


def run_daemon(
    *,
    tree: Path,
    admin_url: str,
    postmaster: int,
    shape: Shape,
    tenant: str,
    interval: float,
    warmup: float,
    duration: float,
    extra_env: dict[str, str],
    profile: Path | None,
) -> DaemonRun:
    port = free_port()
    with (
        fresh_database(admin_url) as url,
        tempfile.TemporaryDirectory(prefix="pluginmon-bench-scale-") as data_dir,
    ):
        env = {k: v for k, v in os.environ.items() if not k.startswith("PLUGINMON_")}
        env.update(
            PYTHONPATH=str(tree),
            PLUGINMON_DATABASE_URL=url,
            PLUGINMON_DATA_DIR=data_dir,
            PLUGINMON_HTTP_HOST="127.0.0.1",
            PLUGINMON_HTTP_PORT=str(port),
            PLUGINMON_SAMPLE_INTERVAL_SECONDS=str(interval),
            PLUGINMON_LABEL_DISCOVERY="true",
            PLUGINMON_LOG_LEVEL="WARNING",
            **extra_env,
        )
        log = Path(data_dir) / "daemon.log"
        with log.open("wb") as log_file:
            daemon = subprocess.Popen(
                [sys.executable, "-m", "pluginmon.daemon.cli", "run"],
                env=env,
                cwd=tree,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        spy: subprocess.Popen[bytes] | None = None
        try:
            started = time.monotonic()
            wait_until("/metrics", lambda: scrape(port), 120, daemon)
            wait_until(
                f"{shape.plugins} plugin ids",
                lambda: plugins_in_database(url, tenant) >= shape.plugins,
                900,
                daemon,
            )
            # Samples of plugins whose id was not known yet wait in the unresolved spool
            # and are replayed a slice per tick: steady state is when both spools are empty.
            wait_until(
                "empty spools",
                lambda: metric_value(scrape(port), "pluginmon_spool_samples") == 0,
                900,
                daemon,
            )
            settled = time.monotonic() - started
            time.sleep(warmup)
            before_log = log.read_text(errors="replace")
            text = scrape(port)
            cycles0 = metric_value(text, "pluginmon_sample_duration_seconds_count")
            rows0 = metric_value(text, "pluginmon_rows_written_total")
            if profile is not None:
                spy = subprocess.Popen(
                    [
                        str(Path(sys.executable).parent / "py-spy"),
                        "record",
                        "--pid",
                        str(daemon.pid),
                        "--duration",
                        str(int(duration)),
                        "--rate",
                        "67",
                        "--nonblocking",
                        "--format",
                        "raw",
                        "--output",
                        str(profile),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            cpu0, db0, wall0 = (
                cpu_seconds(daemon.pid),
                server_cpu_seconds(postmaster),
                time.monotonic(),
            )
            next_scrape = wall0 + SCRAPE_EVERY_SECONDS
            peak = 0.0
            while time.monotonic() - wall0 < duration:
                time.sleep(min(1.0, max(0.0, wall0 + duration - time.monotonic())))
                peak = max(peak, rss_mib(daemon.pid))
                if time.monotonic() >= next_scrape:
                    scrape(port)
                    next_scrape += SCRAPE_EVERY_SECONDS
            cpu1, db1, wall1 = (
                cpu_seconds(daemon.pid),
                server_cpu_seconds(postmaster),
                time.monotonic(),
            )
            rss = rss_mib(daemon.pid)
            anon, _files = memory_split_mib(daemon.pid)
            text = scrape(port)
            cycles = metric_value(text, "pluginmon_sample_duration_seconds_count") - cycles0
            rows = metric_value(text, "pluginmon_rows_written_total") - rows0
            exported = sum(
                1
                for line in text.splitlines()
                if line.startswith("pluginmon_plugin_up{") and f'tenant="{tenant}"' in line
            )
            new_log = log.read_text(errors="replace")[len(before_log) :]
            skips = tuple(
                sorted(
                    {m.group(1) for m in re.finditer(r"job (\w+): \d+ run\(s\) skipped", new_log)}
                )
            )
            if spy is not None:
                spy.wait(timeout=duration + 60)
        finally:
            if spy is not None and spy.poll() is None:
                spy.kill()
            daemon.send_signal(signal.SIGTERM)
            try:
                code = daemon.wait(timeout=120)
            except subprocess.TimeoutExpired:
                daemon.kill()
                code = daemon.wait()
    wall = wall1 - wall0
    return DaemonRun(
        tree=str(tree),
        cpu_percent=100 * (cpu1 - cpu0) / wall,
        rss_mib=rss,
        peak_rss_mib=peak,
        anon_mib=anon,
        database_cpu_percent=100 * (db1 - db0) / wall,
        wall_seconds=wall,
        cycles=round(cycles),
        expected_cycles=int(wall / interval),
        skip_warnings=skips,
        rows_written=round(rows),
        plugins_exported=exported,
        exit_code=code,
        settle_seconds=settled,
    )


def report(label: str, run: DaemonRun, floor: float) -> None:
    print(
        f"  {label}: daemon CPU {run.cpu_percent:.1f}% of one core "
        f"({run.cpu_percent / floor:.2f}x the floor), RSS {run.rss_mib:.1f} MiB "
        f"(highest in the window {run.peak_rss_mib:.1f}; heap {run.anon_mib:.1f}, libraries and files "
        f"{run.rss_mib - run.anon_mib:.1f}), database server CPU {run.database_cpu_percent:.1f}%"
    )
    print(
        f"    {run.wall_seconds:.0f} s measured: {run.cycles} sampling cycles of "
        f"{run.expected_cycles} expected, cycles skipped: {run.cycles_skipped}, "
        f"skip warnings: {', '.join(run.skip_warnings) or 'none'}; "
        f"{run.rows_written} rows written; {run.plugins_exported} plugins exported; "
        f"exit {run.exit_code}; steady state (ids known, spools empty) "
        f"{run.settle_seconds:.0f} s after start"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--database-url", help="admin URL of a server on this host")
    parser.add_argument("--shapes", default="10000x1,1000x1,100x10")
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--warmup", type=float, default=20.0)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--floor-duration", type=float, default=30.0)
    parser.add_argument("--baseline-tree", type=Path, help="another checkout to compare with")
    parser.add_argument("--profile", type=Path, help="directory for py-spy profiles")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        help="extra NAME=VALUE for the daemon under test (repeatable)",
    )
    args = parser.parse_args()
    shapes = [parse_shape(s) for s in args.shapes.split(",")]
    extra = dict(item.split("=", 1) for item in args.env)
    # (label, ratio): the 10,000-plugin shape's when it ran, else the first shape's, named by
    # its own size so a short run is never mistaken for the 10k figure.
    headline: tuple[str, float] | None = None
    with database_server(args.database_url) as (admin_url, postmaster):
        for index, shape in enumerate(shapes):
            tenant = f"scale{uuid.uuid4().hex[:6]}"
            with (
                sleeping_plugins(
                    plugins=shape.plugins, processes_per_plugin=shape.per_plugin, tenant=tenant
                ) as pids,
                tempfile.TemporaryDirectory(prefix="pluginmon-bench-floor-") as workdir,
            ):
                floor, reads = floor_cpu_percent(
                    pids,
                    duration_seconds=args.floor_duration,
                    interval_seconds=args.interval,
                    workdir=Path(workdir),
                )
                print(
                    f"{shape}, {args.interval:g} s interval; floor (raw read of "
                    f"/proc/PID/stat, {reads} per cycle): {floor:.2f}% of one core"
                )
                trees: list[tuple[str, Path, dict[str, str]]] = [("this tree", REPO, extra)]
                if args.baseline_tree is not None:
                    baseline: tuple[str, Path, dict[str, str]] = (
                        "baseline",
                        args.baseline_tree.resolve(),
                        {},
                    )
                    # Alternate the order from shape to shape: neither always runs first.
                    trees = [baseline, *trees] if index % 2 == 0 else [*trees, baseline]
                runs: dict[str, DaemonRun] = {}
                for label, tree, env in trees:
                    profile = None
                    if args.profile is not None and label == "this tree":
                        args.profile.mkdir(parents=True, exist_ok=True)
                        profile = args.profile / f"scale-{shape.plugins}x{shape.per_plugin}.txt"
                    runs[label] = run_daemon(
                        tree=tree,
                        admin_url=admin_url,
                        postmaster=postmaster,
                        shape=shape,
                        tenant=tenant,
                        interval=args.interval,
                        warmup=args.warmup,
                        duration=args.duration,
                        extra_env=env,
                        profile=profile,
                    )
                    report(label, runs[label], floor)
                ours = runs["this tree"]
                if "baseline" in runs:
                    base = runs["baseline"]
                    print(
                        f"  this tree / baseline: CPU {ours.cpu_percent / base.cpu_percent:.2f}x, "
                        f"database CPU {ours.database_cpu_percent / max(base.database_cpu_percent, 1e-9):.2f}x, "
                        f"RSS {ours.rss_mib / base.rss_mib:.2f}x"
                    )
                ratio = ours.cpu_percent / floor
                if shape.plugins == 10_000 and shape.per_plugin == 1:
                    headline = ("10k", ratio)
                elif headline is None:
                    headline = (f"{shape.plugins}x{shape.per_plugin}", ratio)
    assert headline is not None  # --shapes has at least one shape
    label, ratio = headline
    print(f"daemon_vs_floor_{label}={ratio:.2f}")


if __name__ == "__main__":
    main()
