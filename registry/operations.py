"""Operations in the database: create (behind an approval when a policy says so), read, move
through the lifecycle (registry.lifecycle decides), and the daemon's deadline sweep.

Each change locks the operation row (FOR UPDATE), applies the pure transition, writes the new
state and appends one audit entry, all in the caller's transaction. Succeeded operations move
the plugin's per-environment state (an install or update sets the version).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

import asyncpg

from pluginmon.registry import audit, plugins
from pluginmon.registry.actor import DAEMON, Actor
from pluginmon.registry.errors import ConflictError, InvalidError, NotFoundError
from pluginmon.registry.lifecycle import (
    OPERATION_TYPES,
    IllegalTransitionError,
    OperationState,
    RetryPolicy,
    Status,
    TooEarlyError,
    deadline_exceeded,
    initial_status,
    overdue,
    transition,
)
from pluginmon.registry.policies import ApprovalPolicy, requirement
from pluginmon.storage.queries import where_given

MAX_RETRY_LIMIT = 100
MAX_DEADLINE_SECONDS = 30 * 86_400
DEFAULT_DEADLINE_SECONDS = 3_600
MAX_ERROR_CHARS = 4_000


@dataclass(frozen=True, slots=True)
class Operation:
    id: int
    tenant_id: str
    plugin_id: int
    plugin: str
    type: str
    environment: str
    version: str | None
    requested_by: str | None
    requested_by_token_id: int | None
    approval_id: int | None
    state: OperationState
    details: dict[str, Any]
    created_at: datetime
    updated_at: datetime

    @property
    def status(self) -> Status:
        return self.state.status

    def snapshot(self) -> dict[str, Any]:
        s = self.state
        return {
            "status": s.status.value,
            "retry_count": s.retry_count,
            "not_before": s.not_before,
            "error": s.error,
            "status_reason": s.status_reason,
            "duration_ms": s.duration_ms,
        }


_SELECT = """
SELECT o.id, o.tenant_id, o.plugin_id, p.name AS plugin, o.operation_type, o.environment,
       o.target_version, o.user_id, o.requested_by_token_id, o.status, o.retry_count,
       o.retry_limit, o.started_at, o.finished_at, o.duration_ms, o.deadline_seconds,
       o.deadline_at, o.not_before, o.error, o.status_reason, o.details::text AS details,
       o.created_at, o.updated_at,
       (SELECT a.id FROM plugin_approvals a
         WHERE a.operation_id = o.id AND a.tenant_id = o.tenant_id) AS approval_id
  FROM plugin_operations o JOIN plugins p ON p.id = o.plugin_id AND p.tenant_id = o.tenant_id
