"""The data-plane asyncpg pool: opening (logged without the password), graceful-then-forced closing.

A URL may name several hosts (``postgresql://u@db1:5432,db2:5432/pluginmon?
target_session_attrs=read-write``): libpq (psycopg, the admin plane) and this pool both try
them in order, each within its own connect timeout, and take the first that matches
``target_session_attrs``, so a daemon follows a failover to the promoted standby on its next
connection. asyncpg's own multi-host support spends one timeout on all hosts together (a
hung first host, SIGSTOPped or black-holed, would hide the standby behind it for good), so
the pool connects host by host itself (``connect_host_by_host``).

On a Citus node every connection also turns off Citus's shard hiding
(``citus.override_table_visibility``), see ``_show_citus_shards``.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import asyncpg

from pluginmon.storage.dsn import redact_urls, redacted_dsn

logger = logging.getLogger(__name__)

# One host that does not answer is given up on after this long (libpq's connect_timeout
# does the same for the admin plane; storage.migrate uses the same default).
DEFAULT_CONNECT_TIMEOUT_SECONDS = 10.0

# Failures after which libpq tries the next host too: nothing listening or answering, a
# server that refuses connections for now (starting, shutting down), a read-only server
# when read-write was asked for. A refused login (class 28) or a missing database (3D000)
# ends the attempt, as in libpq.
_NEXT_HOST_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.exceptions.TargetServerAttributeNotMatched,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
)

# The parser and scrubber live in storage.dsn (linear, never raises, every character a
# password may hold); kept here under the names callers and tests use.
redact_url = redacted_dsn
redact_text = redact_urls


def split_hosts(url: str) -> tuple[str, ...]:
    """One URL per host of a multi-host ``postgresql://`` URL, in the order libpq tries them.

    ``(url,)`` for a single host, and for forms left to the driver (a keyword/value DSN,
    hosts or ports given as query parameters).
    """
    if "://" not in url:
        return (url,)
    try:
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
    except ValueError:
        return (url,)
    userinfo, at, hostlist = parts.netloc.rpartition("@")
    if "," not in hostlist or any(k.lower() in ("host", "hostaddr", "port") for k, _ in query):
        return (url,)
    # An IPv6 address is bracketed ("[::1]:5432") and holds no comma.
    hosts = [host for host in hostlist.split(",") if host]
    return tuple(urlunsplit(parts._replace(netloc=f"{userinfo}{at}{host}")) for host in hosts)


ConnectFunction = Callable[..., Awaitable[asyncpg.Connection]]


class PooledConnection(asyncpg.Connection):  # type: ignore[misc]  # asyncpg has no types
    """A connection of :func:`open_pool`'s pool: its user can vouch that the session is as
    the last reset left it, so that releasing it skips the reset query.

    asyncpg resets every connection on release (``pg_advisory_unlock_all(); CLOSE ALL;
    UNLISTEN *; RESET ALL``): a round trip, which is a fifth of the work of a short API
    request. A user whose whole use was one transaction with only transaction-local state
    (``set_config(..., true)``, ``SET LOCAL``, transaction-level advisory locks) leaves
    nothing a reset would undo, and says so with :func:`mark_session_untouched`. Anything
    else (the writer, the maintenance jobs, an aborted request) gets the full reset.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._session_untouched = False

    def mark_session_untouched(self) -> None:
        self._session_untouched = True

    def take_session_untouched(self) -> bool:
        """Whether the user vouched for the session since the last release (and forget it)."""
        untouched, self._session_untouched = self._session_untouched, False
        return untouched


def mark_session_untouched(conn: asyncpg.Connection) -> None:
    """Vouch that ``conn`` (acquired from :func:`open_pool`'s pool; any other connection is
    left alone) was used only inside transactions that ended, with transaction-local
    state only, so its release may skip the reset query."""
    # Through the pool's proxy, which forwards attribute access to the connection; a
    # connection of another pool (tests build their own) has no such method.
    mark = getattr(conn, "mark_session_untouched", None)
    if mark is not None and not conn.is_in_transaction():
        mark()


async def _reset_session(conn: asyncpg.Connection) -> None:
    # asyncpg has already rolled back an open transaction and dropped listeners when it
    # calls the pool's reset; what remains is the session state the reset query clears.
    query = conn.get_reset_query()
    if query:
        await conn.execute(query)


def connect_host_by_host(
    host_urls: Sequence[str], *, connect_timeout_seconds: float
) -> ConnectFunction:
    """asyncpg.connect over ``host_urls`` in order, each within ``connect_timeout_seconds``.

    Each URL keeps the query (``target_session_attrs`` included), so every host is checked
    on its own. When none fits, the "no host accepts writes" error wins over the others (it
    is the one an operator needs: only a standby answers); else the last host's error.
    """
    if not host_urls:
        raise ValueError("no host to connect to")

    async def connect(*_args: Any, **kwargs: Any) -> asyncpg.Connection:
        kwargs.pop("dsn", None)
        kwargs["timeout"] = connect_timeout_seconds
        read_only: BaseException | None = None
        last: BaseException | None = None
        for url in host_urls:
            try:
                connection: asyncpg.Connection = await asyncpg.connect(url, **kwargs)
            except asyncpg.exceptions.TargetServerAttributeNotMatched as exc:
                read_only = last = exc
            except _NEXT_HOST_ERRORS as exc:
                last = exc
            else:
                return connection
        assert last is not None
        raise read_only or last

    return connect


