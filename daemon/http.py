"""HTTP endpoints on one port: /metrics, /healthz, /readyz; basic auth, TLS, connection limits.

Over 500 lines on purpose: the connection guard (header timeout, connection limit, accept
errors) wraps aiohttp's protocol and is only correct read beside the server it guards.

Limits, as nginx sets them (see docs/operations.md for what each looks like when it bites):

* A new connection must deliver its first complete request head within
  ``header_timeout_seconds`` (with TLS: the handshake, then the head, each within it), or
  it is closed and counted
  (``pluginmon_http_connections_rejected_total{reason="header_timeout"}``).
* A kept-alive connection is closed once no complete request head arrived within
  ``keepalive_timeout_seconds`` of the previous response (aiohttp's own keep-alive timer).
* At most ``max_connections`` connections are served at once, and never more than a quarter
  of the process's file descriptor limit, so that sampling, the spools and the database
  pool keep theirs. Beyond it a connection gets one ``503`` and is closed, counted as
  ``reason="connection_limit"``.
* When ``accept()`` itself fails (no descriptor left anywhere in the process), asyncio
  retries every second; each failure is counted in ``pluginmon_http_accept_errors_total``
  and logged at most once a minute instead of once a second with a traceback.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import errno
import hashlib
import hmac
import logging
import math
import os
import resource
import socket
import ssl
import time
import zlib
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Protocol, cast

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

# Below this size compressing costs more than it saves.
_GZIP_MIN_BYTES = 64 * 1024
# Served without basic auth unless ``auth_probes``: they reveal nothing but liveness.
_PROBE_PATHS = frozenset({"/healthz", "/readyz"})
# What a connection over the limit gets before it is closed.
_OVER_LIMIT_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: 21\r\n"
    b"Connection: close\r\n"
    b"\r\n"
    b"too many connections\n"
)
# accept() errors that mean "out of descriptors or memory" (asyncio retries them each second).
_ACCEPT_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
REJECT_CONNECTION_LIMIT = "connection_limit"
LISTEN_QUEUE: Final = 100  # asyncio's default backlog
REJECT_HEADER_TIMEOUT = "header_timeout"


class MetricsSource(Protocol):
    def render_chunks(self, accept: str | None) -> tuple[list[bytes], str]:
        """Blocking: the exposition body, in chunks, and its content type."""
        ...


class ListenError(RuntimeError):
    """The server cannot listen on its host:port (in use, not an address of this machine)."""


@dataclass(frozen=True, slots=True)
class Readiness:
    ready: bool
    reasons: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """Connection limits of the endpoint (the defaults are documented in docs/operations.md)."""

    header_timeout_seconds: float = 10.0
    keepalive_timeout_seconds: float = 30.0
    max_connections: int = 256

    def __post_init__(self) -> None:
        for name in ("header_timeout_seconds", "keepalive_timeout_seconds"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of seconds, not {value!r}")
        if self.max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, not {self.max_connections!r}")


def connection_limit(max_connections: int, *, open_files_limit: int | None = None) -> int:
    """``max_connections``, but at most a quarter of the descriptor limit (at least 1)."""
    if open_files_limit is None:
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        open_files_limit = soft
    if open_files_limit == resource.RLIM_INFINITY or open_files_limit <= 0:
        return max_connections
    return max(1, min(max_connections, open_files_limit // 4))


def accept_batch(open_files_limit: int | None = None) -> int:
    """How many connections asyncio accepts in one go (its ``backlog``): 100, but at most an
    eighth of the descriptor limit (the connections held take up to a quarter, the daemon's
    own files, pool and /proc reads need the rest).

    asyncio accepts up to ``backlog`` sockets per readiness event before any of them reaches
    the limit check and is closed; with the default of 100 a flood against a low descriptor
    limit exhausts it (EMFILE) for a moment although the connection limit holds. The
    kernel's listen queue is set back to ``LISTEN_QUEUE`` once the server listens.
    """
    if open_files_limit is None:
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        open_files_limit = soft
    if open_files_limit == resource.RLIM_INFINITY or open_files_limit <= 0:
        return LISTEN_QUEUE
    return max(1, min(LISTEN_QUEUE, open_files_limit // 8))


def _qvalue(params: list[str]) -> float:
    """The q of one Accept-Encoding item; a malformed q makes the coding unacceptable."""
    for param in params:
        name, _, value = param.partition("=")
        if name.strip().lower() == "q":
            try:
                q = float(value.strip())
            except ValueError:
                return 0.0
            return q if math.isfinite(q) and 0.0 <= q <= 1.0 else 0.0
    return 1.0


def wants_gzip(accept_encoding: str | None, *, large: bool) -> bool:
    """Whether to gzip a response, from the request's ``Accept-Encoding`` (RFC 9110 12.5.3).

    ``gzip`` (or ``x-gzip``) takes its own q, else the q of ``*``, else it is not acceptable;
    ``identity`` is acceptable unless given q=0 itself or by ``*;q=0``. The higher q wins;
    on a tie a ``large`` body is gzipped. When nothing is acceptable the body goes out
    uncompressed (it is the only coding we have besides gzip).
    """
    if not accept_encoding:
        return False
    explicit: dict[str, float] = {}
    for item in accept_encoding.split(","):
        coding, *params = item.split(";")
        name = coding.strip().lower()
        if name:
            # Of repeated codings the highest q counts.
            explicit[name] = max(explicit.get(name, 0.0), _qvalue(params))
    star = explicit.get("*")
    gzip_q = explicit.get("gzip", explicit.get("x-gzip", star if star is not None else 0.0))
    identity_q = explicit.get("identity", 0.0 if star == 0.0 else 1.0)
    if gzip_q <= 0.0:
        return False
    return gzip_q > identity_q or (gzip_q == identity_q and large)


@dataclass(frozen=True, slots=True)
class BasicAuth:
    """Credentials for the endpoint: a plain password or the hex SHA-256 of one."""

    username: str
    password: str | None = None
    password_sha256: str | None = None

    def check(self, header: str | None) -> bool:
        if not header:
            return False
        # The scheme is case-insensitive (RFC 9110 11.1): "basic" and "BASIC" are "Basic".
        scheme, _, credentials = header.strip().partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
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


class Throttle:
    """Allows one event per ``interval_seconds``; counts what it held back meanwhile."""

    def __init__(
        self, interval_seconds: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._interval = interval_seconds
        self._clock = clock
        self._next_at: float | None = None
        self.suppressed = 0

    def ready(self) -> int | None:
        """None while throttled (the event is counted); else how many were held back."""
        now = self._clock()
        if self._next_at is not None and now < self._next_at:
            self.suppressed += 1
            return None
        self._next_at = now + self._interval
        held, self.suppressed = self.suppressed, 0
        return held


class _Connections:
    """The open connections and the limit's counters, shared by every connection."""

    def __init__(self, *, limit: int, header_timeout_seconds: float) -> None:
        self.limit = limit
        self.header_timeout_seconds = header_timeout_seconds
        self.open = 0
        self.rejected = {REJECT_CONNECTION_LIMIT: 0, REJECT_HEADER_TIMEOUT: 0}
        self.accept_errors: dict[str, int] = {}
        self.log_throttles = {reason: Throttle(60.0) for reason in (*self.rejected, "accept_error")}

    def reject(self, reason: str, what: str) -> None:
        self.rejected[reason] += 1
        held = self.log_throttles[reason].ready()
        if held is not None:
            logger.warning(
                "HTTP: %s (%s: %d so far, %d since the previous such line; logged at most "
                "once a minute)",
                what,
                reason,
                self.rejected[reason],
                held + 1,
            )


