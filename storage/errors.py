"""Which database errors mean "not now" (keep the data, retry later), and the one backoff.

Every retry loop that talks to the database (the batch writer, the alert store and its
journal, the notification outbox, the daemon's id lookup and readiness probe) uses these two
things, so that they agree on what a failover or an outage looks like.

Transient, with the SQLSTATE class where there is one, and why:

* ``OSError``: connection refused or reset, DNS, network unreachable.
* ``TimeoutError``: a pool acquire, query or COPY over its timeout (a silent server).
* class 08 ``PostgresConnectionError``: the connection was lost mid-operation.
* ``InterfaceError``: the connection was closed under us or the pool is closing.
* ``InternalClientError`` (asyncpg, no SQLSTATE): the server ended the session (an admin
  shutdown or pg_terminate_backend) while the connection was idle, and the next statement
  reached asyncpg before it noticed the close ("cannot switch to state 11; another
  operation (2) is in progress"): one in five such statements on a local server. A daemon
  starting while the database shut down died of it.
* class 57 ``OperatorInterventionError``: admin shutdown, crash shutdown, "cannot connect
  now" while the server starts, a cancelled query.
* class 53 ``InsufficientResourcesError``: too many connections, disk full, out of memory.
* class 40 ``TransactionRollbackError``: deadlock or serialization failure; run it again.
* 25006 ``ReadOnlySQLTransactionError``: connected to a standby (after a failover, or a
  multi-host URL that reached the wrong host); a primary comes back.
* ``TargetServerAttributeNotMatched`` (asyncpg, no SQLSTATE): no host of a multi-host URL
  with ``target_session_attrs=read-write`` accepts writes, i.e. only a standby answers
  until one is promoted.
* class 58 ``PostgresSystemError``: an I/O error on the server.
* 42P01/42703 ``UndefinedTableError``/``UndefinedColumnError``: the schema is not migrated
  yet (another daemon or ``pluginmon migrate`` is on it).
* 42501 ``InsufficientPrivilegeError``: grants being fixed; the data is kept meanwhile.

The admin plane (maintenance, migrations: psycopg) fails the same ways; ``psycopg``'s
``OperationalError`` covers its classes 08, 53, 57 and 58 and its ``TransactionRollback``,
and 25006 is named on its own.

Anything else (a constraint violation, a value a column refuses) is about the data, not the
database: callers isolate or report it and never retry it in silence.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from typing import Final

import asyncpg
import psycopg

TRANSIENT_ERRORS: Final[tuple[type[BaseException], ...]] = (
    OSError,
    TimeoutError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.TransactionRollbackError,
    asyncpg.exceptions.ReadOnlySQLTransactionError,
    asyncpg.exceptions.TargetServerAttributeNotMatched,
    asyncpg.exceptions.PostgresSystemError,
    asyncpg.exceptions.UndefinedTableError,
    asyncpg.exceptions.UndefinedColumnError,
    asyncpg.exceptions.InsufficientPrivilegeError,
)


ADMIN_TRANSIENT_ERRORS: Final[tuple[type[BaseException], ...]] = (
    psycopg.OperationalError,
    psycopg.errors.ReadOnlySqlTransaction,
    psycopg.errors.UndefinedTable,
    psycopg.errors.UndefinedColumn,
    psycopg.errors.InsufficientPrivilege,
)


def is_transient(exc: BaseException) -> bool:
    """True when ``exc`` says the database cannot take the work now (see the module doc),
    from either driver."""
    return isinstance(exc, TRANSIENT_ERRORS + ADMIN_TRANSIENT_ERRORS)


def backoff_seconds(
    attempt: int,
    *,
    initial_seconds: float,
    max_seconds: float,
    random_fraction: Callable[[], float] = random.random,
) -> float:
    """Capped exponential backoff with equal jitter, for retry ``attempt`` (0 = the first).

    The ceiling doubles from ``initial_seconds`` per attempt up to ``max_seconds``; the delay
    is a random point in the upper half of it, so many daemons that lost the same database
    do not come back in step, and no delay is ever shorter than half the ceiling.
    """
    if attempt < 0:
        raise ValueError("attempt must be >= 0")
    # 2**attempt overflows a float past ~1024 attempts; the cap is reached long before.
    ceiling = min(max_seconds, initial_seconds * 2.0 ** min(attempt, 64))
    return ceiling * (0.5 + random_fraction() / 2.0)


# A Citus worker's error names the shard's constraint ("plugins_tenant_name_key_102043", the
# shard id appended; shard ids start at 102008) and the coordinator passes the message on
# without the constraint-name field.
_CONSTRAINT_IN_MESSAGE = re.compile(r'constraint "([^"]+)"')
_SHARD_SUFFIX = re.compile(r"_\d{6,}$")


def constraint_name(exc: asyncpg.PostgresError | psycopg.Error) -> str | None:
    """The name of the constraint ``exc`` (either driver's) reports, as the schema spells it:
    the error's own field, else (Citus) the one its message quotes without the shard suffix."""
    if isinstance(exc, psycopg.Error):
        named, message = exc.diag.constraint_name, exc.diag.message_primary
    else:
        named, message = getattr(exc, "constraint_name", None), getattr(exc, "message", None)
    if named:
        return str(named)
    found = _CONSTRAINT_IN_MESSAGE.search(str(message or ""))
    return None if found is None else _SHARD_SUFFIX.sub("", found.group(1))


def refused_where(exc: asyncpg.PostgresError) -> str:
    """What an integrity error without a constraint name says about where it happened: its
    SQLSTATE, table and column (names from the schema, never the values in its message)."""
    parts = [f"sqlstate {exc.sqlstate}"]
    table = getattr(exc, "table_name", None)
    column = getattr(exc, "column_name", None)
    if table:
        parts.append(f"table {table}")
    if column:
        parts.append(f"column {column}")
    return ", ".join(parts)
