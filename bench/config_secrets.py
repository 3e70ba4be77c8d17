"""Config secrets benchmark: secret writes and reads per second through /api/v1, and
`pluginmon secrets rewrap` of 100,000 secrets. (Not named bench/secrets.py: run as a script, it
would shadow the standard library's ``secrets`` module.)

1. API: the /api/v1 app (in this process, on a loopback port, as in the tests) over a real
   PostgreSQL; CLIENTS aiohttp clients send WRITES `PUT .../config/{key}` with secret true
   (validation, AES-256-GCM under a fresh data key, insert, audit entry, commit), then the same
   number of plain writes as the baseline of the same run; then READS `GET ...?reveal=true`
   (admin: decrypt + audit entry) and as many masked reads.
2. Rewrap: VALUES secrets (in PLUGINS plugins, two environments) encrypted under k1 and
   COPYed into plugin_config, the key file rotated to k2, then the rewrap (the code path of
   `pluginmon secrets rewrap`: batches of BATCH, FOR UPDATE SKIP LOCKED, one UPDATE and one
   audit entry per batch) until none is left under k1. Baseline: the same re-wraps in memory
   only (no database), the ceiling the database round trips are measured against.

Run: .venv/bin/python bench/config_secrets.py [--database-url URL] [--values 100000]
Last line: rewrap_values_per_s=<values re-wrapped per second>.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp
import asyncpg
import psycopg
from aiohttp import web

from bench.scratch import scratch_database
from pluginmon.daemon.api_routes import build_api_app
from pluginmon.registry import crypto, secrets
from pluginmon.registry.actor import Actor
from pluginmon.registry.keyring import (
    KeyringHolder,
    KeyringLocation,
    load_keyring,
    rotate_key_file,
)
from pluginmon.registry.tokens import Role, create_token


def now() -> datetime:
    return datetime.now(UTC)


async def _issue(pool: asyncpg.Pool, name: str, role: Role) -> str:
    async with pool.acquire() as conn:
        _, text = await create_token(
            conn, name=name, tenant_id="bench", role=role, actor=Actor(name="bench"), now=now()
        )
    return text


async def _drive(
    session: aiohttp.ClientSession,
    requests: list[tuple[str, str, dict[str, object] | None]],
    *,
    token: str,
    clients: int,
) -> tuple[float, int]:
    """(requests per second, errors) of ``requests`` sent by ``clients`` concurrent clients."""
    queue = list(reversed(requests))
    errors = 0

    async def client() -> None:
        nonlocal errors
        while queue:
            method, url, body = queue.pop()
            async with session.request(
                method, url, json=body, headers={"Authorization": "Bearer " + token}
            ) as response:
                await response.read()
                if response.status != 200:
                    errors += 1

    started = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for _ in range(clients):
            group.create_task(client())
    return len(requests) / (time.perf_counter() - started), errors


async def api_rates(url: str, key_file: Path, *, writes: int, clients: int) -> None:
    pool = await asyncpg.create_pool(url, min_size=clients, max_size=clients)
    holder = KeyringHolder(KeyringLocation(key_file, create=True), clock=now)
    root = web.Application()
    root.add_subapp("/api/v1", build_api_app(pool, version="bench", keyring=holder))
    runner = web.AppRunner(root, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}/api/v1/plugins/svc/config"
    try:
        writer = await _issue(pool, "bench-writer", Role.WRITER)
        admin = await _issue(pool, "bench-admin", Role.ADMIN)
        async with aiohttp.ClientSession() as session:
            async with session.post(
                base.removesuffix("/svc/config"),
                json={"name": "svc"},
                headers={"Authorization": "Bearer " + writer},
            ) as response:
                assert response.status == 201, await response.text()
            secret_puts: list[tuple[str, str, dict[str, object] | None]] = [
                ("PUT", f"{base}/s{i}", {"value": f"token-{i:08d}-xxxxxxxx", "secret": True})
                for i in range(writes)
            ]
            plain_puts: list[tuple[str, str, dict[str, object] | None]] = [
                ("PUT", f"{base}/p{i}", {"value": f"token-{i:08d}-xxxxxxxx"}) for i in range(writes)
            ]
            reveals: list[tuple[str, str, dict[str, object] | None]] = [
                ("GET", f"{base}/s{i}?reveal=true", None) for i in range(writes)
            ]
            masked: list[tuple[str, str, dict[str, object] | None]] = [
                ("GET", f"{base}/s{i}", None) for i in range(writes)
            ]
            secret_w, e1 = await _drive(session, secret_puts, token=writer, clients=clients)
            plain_w, e2 = await _drive(session, plain_puts, token=writer, clients=clients)
            reveal_r, e3 = await _drive(session, reveals, token=admin, clients=clients)
            masked_r, e4 = await _drive(session, masked, token=admin, clients=clients)
        print(
            f"API, {clients} clients, {writes} requests each: secret writes {secret_w:.0f}/s "
            f"(plain writes {plain_w:.0f}/s, ratio {secret_w / plain_w:.2f}); secret reveals "
            f"{reveal_r:.0f}/s (masked reads {masked_r:.0f}/s, ratio {reveal_r / masked_r:.2f}); "
            f"errors {e1 + e2 + e3 + e4}"
        )
    finally:
        await runner.cleanup()
        await pool.close()


def seed(url: str, keyring: crypto.Keyring, *, values: int, plugins: int) -> float:
    """Encrypt and COPY ``values`` secrets; seconds taken."""
    started = time.perf_counter()
    with psycopg.connect(url) as conn:
        conn.execute("INSERT INTO tenants (id, name) VALUES ('rw', 'rw') ON CONFLICT DO NOTHING")
        ids = [
            row[0]
            for row in conn.execute(
                "INSERT INTO plugins (tenant_id, name)"
                " SELECT 'rw', 'p' || g FROM generate_series(1, %s) g RETURNING id",
                (plugins,),
            ).fetchall()
        ]
        names = {pid: f"p{n + 1}" for n, pid in enumerate(ids)}
        with (
            conn.cursor() as cur,
            cur.copy(
                "COPY plugin_config (tenant_id, plugin_id, environment, key, is_secret,"
                " secret_ciphertext, secret_key_id) FROM STDIN"
            ) as copy,
        ):
            for n in range(values):
                pid = ids[n % plugins]
                environment = "production" if n % 2 else "staging"
                key = f"key{n}"
                blob, key_id = crypto.encrypt(
                    keyring,
                    json.dumps(f"value-{n:08d}").encode(),
                    aad=crypto.secret_aad(
                        tenant_id="rw", plugin=names[pid], environment=environment, key=key
                    ),
                )
                copy.write_row(("rw", pid, environment, key, True, blob, key_id))
    return time.perf_counter() - started


async def rewrap_rate(url: str, keyring: crypto.Keyring, *, batch: int) -> tuple[float, int]:
    conn = await asyncpg.connect(url)
    try:
        started = time.perf_counter()
        report = await secrets.rewrap_all(
            conn, keyring, actor=Actor(name="bench"), clock=now, batch_size=batch
        )
        elapsed = time.perf_counter() - started
    finally:
        await conn.close()
    assert report.remaining == 0, report
    return report.values / elapsed, report.values


def memory_rewrap_rate(old: crypto.Keyring, new: crypto.Keyring, *, count: int) -> float:
    aad = crypto.secret_aad(tenant_id="rw", plugin="p", environment="production", key="k")
    blobs = [crypto.encrypt(old, b'"value-00000000"', aad=aad)[0] for _ in range(count)]
    started = time.perf_counter()
    for blob in blobs:
        crypto.rewrap(new, blob, key_id=old.primary_id, aad=aad, where="bench")
    return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--database-url", help="a server to create a scratch database on")
    parser.add_argument("--values", type=int, default=100_000)
    parser.add_argument("--plugins", type=int, default=100)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--writes", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="pluginmon-bench-keys") as keys,
        scratch_database(args.database_url, server_dir_prefix="pluginmon-bench-secrets") as url,
    ):
        key_file = Path(keys) / "keys.json"
        asyncio.run(api_rates(url, key_file, writes=args.writes, clients=args.clients))
        location = KeyringLocation(key_file)
        old, _ = load_keyring(location, now=now())
        seconds = seed(url, old, values=args.values, plugins=args.plugins)
        print(f"seeded {args.values} secrets under {old.primary_id} in {seconds:.1f} s")
        new = rotate_key_file(location, now=now())
        ceiling = memory_rewrap_rate(old, new, count=20_000)
        rate, done = asyncio.run(rewrap_rate(url, new, batch=args.batch))
        print(
            f"rewrap {old.primary_id} -> {new.primary_id}: {done} values (API writes above "
            f"included) in batches of {args.batch}: {rate:.0f} values/s; in-memory re-wrap "
            f"ceiling {ceiling:.0f} values/s (database share {1 - rate / ceiling:.0%})"
        )
    print(f"rewrap_values_per_s={rate:.0f}")


if __name__ == "__main__":
    main()