def _head_ends_in(data: bytes) -> bool:
    """An empty line ends a request head; aiohttp's parser also takes bare LF line ends."""
    return b"\n\n" in data or b"\n\r\n" in data


class _GuardedConnection(asyncio.Protocol):
    """Wraps aiohttp's per-connection protocol: enforces the connection limit and the
    first request head's deadline, and forwards everything else unchanged."""

    def __init__(
        self, connections: _Connections, make_handler: Callable[[], asyncio.Protocol]
    ) -> None:
        self._connections = connections
        self._make_handler = make_handler
        self._handler: asyncio.Protocol | None = None
        self._transport: asyncio.Transport | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._tail = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport; uvloop's does not derive from asyncio.Transport.
        transport = cast(asyncio.Transport, transport)
        connections = self._connections
        if connections.open >= connections.limit:
            # Checked here, not when accepted: connection_made comes after a TLS handshake,
            # and only here is it certain that connection_lost will follow.
            transport.write(_OVER_LIMIT_RESPONSE)
            transport.close()
            connections.reject(
                REJECT_CONNECTION_LIMIT,
                f"refused a connection with 503: {connections.limit} open, the limit",
            )
            return
        connections.open += 1
        self._transport = transport
        self._deadline = asyncio.get_running_loop().call_later(
            connections.header_timeout_seconds, self._head_too_slow
        )
        self._handler = self._make_handler()
        self._handler.connection_made(transport)

    def _head_too_slow(self) -> None:
        self._deadline = None
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()
            self._connections.reject(
                REJECT_HEADER_TIMEOUT,
                "closed a connection that sent no complete request head within "
                f"{self._connections.header_timeout_seconds:g} s",
            )

    def data_received(self, data: bytes) -> None:
        if self._deadline is not None:
            # Only the first head is watched: later ones are bounded by the keep-alive timer.
            if _head_ends_in(self._tail + data[:2]) or _head_ends_in(data):
                self._deadline.cancel()
                self._deadline = None
            else:
                self._tail = (self._tail + data[-2:])[-2:]
        if self._handler is not None:
            self._handler.data_received(data)

    def eof_received(self) -> bool | None:
        return self._handler.eof_received() if self._handler is not None else None

    def pause_writing(self) -> None:
        if self._handler is not None:
            self._handler.pause_writing()

    def resume_writing(self) -> None:
        if self._handler is not None:
            self._handler.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self._handler is not None:
            self._connections.open -= 1
            handler, self._handler = self._handler, None
            handler.connection_lost(exc)


