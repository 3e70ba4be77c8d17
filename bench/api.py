"""Management API benchmark: 50 concurrent clients against `pluginmon run` while it samples
1,000 processes at 1 s.

PROCESSES real processes (`sleep`) in PLUGINS plugins (label discovery) are sampled every
1 s by `pluginmon run` on a real PostgreSQL (embedded in a temporary directory unless
--database-url). CLIENTS aiohttp clients in this process, each paced at RATE / CLIENTS
requests per second (an open loop: a late request is sent at once, never skipped), run a
realistic mix with their tenant's writer token for DURATION seconds after WARMUP:

  60%  reads          GET /plugins, GET /plugins/{name}, GET /operations?status=pending
  20%  config writes  PATCH /plugins/{name} (description and version)
  20%  operations     POST /plugins/{name}/operations, then PATCH running, then succeeded

The clients run LOAD_WARMUP seconds (5) before the measured window without a break, and those
requests are reported on a line of their own, not in the figures: the window starts with the
50 connections open and the daemon's pooled connections holding their prepared statements
(a cold start put up to half of the slowest 1% in its first second). --load-warmup 0 measures
from the first request, as runs before 2026-12-02 did.

Every request is one transaction as pluginmon_api under row-level security with an audit
entry per write, as in production. Reported: requests/s achieved, p50/p99/max latency (the
client's clock, so it includes this process's own scheduling on the loaded 2-core host),
errors, and the sampling cycle meanwhile: cycles counted by the daemon's
pluginmon_sample_duration_seconds histogram against the seconds elapsed, its mean, and the
scheduler's "run(s) skipped" warnings for the sample job in the daemon's log.

The load generator's garbage collector is off while it measures (--gc-in-client leaves it
on): a collection pauses every client at once and the requests in flight would count it as
the API's latency. The run reports the load generator's collections meanwhile (none, unless
--gc-in-client) and the daemon's (python_gc_collections_total). --monitor records what the
host, the daemon's threads, PostgreSQL's processes and sessions did every 50 ms,
describes the seconds that held the most slow requests, and counts the slow requests of the
seconds in which the hypervisor took a fifth of a core or more (steal) apart from the others
(bench/stall_monitor.py).

Run: .venv/bin/python bench/api.py [--processes 1000] [--clients 50] [--rate 500] [--duration 60]
                                   [--load-warmup 5] [--monitor] [--gc-in-client]
Last line: api_p99_ms=<p99 latency in ms>.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp
import psycopg

from bench.processes import (
    cpu_seconds,
    daemon_env,
    postmaster_of,
    scrape,
    server_cpu_seconds,
    start_processes,
)
from bench.scratch import free_port, scratch_database
from bench.stall_monitor import Monitor, report, steal_split
from bench.stats import percentile

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True, slots=True)
class Before:
    """What the counters said when the measured window opened."""

    counters: DaemonCounters
    wall: float
    daemon_cpu: float
    own_cpu: float
    server_cpu: float


@dataclass(frozen=True, slots=True)
class DaemonCounters:
    cycles: float  # sample cycles so far (pluginmon_sample_duration_seconds histogram)
    sampling_seconds: float  # spent in them
    collections: dict[str, float]  # garbage collections by generation (python_gc_*)


def daemon_counters(port: int) -> DaemonCounters:
    """The daemon's counters from one /metrics scrape; NaN and no collections when /metrics
    fails (the exposition is not what this measures)."""
    try:
        text = scrape(port)
    except urllib.error.HTTPError as exc:
        print(f"(cannot count sample cycles: /metrics answered {exc.code})", file=sys.stderr)
        return DaemonCounters(float("nan"), float("nan"), {})
    count = re.search(r"^pluginmon_sample_duration_seconds_count (\S+)$", text, re.MULTILINE)
    total = re.search(r"^pluginmon_sample_duration_seconds_sum (\S+)$", text, re.MULTILINE)
    assert count is not None
    assert total is not None
    collections = {
        m[1]: float(m[2])
        for m in re.finditer(
            r'^python_gc_collections_total\{generation="(\d)"\} (\S+)$', text, re.MULTILINE
        )
    }
    return DaemonCounters(float(count[1]), float(total[1]), collections)


def cli(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "pluginmon.daemon.cli", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return done.stdout


def wait_for_plugins(port: int, token: str, names: set[str], *, timeout_seconds: float) -> None:
    """Until the daemon has registered every plugin it samples (label discovery)."""
    deadline = time.monotonic() + timeout_seconds
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/v1/plugins?limit=1000",
        headers={"Authorization": "Bearer " + token},
    )
    seen: set[str] = set()
    while time.monotonic() < deadline:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            seen = {p["name"] for p in json.loads(response.read())["items"]}
        if names <= seen:
            return
        time.sleep(1)
    raise RuntimeError(f"the daemon registered {len(names & seen)} of {len(names)} plugins")


def probe_loop(port: int, *, seconds: float) -> list[tuple[float, float]]:
    """(start, latency) of /healthz every 10 ms for ``seconds`` (no API load yet): the
    daemon's event loop answers it, so a sampling cycle that held the loop for tens of ms
    shows as slow probes at the same phase of every second."""
    probes = []
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        started = time.perf_counter()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as reply:
            reply.read()
        probes.append((started, time.perf_counter() - started))
        time.sleep(0.01)
    return probes


def probe_report(probes: list[tuple[float, float]]) -> str:
    latencies = [latency for _, latency in probes]
    slow = [(start, latency) for start, latency in probes if latency > 0.005]
    # Where in the second the slow probes fall, in tenths: one or two crowded tenths mean a
    # periodic cause (the 1 s sampling cycle); an even spread means the host's scheduling.
    tenths = [0] * 10
    for start, _ in slow:
        tenths[int((start % 1.0) * 10)] += 1
    return (
        f"{len(probes)} /healthz probes, p50 {statistics.median(latencies) * 1000:.1f} ms, "
        f"p99 {percentile(latencies, 0.99) * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms; "
        f"{len(slow)} over 5 ms, by tenth of the second: {tenths}"
    )


@dataclass
class Results:
    latencies: list[float] = field(default_factory=list)
    # (wall-clock start, latency) of every request: where in time the slow ones fall.
    timeline: list[tuple[float, float]] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    by_kind: dict[str, list[float]] = field(default_factory=dict)
    # The first answer of each kind of error: what the database or the API refused.
    examples: dict[str, str] = field(default_factory=dict)

    def record(self, kind: str, seconds: float, status: int, expected: int, code: str = "") -> None:
        self.latencies.append(seconds)
        self.timeline.append((time.time() - seconds, seconds))
        self.by_kind.setdefault(kind, []).append(seconds)
        if status != expected:
            key = f"{kind}:{status}:{code}"
            self.errors[key] = self.errors.get(key, 0) + 1


class Sender:
    """One request, answered by its status and body: (status, body bytes)."""

    async def send(self, method: str, path: str, body: object) -> tuple[int, bytes]:
        raise NotImplementedError

    async def close(self) -> None:
        return None


class AiohttpSender(Sender):
    """Through an aiohttp session shared by the clients (``--client aiohttp``)."""

    def __init__(self, session: aiohttp.ClientSession, base: str, token: str) -> None:
        self._session = session
        self._base = base
        self._headers = {"Authorization": "Bearer " + token}

    async def send(self, method: str, path: str, body: object) -> tuple[int, bytes]:
        async with self._session.request(
            method, self._base + path, json=body, headers=self._headers
        ) as reply:
            return reply.status, await reply.read()


class LeanSender(Sender):
    """HTTP/1.1 on one keep-alive connection of its own (``--client lean``, the default).

    The load generator shares the daemon's two cores, so its CPU per request is taken from
    the daemon's: this one writes a prepared request and reads the status line, the
    Content-Length and the body, about a third of aiohttp's client work per request (the
    run prints the load generator's CPU). It reconnects when the server closes."""

    def __init__(self, port: int, token: str) -> None:
        self._port = port
        self._head = (
            "{method} {path} HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\n"
        )
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def send(self, method: str, path: str, body: object) -> tuple[int, bytes]:
        data = b"" if body is None else json.dumps(body).encode()
        request = self._head.format(method=method, path=path).encode()
        if body is not None:
            request += b"Content-Type: application/json\r\n"
        request += b"Content-Length: %d\r\n\r\n" % len(data) + data
        for attempt in (1, 2):
            if self._streams is None:
                self._streams = await asyncio.open_connection("127.0.0.1", self._port)
            reader, writer = self._streams
            try:
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
            except (ConnectionError, asyncio.IncompleteReadError):
                await self.close()
                if attempt == 2:
                    raise
                continue
            status = int(head[9:12])
            length = 0
            close = False
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"connection" and value.strip().lower() == b"close":
                    close = True
                elif name == b"transfer-encoding":
                    raise RuntimeError("the lean client reads Content-Length bodies only")
            payload = await reader.readexactly(length)
            if close:
                await self.close()
            return status, payload
        raise AssertionError("unreachable")

    async def close(self) -> None:
        if self._streams is not None:
            _, writer = self._streams
            self._streams = None
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


