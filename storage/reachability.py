"""Whether the database can be used, as the daemon last saw it, and if not why: one named condition, logged and exported.

Every failure to use the database is reduced to a ``reason``, a short stable word (the label
of ``pluginmon_database_error_info``, the word /readyz and the log lines show):

=====================  =========  =============================================================
reason                 permanent  from
=====================  =========  =============================================================
unreachable            no         refused/reset connections, DNS, class 08, 57 (shutting down,
                                  starting up)
timeout                no         no answer within the connect, probe or query timeout
read_only              no         25006, or no host of a multi-host URL accepts writes
server_error           no         40, 53 (resources), 55 (locks), 58 (I/O), XX (internal)
authentication_failed  yes        class 28: wrong password, no pg_hba.conf entry, no such role
database_missing       yes        3D000: the database in the URL does not exist
missing_privilege      yes        42501: the user may not connect, create or write
not_preloaded          yes        TimescaleDB installed but not in shared_preload_libraries
extension_missing      yes        backend = "timescaledb" on a server without it
extension_too_old      yes        TimescaleDB older than the migrations need
newer_schema           yes        the database was migrated by a newer pluginmon
migration_failed       yes        a migration refused (changed file, bad SQL): start-up stops
error                  yes        anything else (a malformed URL, a driver error): start-up stops
=====================  =========  =============================================================

"Permanent" means only an operator fixes it: the daemon keeps sampling, spooling and
alerting, retries with backoff and says so at a bounded rate (never once-then-silent, never
every step).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import asyncpg
import psycopg
from prometheus_client.core import GaugeMetricFamily, Metric

from pluginmon.storage.dsn import SecretScrubber
from pluginmon.storage.errors import TRANSIENT_ERRORS
from pluginmon.storage.migrate import DatabaseRefusedError, MigrationError
from pluginmon.storage.pool import redact_text

logger = logging.getLogger(__name__)

# A probe that takes longer than this counts as "unreachable" (a hung server answers nothing).
PROBE_TIMEOUT_SECONDS = 5.0
# A permanent condition is logged again at most this often (the start-up retries too).
LOG_INTERVAL_SECONDS = 60.0
# Longer server messages are cut (a multi-host URL's error lists every host).
MESSAGE_MAX_CHARS = 600


@dataclass(frozen=True, slots=True)
class Condition:
    """What a reason means to an operator."""

    reason: str
    summary: str  # starts the log line: "<summary> at start-up (<reason>) ..."
    action: str  # what the operator does
    permanent: bool


_CONDITIONS = {
    c.reason: c
    for c in (
        Condition(
            "unreachable",
            "database unreachable",
            "check that PostgreSQL runs and that database_url names its host and port",
            permanent=False,
        ),
        Condition(
            "timeout",
            "database unreachable",
            "no answer in time: check the host, the network and the server's load",
            permanent=False,
        ),
        Condition(
            "read_only",
            "database read-only",
            "point database_url at the primary, or list every host with "
            "target_session_attrs=read-write so the daemon follows a failover",
            permanent=False,
        ),
        Condition(
            "server_error",
            "database server error",
            "see the PostgreSQL server log",
            permanent=False,
        ),
        Condition(
            "authentication_failed",
            "database login refused",
            "check the user and password in database_url and the server's pg_hba.conf",
            permanent=True,
        ),
        Condition(
            "database_missing",
            "database missing",
            "create the database (createdb) or fix its name in database_url",
            permanent=True,
        ),
        Condition(
            "missing_privilege",
            "database privilege missing",
            "grant the database user what the message names (see docs/operations.md)",
            permanent=True,
        ),
        Condition(
            "not_preloaded",
            "TimescaleDB not preloaded",
            "add timescaledb to shared_preload_libraries and restart PostgreSQL, "
            'or set backend = "auto"/"postgres"',
            permanent=True,
        ),
        Condition(
            "extension_missing",
            "TimescaleDB missing",
            'install TimescaleDB or set backend = "auto"/"postgres"',
            permanent=True,
        ),
        Condition(
            "extension_too_old",
            "TimescaleDB too old",
            'update TimescaleDB or set backend = "auto"/"postgres"',
            permanent=True,
        ),
        Condition(
            "newer_schema",
            "database schema newer than this pluginmon",
            "upgrade pluginmon to the version that migrated the database",
            permanent=True,
        ),
        Condition(
            "migration_failed",
            "migration failed",
            "see the message; applied migration files must not change",
            permanent=True,
        ),
        Condition(
            "error",
            "database error",
            "see the message (a malformed database_url, a driver error)",
            permanent=True,
        ),
    )
}
REASONS = frozenset(_CONDITIONS)
# Start-up retries these; the rest (a migration refused, a bad URL, a bug) stops the daemon.
RETRIED_AT_START = REASONS - {"migration_failed", "error"}

# libpq reports a failed connection without a SQLSTATE: its (English) text says why.
_CONNECT_TEXT_REASONS: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern, re.IGNORECASE), reason)
    for pattern, reason in (
        (r"password authentication failed|authentication failed|no pg_hba\.conf entry"
         r"|role \".*\" does not exist|password is required|SCRAM|no password supplied",
         "authentication_failed"),
        (r"database \".*\" does not exist", "database_missing"),
        (r"permission denied", "missing_privilege"),
        (r"session is read-only|server is in hot standby mode|read-only", "read_only"),
        (r"timeout expired|timed out", "timeout"),
        (r"must be preloaded", "not_preloaded"),
    )
)  # fmt: skip


def condition(reason: str) -> Condition:
    return _CONDITIONS[reason]


def _sqlstate_reason(sqlstate: str) -> str | None:
    if sqlstate.startswith("28"):
        return "authentication_failed"
    if sqlstate == "3D000":
        return "database_missing"
    if sqlstate == "42501":
        return "missing_privilege"
    if sqlstate == "25006":
        return "read_only"
    if sqlstate.startswith(("08", "57")):
        return "unreachable"
    return None


def failure_reason(error: BaseException) -> str:
    """The reason word for ``error`` (asyncpg, psycopg, OSError, a MigrationError, ...),
    looking through the chain of causes."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        reason = _own_reason(current)
        if reason is not None:
            return reason
        current = current.__cause__
    if isinstance(error, MigrationError):
        return "migration_failed"
    return "error"


