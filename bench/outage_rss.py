"""Memory through a long database outage: generated snapshots through the real sink, writer, spool and alert engine.

An embedded PostgreSQL is started in a temporary directory and migrated; PLUGINS plugins are
sampled once with it up (their ids resolved by the sink, as in the daemon), the alert engine
is started on it, and then the server is stopped. For SECONDS the loop does what the daemon
does every INTERVAL: a snapshot of every plugin goes to ``SampleSink.put`` (rows to the
``BatchWriter``, which spools them to disk while the database is away) and to
``AlertEngine.process`` (scores, rules, state journaled); 1% of the plugins go down for 40 s
out of every 100 s, so PluginDown fires and resolves during the outage. The writer and the
spool are configured as the daemon's defaults (5,000-row batches, a 2 s flush, a 100,000-row
queue; the spool cap raised to SPOOL_MAX_GIB so the run measures memory, not the cap).

The health score's leak forecast keeps up to 60 RSS points per plugin over
``leak_window_seconds`` (30 min by default): that history grows for the first window of any
run, outage or not (about 2 MiB a minute at 10,000 plugins, up to ~65 MiB). The bench sets
the window to LEAK_WINDOW_SECONDS (240 s by default) so it is full before the second half
of the outage, which is what the headline measures; ``--leak-window-seconds 1800`` runs the
default.

The process's RSS (VmRSS) is read every 5 s. Rows must go to disk, not memory: at the end
the spool must hold every row put during the outage (none dropped), and RSS must plateau.
The writer keeps up to its high-water mark (half of its 100,000-row queue) in memory when
the spool appends fall behind the intake (a saturated event loop); the peak is reported.
Reported: RSS when the outage starts, its peak, and its growth over the second half of the
outage (the "plateau"); the headline is that growth.

Run: .venv/bin/python bench/outage_rss.py [--plugins 10000] [--seconds 600] [--interval 1]
     [--leak-window-seconds 240]
Last line: outage_rss_growth_mib=<RSS growth over the second half of the outage, MiB>.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pluginmon.alerts.engine import AlertEngine
from pluginmon.alerts.health import HealthConfig, HealthSettings
from pluginmon.alerts.rules import builtin_rules
from pluginmon.collectors.models import PluginKey, PluginSample, Snapshot
from pluginmon.storage.embedded import EmbeddedPostgres
from pluginmon.storage.ingest import SampleSink, SampleSpool, UnresolvedSpool
from pluginmon.storage.migrate import migrate
from pluginmon.storage.pool import close_pool, open_pool
from pluginmon.storage.reachability import DatabaseWatch
from pluginmon.storage.writer import PLUGIN_SAMPLES_COLUMNS, PLUGIN_SAMPLES_TABLE, BatchWriter

MIB = 1 << 20
RSS_EVERY_SECONDS = 5.0


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def snapshot(keys: list[PluginKey], tick: int, at: datetime) -> Snapshot:
    samples = []
    second = int(at.timestamp())
    for index, key in enumerate(keys):
        # 1% of the plugins are down 40 s out of every 100 (PluginDown fires after 30 s),
        # each at its own phase.
        up = not (index % 100 == 0 and (second + index // 100 * 7) % 100 < 40)
        seed = tick * 7919 + index * 104_729
        samples.append(
            PluginSample(
                key=key,
                timestamp=at,
                up=up,
                process_count=1 + index % 3 if up else 0,
                cpu_percent=(seed % 600) / 10.0 if up else 0.0,
                rss_bytes=50 * MIB + seed % (200 * MIB) if up else 0,
                vms_bytes=400 * MIB + seed % (100 * MIB) if up else 0,
                threads=1 + seed % 32 if up else 0,
                # restarts since the previous sample: 2% of the plugins restart every 100 s
                restarts=1 if index % 50 == 0 and (second + index) % 100 == 0 else 0,
            )
        )
    return Snapshot(timestamp=at, host="bench-host", samples=tuple(samples), duration_seconds=0.01)


async def run(
    *,
    plugins: int,
    seconds: float,
    interval: float,
    spool_max_gib: float,
    leak_window_seconds: float,
) -> float:
    work = Path(tempfile.mkdtemp(prefix="pluginmon-bench-outage-"))
    server = EmbeddedPostgres(work / "server")
    url = await asyncio.to_thread(server.start)
    await asyncio.to_thread(migrate, url)
    pool = await open_pool(url, min_size=0, max_size=4)
    spool = SampleSpool(work / "spool", max_bytes=int(spool_max_gib * (1 << 30)))
    unresolved = UnresolvedSpool(work / "spool-unresolved", max_bytes=1 << 30)
    writer = BatchWriter(
        pool,
        table=PLUGIN_SAMPLES_TABLE,
        columns=PLUGIN_SAMPLES_COLUMNS,
        max_rows=5000,
        max_delay_seconds=2.0,
        max_queue_rows=100_000,
        spool=spool,
        close_timeout_seconds=30.0,
    )
    engine = AlertEngine(
        pool,
        builtin_rules(),
        health_config=HealthConfig(HealthSettings(leak_window_seconds=leak_window_seconds)),
        spool_dir=work / "alert-spool",
        instance="bench",
    )
    try:
        async with writer:
            database = DatabaseWatch(pool, writer=writer)
            database.mark_schema_ready()
            sink = SampleSink(
                pool=pool,
                writer=writer,
                unresolved=unresolved,
                database=database,
                replay_seconds=max(1.0, interval / 2),
            )
            keys = [PluginKey("bench", f"plugin-{i:05d}", "production") for i in range(plugins)]
            started = time.monotonic()
            # As the daemon's first ticks: ids resolved (a bounded number per put), samples
            # of plugins without one yet replayed from the unresolved spool, rows written.
            while len(sink.plugin_ids) < plugins or unresolved.rows:
                if time.monotonic() - started > 600:
                    break
                await sink.put(snapshot(keys, 0, datetime.now(UTC)))
            await writer.flush()
            resolved = len(sink.plugin_ids)
            await engine.start()
            print(
                f"setup: {plugins} plugins, {resolved} ids resolved and their rows written in "
                f"{time.monotonic() - started:.1f} s"
            )
            if resolved != plugins:
                raise RuntimeError(f"only {resolved} of {plugins} plugin ids resolved")

            await asyncio.to_thread(server.stop, mode="fast")
            print(
                f"database stopped; {seconds:g} s of outage, a snapshot every {interval:g} s, "
                f"leak_window_seconds {leak_window_seconds:g}"
            )
            written_before = writer.stats().rows_written
            outage_start = time.monotonic()
            rss: list[tuple[float, float]] = [(0.0, rss_mib())]
            next_rss = RSS_EVERY_SECONDS
            tick = 0
            rows_put = 0
            evaluated = 0
            queued_peak = 0
            while (elapsed := time.monotonic() - outage_start) < seconds:
                tick += 1
                snap = snapshot(keys, tick, datetime.now(UTC))
                await sink.put(snap)
                rows_put += len(snap.samples)
                report = await engine.process(snap, sink.plugin_ids)
                evaluated += report.plugins_scored
                queued_peak = max(queued_peak, writer.stats().rows_queued)
                if elapsed >= next_rss:
                    rss.append((elapsed, rss_mib()))
                    print(
                        f"  t={elapsed:6.1f} s  rss={rss[-1][1]:7.1f} MiB  ticks={tick}  "
                        f"spool={spool.rows} rows ({spool.bytes / MIB:.0f} MiB)  "
                        f"queued={writer.stats().rows_queued}  "
                        f"alert journal={report.journal_batches} batches"
                    )
                    next_rss += RSS_EVERY_SECONDS
                # The daemon's fixed-rate tick; a late tick runs at once (coalesced).
                await asyncio.sleep(max(0.0, tick * interval - (time.monotonic() - outage_start)))
            rss.append((time.monotonic() - outage_start, rss_mib()))
            await writer.flush()  # the database is away: returns once all is spooled
            stats = writer.stats()
        end = rss[-1][0]
        half = min(rss, key=lambda point: abs(point[0] - end / 2))
        growth = rss[-1][1] - half[1]
        print(
            f"outage: {tick} ticks, {rows_put} rows put, {evaluated} plugin evaluations; "
            f"rows written {stats.rows_written - written_before}, spooled {stats.rows_spooled}, "
            f"in the spool {spool.rows}, dropped {stats.rows_dropped}; at most {queued_peak} "
            f"rows in the writer's memory queue at once"
        )
        print(
            f"rss: {rss[0][1]:.1f} MiB at the outage start, {half[1]:.1f} MiB at "
            f"t={half[0]:.0f} s, {rss[-1][1]:.1f} MiB at the end (t={end:.0f} s), peak "
            f"{max(v for _, v in rss):.1f} MiB"
        )
        print(f"spool_rows={spool.rows} rows_put={rows_put} rows_dropped={stats.rows_dropped}")
        print(f"rss_growth_second_half_mib={growth:.1f} over {end - half[0]:.0f} s")
        return growth
    finally:
        await engine.aclose()
        spool.close()
        unresolved.close()
        await close_pool(pool, timeout_seconds=5.0)
        if server.is_running():
            await asyncio.to_thread(server.stop, mode="immediate")
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plugins", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--spool-max-gib", type=float, default=4.0)
    parser.add_argument("--leak-window-seconds", type=float, default=240.0)
    args = parser.parse_args()
    growth = asyncio.run(
        run(
            plugins=args.plugins,
            seconds=args.seconds,
            interval=args.interval,
            spool_max_gib=args.spool_max_gib,
            leak_window_seconds=args.leak_window_seconds,
        )
    )
    print(f"outage_rss_growth_mib={growth:.1f}")


if __name__ == "__main__":
    main()
