"""Test harness for /api/v1: a real aiohttp server on a loopback port over a migrated database,
tokens issued the way the CLI issues them, a settable clock and a real aiohttp client."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import asyncpg
from aiohttp import web
from multidict import CIMultiDict
from prometheus_client import CollectorRegistry

from pluginmon.daemon.api_metrics import ApiMetrics
from pluginmon.daemon.api_plugin_metrics import PluginMetricsHandlers
from pluginmon.daemon.api_routes import build_api_app
from pluginmon.registry import tokens
from pluginmon.registry.actor import Actor
from pluginmon.registry.backup_readers import Readers
from pluginmon.registry.lifecycle import RetryPolicy
from pluginmon.registry.policies import ApprovalPolicy
from pluginmon.storage.pool import open_pool

START = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


class Clock:
    """The API's clock, moved by the test (backoff, deadlines, expiry without sleeping)."""

    def __init__(self, now: datetime = START) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: Any
    headers: CIMultiDict[str]  # header names are case-insensitive

    @property
    def error(self) -> dict[str, Any]:
        assert isinstance(self.body, dict), self.body
        assert "error" in self.body, self.body
        error = self.body["error"]
        assert isinstance(error, dict)
        return error


@dataclass
class ApiHarness:
    base_url: str
    pool: asyncpg.Pool
    database_url: str
    clock: Clock
    session: aiohttp.ClientSession
    registry: CollectorRegistry
    issued: dict[str, str] = field(default_factory=dict)

    async def token(
        self, name: str, *, tenant: str | None, role: tokens.Role = tokens.Role.WRITER
    ) -> str:
        async with self.pool.acquire() as conn:
            _, text = await tokens.create_token(
                conn,
                name=name,
                tenant_id=tenant,
                role=role,
                actor=Actor(name="cli:test"),
                now=self.clock(),
            )
        self.issued[name] = text
        return text

    async def call(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        body: Any = None,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        """``token`` is a name from :attr:`issued` or a raw token string."""
        sent = dict(headers or {})
        if token is not None:
            sent["Authorization"] = "Bearer " + self.issued.get(token, token)
        if body is not None:
            data = json.dumps(body).encode()
            sent.setdefault("Content-Type", "application/json")
        async with self.session.request(
            method, self.base_url + path, data=data, headers=sent
        ) as response:
            raw = await response.read()
            try:
                parsed: Any = json.loads(raw) if raw else None
            except ValueError:
                parsed = raw.decode(errors="replace")
            return Reply(response.status, parsed, CIMultiDict(response.headers))

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        """As the owner (sees every tenant): what the database really holds."""
        async with self.pool.acquire() as conn:
            rows: list[asyncpg.Record] = await conn.fetch(query, *args)
            return rows


@asynccontextmanager
async def api_server(
    database_url: str,
    *,
    policies: Sequence[ApprovalPolicy] = (),
    retry: RetryPolicy | None = None,
    max_body_bytes: int = 64 * 1024,
    max_document_bytes: int = 32 * 1024 * 1024,
    clock: Clock | None = None,
    plugin_metrics: PluginMetricsHandlers | None = None,
    backup_readers: Readers | None = None,
) -> AsyncIterator[ApiHarness]:
    # The daemon's own pool (storage.pool), so every API test runs with its reset policy.
    pool = await open_pool(database_url, min_size=1, max_size=4)
    clock = clock or Clock()
    registry = CollectorRegistry()
    root = web.Application()
    root.add_subapp(
        "/api/v1",
        build_api_app(
            pool,
            version="test",
            policies=policies,
            retry=retry or RetryPolicy(random_fraction=lambda: 0.5),
            clock=clock,
            max_body_bytes=max_body_bytes,
            max_document_bytes=max_document_bytes,
            metrics=ApiMetrics(registry),
            plugin_metrics=plugin_metrics,
            backup_readers=backup_readers,
        ),
    )
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