class _HttpCollector(Collector):
    """The endpoint's own metrics, built at scrape time from its counters."""

    def __init__(self, connections: _Connections) -> None:
        self._connections = connections

    def collect(self) -> Iterator[Metric]:
        c = self._connections
        open_now = GaugeMetricFamily(
            "pluginmon_http_connections", "HTTP connections open now (metrics endpoint)."
        )
        open_now.add_metric([], c.open)
        yield open_now
        limit = GaugeMetricFamily(
            "pluginmon_http_connection_limit", "HTTP connections served at most at once."
        )
        limit.add_metric([], c.limit)
        yield limit
        rejected = CounterMetricFamily(
            "pluginmon_http_connections_rejected",
            "HTTP connections closed by a limit: over the connection limit, or no complete "
            "request head within the header timeout.",
            labels=["reason"],
        )
        for reason, count in sorted(c.rejected.items()):
            rejected.add_metric([reason], count)
        yield rejected
        errors = CounterMetricFamily(
            "pluginmon_http_accept_errors",
            "accept() failures of the HTTP listener (no file descriptor or memory left).",
            labels=["reason"],
        )
        for reason, count in sorted(c.accept_errors.items()):
            errors.add_metric([reason], count)
        yield errors


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
        limits: HttpLimits | None = None,
        registry: CollectorRegistry | None = None,
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
        self._limits = limits or HttpLimits()
        self.connections = _Connections(
            limit=connection_limit(self._limits.max_connections),
            header_timeout_seconds=self._limits.header_timeout_seconds,
        )
        if registry is not None:
            registry.register(_HttpCollector(self.connections))
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._previous_exception_handler: Any = None
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
        accept_encoding = request.headers.get("Accept-Encoding")
        async with self._render_slots:
            body, content_type, gzipped = await asyncio.to_thread(
                self._render, accept, accept_encoding
            )
        response = web.Response(body=body)
        response.headers["Content-Type"] = content_type
        # The body depends on both (OpenMetrics or text; gzip or not): caches must key on them.
        response.headers["Vary"] = "Accept, Accept-Encoding"
        if gzipped:
            response.headers["Content-Encoding"] = "gzip"
        return response

    def _render(self, accept: str | None, accept_encoding: str | None) -> tuple[bytes, str, bool]:
        chunks, content_type = self._metrics.render_chunks(accept)
        large = sum(map(len, chunks)) >= _GZIP_MIN_BYTES
        if wants_gzip(accept_encoding, large=large):
            # Streamed through one compressor: the uncompressed body is never joined.
            compressor = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
            parts = [compressor.compress(chunk) for chunk in chunks]
            parts.append(compressor.flush())
            return b"".join(parts), content_type, True
        return b"".join(chunks), content_type, False

    async def _handle_healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _handle_readyz(self, request: web.Request) -> web.Response:
        try:
            readiness = await self._readiness()
        except Exception as exc:  # /readyz says why; it never answers 500
            logger.exception("readiness check failed")
            readiness = Readiness(
                ready=False, reasons=(f"readiness check failed: {type(exc).__name__}",)
            )
        if readiness.ready:
            return web.Response(text="ready\n")
        return web.Response(status=503, text="not ready: " + "; ".join(readiness.reasons) + "\n")

    async def _handle_index(self, request: web.Request) -> web.Response:
        return web.Response(
            text="pluginmon: /metrics /healthz /readyz\n", content_type="text/plain"
        )

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """Counts accept() failures for want of descriptors; anything else goes on as before.

        asyncio stops accepting for a second after such a failure and logs it each time
        with a traceback; under a flood that is megabytes of log for one condition.
        """
        exc = context.get("exception")
        if (
            isinstance(exc, OSError)
            and exc.errno in _ACCEPT_RESOURCE_ERRORS
            and ("accept" in str(context.get("message", "")))
        ):
            reason = errno.errorcode.get(exc.errno, str(exc.errno)).lower()
            errors = self.connections.accept_errors
            errors[reason] = errors.get(reason, 0) + 1
            held = self.connections.log_throttles["accept_error"].ready()
            if held is not None:
                logger.error(
                    "HTTP: cannot accept connections: %s (%s); retrying every second "
                    "(%d failures so far, %d since the previous such line; logged at most once "
                    "a minute)",
                    exc.strerror,
                    reason,
                    sum(errors.values()),
                    held + 1,
                )
            return
        if self._previous_exception_handler is not None:
            self._previous_exception_handler(loop, context)
        else:
            loop.default_exception_handler(context)

    async def __aenter__(self) -> HttpServer:
        limits = self._limits
        runner = web.AppRunner(
            self._app(),
            access_log=None,
            handle_signals=False,
            shutdown_timeout=self._shutdown_timeout,
            keepalive_timeout=limits.keepalive_timeout_seconds,
        )
        await runner.setup()
        make_handler = runner.server
        assert make_handler is not None
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(
                lambda: _GuardedConnection(self.connections, make_handler),
                self._host,
                self._port,
                ssl=self._ssl_context,
                reuse_address=True,
                backlog=accept_batch(),
                ssl_handshake_timeout=(
                    limits.header_timeout_seconds if self._ssl_context is not None else None
                ),
            )
        except OSError as exc:
            await runner.cleanup()
            # One line for the operator, not asyncio's "error while attempting to bind ...".
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise ListenError(f"cannot listen on {self._host}:{self._port}: {reason}") from exc
        except BaseException:
            await runner.cleanup()
            raise
        for listening in self._server.sockets:
            # The kernel's queue stays at 100 although asyncio accepts fewer at a time.
            with socket.socket(
                listening.family, listening.type, listening.proto, fileno=os.dup(listening.fileno())
            ) as same:
                same.listen(LISTEN_QUEUE)
        self._runner = runner
        self._loop = loop
        self._previous_exception_handler = loop.get_exception_handler()
        loop.set_exception_handler(self._loop_exception)
        if self._server.sockets:
            # The bound socket tells the real port when 0 was asked for.
            self.port = int(self._server.sockets[0].getsockname()[1])
        logger.info(
            "HTTP listening on %s://%s:%d (/metrics /healthz /readyz%s); at most %d connections, "
            "request head within %g s, keep-alive %g s",
            "https" if self._ssl_context else "http",
            self._host,
            self.port,
            (", basic auth" + ("" if not self._auth_exempt else " except the probes"))
            if self._auth
            else "",
            self.connections.limit,
            limits.header_timeout_seconds,
            limits.keepalive_timeout_seconds,
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()  # no new connections; the open ones are shut down below
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await asyncio.shield(runner.cleanup())
        loop, self._loop = self._loop, None
        if loop is not None and loop.get_exception_handler() == self._loop_exception:
            loop.set_exception_handler(self._previous_exception_handler)
