"""HTTP endpoints on one port: /metrics, /healthz, /readyz; optional basic auth and TLS."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import logging
import ssl
import zlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Protocol

from aiohttp import web

logger = logging.getLogger(__name__)

# Below this size compressing costs more than it saves.
_GZIP_MIN_BYTES = 64 * 1024
# Served without basic auth unless ``auth_probes``: they reveal nothing but liveness.
_PROBE_PATHS = frozenset({"/healthz", "/readyz"})


class MetricsSource(Protocol):
    def render_chunks(self, accept: str | None) -> tuple[list[bytes], str]:
        """Blocking: the exposition body, in chunks, and its content type."""
        ...


@dataclass(frozen=True, slots=True)
class Readiness:
    ready: bool
    reasons: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class BasicAuth:
    """Credentials for the endpoint: a plain password or the hex SHA-256 of one."""

    username: str
    password: str | None = None
    password_sha256: str | None = None

    def check(self, header: str | None) -> bool:
        if not header or not header.startswith("Basic "):
            return False
        try:
            decoded = base64.b64decode(header[6:], validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return False
        username, sep, password = decoded.partition(":")
        if not sep:
            return False
        user_ok = hmac.compare_digest(username.encode(), self.username.encode())
        if self.password_sha256 is not None:
            digest = hashlib.sha256(password.encode()).hexdigest()
            pass_ok = hmac.compare_digest(digest, self.password_sha256)
        else:
            pass_ok = hmac.compare_digest(password.encode(), (self.password or "").encode())
        return user_ok and pass_ok


def tls_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(cert_file), str(key_file))
    return context


class HttpServer:
    """aiohttp on one host:port; ``async with`` starts it and stops it.

    /metrics renders in a worker thread (10,000 plugins must not stall the event loop);
    ``before_render`` runs on the loop first, to copy counters owned by loop-side components.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        metrics: MetricsSource,
        readiness: Callable[[], Awaitable[Readiness]],
        before_render: Callable[[], None] | None = None,
        auth: BasicAuth | None = None,
        auth_probes: bool = False,
        ssl_context: ssl.SSLContext | None = None,
        max_concurrent_renders: int = 2,
        shutdown_timeout_seconds: float = 5.0,
        subapps: Sequence[tuple[str, web.Application]] = (),
    ) -> None:
        self._host = host
        self._port = port
        self._metrics = metrics
        self._readiness = readiness
        self._before_render = before_render
        self._auth = auth
        # Orchestrator probes (kubelet, systemd, load balancers) rarely carry credentials.
        self._auth_exempt = frozenset() if auth_probes else _PROBE_PATHS
        # Mounted applications (/api/v1) authenticate their own requests (bearer tokens).
        self._subapps = tuple(subapps)
        self._own_auth_prefixes = tuple(prefix.rstrip("/") + "/" for prefix, _ in self._subapps)
        self._shutdown_timeout = shutdown_timeout_seconds
        self._ssl_context = ssl_context
        self._render_slots = asyncio.Semaphore(max_concurrent_renders)
        self._runner: web.AppRunner | None = None
        self.port: int = port

    def _app(self) -> web.Application:
        middlewares = [self._auth_middleware] if self._auth is not None else []
        app = web.Application(middlewares=middlewares)
        app.router.add_get("/metrics", self._handle_metrics)
        app.router.add_get("/healthz", self._handle_healthz)
        app.router.add_get("/readyz", self._handle_readyz)
        app.router.add_get("/", self._handle_index)
        for prefix, subapp in self._subapps:
            app.add_subapp(prefix, subapp)
        return app

    @web.middleware
    async def _auth_middleware(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        assert self._auth is not None
        own_auth = self._own_auth_prefixes and request.path.startswith(self._own_auth_prefixes)
        if (
            not own_auth
            and request.path not in self._auth_exempt
            and not self._auth.check(request.headers.get("Authorization"))
        ):
            return web.Response(
                status=401,
                text="unauthorized\n",
                headers={"WWW-Authenticate": 'Basic realm="pluginmon"'},
            )
        return await handler(request)

    async def _handle_metrics(self, request: web.Request) -> web.Response:
        if self._before_render is not None:
            self._before_render()
        accept = request.headers.get("Accept")
        gzip_ok = "gzip" in request.headers.get("Accept-Encoding", "")
        async with self._render_slots:
            body, content_type, gzipped = await asyncio.to_thread(self._render, accept, gzip_ok)
        response = web.Response(body=body)
        response.headers["Content-Type"] = content_type
        if gzipped:
            response.headers["Content-Encoding"] = "gzip"
        return response

    def _render(self, accept: str | None, gzip_ok: bool) -> tuple[bytes, str, bool]:
        chunks, content_type = self._metrics.render_chunks(accept)
        if gzip_ok and sum(map(len, chunks)) >= _GZIP_MIN_BYTES:
            # Streamed through one compressor: the uncompressed body is never joined.
            compressor = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
            parts = [compressor.compress(chunk) for chunk in chunks]
            parts.append(compressor.flush())
            return b"".join(parts), content_type, True
        return b"".join(chunks), content_type, False

    async def _handle_healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _handle_readyz(self, request: web.Request) -> web.Response:
        readiness = await self._readiness()
        if readiness.ready:
            return web.Response(text="ready\n")
        return web.Response(status=503, text="not ready: " + "; ".join(readiness.reasons) + "\n")

    async def _handle_index(self, request: web.Request) -> web.Response:
        return web.Response(
            text="pluginmon: /metrics /healthz /readyz\n", content_type="text/plain"
        )

    async def __aenter__(self) -> HttpServer:
        runner = web.AppRunner(
            self._app(),
            access_log=None,
            handle_signals=False,
            shutdown_timeout=self._shutdown_timeout,
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, self._host, self._port, ssl_context=self._ssl_context)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        server = site._server  # the bound socket tells the real port when 0 was asked for
        sockets = getattr(server, "sockets", None) or []
        if sockets:
            self.port = int(sockets[0].getsockname()[1])
        logger.info(
            "HTTP listening on %s://%s:%d (/metrics /healthz /readyz%s)",
            "https" if self._ssl_context else "http",
            self._host,
            self.port,
            (", basic auth" + ("" if not self._auth_exempt else " except the probes"))
            if self._auth
            else "",
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await asyncio.shield(runner.cleanup())
