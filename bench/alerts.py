"""Alert evaluation cost at 10,000 plugins, and threshold-crossing-to-webhook latency.

  evaluate   RuleEvaluator.evaluate over PLUGINS plugins x the 5 built-in rules, CYCLES
             cycles; 5% of the plugins are over the CPU threshold at any time and 3% of the
             fleet changes side every cycle, so pending, firing and resolved transitions
             happen every cycle. Samples and health scores
             are built before timing (they come from the sampler and the scorer).
  score      score_health + history for the same PLUGINS plugins (per cycle, for scale).
  process    AlertEngine.process at PLUGINS plugins on the real database: scoring,
             evaluation, plugins.health_score UPDATE and PLUGINS health_score rows COPYed.
  latency    LATENCY_PLUGINS synthetic plugins on the real database, sampled every 1 s by a
             loop like the daemon's; each crosses its threshold at a random moment; a real
             aiohttp receiver records when the firing notification arrives. The deliverer
             polls every 1 s and is woken when the engine queues something.
             Latency = receive time - crossing time.

Run: .venv/bin/python bench/alerts.py [--database-url URL] [--plugins 10000] [--cycles 200]
Without --database-url an embedded PostgreSQL is started in a temporary directory.
Times are reported both as wall time and as the evaluating thread's CPU time (the host is
shared; wall time includes waiting for a core). Last line: evaluate_10k_plugins_ms=<p99 of
the CPU time per cycle, ms>.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
import uuid
from contextlib import suppress
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.scratch import scratch_database
from pluginmon.alerts.engine import AlertEngine
from pluginmon.alerts.health import HealthScore, HealthSettings, PluginHistory, score_health
from pluginmon.alerts.outbox import OutboxDeliverer
from pluginmon.alerts.rules import Rule, RuleEvaluator, WebhookConfig, builtin_rules
from pluginmon.collectors.models import PluginKey, PluginSample, Snapshot

MIB = 1 << 20


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def make_sample(key: PluginKey, at: datetime, rng: random.Random, hot: bool) -> PluginSample:
    return PluginSample(
        key=key,
        timestamp=at,
        up=rng.random() > 0.002,
        process_count=1,
        cpu_percent=95.0 if hot else rng.uniform(0, 60),
        rss_bytes=int(rng.uniform(50, 500) * MIB),
        vms_bytes=1 << 30,
        threads=4,
    )


def bench_evaluate(plugins: int, cycles: int) -> tuple[list[float], list[float], int]:
    """Inputs for each cycle are built (untimed) just before it, as the sampler would hand
    them over: only one cycle's samples are alive at a time, as in the daemon."""
    rng = random.Random(7)
    keys = [PluginKey(f"t{i % 50}", f"plugin-{i}") for i in range(plugins)]
    start = datetime(2026, 1, 1, tzinfo=UTC)
    hot = set(rng.sample(range(plugins), plugins // 20))
    settings = HealthSettings()
    evaluator = RuleEvaluator(builtin_rules())
    timings: list[float] = []
    cpu_timings: list[float] = []
    transitions = 0
    for c in range(cycles):
        at = start + timedelta(seconds=10 * c)
        # 5% of the plugins are over the CPU threshold; each cycle 1.5% of the fleet cools
        # down and as many others heat up, so ~300 plugins change side every cycle
        churn = plugins * 3 // 200
        cooled = set(rng.sample(sorted(hot), churn))
        heated = set(rng.sample([i for i in range(plugins) if i not in hot], churn))
        hot = (hot - cooled) | heated
        samples = [make_sample(k, at, rng, i in hot) for i, k in enumerate(keys)]
        # every plugin gets a score; a few hundred distinct ones keep the setup short
        distinct = [
            score_health(s, settings=settings, now=at) for s in samples[:: max(1, plugins // 500)]
        ]
        aligned: list[HealthScore | None] = [distinct[i % len(distinct)] for i in range(plugins)]
        now = at.timestamp()
        c0 = time.thread_time()
        t0 = time.perf_counter()
        changes = evaluator.evaluate(samples, now, aligned)
        timings.append((time.perf_counter() - t0) * 1000)
        cpu_timings.append((time.thread_time() - c0) * 1000)
        transitions += len(changes)
    return timings, cpu_timings, transitions


def bench_score(plugins: int, cycles: int) -> list[float]:
    rng = random.Random(11)
    keys = [PluginKey(f"t{i % 50}", f"plugin-{i}") for i in range(plugins)]
    histories = {k: PluginHistory(window_seconds=1800) for k in keys}
    settings = HealthSettings(memory_limit_bytes=1 << 30)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    timings = []
    for c in range(cycles):
        at = start + timedelta(seconds=10 * c)
        samples = [make_sample(k, at, rng, False) for k in keys]
        t0 = time.perf_counter()
        for s in samples:
            h = histories[s.key]
            h.add(s, restart_window_seconds=settings.restart_window_seconds)
            score_health(
                s,
                settings=settings,
                now=at,
                restart_events=h.restart_events,
                leak_slope=h.leak_slope,
            )
        timings.append((time.perf_counter() - t0) * 1000)
    return timings


async def create_plugins(url: str, keys: list[PluginKey]) -> dict[PluginKey, int]:
    conn = await asyncpg.connect(url)
    try:
        tenants = sorted({k.tenant for k in keys})
        await conn.executemany(
            "INSERT INTO tenants (id) VALUES ($1) ON CONFLICT DO NOTHING", [(t,) for t in tenants]
        )
        rows = await conn.fetch(
            "INSERT INTO plugins (tenant_id, name) SELECT * FROM unnest($1::text[], $2::text[]) "
            "RETURNING id, tenant_id, name",
            [k.tenant for k in keys],
            [k.plugin for k in keys],
        )
    finally:
        await conn.close()
    by_name = {(r["tenant_id"], r["name"]): r["id"] for r in rows}
    return {k: by_name[(k.tenant, k.plugin)] for k in keys}


async def bench_process(url: str, plugins: int, cycles: int) -> list[float]:
    rng = random.Random(13)
    keys = [PluginKey(f"p{i % 50}", f"plugin-{i}") for i in range(plugins)]
    ids = await create_plugins(url, keys)
    now = datetime.now(UTC)
    timings = []
    async with asyncpg.create_pool(url, min_size=1, max_size=4) as pool:
        engine = AlertEngine(pool, builtin_rules())
        await engine.start()
        for c in range(cycles):
            at = now + timedelta(seconds=c)
            samples = tuple(make_sample(k, at, rng, rng.random() < 0.01) for k in keys)
            snap = Snapshot(timestamp=at, host="bench", samples=samples, duration_seconds=0.0)
            t0 = time.perf_counter()
            report = await engine.process(snap, ids)
            timings.append((time.perf_counter() - t0) * 1000)
            assert report.persisted, report.database_error
    return timings


async def bench_latency(url: str, plugins: int, window_seconds: float) -> list[float]:
    rng = random.Random(17)
    keys = [PluginKey("lat", f"plugin-{i}") for i in range(plugins)]
    ids = await create_plugins(url, keys)
    received: dict[str, float] = {}

    async def handle(request: web.Request) -> web.Response:
        body = await request.json()
        if body["status"] == "firing":
            for alert in body["alerts"]:
                received.setdefault(alert["labels"]["plugin"], time.time())
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    hook = WebhookConfig(name="bench", url=f"http://127.0.0.1:{port}/hook", secret=uuid.uuid4().hex)
    rule = Rule(name="CpuHigh", metric="cpu_percent", op=">", threshold=80)
    t_start = time.time() + 1.0
    crossing = {k.plugin: t_start + rng.uniform(0, window_seconds) for k in keys}
    try:
        async with asyncpg.create_pool(url, min_size=2, max_size=6) as pool:
            engine = AlertEngine(pool, [rule], webhooks=[hook])
            await engine.start()
            async with OutboxDeliverer(pool, [hook]) as deliverer:
                delivering = asyncio.create_task(deliverer.run(poll_interval_seconds=1.0))
                try:
                    next_tick = time.monotonic()
                    end = t_start + window_seconds + 3.0
                    while time.time() < end and len(received) < plugins:
                        now = time.time()
                        at = datetime.fromtimestamp(now, UTC)
                        samples = tuple(
                            PluginSample(
                                key=k,
                                timestamp=at,
                                up=True,
                                process_count=1,
                                cpu_percent=95.0 if now >= crossing[k.plugin] else 5.0,
                                rss_bytes=100 * MIB,
                                vms_bytes=200 * MIB,
                                threads=2,
                            )
                            for k in keys
                        )
                        report = await engine.process(Snapshot(at, "bench", samples, 0.0), ids)
                        if report.notifications_queued:
                            deliverer.wake()
                        next_tick += 1.0  # the 1 s sample interval
                        await asyncio.sleep(max(0.0, next_tick - time.monotonic()))
                    await asyncio.sleep(1.5)
                finally:
                    delivering.cancel()
                    with suppress(asyncio.CancelledError):
                        await delivering
    finally:
        await runner.cleanup()
    missing = [p for p in crossing if p not in received]
    if missing:
        print(f"latency: {len(missing)} plugin(s) never notified", file=sys.stderr)
    return [received[p] - crossing[p] for p in crossing if p in received]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--database-url")
    parser.add_argument("--plugins", type=int, default=10_000)
    parser.add_argument("--cycles", type=int, default=200)
    parser.add_argument("--process-cycles", type=int, default=10)
    parser.add_argument("--latency-plugins", type=int, default=200)
    parser.add_argument("--latency-window", type=float, default=20.0)
    args = parser.parse_args()

    timings, cpu_timings, transitions = bench_evaluate(args.plugins, args.cycles)
    print(
        f"evaluate: {args.plugins} plugins x {len(builtin_rules())} rules, {args.cycles} cycles, "
        f"{transitions} transitions: CPU time median {statistics.median(cpu_timings):.1f} ms, "
        f"p99 {percentile(cpu_timings, 0.99):.1f} ms; wall median {statistics.median(timings):.1f} ms, "
        f"p99 {percentile(timings, 0.99):.1f} ms, min {min(timings):.1f} ms per cycle"
    )
    score = bench_score(args.plugins, 10)
    print(
        f"score: {args.plugins} plugins (history + 6 components): median "
        f"{statistics.median(score):.1f} ms per cycle"
    )
    with scratch_database(args.database_url, server_dir_prefix="pluginmon-bench-alerts-") as url:
        process = asyncio.run(bench_process(url, args.plugins, args.process_cycles))
        print(
            f"process (real database): {args.plugins} plugins: median {statistics.median(process):.0f} ms, "
            f"max {max(process):.0f} ms per cycle ({args.process_cycles} cycles)"
        )
        latency = asyncio.run(bench_latency(url, args.latency_plugins, args.latency_window))
    print(
        f"latency crossing -> webhook received, 1 s sample interval, {len(latency)} crossings: "
        f"median {statistics.median(latency) * 1000:.0f} ms, p99 {percentile(latency, 0.99) * 1000:.0f} ms, "
        f"max {max(latency) * 1000:.0f} ms"
    )
    print(f"latency_p99_ms={percentile(latency, 0.99) * 1000:.0f}")
    # headline: CPU time per cycle, p99 (wall time on a shared host includes preemption)
    print(f"evaluate_10k_plugins_ms={percentile(cpu_timings, 0.99):.1f}")


if __name__ == "__main__":
    main()