def _own_reason(error: BaseException) -> str | None:
    if isinstance(error, DatabaseRefusedError):
        return error.reason
    if isinstance(error, asyncpg.exceptions.TargetServerAttributeNotMatched):
        return "read_only"
    if isinstance(error, TimeoutError):
        return "timeout"
    sqlstate = getattr(error, "sqlstate", None)
    if isinstance(sqlstate, str) and sqlstate:
        reason = _sqlstate_reason(sqlstate)
        if reason is not None:
            return reason
        if sqlstate == "XX000" and "must be preloaded" in str(error):
            return "not_preloaded"
        if sqlstate.startswith(("40", "53", "55", "58", "XX")):
            return "server_error"  # conflicts, resources, locks, I/O: the server's trouble
        return None  # about the statement (42601 ...): a migration's problem, not the server's
    if isinstance(error, psycopg.OperationalError):
        text = str(error)
        for pattern, reason in _CONNECT_TEXT_REASONS:
            if pattern.search(text):
                return reason
        return "unreachable"
    if isinstance(error, OSError | asyncpg.exceptions.InterfaceError):
        return "unreachable"
    return None


def failure_message(error: BaseException) -> str:
    """The server's (or driver's) own words for ``error``, on one line, passwords redacted."""
    text = str(error).strip() or type(error).__name__
    # libpq: 'connection failed: connection to server at "h", port 5432 failed: FATAL:  <msg>'
    # keeps the server's message; a refused or silent host keeps the host and port.
    if "FATAL:" in text:
        text = text.rsplit("FATAL:", 1)[1].strip()
    text = re.sub(r"\s*\n\s*", "; ", text)
    text = re.sub(r"\s{2,}", " ", text)
    if len(text) > MESSAGE_MAX_CHARS:
        text = text[: MESSAGE_MAX_CHARS - 3] + "..."
    return redact_text(text)


@dataclass(frozen=True, slots=True)
class DatabaseFailure:
    """Why the database cannot be used now."""

    reason: str
    message: str

    @classmethod
    def of(cls, error: BaseException | None) -> DatabaseFailure:
        if error is None:
            return cls("timeout", "no answer")
        return cls(failure_reason(error), failure_message(error))

    @property
    def condition(self) -> Condition:
        return _CONDITIONS[self.reason]

    def readiness_text(self) -> str:
        """The /readyz reason: ``database <reason>: <message>``."""
        return f"database {self.reason}: {self.message}"


class LogThrottle:
    """When to say a condition again: at once when it is new (another reason), then at
    most every ``interval_seconds`` while it lasts. Pure: the clock is injected."""

    def __init__(self, *, interval_seconds: float, clock: Callable[[], float]) -> None:
        if not interval_seconds > 0:
            raise ValueError(f"interval_seconds must be positive, got {interval_seconds}")
        self._interval = interval_seconds
        self._clock = clock
        self._reason: str | None = None
        self._said_at = 0.0

    def due(self, reason: str, *, repeat: bool = True) -> bool:
        """True when ``reason`` should be logged now (and counts it as logged)."""
        now = self._clock()
        if reason == self._reason and (not repeat or now - self._said_at < self._interval):
            return False
        self._reason = reason
        self._said_at = now
        return True

    def reset(self) -> None:
        self._reason = None


class WritesToDatabase(Protocol):
    """The writer, as far as the database's state is concerned."""

    @property
    def database_available(self) -> bool: ...