# asyncpg learns a non-built-in type (a domain, an enum, a row type) with one query per
# connection that reads pg_class once per type in pg_type. On a Citus worker each of those
# reads passes every pg_class row through Citus's check that hides shards from clients, and a
# worker holds thousands of shards: 25 s per connection on the two-worker test cluster, so an
# agent's first COPY through a worker timed out. pluginmon reads no catalog by name where a
# shard could be mistaken for a table, so its connections see the shards. Off Citus the
# setting does not exist and nothing is set.
_SHOW_CITUS_SHARDS_SQL = (
    "SELECT set_config('citus.override_table_visibility', 'off', false) IS NOT NULL"
    " WHERE current_setting('citus.override_table_visibility', true) IS NOT NULL"
)


class _CitusShardVisibility:
    """Sets the visibility on every new connection and again after the reset on release
    (its RESET ALL would restore the server's default), on Citus connections only. The reset
    is skipped for a connection vouched for by :func:`mark_session_untouched`."""

    def __init__(self) -> None:
        self._citus: weakref.WeakSet[asyncpg.Connection] = weakref.WeakSet()

    async def init(self, conn: asyncpg.Connection) -> None:
        if await conn.fetchval(_SHOW_CITUS_SHARDS_SQL):
            self._citus.add(conn)

    async def reset(self, conn: asyncpg.Connection) -> None:
        if isinstance(conn, PooledConnection) and conn.take_session_untouched():
            return  # no RESET ALL ran: the setting is still off
        await _reset_session(conn)
        if conn in self._citus:
            await conn.execute(_SHOW_CITUS_SHARDS_SQL)


async def open_pool(
    database_url: str,
    *,
    min_size: int = 1,
    max_size: int = 4,
    command_timeout_seconds: float = 30.0,
    connect_timeout_seconds: float = DEFAULT_CONNECT_TIMEOUT_SECONDS,
    application_name: str = "pluginmon",
) -> asyncpg.Pool:
    """Open an asyncpg pool; close it with :func:`close_pool` (or use :func:`pool_context`).

    ``min_size=0`` opens without connecting, so a daemon can start while the database is
    away (its writer then spools); with ``min_size >= 1`` an unreachable database raises
    ``OSError`` or an asyncpg error here. Each host gets ``connect_timeout_seconds`` to
    answer; the hosts of a multi-host URL are tried in order (see the module docstring).
    """
    hosts = split_hosts(database_url)
    logger.info(
        "opening database pool to %s (min %d, max %d connections%s)",
        redact_url(database_url),
        min_size,
        max_size,
        f", {len(hosts)} hosts tried in order" if len(hosts) > 1 else "",
    )
    target: dict[str, Any] = (
        {"connect": connect_host_by_host(hosts, connect_timeout_seconds=connect_timeout_seconds)}
        if len(hosts) > 1
        else {"dsn": database_url, "timeout": connect_timeout_seconds}
    )
    visibility = _CitusShardVisibility()
    pool: asyncpg.Pool = await asyncpg.create_pool(
        min_size=min_size,
        max_size=max_size,
        connection_class=PooledConnection,
        command_timeout=command_timeout_seconds,
        server_settings={"application_name": application_name},
        init=visibility.init,
        reset=visibility.reset,
        **target,
    )
    return pool


async def close_pool(pool: asyncpg.Pool, *, timeout_seconds: float = 10.0) -> None:
    """Close gracefully (waiting for connections to be released), terminate on timeout.

    Shielded: cancelling the caller does not leave connections open; it waits for the
    close (bounded by ``timeout_seconds``) and then re-raises the cancellation.
    """

    async def close() -> None:
        try:
            async with asyncio.timeout(timeout_seconds):
                await pool.close()
        except TimeoutError:
            logger.warning(
                "database pool did not close within %.1f s; terminating its connections",
                timeout_seconds,
            )
            pool.terminate()

    closing = asyncio.ensure_future(close())
    try:
        await asyncio.shield(closing)
    except asyncio.CancelledError:
        # Finish the cleanup, then let the cancellation continue.
        await closing
        raise


@asynccontextmanager
async def pool_context(
    database_url: str,
    *,
    min_size: int = 1,
    max_size: int = 4,
    command_timeout_seconds: float = 30.0,
    application_name: str = "pluginmon",
    close_timeout_seconds: float = 10.0,
) -> AsyncIterator[asyncpg.Pool]:
    """``async with pool_context(url) as pool``: open, yield, and always close the pool."""
    pool = await open_pool(
        database_url,
        min_size=min_size,
        max_size=max_size,
        command_timeout_seconds=command_timeout_seconds,
        application_name=application_name,
    )
    try:
        yield pool
    finally:
        await close_pool(pool, timeout_seconds=close_timeout_seconds)
