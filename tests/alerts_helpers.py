"""Test helpers for the alerts tests: a real HTTP receiver, a TCP proxy, a settable clock."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from aiohttp import web

from pluginmon.alerts.notifiers import IDEMPOTENCY_HEADER, SIGNATURE_HEADER, verify_signature
from pluginmon.collectors.models import PluginKey, PluginSample, Snapshot
from pluginmon.registry import alert_actions
from pluginmon.registry.actor import Actor
from pluginmon.storage.queries import ensure_tenant_and_plugin

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
MIB = 1 << 20


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, start: datetime = T0) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now


def plugin_sample(
    key: PluginKey,
    at: datetime,
    *,
    cpu: float = 5.0,
    rss: int = 50 * MIB,
    up: bool = True,
    restarts: int = 0,
) -> PluginSample:
    return PluginSample(
        key=key,
        timestamp=at,
        up=up,
        process_count=1 if up else 0,
        cpu_percent=cpu if up else 0.0,
        rss_bytes=rss if up else 0,
        vms_bytes=2 * rss if up else 0,
        threads=2 if up else 0,
        restarts=restarts,
    )


def snapshot(at: datetime, samples: Iterable[PluginSample]) -> Snapshot:
    return Snapshot(timestamp=at, host="test-host", samples=tuple(samples), duration_seconds=0.001)


async def plugin_ids(pool: Any, keys: Sequence[PluginKey]) -> dict[PluginKey, int]:
    async with pool.acquire() as conn:
        return {
            k: await ensure_tenant_and_plugin(conn, k.tenant, k.plugin, k.environment) for k in keys
        }


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    signature_ok: bool | None

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def idempotency_key(self) -> str:
        return self.headers[IDEMPOTENCY_HEADER]


@dataclass
class Receiver:
    """A real aiohttp server that records what it gets and verifies the HMAC signature.

    ``responses`` are the HTTP statuses to answer with, in order; when empty, 200.
    """

    secret: str | None = None
    responses: list[int] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)
    attempts: int = 0
    port: int = 0
    _runner: web.AppRunner | None = None
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        if self.port == 0:
            server = site._server
            assert server is not None
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.attempts += 1
        status = self.responses.pop(0) if self.responses else 200
        if status == 200:
            ok = (
                None
                if self.secret is None
                else verify_signature(self.secret, body, request.headers.get(SIGNATURE_HEADER))
            )
            self.received.append(Received(dict(request.headers), body, ok))
            self._arrived.set()
        return web.Response(status=status, text="ok" if status == 200 else "no")

    async def wait_for(self, count: int) -> list[Received]:
        """Until ``count`` notifications arrived (wrap in ``asyncio.timeout``)."""
        while len(self.received) < count:
            self._arrived.clear()
            await self._arrived.wait()
        return self.received


class TcpProxy:
    """Forwards a local port to the database; ``down()`` cuts every connection and refuses
    new ones, ``up()`` listens again on the same port: a real outage for the client."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def up(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def down(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for w in list(self._writers):
            w.close()
        self._writers.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers.discard(writer)
        self._writers.discard(up_writer)


# Acknowledgements and silences have one way in: registry.alert_actions (the API's), which
# audits them; the engine reads them back on its next cycle.


async def acknowledge_as(pool: asyncpg.Pool, fingerprint: str, *, by: str, now: datetime) -> bool:
    """Acknowledge through the registry, as ``by``; whether this changed the alert."""
    async with pool.acquire() as conn, conn.transaction():
        # The request's tenant, as the API knows it: here the open alert's own.
        tenant = await conn.fetchval(
            "SELECT tenant_id FROM plugin_alerts WHERE fingerprint = $1 AND status <> 'resolved'",
            fingerprint,
        )
        _alert, changed = await alert_actions.acknowledge(
            conn, fingerprint, tenant_id=str(tenant or "-"), actor=Actor(name=by), now=now
        )
    return changed


async def silence_as(
    pool: asyncpg.Pool,
    *,
    tenant: str,
    matchers: dict[str, str],
    ends_at: datetime,
    by: str,
    now: datetime,
    comment: str = "",
) -> int:
    """Create a silence through the registry, as ``by``; its id."""
    async with pool.acquire() as conn, conn.transaction():
        silence = await alert_actions.create_silence(
            conn,
            tenant_id=tenant,
            actor=Actor(name=by),
            now=now,
            matchers=matchers,
            ends_at=ends_at,
            comment=comment,
        )
    return silence.id


async def audit_actions(
    pool: asyncpg.Pool, *, discovered: bool = False
) -> list[tuple[str, str, str]]:
    """(tenant, actor, action) of every audit entry, oldest first; the daemon's entries for
    the tenants and plugins it created on first sight only when ``discovered``."""
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT tenant_id, actor, action FROM audit_log"
            " WHERE $1 OR details->>'source' IS DISTINCT FROM 'discovered' ORDER BY id",
            discovered,
        )
    return [(r["tenant_id"], r["actor"], r["action"]) for r in rows]