"""

# The same, for one tenant ($2): Citus routes a correlated subquery (and so the locking read
# around it) to one shard group only when the subquery's own tenant filter is the parameter.
_SELECT_OF_TENANT = _SELECT.replace("a.tenant_id = o.tenant_id", "a.tenant_id = $2")

# The statuses of idx_plugin_operations_open (sql/123), as SQL text of constants: every status
# that is not terminal ('retrying' is the seed's, never written here).
_OPEN_SQL: Final = "'pending', 'awaiting_approval', 'running', 'retrying'"


def _operation(row: asyncpg.Record) -> Operation:
    return Operation(
        id=row["id"],
        tenant_id=row["tenant_id"],
        plugin_id=row["plugin_id"],
        plugin=row["plugin"],
        type=row["operation_type"],
        environment=row["environment"],
        version=row["target_version"],
        requested_by=row["user_id"],
        requested_by_token_id=row["requested_by_token_id"],
        approval_id=row["approval_id"],
        state=OperationState(
            # 'retrying' is the seed's; nothing here writes it, a pending row is its equivalent
            status=Status.PENDING if row["status"] == "retrying" else Status(row["status"]),
            retry_count=row["retry_count"],
            retry_limit=row["retry_limit"],
            started_at=row["started_at"],
            finished_at=row["finished_at"],
            duration_ms=row["duration_ms"],
            deadline_seconds=row["deadline_seconds"],
            deadline_at=row["deadline_at"],
            not_before=row["not_before"],
            error=row["error"],
            status_reason=row["status_reason"],
        ),
        details=json.loads(row["details"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


async def get_operation(
    conn: asyncpg.Connection,
    operation_id: int,
    *,
    for_update: bool = False,
    tenant_id: str | None = None,
) -> Operation:
    """The operation ``operation_id`` visible to the transaction. ``tenant_id`` (its tenant)
    adds an explicit filter, which a locking read (``for_update``) needs: Citus runs
    ``FOR UPDATE`` only in a query routed to one shard group by it."""
    if tenant_id is None:
        if for_update:
            raise ValueError("a locking read of an operation needs its tenant_id")
        row = await conn.fetchrow(_SELECT + " WHERE o.id = $1", operation_id)
    else:
        row = await conn.fetchrow(
            _SELECT_OF_TENANT
            + " WHERE o.id = $1 AND o.tenant_id = $2"
            + (" FOR UPDATE OF o" if for_update else ""),
            operation_id,
            tenant_id,
        )
    if row is None:
        raise NotFoundError(f"no operation {operation_id}", field="id")
    return _operation(row)


async def list_operations(
    conn: asyncpg.Connection,
    *,
    plugin: str | None = None,
    status: str | None = None,
    environment: str | None = None,
    operation_type: str | None = None,
    limit: int = 100,
) -> list[Operation]:
    if status is not None and status not in {s.value for s in Status}:
        raise InvalidError(
            f"status must be one of {', '.join(s.value for s in Status)}", field="status"
        )
    # Only the filters given (storage.queries.where_given): with "($2 IS NULL OR o.status
    # = $2)" listing the few pending operations read every operation of the tenant
    # (bench/api.py: 1,800 pages a call after a minute of load, growing with the history).
    # An open status also names the partial index's predicate (sql/123), so the generic plan
    # can prove it and use it.
    where, args = where_given(
        (
            ("p.name = {}", plugin),
            ("o.status = {}", status),
            ("o.environment = {}", environment),
            ("o.operation_type = {}", operation_type),
        ),
        also=[f"o.status IN ({_OPEN_SQL})"] if status and not Status(status).terminal else [],
        args=[limit],
    )
    rows = await conn.fetch(_SELECT + f"{where} ORDER BY o.id DESC LIMIT $1", *args)
    return [_operation(r) for r in rows]


def _check_new(
    operation_type: str, retry_limit: int, deadline_seconds: int, environment: str
) -> None:
    if operation_type not in OPERATION_TYPES:
        raise InvalidError(f"type must be one of {', '.join(OPERATION_TYPES)}", field="type")
    if not 0 <= retry_limit <= MAX_RETRY_LIMIT:
        raise InvalidError(f"retry_limit must be 0..{MAX_RETRY_LIMIT}", field="retry_limit")
    if not 1 <= deadline_seconds <= MAX_DEADLINE_SECONDS:
        raise InvalidError(
            f"deadline_seconds must be 1..{MAX_DEADLINE_SECONDS}", field="deadline_seconds"
        )
    plugins.check_environment(environment)


async def create_operation(
    conn: asyncpg.Connection,
    *,
    tenant_id: str,
    actor: Actor,
    now: datetime,
    plugin_name: str,
    operation_type: str,
    environment: str,
    policies: Sequence[ApprovalPolicy],
    retry_limit: int = 3,
    deadline_seconds: int = DEFAULT_DEADLINE_SECONDS,
    version: str | None = None,
    details: Mapping[str, Any] | None = None,
) -> Operation:
    """Record an operation: ``pending``, or ``awaiting_approval`` with its approval request
    when a policy names its type and environment. Audited (one entry, the approval in it)."""
    _check_new(operation_type, retry_limit, deadline_seconds, environment)
    needs = requirement(policies, operation_type, environment)
    status = initial_status(needs_approval=needs is not None)
    stored_details = audit.redact(dict(details or {}))
    # The plugin is looked up by name in the insert itself (one round trip): no row
    # inserted means no such plugin for this tenant.
    inserted = await conn.fetchrow(
        """INSERT INTO plugin_operations (tenant_id, plugin_id, environment, operation_type, status,
                                          retry_limit, user_id, requested_by_token_id,
                                          target_version, deadline_seconds, details, started_at,
                                          created_at, updated_at)
           SELECT $1, p.id, $3, $4, $5, $6, $7, $8, $9, $10, $11::jsonb, $12, $12, $12
             FROM plugins p WHERE p.name = $2
           RETURNING id, plugin_id""",
        tenant_id,
        plugin_name,
        environment,
        operation_type,
        status.value,
        retry_limit,
        actor.name,
        actor.token_id,
        version,
        deadline_seconds,
        json.dumps(stored_details),
        now,
    )
    if inserted is None:
        raise NotFoundError(f"no plugin named {plugin_name!r}", field="name")
    operation_id, plugin_id = int(inserted["id"]), int(inserted["plugin_id"])
    approval_id: int | None = None
    if needs is not None:
        # request_type: the operation type (030 widened the CHECK to every type).
        approval_id = await conn.fetchval(
            """INSERT INTO plugin_approvals (tenant_id, plugin_id, environment, request_type,
                                             requested_version, requested_by,
                                             requested_by_token_id, requested_at, expires_at,
                                             operation_id, required_approvals)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) RETURNING id""",
            tenant_id,
            plugin_id,
            environment,
            operation_type,
            version,
            actor.name,
            actor.token_id,
            now,
            now + timedelta(seconds=needs.expires_after_seconds),
            operation_id,
            needs.required_approvals,
        )
    # Built from what was just written: one query fewer per request than reading it back.
    operation = Operation(
        id=operation_id,
        tenant_id=tenant_id,
        plugin_id=plugin_id,
        plugin=plugin_name,
        type=operation_type,
        environment=environment,
        version=version,
        requested_by=actor.name,
        requested_by_token_id=actor.token_id,
        approval_id=approval_id,
        state=OperationState(
            status=status,
            retry_count=0,
            retry_limit=retry_limit,
            started_at=now,
            deadline_seconds=deadline_seconds,
        ),
        details=stored_details,
        created_at=now,
        updated_at=now,
    )
    await audit.append(
        conn,
        tenant_id=tenant_id,
        actor=actor,
        action="operation.create",
        entity_type="operation",
        entity_id=str(operation_id),
        plugin_id=plugin_id,
        plugin_name=plugin_name,
        environment=environment,
        occurred_at=now,
        after={
            **operation.snapshot(),
            "type": operation_type,
            "version": version,
            "retry_limit": retry_limit,
            "deadline_seconds": deadline_seconds,
            "approval_id": approval_id,
            "required_approvals": None if needs is None else needs.required_approvals,
        },
    )
    return operation


async def save_state(
    conn: asyncpg.Connection,
    before: Operation,
    after: OperationState,
    *,
    actor: Actor,
    now: datetime,
    action: str = "operation.transition",
    audited: bool = True,
) -> Operation:
    """Write ``after`` over ``before`` (locked by the caller), apply a success's effect on the
    plugin's environment state, and audit the change (``audited=False``: the caller's own
    entry records it, as an approval decision does).

    The side effects come first and the operation's own row last, in the same statement as
    its audit entry (one round trip); nothing in them reads the operation's row."""
    if after.status is Status.SUCCEEDED:
        await _apply_success(conn, before, now=now)
    if before.status is Status.AWAITING_APPROVAL and after.status is Status.CANCELLED:
        # Withdrawn by a client: the request no longer waits for anyone. (An expiry or a
        # rejection has already set the approval's own status; this matches nothing then.)
        await conn.execute(
            """UPDATE plugin_approvals SET status = 'cancelled', reason = $2
                WHERE operation_id = $1 AND status = 'pending' AND tenant_id = $3""",
            before.id,
            after.status_reason,
            before.tenant_id,
        )
    update = audit.Write(
        """UPDATE plugin_operations
              SET status = $2, retry_count = $3, started_at = $4, finished_at = $5,
                  duration_ms = $6, deadline_at = $7, not_before = $8, error = $9,
                  status_reason = $10, updated_at = $11
            WHERE id = $1 AND tenant_id = $12""",
        (
            before.id,
            after.status.value,
            after.retry_count,
            after.started_at,
            after.finished_at,
            after.duration_ms,
            after.deadline_at,
            after.not_before,
            after.error,
            after.status_reason,
            now,
            before.tenant_id,
        ),
    )
    operation = dataclasses.replace(before, state=after, updated_at=now)
    if not audited:
        await conn.execute(update.sql, *update.args)
        return operation
    await audit.append(
        conn,
        write=update,
        tenant_id=before.tenant_id,
        actor=actor,
        action=action,
        entity_type="operation",
        entity_id=str(before.id),
        plugin_id=before.plugin_id,
        plugin_name=before.plugin,
        environment=before.environment,
        occurred_at=now,
        before=before.snapshot(),
        after=operation.snapshot(),
    )
    return operation


