"""Approvals: the four-eyes gate in front of operations that a policy names.

An operation a policy names is created ``awaiting_approval`` with one plugin_approvals row
(registry.operations). Decisions come from tokens: identity is the token, never a free-text
name, so the requester's token can never decide its own request (checked here and by a
trigger), and each token decides once. ``required_approvals`` distinct approvals release the
operation to ``pending``; one rejection rejects it and cancels the operation; a request still
pending at ``expires_at`` expires and its operation is cancelled with reason
``approval_expired``. Each decision or expiry is one audit entry that carries the operation's
new state too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

import asyncpg

from pluginmon.registry import audit, operations
from pluginmon.registry.actor import DAEMON, Actor
from pluginmon.registry.errors import ConflictError, ForbiddenError, InvalidError, NotFoundError
from pluginmon.registry.lifecycle import (
    REASON_APPROVAL_EXPIRED,
    REASON_APPROVAL_REJECTED,
    approved,
    cancelled_by_approval,
)
from pluginmon.storage.queries import where_given

MAX_COMMENT_CHARS = 2_000


class ApprovalStatus(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    REJECTED = "rejected"
    EXPIRED = "expired"
    CANCELLED = "cancelled"


class Decision(StrEnum):
    APPROVED = "approved"
    REJECTED = "rejected"


@dataclass(frozen=True, slots=True)
class DecisionRecord:
    decided_by: str
    decision: Decision
    comment: str
    decided_at: datetime


@dataclass(frozen=True, slots=True)
class Approval:
    id: int
    tenant_id: str
    operation_id: int | None
    plugin: str
    environment: str
    request_type: str
    requested_version: str | None
    status: ApprovalStatus
    requested_by: str
    requested_by_token_id: int | None
    requested_at: datetime
    expires_at: datetime | None
    required_approvals: int
    decided_by: str | None
    decided_at: datetime | None
    reason: str | None
    decisions: tuple[DecisionRecord, ...]

    @property
    def approvals(self) -> int:
        return sum(1 for d in self.decisions if d.decision is Decision.APPROVED)


_SELECT = """
SELECT a.id, a.tenant_id, a.operation_id, p.name AS plugin, a.environment, a.request_type,
       a.requested_version, a.status, a.requested_by, a.requested_by_token_id, a.requested_at,
       a.expires_at, a.required_approvals, a.decided_by, a.decided_at, a.reason,
       coalesce((SELECT json_agg(json_build_object(
                     'decided_by', d.decided_by, 'decision', d.decision, 'comment', d.comment,
                     'decided_at', d.decided_at) ORDER BY d.id)
                   FROM plugin_approval_decisions d
                  WHERE d.approval_id = a.id AND d.tenant_id = a.tenant_id), '[]')::text
           AS decisions
  FROM plugin_approvals a JOIN plugins p ON p.id = a.plugin_id AND p.tenant_id = a.tenant_id
