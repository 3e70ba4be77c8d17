"""The data-plane asyncpg pool: opening (logged without the password), graceful-then-forced closing."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg

from pluginmon.storage.dsn import redacted_dsn

logger = logging.getLogger(__name__)

# Kept under its old name for callers and tests; the parser lives in storage.dsn.
redact_url = redacted_dsn


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
        redacted_dsn(database_url),
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