# What a succeeded operation does to the plugin's state in its environment.
_SUCCESS_EFFECTS: dict[str, dict[str, Any]] = {
    "install": {"status": "installed", "enabled": True},
    "update": {"status": "installed"},
    "rollback": {"status": "installed"},
    "restore": {"status": "installed"},
    "uninstall": {"status": "uninstalled", "enabled": False},
    "enable": {"enabled": True},
    "disable": {"enabled": False},
}


def _success_effect(operation: Operation) -> dict[str, Any]:
    effect = dict(_SUCCESS_EFFECTS.get(operation.type, {}))
    if operation.version is not None and operation.type in {"install", "update", "rollback"}:
        effect["version"] = operation.version
    return effect


def changed_plugin_state(operation: Operation) -> bool:
    """Whether the transition that left ``operation`` as it is wrote its plugin's state in
    its environment (a success with an effect): any other transition moves no dependency
    result (registry.dependencies reads versions, statuses and enabled flags only)."""
    return operation.status is Status.SUCCEEDED and bool(_success_effect(operation))


async def _apply_success(conn: asyncpg.Connection, operation: Operation, *, now: datetime) -> None:
    effect = _success_effect(operation)
    if not effect:
        return
    plugin = await plugins.get_plugin_by_id(conn, operation.plugin_id)
    await plugins.upsert_environment(
        conn,
        plugin,
        operation.environment,
        tenant_id=operation.tenant_id,
        now=now,
        changes=effect,
    )


