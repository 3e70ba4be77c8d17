"""Whether the database answers, as the daemon last saw it: logged once per change, exported as pluginmon_database_up."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Protocol

import asyncpg
from prometheus_client.core import GaugeMetricFamily, Metric

from pluginmon.storage.dsn import describe_database_error
from pluginmon.storage.errors import TRANSIENT_ERRORS

logger = logging.getLogger(__name__)

# A probe that takes longer than this counts as "unreachable" (a hung server answers nothing).
PROBE_TIMEOUT_SECONDS = 5.0


class WritesToDatabase(Protocol):
    """The writer, as far as the database's state is concerned."""

    @property
    def database_available(self) -> bool: ...


class DatabaseWatch:
    """The database's state from the daemon's side: reachable or not, schema ready or not.

    Fed by the periodic probe, the readiness check and the id lookups of the sample sink;
    "database unreachable" and "database recovered" are logged once per change, not on
    every tick. ``up`` is None until the first answer or failure.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        writer: WritesToDatabase,
        probe_timeout_seconds: float = PROBE_TIMEOUT_SECONDS,
    ) -> None:
        self._pool = pool
        self._writer = writer
        self._probe_timeout = probe_timeout_seconds
        self.up: bool | None = None
        self.schema_ready = False
        # Why the last probe failed, in fixed words (no host, user or secret): for /readyz.
        self.reason: str | None = None

    def mark_schema_ready(self) -> None:
        """Migrations are applied: plugin ids may be looked up from now on."""
        self.schema_ready = True

    def answered(self) -> None:
        if self.up is False:
            logger.info("database recovered")
        self.up = True

    def failed(self, error: BaseException | None) -> None:
        if self.up is not False:
            logger.warning(
                "database unreachable: %s; samples go to the disk spool until it returns",
                error if error is not None else "no answer",
            )
        self.up = False

    async def probe(self) -> bool:
        """``SELECT 1`` within the probe timeout; True when it answered.

        Any database error counts as "not answering" here (a refused password is a
        PostgresError, a malformed URL a ValueError): the probe reports, it never raises.
        """
        try:
            async with asyncio.timeout(self._probe_timeout):
                await self._pool.fetchval("SELECT 1")
        except (
            *TRANSIENT_ERRORS,
            asyncpg.PostgresError,
            asyncpg.InterfaceError,
            ValueError,
        ) as exc:
            self.reason = describe_database_error(exc)
            self.failed(exc)
            return False
        self.reason = None
        self.answered()
        return True

    async def readiness_reasons(self) -> list[str]:
        """Why the database is not ready for the daemon (empty when it is); probes now."""
        if not await self.probe():
            return [f"database unreachable: {self.reason or 'no answer'}"]
        if not self.schema_ready:
            return ["database schema not ready yet"]
        return []

    def collect(self) -> Iterator[Metric]:
        """prometheus-client's Collector: up when the last probe or lookup answered and the
        writer is not in an outage."""
        up = bool(self.up) and self._writer.database_available
        yield GaugeMetricFamily(
            "pluginmon_database_up",
            "1 when the database answered the last write or probe",
            value=int(up),
        )