"""

# The same, for one tenant ($2): Citus routes a correlated subquery (and so the locking read
# around it) to one shard group only when the subquery's own tenant filter is the parameter.
_SELECT_OF_TENANT = _SELECT.replace("d.tenant_id = a.tenant_id", "d.tenant_id = $2")


def _approval(row: asyncpg.Record) -> Approval:
    return Approval(
        id=row["id"],
        tenant_id=row["tenant_id"],
        operation_id=row["operation_id"],
        plugin=row["plugin"],
        environment=row["environment"],
        request_type=row["request_type"],
        requested_version=row["requested_version"],
        status=ApprovalStatus(row["status"]),
        requested_by=row["requested_by"],
        requested_by_token_id=row["requested_by_token_id"],
        requested_at=row["requested_at"],
        expires_at=row["expires_at"],
        required_approvals=row["required_approvals"],
        decided_by=row["decided_by"],
        decided_at=row["decided_at"],
        reason=row["reason"],
        decisions=tuple(
            DecisionRecord(
                decided_by=d["decided_by"],
                decision=Decision(d["decision"]),
                comment=d["comment"],
                decided_at=datetime.fromisoformat(d["decided_at"]),
            )
            for d in json.loads(row["decisions"])
        ),
    )


async def get_approval(
    conn: asyncpg.Connection,
    approval_id: int,
    *,
    for_update: bool = False,
    tenant_id: str | None = None,
) -> Approval:
    """The approval ``approval_id`` visible to the transaction. ``tenant_id`` (its tenant)
    adds an explicit filter, which a locking read (``for_update``) needs: Citus runs
    ``FOR UPDATE`` only in a query routed to one shard group by it."""
    if tenant_id is None:
        if for_update:
            raise ValueError("a locking read of an approval needs its tenant_id")
        row = await conn.fetchrow(_SELECT + " WHERE a.id = $1", approval_id)
    else:
        row = await conn.fetchrow(
            _SELECT_OF_TENANT
            + " WHERE a.id = $1 AND a.tenant_id = $2"
            + (" FOR UPDATE OF a" if for_update else ""),
            approval_id,
            tenant_id,
        )
    if row is None:
        raise NotFoundError(f"no approval {approval_id}", field="id")
    return _approval(row)


async def list_approvals(
    conn: asyncpg.Connection, *, status: str | None = None, limit: int = 100
) -> list[Approval]:
    if status is not None and status not in {s.value for s in ApprovalStatus}:
        raise InvalidError(
            f"status must be one of {', '.join(s.value for s in ApprovalStatus)}", field="status"
        )
    # Only the filter given (storage.queries.where_given); pending also names the partial
    # index's predicate, so a generic plan reads the pending few, not every decided approval.
    where, args = where_given(
        (("a.status = {}", status),),
        also=["a.status = 'pending'"] if status == ApprovalStatus.PENDING else [],
        args=[limit],
    )
    rows = await conn.fetch(_SELECT + f"{where} ORDER BY a.id DESC LIMIT $1", *args)
    return [_approval(r) for r in rows]


def _summary(approval: Approval) -> dict[str, object]:
    return {
        "status": approval.status.value,
        "approvals": approval.approvals,
        "required_approvals": approval.required_approvals,
    }


async def decide(
    conn: asyncpg.Connection,
    approval_id: int,
    *,
    tenant_id: str,
    actor: Actor,
    now: datetime,
    decision: str,
    comment: str = "",
) -> Approval:
    """Record ``actor``'s decision on an approval of ``tenant_id`` (the request's tenant);
    approve (enough distinct approvers) or reject the request."""
    try:
        verdict = Decision(decision)
    except ValueError:
        raise InvalidError("decision must be approved or rejected", field="decision") from None
    if len(comment) > MAX_COMMENT_CHARS:
        raise InvalidError(
            f"comment must be at most {MAX_COMMENT_CHARS} characters", field="comment"
        )
    if actor.token_id is None:
        raise ForbiddenError("only a token can decide an approval", field="decision")
    before = await get_approval(conn, approval_id, for_update=True, tenant_id=tenant_id)
    if before.status is not ApprovalStatus.PENDING:
        raise ConflictError(
            f"approval {approval_id} is {before.status.value}, not pending",
            field="decision",
            code="not_pending",
        )
    if before.expires_at is not None and now >= before.expires_at:
        raise ConflictError(
            f"approval {approval_id} expired at {before.expires_at.isoformat()}",
            field="decision",
            code="approval_expired",
        )
    if actor.token_id == before.requested_by_token_id or actor.name == before.requested_by:
        raise ForbiddenError(
            f"approval {approval_id} was requested by this token; another identity must decide",
            field="decision",
            code="self_approval",
        )
    try:
        await conn.execute(
            """INSERT INTO plugin_approval_decisions (tenant_id, approval_id, decision, decided_by,
                                                      decided_by_token_id, comment, decided_at)
               VALUES ($1, $2, $3, $4, $5, $6, $7)""",
            before.tenant_id,
            approval_id,
            verdict.value,
            actor.name,
            actor.token_id,
            comment,
            now,
        )
    except asyncpg.UniqueViolationError:
        raise ConflictError(
            f"this token has already decided approval {approval_id}",
            field="decision",
            code="already_decided",
        ) from None
    approvals = before.approvals + (1 if verdict is Decision.APPROVED else 0)
    new_status: ApprovalStatus | None = None
    if verdict is Decision.REJECTED:
        new_status = ApprovalStatus.REJECTED
    elif approvals >= before.required_approvals:
        new_status = ApprovalStatus.APPROVED
    operation_after: dict[str, object] | None = None
    if new_status is not None:
        await conn.execute(
            """UPDATE plugin_approvals SET status = $2, decided_by = $3, decided_at = $4, reason = $5
                WHERE id = $1 AND tenant_id = $6""",
            approval_id,
            new_status.value,
            actor.name,
            now,
            comment or None,
            tenant_id,
        )
        if before.operation_id is not None:
            operation = await operations.get_operation(
                conn, before.operation_id, for_update=True, tenant_id=before.tenant_id
            )
            if new_status is ApprovalStatus.APPROVED:
                state = approved(operation.state)
            else:
                state = cancelled_by_approval(
                    operation.state, now=now, reason=REASON_APPROVAL_REJECTED
                )
            moved = await operations.save_state(
                conn, operation, state, actor=actor, now=now, audited=False
            )
            operation_after = moved.snapshot()
    after = await get_approval(conn, approval_id, tenant_id=tenant_id)
    await audit.append(
        conn,
        tenant_id=before.tenant_id,
        actor=actor,
        action="approval.decide",
        entity_type="approval",
        entity_id=str(approval_id),
        plugin_name=before.plugin,
        environment=before.environment,
        occurred_at=now,
        before=_summary(before),
        after=_summary(after),
        details={
            "decision": verdict.value,
            "comment": comment,
            "operation_id": before.operation_id,
            "operation": operation_after,
        },
    )
    return after


async def expire_due(
    conn: asyncpg.Connection,
    *,
    now: datetime,
    actor: Actor = DAEMON,
    limit: int = 1000,
    tenant_id: str | None = None,
) -> list[Approval]:
    """Expire pending requests past ``expires_at`` and cancel their operations
    (reason ``approval_expired``): those of ``tenant_id`` (an API request's), or of every
    tenant the connection sees (the daemon's). Rows a request holds right now are left to
    the next run."""
    if tenant_id is not None:
        tenants = [tenant_id]
    else:
        # Tenant by tenant: Citus locks rows only within one shard group (the same rows, in
        # a few more statements, on the other backends). The tenants are read without a lock.
        found = await conn.fetch(
            """SELECT DISTINCT tenant_id FROM plugin_approvals
                WHERE status = 'pending' AND expires_at <= $1""",
            now,
        )
        tenants = sorted(r["tenant_id"] for r in found)
    expired: list[Approval] = []
    remaining = limit
    for tenant in tenants:
        if remaining <= 0:
            break
        rows = await conn.fetch(
            """SELECT id FROM plugin_approvals
                WHERE status = 'pending' AND expires_at <= $1 AND tenant_id = $3
                ORDER BY expires_at LIMIT $2 FOR UPDATE SKIP LOCKED""",
            now,
            remaining,
            tenant,
        )
        remaining -= len(rows)
        for row in rows:
            expired.append(await _expire(conn, row["id"], tenant_id=tenant, actor=actor, now=now))
    return expired


async def _expire(
    conn: asyncpg.Connection, approval_id: int, *, tenant_id: str, actor: Actor, now: datetime
) -> Approval:
    """Expire one pending approval (locked by the caller) and cancel its operation."""
    before = await get_approval(conn, approval_id, tenant_id=tenant_id)
    await conn.execute(
        "UPDATE plugin_approvals SET status = 'expired', reason = $2 WHERE id = $1 AND tenant_id = $3",
        before.id,
        REASON_APPROVAL_EXPIRED,
        tenant_id,
    )
    operation_after: dict[str, object] | None = None
    if before.operation_id is not None:
        operation = await operations.get_operation(
            conn, before.operation_id, for_update=True, tenant_id=tenant_id
        )
        state = cancelled_by_approval(operation.state, now=now, reason=REASON_APPROVAL_EXPIRED)
        moved = await operations.save_state(
            conn, operation, state, actor=actor, now=now, audited=False
        )
        operation_after = moved.snapshot()
    after = await get_approval(conn, before.id, tenant_id=tenant_id)
    await audit.append(
        conn,
        tenant_id=tenant_id,
        actor=actor,
        action="approval.expire",
        entity_type="approval",
        entity_id=str(before.id),
        plugin_name=before.plugin,
        environment=before.environment,
        occurred_at=now,
        before=_summary(before),
        after=_summary(after),
        details={"operation_id": before.operation_id, "operation": operation_after},
    )
    return after
