"""The data-plane asyncpg pool: opening, graceful-then-forced closing, and URL redaction.

A URL may name several hosts (``postgresql://u@db1:5432,db2:5432/pluginmon?
target_session_attrs=read-write``): asyncpg (this pool) and libpq (psycopg, the admin plane)
both try them in order and take the first that matches ``target_session_attrs``, so a
daemon follows a failover to the promoted standby on its next connection.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg

logger = logging.getLogger(__name__)

REDACTED = "***"

# libpq keyword/value DSNs ("host=db password=secret") have no URL structure to parse.
_KEYWORD_PASSWORD_RE = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)
# user:password@ inside any URL-looking text (a driver's message may echo the DSN).
_URL_PASSWORD_RE = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s:@]*:)[^@\s/]*@")


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***``, safe to log.

    Handles ``postgresql://user:secret@host/db``, ``?password=secret`` query parameters and
    keyword/value DSNs (``host=db password=secret``). Anything unparsable is redacted whole
    rather than risk leaking it.
    """
    if "://" not in url:
        return _KEYWORD_PASSWORD_RE.sub(lambda m: m.group(1) + REDACTED, url)
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, hostinfo = netloc.rpartition("@")
            if ":" in userinfo:
                user = userinfo.split(":", 1)[0]
                netloc = f"{user}:{REDACTED}@{hostinfo}"
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            if any(key.lower() == "password" for key, _ in pairs):
                query = urlencode(
                    [(k, REDACTED if k.lower() == "password" else v) for k, v in pairs],
                    safe="*",
                )
        return urlunsplit(parts._replace(netloc=netloc, query=query))
    except ValueError:
        return "<unparsable database URL>"


def redact_text(text: str) -> str:
    """Free text (an error message) with URL passwords and ``password=`` values replaced."""
    text = _URL_PASSWORD_RE.sub(lambda m: m.group("head") + REDACTED + "@", text)
    return _KEYWORD_PASSWORD_RE.sub(lambda m: m.group(1) + REDACTED, text)


async def open_pool(
    database_url: str,
    *,
    min_size: int = 1,
    max_size: int = 4,
    command_timeout_seconds: float = 30.0,
    application_name: str = "pluginmon",
) -> asyncpg.Pool:
    """Open an asyncpg pool; close it with :func:`close_pool` (or use :func:`pool_context`).

    ``min_size=0`` opens without connecting, so a daemon can start while the database is
    away (its writer then spools); with ``min_size >= 1`` an unreachable database raises
    ``OSError`` or an asyncpg error here.
    """
    logger.info(
        "opening database pool to %s (min %d, max %d connections)",
        redact_url(database_url),
        min_size,
        max_size,
    )
    pool: asyncpg.Pool = await asyncpg.create_pool(
        dsn=database_url,
        min_size=min_size,
        max_size=max_size,
        command_timeout=command_timeout_seconds,
        server_settings={"application_name": application_name},
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