async def change_status(
    conn: asyncpg.Connection,
    operation_id: int,
    *,
    tenant_id: str,
    actor: Actor,
    now: datetime,
    status: str,
    retry: RetryPolicy,
    error: str | None = None,
) -> Operation:
    """A client's transition (PATCH): running, succeeded, failed or cancelled, of an
    operation of ``tenant_id`` (the request's tenant)."""
    try:
        requested = Status(status)
    except ValueError:
        raise InvalidError(
            f"status must be one of {', '.join(s.value for s in Status)}", field="status"
        ) from None
    if error is not None and len(error) > MAX_ERROR_CHARS:
        raise InvalidError(f"error must be at most {MAX_ERROR_CHARS} characters", field="error")
    before = await get_operation(conn, operation_id, for_update=True, tenant_id=tenant_id)
    try:
        after = transition(before.state, requested, now=now, retry=retry, error=error)
    except IllegalTransitionError as exc:
        raise ConflictError(
            f"operation {operation_id} cannot go from {exc.current.value} to {exc.requested.value}",
            field="status",
            code="illegal_transition",
        ) from None
    except TooEarlyError as exc:
        raise ConflictError(
            f"operation {operation_id} is waiting for its retry backoff until "
            f"{exc.not_before.isoformat()}",
            field="status",
            code="retry_backoff",
        ) from None
    return await save_state(conn, before, after, actor=actor, now=now)


async def fail_overdue(
    conn: asyncpg.Connection, *, now: datetime, actor: Actor = DAEMON, limit: int = 1000
) -> list[Operation]:
    """Fail every started operation past its deadline (reason ``deadline_exceeded``).

    Run by the daemon's maintenance under its advisory lock, on a connection that sees every
    tenant; SKIP LOCKED leaves an operation a request is changing right now to the next run.
    """
    # Tenant by tenant: Citus locks rows only within one shard group (the same rows, in
    # a few more statements, on the other backends). The tenants are read without a lock.
    tenants = await conn.fetch(
        """SELECT DISTINCT tenant_id FROM plugin_operations
            WHERE status IN ('pending', 'running') AND deadline_at <= $1""",
        now,
    )
    failed: list[Operation] = []
    remaining = limit
    for tenant in sorted(t["tenant_id"] for t in tenants):
        if remaining <= 0:
            break
        ids = await conn.fetch(
            """SELECT id FROM plugin_operations
                WHERE status IN ('pending', 'running') AND deadline_at <= $1 AND tenant_id = $3
                ORDER BY deadline_at LIMIT $2 FOR UPDATE SKIP LOCKED""",
            now,
            remaining,
            tenant,
        )
        remaining -= len(ids)
        for row in ids:
            before = await get_operation(conn, row["id"], tenant_id=tenant)
            if not overdue(before.state, now):
                continue
            after = deadline_exceeded(before.state, now=now)
            failed.append(
                await save_state(
                    conn, before, after, actor=actor, now=now, action="operation.deadline_exceeded"
                )
            )
    return failed
