"""Audit retention against audited writes: how long a write waits while retention runs.

Tenant ``expiring`` holds ENTRIES audit entries past the retention horizon (two years and a
day old); tenant ``other`` a few recent ones. One writer per tenant appends audited entries one
at a time, each its own transaction (as an API write, or an agent's first sighting of a
plugin, does), while retention removes the expired entries. Measured on the same rows, seeded
afresh before each, in the same invocation:

  baseline   sql/030's pluginmon_audit_expire(horizon), one transaction that locks every lane
             of every tenant first and holds them until it is done
  current    the maintenance job's audit step (storage.backend.delete_expired): sql/130's
             pluginmon_audit_expire_tenant, one tenant at a time, AUDIT_EXPIRE_BATCH entries a
             transaction, holding only the lanes it cuts

Printed for each: retention's wall time and entries removed, and for each writer the appends
that overlapped retention: how many, p50, p99 and the longest. The chain of both tenants is
verified after each run.

Run: .venv/bin/python bench/audit_retention.py [--entries 200000] [--database-url URL]
Last line: audit_retention_other_tenant_max_wait_ms=<current's longest append of tenant other>.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncpg
import psycopg

from bench.scratch import scratch_database
from bench.stats import percentile
from pluginmon.registry import audit
from pluginmon.registry.actor import Actor
from pluginmon.storage.backend import Retention, admin_connection, delete_expired

TENANTS = ("expiring", "other")


def seed(url: str, entries: int, now: datetime) -> None:
    """Fresh tenants: ``expiring`` with ``entries`` entries past the horizon, ``other`` with
    ten recent ones."""
    old = now - timedelta(days=731)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET session_replication_role = replica")  # the append-only trigger
        conn.execute("DELETE FROM audit_log")
        conn.execute("DELETE FROM audit_chain")
        conn.execute("RESET session_replication_role")
        for tenant in TENANTS:
            conn.execute(
                "INSERT INTO tenants (id, name) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                (tenant, tenant),
            )
        # 1,000 entries a statement: the chain trigger rewrites its lane's head row for each
        # entry, and within one transaction every version of that row stays to be walked, so
        # one statement of all the entries would take time quadratic in their number.
        for first in range(1, entries + 1, 1000):
            conn.execute(
                "INSERT INTO audit_log (tenant_id, actor, action, entity_type, entity_id,"
                " occurred_at)"
                " SELECT 'expiring', 'bench', 'plugin.update', 'plugin', 'p' || i,"
                "        %s::timestamptz + i * interval '1 ms'"
                "   FROM generate_series(%s::int, %s::int) AS i",
                (old, first, min(entries, first + 999)),
            )
        conn.execute(
            "INSERT INTO audit_log (tenant_id, actor, action, entity_type, occurred_at)"
            " SELECT 'other', 'bench', 'plugin.update', 'plugin', %s FROM generate_series(1, 10)",
            (now,),
        )
        conn.execute("VACUUM ANALYZE audit_log")


async def writer(
    url: str, tenant: str, stop: asyncio.Event, out: list[tuple[float, float]]
) -> None:
    """Appends one entry at a time until ``stop``; records (start, latency) of each."""
    conn = await asyncpg.connect(url)
    try:
        while not stop.is_set():
            began = time.monotonic()
            await audit.append(
                conn,
                tenant_id=tenant,
                actor=Actor(name="bench-writer"),
                action="plugin.update",
                entity_type="plugin",
                occurred_at=datetime.now(UTC),
            )
            out.append((began, time.monotonic() - began))
    finally:
        await conn.close()


@dataclass(frozen=True, slots=True)
class RetentionRun:
    seconds: float
    removed: int
    # Per tenant, the latencies of the appends in flight at any moment of the retention run.
    during: dict[str, list[float]]


async def run_once(url: str, kind: str, now: datetime) -> RetentionRun:
    stop = asyncio.Event()
    appends: dict[str, list[tuple[float, float]]] = {t: [] for t in TENANTS}
    writers = [asyncio.create_task(writer(url, t, stop, appends[t])) for t in TENANTS]
    await asyncio.sleep(1.0)  # the writers are appending
    horizon = now - Retention().audit
    async with admin_connection(url) as conn:
        began = time.monotonic()
        if kind == "baseline":
            async with conn.transaction():
                cur = await conn.execute("SELECT pluginmon_audit_expire(%s)", (horizon,))
                row = await cur.fetchone()
            removed = int(row[0]) if row is not None else 0
        else:
            removed = dict(await delete_expired(conn, Retention(), now))["audit_log"]
        ended = time.monotonic()
    await asyncio.sleep(0.5)
    stop.set()
    await asyncio.gather(*writers)
    result = RetentionRun(
        seconds=ended - began,
        removed=removed,
        during={
            tenant: [lat for start, lat in points if start <= ended and start + lat >= began]
            for tenant, points in appends.items()
        },
    )
    conn2 = await asyncpg.connect(url)
    try:
        verdicts = await audit.verify(conn2)
    finally:
        await conn2.close()
    broken = [v.tenant_id for v in verdicts if not v.intact]
    if broken:
        raise SystemExit(f"{kind}: chain not intact after retention: {broken}")
    return result


def describe(kind: str, result: RetentionRun) -> float:
    print(f"{kind}: retention {result.seconds:.2f} s, {result.removed:,} entries removed")
    worst_other = 0.0
    for tenant in TENANTS:
        during = sorted(result.during[tenant])
        if not during:
            print(f"  writer of {tenant}: no append overlapped retention")
            continue
        p99 = percentile(during, 0.99)
        print(
            f"  writer of {tenant}: {len(during)} appends during retention, p50"
            f" {1000 * statistics.median(during):.1f} ms, p99 {1000 * p99:.1f} ms,"
            f" longest {1000 * during[-1]:.1f} ms"
        )
        if tenant == "other":
            worst_other = 1000 * during[-1]
    return worst_other


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", help="admin URL of a server to create a database on")
    parser.add_argument("--entries", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=2, help="baseline/current pairs")
    args = parser.parse_args()
    with scratch_database(
        args.database_url or None,
        server_dir_prefix="pluginmon-bench-audit-pg-",
        database_prefix="pluginmon_bench_audit",
    ) as url:
        worst: list[float] = []
        for round_no in range(1, args.rounds + 1):
            for kind in ("baseline", "current"):
                now = datetime.now(UTC)
                seed(url, args.entries, now)
                print(f"round {round_no}, ", end="")
                value = describe(kind, asyncio.run(run_once(url, kind, now)))
                if kind == "current":
                    worst.append(value)
    print(f"audit_retention_other_tenant_max_wait_ms={max(worst):.1f}")


if __name__ == "__main__":
    main()
