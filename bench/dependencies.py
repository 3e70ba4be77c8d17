"""Dependency recomputation benchmark: 10,000 plugins with 50,000 dependency edges.

One tenant, PLUGINS plugins each deployed in production (and every third one in staging too)
with a semantic version, and EDGES edges: every plugin from the sixth on depends on five
earlier ones (a DAG), with ranges in every npm form (caret, tilde, x-range, hyphen, ``||``,
comparators), a fifth of them dev edges, some out of range, a few conflicting pairs and a few
two-plugin cycles. Measured with the real database (asyncpg):

* ``registry.dependencies.refresh`` over every tenant, as the maintenance job runs it (with
  the health gauge): the first run (every result written), then REPEAT steady runs (nothing
  changed, nothing rewritten), and a run after one version change (what an API write costs:
  the API recomputes the writer's tenant in the request's transaction);
* the pure evaluation (registry.dependency_graph.evaluate) alone, on the loaded rows;
* **baseline, same run**: the floor of any recompute, reading the edges and the deployments
  (the two SELECTs refresh() starts with), median of REPEAT.

Run: .venv/bin/python bench/dependencies.py [--plugins 10000] [--edges 50000] [--repeat 5]
     [--database-url URL]   (default: a throwaway embedded PostgreSQL)
Last line: dependency_recompute_10k_ms=<median steady full recompute, ms>.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncpg

from bench.scratch import scratch_database
from pluginmon.registry import dependencies
from pluginmon.registry.dependency_graph import Deployment, Edge, evaluate

NOW = datetime(2026, 12, 1, tzinfo=UTC)
# This process's CPU time of each timed refresh (the wall time includes a loaded host's queue).
CPU_MS: list[float] = []


def version_of(i: int) -> tuple[int, int, int]:
    return (1 + i % 3, i % 10, i % 7)


def range_for(rng: random.Random, target: int) -> str:
    major, minor, patch = version_of(target)
    roll = rng.random()
    if roll < 0.45:
        return f"^{major}.{minor}.0"
    if roll < 0.60:
        return f"~{major}.{minor}"
    if roll < 0.70:
        return f"{major}.x"
    if roll < 0.78:
        return f"{major}.0.0 - {major}.9.9"
    if roll < 0.85:
        return f"^{major - 1 if major > 1 else 9}.0.0 || >={major}.{minor}.{patch}"
    if roll < 0.92:
        return f">={major}.{minor}.{patch} <{major + 1}"
    return f"~{major}.{minor + 1}.0"  # out of range


async def populate(url: str, *, plugins: int, edges: int, seed: int) -> None:
    rng = random.Random(seed)
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("INSERT INTO tenants (id) VALUES ('bench')")
        await conn.copy_records_to_table(
            "plugins",
            records=[
                ("bench", f"p{i:05d}", ".".join(map(str, version_of(i)))) for i in range(plugins)
            ],
            columns=["tenant_id", "name", "version"],
            timeout=300,
        )
        ids = {r["name"]: r["id"] for r in await conn.fetch("SELECT id, name FROM plugins")}
        envs = []
        for i in range(plugins):
            envs.append(
                ("bench", ids[f"p{i:05d}"], "production", ".".join(map(str, version_of(i))))
            )
            if i % 3 == 0:
                envs.append(
                    ("bench", ids[f"p{i:05d}"], "staging", ".".join(map(str, version_of(i + 1))))
                )
        await conn.copy_records_to_table(
            "plugin_environments",
            records=envs,
            columns=["tenant_id", "plugin_id", "environment", "version"],
            timeout=300,
        )
        rows = []
        pairs: list[tuple[int, int]] = []
        per_plugin = max(1, edges // max(1, plugins - 5))
        for i in range(5, plugins):
            for j in rng.sample(range(i), min(per_plugin, i)):
                pairs.append((i, j))
        cycles = max(0, edges - len(pairs))
        for i, j in rng.sample(pairs, min(cycles, len(pairs))):
            pairs.append((j, i))  # closes a two-plugin cycle
        for i, j in pairs[:edges]:
            kind = "dev" if rng.random() < 0.2 else "runtime"
            rows.append(("bench", ids[f"p{i:05d}"], ids[f"p{j:05d}"], range_for(rng, j), kind))
        await conn.copy_records_to_table(
            "plugin_dependencies",
            records=rows,
            columns=["tenant_id", "plugin_id", "depends_on_plugin_id", "version_range", "kind"],
            timeout=300,
        )
        # a few conflicts: two dependents of one plugin asking disjoint majors
        for k in range(20):
            target = ids[f"p{k:05d}"]
            major = version_of(k)[0]
            await conn.execute(
                "UPDATE plugin_dependencies SET version_range = $2 WHERE id = ("
                "SELECT id FROM plugin_dependencies WHERE depends_on_plugin_id = $1 "
                "AND kind = 'runtime' ORDER BY id LIMIT 1)",
                target,
                f"^{major + 5}.0.0",
            )
    finally:
        await conn.close()


async def timed_refresh(
    conn: asyncpg.Connection, now: datetime
) -> tuple[float, dependencies.Refresh]:
    start, cpu = time.perf_counter(), time.process_time()
    async with conn.transaction():
        result = await dependencies.refresh(conn, now=now, write_gauge=True)
    CPU_MS.append((time.process_time() - cpu) * 1000.0)
    return (time.perf_counter() - start) * 1000.0, result


async def measure(url: str, repeat: int) -> float:
    conn = await asyncpg.connect(url)
    try:
        counts = await conn.fetchrow(
            "SELECT (SELECT count(*) FROM plugins) AS plugins, "
            "(SELECT count(*) FROM plugin_dependencies) AS edges, "
            "(SELECT count(*) FROM plugin_environments) AS environments"
        )
        assert counts is not None
        print(
            f"graph: {counts['plugins']} plugins, {counts['edges']} edges, "
            f"{counts['environments']} plugin environments"
        )
        first_ms, first = await timed_refresh(conn, NOW)
        print(
            f"first recompute (every result written): {first_ms:.1f} ms; "
            f"{first.states_written} results, {first.edges_changed} edge summaries"
        )
        problems = sum(1 for v in first.unsatisfied.values() if v)
        print(f"  plugin environments with unsatisfied runtime dependencies: {problems}")
        steady = []
        CPU_MS.clear()
        for k in range(repeat):
            ms, result = await timed_refresh(conn, NOW + timedelta(minutes=k + 1))
            assert result.states_written == 0, result
            steady.append(ms)
        steady_cpu = statistics.median(CPU_MS)
        baseline = []
        for _ in range(repeat):
            start = time.perf_counter()
            async with conn.transaction():
                edge_rows = await conn.fetch(dependencies._EDGES_SQL, None)
                deployment_rows = await conn.fetch(dependencies._DEPLOYMENTS_SQL, None)
            baseline.append((time.perf_counter() - start) * 1000.0)
        edge_list = [
            Edge(r["id"], r["dependent"], r["dependency"], r["version_range"], r["kind"])
            for r in edge_rows
        ]
        deployment_list = [
            Deployment(r["name"], r["environment"], r["version"], r["status"], r["enabled"])
            for r in deployment_rows
        ]
        pure, pure_cpu = [], []
        for _ in range(repeat):
            start, cpu = time.perf_counter(), time.process_time()
            evaluate(edge_list, deployment_list)
            pure.append((time.perf_counter() - start) * 1000.0)
            pure_cpu.append((time.process_time() - cpu) * 1000.0)
        await conn.execute(
            "UPDATE plugin_environments SET version = '9.9.9' WHERE environment = 'production' "
            "AND plugin_id = (SELECT id FROM plugins WHERE name = 'p00007')"
        )
        change_ms, change = await timed_refresh(conn, NOW + timedelta(hours=1))
    finally:
        await conn.close()
    median = statistics.median(steady)
    floor = statistics.median(baseline)
    print(
        f"steady recompute (nothing changed), median of {repeat}: {median:.1f} ms "
        f"(min {min(steady):.1f}, max {max(steady):.1f}); this process's CPU {steady_cpu:.1f} ms"
    )
    print(
        f"  of which the pure evaluation, median of {repeat}: {statistics.median(pure):.1f} ms "
        f"wall, {statistics.median(pure_cpu):.1f} ms CPU"
    )
    print(
        f"after one version change: {change_ms:.1f} ms, {change.states_written} results rewritten"
    )
    print(
        f"baseline, same run: reading edges and deployments alone, median of {repeat}: "
        f"{floor:.1f} ms; recompute / baseline = {median / floor:.2f}"
    )
    return median


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plugins", type=int, default=10_000)
    parser.add_argument("--edges", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--seed", type=int, default=10)
    parser.add_argument("--database-url")
    args = parser.parse_args(argv)
    with scratch_database(args.database_url, server_dir_prefix="pluginmon-bench-deps-") as url:
        asyncio.run(populate(url, plugins=args.plugins, edges=args.edges, seed=args.seed))
        median = asyncio.run(measure(url, args.repeat))
    print(f"dependency_recompute_10k_ms={median:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
