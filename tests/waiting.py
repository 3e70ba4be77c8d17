"""Polling that fails loudly: wait for a condition, return what satisfied it, or raise naming it.

A poll that simply stops after its time is up lets the test go on to assertions about a state
that was never reached (or, worse, pass on a stale one). This helper raises AssertionError
with ``what`` and the last value seen instead, so a timeout reads as the failure it is (the
synchronous twin is ``tests.daemon_helpers.wait_for``).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import TypeVar, overload

T = TypeVar("T")


@overload
async def wait_until(
    probe: Callable[[], Awaitable[T | None]],
    *,
    timeout_seconds: float,
    what: str,
    interval_seconds: float = ...,
) -> T: ...


@overload
async def wait_until(
    probe: Callable[[], T | None],
    *,
    timeout_seconds: float,
    what: str,
    interval_seconds: float = ...,
) -> T: ...


async def wait_until(
    probe: Callable[[], Awaitable[T | None]] | Callable[[], T | None],
    *,
    timeout_seconds: float,
    what: str,
    interval_seconds: float = 0.02,
) -> T:
    """Call ``probe`` (sync or async) until it returns something truthy and return that.

    Raises AssertionError naming ``what`` and the last value when ``timeout_seconds`` pass.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_seconds
    while True:
        result = probe()
        value = await result if inspect.isawaitable(result) else result
        if value:
            return value
        if loop.time() >= deadline:
            raise AssertionError(
                f"timed out after {timeout_seconds:g} s waiting for {what} (last: {value!r})"
            )
        await asyncio.sleep(interval_seconds)