class DatabaseWatch:
    """The database's state from the daemon's side: usable or not and why, schema ready or not.

    Fed by the start-up migration retries (``startup_failed``), the periodic probe, the
    readiness check and the id lookups of the sample sink. At start-up every retry step
    may log, at most every ``log_interval_seconds`` (a new reason at once); once running,
    "database unreachable" and "database recovered" are logged once per change, and a
    permanent condition (a password changed under the daemon) again every interval.
    ``up`` is None until the first answer or failure.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        writer: WritesToDatabase,
        probe_timeout_seconds: float = PROBE_TIMEOUT_SECONDS,
        log_interval_seconds: float = LOG_INTERVAL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        scrubber: SecretScrubber | None = None,
    ) -> None:
        self._pool = pool
        self._writer = writer
        # /readyz is no log line (the log filter scrubs those): its text is scrubbed here of
        # the URL's password, which a driver may echo (a raw '@' makes it part of the host).
        self._scrubber = scrubber or SecretScrubber()
        self._probe_timeout = probe_timeout_seconds
        self._clock = clock
        self.up: bool | None = None
        self.schema_ready = False
        self._startup: DatabaseFailure | None = None
        self._startup_log = LogThrottle(interval_seconds=log_interval_seconds, clock=clock)
        self._runtime: DatabaseFailure | None = None
        self._runtime_log = LogThrottle(interval_seconds=log_interval_seconds, clock=clock)
        self._down_logged = False

    @property
    def failure(self) -> DatabaseFailure | None:
        """Why the database cannot be used now, or None when it can (as far as known)."""
        if self._startup is not None:
            return self._startup
        return self._runtime if self.up is False else None

    def mark_schema_ready(self) -> None:
        """Migrations are applied: plugin ids may be looked up from now on."""
        if self._startup is not None:
            logger.info("database ready (it was: %s)", self._startup.reason)
        self._startup = None
        self.schema_ready = True

    def startup_failed(
        self, error: BaseException, *, attempt: int, retry_in_seconds: float
    ) -> DatabaseFailure:
        """A start-up attempt (migrations) failed and will be retried: remember why, and
        log it when the reason is new or the last line is ``log_interval_seconds`` old."""
        failure = DatabaseFailure.of(error)
        self._startup = failure
        if self._startup_log.due(failure.reason):
            known = failure.condition
            logger.log(
                logging.ERROR if known.permanent else logging.WARNING,
                "%s at start-up (%s), attempt %d: %s; %s; retrying in %.1f s "
                "(sampling and alerting go on, samples wait in the disk spool)",
                known.summary,
                failure.reason,
                attempt,
                failure.message,
                known.action,
                retry_in_seconds,
                extra={"reason": failure.reason, "attempt": attempt},
            )
        return failure

    def answered(self) -> None:
        if self._down_logged:
            logger.info("database recovered")
        self._down_logged = False
        self._runtime = None
        self._runtime_log.reset()
        self.up = True

    def failed(self, error: BaseException | None) -> None:
        failure = DatabaseFailure.of(error)
        was_up = self.up is not False
        self._runtime = failure
        self.up = False
        if not self.schema_ready:
            return  # start-up: migrate_until_ready's retries report it (startup_failed)
        known = failure.condition
        if known.permanent:
            # Said when new, and again every interval: only an operator ends it.
            if not self._runtime_log.due(failure.reason):
                return
            logger.error(
                "%s (%s): %s; %s; samples go to the disk spool until it is fixed",
                known.summary,
                failure.reason,
                failure.message,
                known.action,
                extra={"reason": failure.reason},
            )
        elif was_up:
            self._runtime_log.due(failure.reason)
            logger.warning(
                "%s (%s): %s; samples go to the disk spool until it returns",
                known.summary,
                failure.reason,
                failure.message,
                extra={"reason": failure.reason},
            )
        else:
            return
        self._down_logged = True

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
            # A wrong password or a missing database is not transient, but to a probe it
            # is the same answer: not usable, for the reason it names.
            asyncpg.PostgresError,
            asyncpg.exceptions.InternalClientError,
            asyncpg.InterfaceError,
            ValueError,  # a URL the driver cannot parse
            OverflowError,  # a port over 65535 reaches socket.connect (reason "error")
        ) as exc:
            self.failed(exc)
            return False
        self.answered()
        return True

    async def readiness_reasons(self) -> list[str]:
        """Why the database is not ready for the daemon (empty when it is); probes now."""
        answered = await self.probe()
        failure = self.failure
        if failure is not None:
            return [self._scrubber.scrub(failure.readiness_text())]
        if not answered:
            return ["database unreachable"]
        if not self.schema_ready:
            return ["database schema not ready yet"]
        return []

    def collect(self) -> Iterator[Metric]:
        """prometheus-client's Collector: up when the last probe or lookup answered, the
        writer is not in an outage and no start-up condition stands; the condition's reason
        as ``pluginmon_database_error_info{reason}`` 1 while one stands (no series else)."""
        up = bool(self.up) and self._writer.database_available and self._startup is None
        yield GaugeMetricFamily(
            "pluginmon_database_up",
            "1 when the database answered the last write or probe",
            value=int(up),
        )
        failure = self.failure
        if failure is not None:
            info = GaugeMetricFamily(
                "pluginmon_database_error_info",
                "1 for the reason the database cannot be used now (see docs/operations.md)",
                labels=["reason"],
            )
            info.add_metric([failure.reason], 1)
            yield info
