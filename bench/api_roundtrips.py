"""Round trips per API request: the statements each request of bench/api.py's mix sends to
PostgreSQL, counted on the daemon's side of the wire.

The /api/v1 app runs in this process (on a loopback port, as in the tests) over the daemon's
own pool (storage.pool.open_pool) on a real PostgreSQL; every pooled connection carries an
asyncpg query logger, which sees each statement the connection sends: BEGIN, the token
lookup, the handler's queries, COMMIT and the pool's reset on release. Statements are
prepared once per connection and cached, so in the steady state measured here (each kind
warmed up first) one logged statement is one round trip. The kinds are bench/api.py's, with
its mix: 43% reads (three shapes), 14% plugin PATCHes, 43% operation steps (create, running,
succeeded).

The server's CPU per request of each kind comes from /proc: the whole local server (its
backends, exited ones included, and its WAL writer, checkpointer...; clock ticks of 10 ms,
hence a few hundred requests per round);
this process's CPU (the API app and the aiohttp client together, one request at a time) from
time.process_time(). Each kind runs in 5 rounds and the least CPU of a round counts: on a
shared host other processes only add to a round's CPU (cache misses, preemption), never take
from it, so the minimum is the figure that moves least with the host's load.

Run: .venv/bin/python bench/api_roundtrips.py [--database-url URL] [--repeat 200] [--verbose]
Last line: api_round_trips_per_request=<mix average>.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp
import asyncpg
from aiohttp import web

from bench.processes import postmaster_of, server_cpu_seconds
from bench.scratch import scratch_database
from pluginmon.daemon.api_routes import build_api_app
from pluginmon.registry import audit
from pluginmon.registry.actor import Actor
from pluginmon.registry.tokens import Role, create_token
from pluginmon.storage.pool import close_pool, open_pool

POOL_SIZE = 2
ROUNDS = 5
PLUGINS = 20
# Share of each kind in bench/api.py's mix (an operation roll is three requests).
MIX = {
    "GET /plugins?limit=100": 0.6 / 1.4 / 3,
    "GET /plugins/{name}": 0.6 / 1.4 / 3,
    "GET /operations?status=pending": 0.6 / 1.4 / 3,
    "PATCH /plugins/{name}": 0.2 / 1.4,
    "POST /plugins/{name}/operations": 0.2 / 1.4,
    "PATCH /operations/{id} running": 0.2 / 1.4,
    "PATCH /operations/{id} succeeded": 0.2 / 1.4,
}


def summary(
    rounds: list[tuple[int, float, float]], repeat: int, statements: list[str]
) -> tuple[float, float, float, list[str]]:
    """Per request: statements, least server CPU and least own CPU over the rounds. (A round
    whose connection asyncpg replaced, after its max_queries, counts fewer statements than it
    sent until the next round's logger: the most of the rounds is the count.)"""
    return (
        max(r[0] for r in rounds) / repeat,
        min(r[1] for r in rounds) / repeat,
        min(r[2] for r in rounds) / repeat,
        statements,
    )


async def log_statements(pool: asyncpg.Pool, counter: Counter) -> None:
    """``counter`` on every connection of the pool (asyncpg replaces a connection after
    50,000 queries; a logger already there is not added twice)."""
    held = [await pool.acquire() for _ in range(POOL_SIZE)]
    for conn in held:
        conn.add_query_logger(counter)
    for conn in held:
        await pool.release(conn)


class Counter:
    def __init__(self) -> None:
        self.statements: list[str] = []

    def __call__(self, record: Any) -> None:
        self.statements.append(" ".join(str(record.query).split())[:70])


async def measure(url: str, *, repeat: int) -> dict[str, tuple[float, float, float, list[str]]]:
    pool = await open_pool(url, min_size=POOL_SIZE, max_size=POOL_SIZE)
    counter = Counter()
    held = [await pool.acquire() for _ in range(POOL_SIZE)]
    postmaster = postmaster_of(int(await held[0].fetchval("SELECT pg_backend_pid()")))
    async with held[0].transaction():
        _, token = await create_token(
            held[0],
            name="bench",
            tenant_id="bench",
            role=Role.WRITER,
            actor=Actor(name="bench"),
            now=datetime.now(UTC),
        )
    for conn in held:
        await pool.release(conn)
    root = web.Application()
    root.add_subapp("/api/v1", build_api_app(pool, version="bench"))
    runner = web.AppRunner(root, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}/api/v1"
    headers = {"Authorization": "Bearer " + token}
    results: dict[str, tuple[float, float, float, list[str]]] = {}
    try:
        async with aiohttp.ClientSession(headers=headers) as session:

            async def send(method: str, path: str, body: Any = None, expected: int = 200) -> Any:
                async with session.request(method, base + path, json=body) as reply:
                    payload = await reply.json()
                    assert reply.status == expected, (method, path, reply.status, payload)
                    return payload

            for i in range(PLUGINS):
                await send("POST", "/plugins", {"name": f"plugin-{i:02d}"}, 201)

            async def new_operation(i: int) -> int:
                created = await send(
                    "POST",
                    f"/plugins/plugin-{i % PLUGINS:02d}/operations",
                    {"type": "configure", "environment": "bench"},
                    201,
                )
                return int(created["id"])

            kinds: dict[str, Callable[[int], Awaitable[Any]]] = {
                "GET /plugins?limit=100": lambda i: send("GET", "/plugins?limit=100"),
                "GET /plugins/{name}": lambda i: send("GET", f"/plugins/plugin-{i % PLUGINS:02d}"),
                "GET /operations?status=pending": lambda i: send(
                    "GET", "/operations?status=pending&limit=50"
                ),
                "PATCH /plugins/{name}": lambda i: send(
                    "PATCH",
                    f"/plugins/plugin-{i % PLUGINS:02d}",
                    {"description": f"tuned {i}", "version": "1.0.0"},
                ),
                "POST /plugins/{name}/operations": new_operation,
            }
            # Each kind in ROUNDS rounds of ``repeat`` requests; CPU is the least of the rounds
            # (on a shared host other processes only ever add to it), statements the mean.
            for name, run in kinds.items():
                await run(0)  # warm: statements prepared, caches filled
                rounds = []
                for _ in range(ROUNDS):
                    await log_statements(pool, counter)
                    counter.statements.clear()
                    cpu, own = server_cpu_seconds(postmaster), time.process_time()
                    for i in range(repeat):
                        await run(i)
                    cpu, own = server_cpu_seconds(postmaster) - cpu, time.process_time() - own
                    rounds.append((len(counter.statements), cpu, own))
                results[name] = summary(rounds, repeat, counter.statements[:12])
            for status in ("running", "succeeded"):
                rounds = []
                for _ in range(ROUNDS):
                    # Operations made beforehand, each taken to the step before ``status``
                    # (their creation and earlier steps not counted).
                    created = [await new_operation(i) for i in range(repeat)]
                    if status == "succeeded":
                        for op in created:
                            await send("PATCH", f"/operations/{op}", {"status": "running"})
                    await log_statements(pool, counter)
                    counter.statements.clear()
                    cpu, own = server_cpu_seconds(postmaster), time.process_time()
                    for op in created:
                        await send("PATCH", f"/operations/{op}", {"status": status})
                    cpu, own = server_cpu_seconds(postmaster) - cpu, time.process_time() - own
                    rounds.append((len(counter.statements), cpu, own))
                results[f"PATCH /operations/{{id}} {status}"] = summary(
                    rounds, repeat, counter.statements[:12]
                )
        # Every write above left an entry: the tenant's chain must still verify.
        async with pool.acquire() as conn:
            (verdict,) = await audit.verify(conn, tenant_id="bench")
        if not verdict.intact:
            raise RuntimeError(f"the audit chain does not verify: {verdict.problem}")
        print(f"audit chain of the bench tenant: {verdict.checked} entries, intact")
    finally:
        await runner.cleanup()
        await close_pool(pool)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", help="admin URL of a server to create a database on")
    parser.add_argument("--repeat", type=int, default=200, help="requests per round")
    parser.add_argument("--verbose", action="store_true", help="list each kind's statements")
    args = parser.parse_args()
    with scratch_database(
        args.database_url or None,
        server_dir_prefix="pluginmon-bench-pg-",
        database_prefix="pluginmon_bench_rt",
        migrated=True,
    ) as url:
        results = asyncio.run(measure(url, repeat=args.repeat))
    average = server_cpu = own_cpu = 0.0
    for name, (per_request, cpu, own, statements) in results.items():
        average += MIX[name] * per_request
        server_cpu += MIX[name] * cpu
        own_cpu += MIX[name] * own
        print(
            f"{name:34s} {per_request:5.2f} statements; CPU per request: PostgreSQL "
            f"{cpu * 1000:.2f} ms, API + client {own * 1000:.2f} ms"
        )
        if args.verbose:
            for statement in statements[: round(per_request)]:
                print(f"    {statement}")
    print(
        f"mix of bench/api.py: {average:.2f} round trips; CPU per request: PostgreSQL "
        f"{server_cpu * 1000:.2f} ms, API + client {own_cpu * 1000:.2f} ms"
    )
    print(f"api_round_trips_per_request={average:.2f}")


if __name__ == "__main__":
    main()