async def client(
    sender: Sender,
    plugins: list[str],
    *,
    interval: float,
    until: float,
    results: Results,
    rng: random.Random,
    counted_from: float,
    warm: Results,
) -> None:
    """One paced client. A request sent before ``counted_from`` (monotonic) is recorded in
    ``warm`` instead of ``results``: the load's own warm-up."""
    next_at = time.monotonic() + rng.random() * interval
    open_operation: int | None = None
    step = 0
    # Ends at ``until`` even when behind: the duration is fixed, the number of requests not.
    while next_at < until and time.monotonic() < until:
        delay = next_at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        next_at += interval
        into = results if time.monotonic() >= counted_from else warm
        plugin = rng.choice(plugins)
        roll = rng.random()
        if open_operation is not None or roll >= 0.8:
            kind = "operation"
            if open_operation is None:
                method, path, body, expected = (
                    "POST",
                    f"/api/v1/plugins/{plugin}/operations",
                    {"type": "configure", "environment": "bench"},
                    201,
                )
            else:
                status = "running" if step == 1 else "succeeded"
                method, path, body, expected = (
                    "PATCH",
                    f"/api/v1/operations/{open_operation}",
                    {"status": status},
                    200,
                )
        elif roll < 0.6:
            kind = "read"
            path = rng.choice(
                [
                    "/api/v1/plugins?limit=100",
                    f"/api/v1/plugins/{plugin}",
                    "/api/v1/operations?status=pending&limit=50",
                ]
            )
            method, body, expected = "GET", None, 200
        else:
            kind = "config"
            method, path, expected = "PATCH", f"/api/v1/plugins/{plugin}", 200
            body = {"description": f"tuned {rng.randrange(10**6)}", "version": "1.0.0"}
        started = time.perf_counter()
        try:
            status_code, raw = await asyncio.wait_for(sender.send(method, path, body), 30)
        except (aiohttp.ClientError, OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
            into.record(kind, time.perf_counter() - started, 0, expected)
            into.errors[type(exc).__name__] = into.errors.get(type(exc).__name__, 0) + 1
            continue
        # Decoded only where an answer is used: an operation's id, an error's code.
        payload = json.loads(raw) if kind == "operation" or status_code != expected else None
        code = ""
        if status_code != expected and isinstance(payload, dict):
            code = str(payload.get("error", {}).get("code", ""))
            into.examples.setdefault(
                f"{kind}:{status_code}:{code}", f"{method} {path} {body} -> {payload}"
            )
        into.record(kind, time.perf_counter() - started, status_code, expected, code)
        if kind == "operation" and status_code == expected:
            assert isinstance(payload, dict)
            if open_operation is None:
                open_operation, step = int(payload["id"]), 1
            elif step == 1:
                step = 2
            else:
                open_operation, step = None, 0
        elif kind == "operation":
            open_operation, step = None, 0


def slow_report(timeline: list[tuple[float, float]], threshold: float) -> str:
    """Where the requests slower than ``threshold`` fall: by tenth of the wall-clock second
    (the daemon samples once a second, so a periodic cause crowds one or two tenths) and how
    many distinct seconds hold them (a few bursts, or spread evenly)."""
    slow = [(start, latency) for start, latency in timeline if latency > threshold]
    tenths = [0] * 10
    for start, _ in slow:
        tenths[int((start % 1.0) * 10)] += 1
    seconds = sorted({int(start) for start, _ in slow})
    busiest = busiest_slow_seconds(timeline, threshold)
    first = min((start for start, _ in timeline), default=0.0)
    return (
        f"{len(slow)} requests in {len(seconds)} distinct seconds, by tenth of the second "
        f"{tenths}; busiest seconds (requests, s into the run): "
        + ", ".join(f"{n} at {second - int(first)}" for n, second in busiest)
    )


@contextlib.contextmanager
def collector_paused(*, enabled: bool) -> Iterator[None]:
    """The load generator's cyclic garbage collector off while it measures (``enabled``).

    Its collections stop every client of this process at once, and every request in flight
    then counts the pause as the API's latency: on a loaded host a full collection of this
    process took 320 ms (--gc-in-client shows them). Reference counting still frees what the
    clients drop; the few cycles they make wait for the end of the run. ``gc.freeze`` first
    moves the set-up's objects out of the collector's view for the collection at the end.
    """
    if not enabled:
        yield
        return
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.unfreeze()


class GcPauses:
    """The load generator's own garbage collections while it measures (gc.callbacks): a
    collection pauses every client of this process, and the requests in flight then count
    the pause as latency."""

    def __init__(self) -> None:
        self.pauses: list[tuple[float, int, float]] = []  # (wall-clock start, generation, s)
        self._started = 0.0

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            elapsed = time.perf_counter() - self._started
            self.pauses.append((time.time() - elapsed, info["generation"], elapsed))

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def summary(self, first: float) -> str:
        if not self.pauses:
            return "none"
        by_generation = Counter(generation for _, generation, _ in self.pauses)
        longest = sorted(self.pauses, key=lambda p: p[2], reverse=True)[:3]
        return (
            f"{len(self.pauses)} collections ({dict(sorted(by_generation.items()))} by "
            f"generation), {sum(p[2] for p in self.pauses) * 1000:.0f} ms in all; longest: "
            + ", ".join(f"{s * 1000:.1f} ms (gen {g}) at {t - first:.1f} s" for t, g, s in longest)
        )


def slow_per_second(timeline: list[tuple[float, float]], threshold: float) -> Counter[int]:
    """Requests slower than ``threshold`` by the wall-clock second they started in."""
    return Counter(int(start) for start, latency in timeline if latency > threshold)


def busiest_slow_seconds(
    timeline: list[tuple[float, float]], threshold: float, *, count: int = 3
) -> list[tuple[int, int]]:
    """(requests, wall-clock second) of the ``count`` seconds that started the most requests
    slower than ``threshold``."""
    per_second = slow_per_second(timeline, threshold)
    return sorted(((n, second) for second, n in per_second.items()), reverse=True)[:count]


async def load(
    port: int,
    token: str,
    plugins: list[str],
    *,
    lean: bool,
    clients: int,
    rate: float,
    duration: float,
    load_warmup: float,
    at_window_start: Callable[[], Before],
) -> tuple[Results, Results, float, Before]:
    """The paced clients for ``load_warmup`` + ``duration`` seconds without a break; the
    requests of the first ``load_warmup`` seconds go to the second Results (not measured),
    and ``at_window_start`` runs (in a thread) when the measured window opens: its value is
    returned, with the measured window's length."""
    results = Results()
    warm = Results()
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=30)
    ) as session:
        senders: list[Sender] = [
            LeanSender(port, token)
            if lean
            else AiohttpSender(session, f"http://127.0.0.1:{port}", token)
            for _ in range(clients)
        ]
        counted_from = time.monotonic() + load_warmup
        until = counted_from + duration

        async def open_window() -> Before:
            await asyncio.sleep(max(0.0, counted_from - time.monotonic()))
            return await asyncio.to_thread(at_window_start)

        opener = asyncio.create_task(open_window())
        await asyncio.gather(
            *(
                client(
                    sender,
                    plugins,
                    interval=clients / rate,
                    until=until,
                    results=results,
                    rng=random.Random(i),
                    counted_from=counted_from,
                    warm=warm,
                )
                for i, sender in enumerate(senders)
            )
        )
        before = await opener
        elapsed = time.monotonic() - counted_from
        for sender in senders:
            await sender.close()
    return results, warm, elapsed, before


def bench(
    database_url: str,
    *,
    processes: int,
    plugins: int,
    clients: int,
    rate: float,
    warmup: float,
    duration: float,
    pool_size: int = 8,
    settings: dict[str, str] | None = None,
    monitor: bool = False,
    gc_in_client: bool = False,
    client_kind: str = "lean",
    load_warmup: float = 5.0,
) -> float:
    settings = settings or {}
    tenant = f"bench-{uuid.uuid4().hex[:6]}"
    # The server's CPU is counted only when it runs on this host (the embedded default).
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
        assert row is not None
        try:
            postmaster: int | None = postmaster_of(int(row[0]))
        except FileNotFoundError:
            postmaster = None
    procs = start_processes(processes, plugins, tenant)
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="pluginmon-bench-api-") as data_dir:
        env = daemon_env(
            database_url,
            data_dir,
            port,
            PLUGINMON_DATABASE_POOL_MAX_SIZE=str(pool_size),
            **{f"PLUGINMON_{name.upper()}": value for name, value in settings.items()},
        )
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
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(
                            f"daemon not ready:\n{log.read_text()[-3000:]}"
                        ) from None
                    time.sleep(0.5)
            token = cli(
                env, "token", "create", "--tenant", tenant, "--role", "writer", "--name", tenant
            ).splitlines()[-1]
            names = [f"plugin-{i:04d}" for i in range(plugins)]
            wait_for_plugins(port, token, set(names), timeout_seconds=300)
            # First half of the warm-up: CPU of sampling alone; second half: the loop probe
            # (its own requests would count as sampling's CPU).
            idle_before, idle_wall = cpu_seconds(daemon.pid), time.monotonic()
            idle_server = server_cpu_seconds(postmaster) if postmaster else float("nan")
            time.sleep(warmup / 2)
            idle_wall = time.monotonic() - idle_wall
            # Sampling alone (no API load): what the daemon and the server spend anyway.
            idle_cpu = (cpu_seconds(daemon.pid) - idle_before) / idle_wall
            idle_server = (
                (server_cpu_seconds(postmaster) - idle_server) / idle_wall
                if postmaster
                else float("nan")
            )
            probe = probe_loop(port, seconds=warmup / 2)

            def take_before() -> Before:
                # When the measured window opens, after the load's own warm-up.
                return Before(
                    counters=daemon_counters(port),
                    wall=time.monotonic(),
                    daemon_cpu=cpu_seconds(daemon.pid),
                    own_cpu=time.process_time(),
                    server_cpu=server_cpu_seconds(postmaster) if postmaster else float("nan"),
                )

            watcher = (
                Monitor(
                    Path(data_dir) / "monitor.jsonl",
                    {"daemon": daemon.pid, "client": os.getpid()},
                    postmaster,
                    database_url,
                )
                if monitor
                else None
            )
            pauses = GcPauses()
            with collector_paused(enabled=not gc_in_client), pauses:
                results, warm, elapsed, before = asyncio.run(
                    load(
                        port,
                        token,
                        names,
                        lean=client_kind == "lean",
                        clients=clients,
                        rate=rate,
                        duration=duration,
                        load_warmup=load_warmup,
                        at_window_start=take_before,
                    )
                )
            ticks = watcher.stop() if watcher is not None else []
            counters_after = daemon_counters(port)
            collections = {
                generation: count - before.counters.collections.get(generation, 0.0)
                for generation, count in counters_after.collections.items()
            }
            wall = time.monotonic() - before.wall
            daemon_cpu_total = cpu_seconds(daemon.pid) - before.daemon_cpu
            server_cpu_total = (
                server_cpu_seconds(postmaster) - before.server_cpu if postmaster else float("nan")
            )
            daemon_cpu = daemon_cpu_total / wall
            client_cpu = (time.process_time() - before.own_cpu) / wall
        except Exception:
            print(f"--- daemon log ---\n{log.read_text(errors='replace')[-4000:]}", file=sys.stderr)
            raise
        finally:
            daemon.send_signal(signal.SIGTERM)
            code = daemon.wait(timeout=60)
            for proc in procs:
                proc.kill()
            for proc in procs:
                proc.wait()
        skipped = [
            line
            for line in log.read_text(errors="replace").splitlines()
            if "job sample" in line and "skipped" in line
        ]
    lat = results.latencies
    cycles = counters_after.cycles - before.counters.cycles
    mean_cycle = (
        (counters_after.sampling_seconds - before.counters.sampling_seconds) / cycles
        if cycles
        else float("nan")
    )
    p99 = percentile(lat, 0.99) * 1000
    print(
        f"api: {clients} clients, target {rate:.0f} req/s, {elapsed:.1f} s: {len(lat)} requests "
        f"= {len(lat) / elapsed:.0f} req/s; latency p50 {statistics.median(lat) * 1000:.1f} ms, "
        f"p99 {p99:.1f} ms, max {max(lat) * 1000:.1f} ms; errors {results.errors or 'none'}"
    )
    if warm.latencies:
        print(
            f"the load's first {load_warmup:.0f} s (its warm-up, not counted above): "
            f"{len(warm.latencies)} requests, p50 {statistics.median(warm.latencies) * 1000:.1f} "
            f"ms, p99 {percentile(warm.latencies, 0.99) * 1000:.1f} ms, max "
            f"{max(warm.latencies) * 1000:.1f} ms; errors {warm.errors or 'none'}"
        )
    for key, example in sorted(results.examples.items()):
        print(f"first {key}: {example[:400]}")
    print(f"slowest 1% (over {p99:.1f} ms): {slow_report(results.timeline, p99 / 1000)}")
    first = min(start for start, _ in results.timeline)
    print(f"load generator's garbage collections meanwhile: {pauses.summary(first)}")
    print(
        "daemon's garbage collections meanwhile, by generation: "
        + (", ".join(f"{g}: {n:.0f}" for g, n in sorted(collections.items())) or "unknown")
    )
    if ticks:
        busiest = [second for _, second in busiest_slow_seconds(results.timeline, p99 / 1000)]
        print("what the host did (--monitor, every 50 ms):")
        for line in report(ticks, busiest, first):
            print(line)
        print(steal_split(ticks, slow_per_second(results.timeline, p99 / 1000)))
    for kind, values in sorted(results.by_kind.items()):
        print(
            f"  {kind:9s} {len(values):6d} requests: p50 {statistics.median(values) * 1000:.1f} ms, "
            f"p99 {percentile(values, 0.99) * 1000:.1f} ms"
        )
    print(
        f"sampling meanwhile: {processes} processes in {plugins} plugins at 1 s: {cycles:.0f} "
        f"cycles in {wall:.1f} s (expected {int(wall)}), mean cycle {mean_cycle * 1000:.0f} ms; "
        f"'sample' runs skipped: {len(skipped)}; daemon exit code {code}"
    )
    print(
        f"CPU: daemon {daemon_cpu * 100:.0f}% of one core, load generator {client_cpu * 100:.0f}%, "
        f"host load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    # Per request, including the sampling's share (the same 1,000 processes in every run):
    # CPU-seconds change less with the host's load than latencies do.
    print(
        f"CPU per request: daemon {daemon_cpu_total / len(lat) * 1000:.2f} ms, "
        f"PostgreSQL {server_cpu_total / len(lat) * 1000:.2f} ms "
        f"(daemon {daemon_cpu_total:.1f} s, PostgreSQL {server_cpu_total:.1f} s in {wall:.1f} s); "
        f"sampling alone beforehand: daemon {idle_cpu * 100:.0f}%, PostgreSQL "
        f"{idle_server * 100:.0f}% of one core"
    )
    print(f"event loop while sampling alone: {probe_report(probe)}")
    extra_daemon = daemon_cpu_total - idle_cpu * wall
    extra_server = server_cpu_total - idle_server * wall
    print(
        f"CPU per request above sampling alone: daemon {extra_daemon / len(lat) * 1000:.2f} ms, "
        f"PostgreSQL {extra_server / len(lat) * 1000:.2f} ms"
    )
    return p99


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", help="admin URL of a server to create a database on")
    parser.add_argument("--processes", type=int, default=1000)
    parser.add_argument("--plugins", type=int, default=100)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--rate", type=float, default=500.0, help="requests per second, in all")
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument(
        "--load-warmup",
        type=float,
        default=5.0,
        help="seconds of the same load before the measured window, not counted (the clients' "
        "connections, the pool's prepared statements); 0 measures from the first request",
    )
    parser.add_argument("--pool-size", type=int, default=8, help="the daemon's pool")
    parser.add_argument(
        "--daemon-setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a PLUGINMON_NAME=VALUE for the daemon (repeatable), e.g. maintenance_interval_seconds=3600",
    )
    parser.add_argument(
        "--monitor",
        action="store_true",
        help="record the host's, daemon's and server's CPU and the sessions' waits every 50 ms "
        "and describe the seconds holding the most slow requests (bench/stall_monitor.py)",
    )
    parser.add_argument(
        "--client",
        choices=("lean", "aiohttp"),
        default="lean",
        help="the load generator's HTTP client: one keep-alive connection per client read by "
        "hand (default, the least CPU taken from the daemon's cores) or aiohttp's",
    )
    parser.add_argument(
        "--gc-in-client",
        action="store_true",
        help="leave the load generator's garbage collector on while it measures (its pauses "
        "then count as latency; off by default)",
    )
    args = parser.parse_args()
    with scratch_database(
        args.database_url or None,
        server_dir_prefix="pluginmon-bench-pg-",
        database_prefix="pluginmon_bench_api",
        migrated=True,
    ) as url:
        p99 = bench(
            url,
            processes=args.processes,
            plugins=args.plugins,
            clients=args.clients,
            rate=args.rate,
            warmup=args.warmup,
            duration=args.duration,
            pool_size=args.pool_size,
            settings=dict(setting.split("=", 1) for setting in args.daemon_setting),
            monitor=args.monitor,
            gc_in_client=args.gc_in_client,
            client_kind=args.client,
            load_warmup=args.load_warmup,
        )
    print(f"api_p99_ms={p99:.1f}")


if __name__ == "__main__":
    # SIGTERM (`timeout`, `kill`) unwinds like Ctrl-C, so the finally blocks stop the daemon
    # (and with it the embedded server) and the sleepers instead of leaving them running.
    signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(128 + signal.SIGTERM))
    main()
