"""The operation state machine, pure: statuses, legal transitions, retries with backoff, deadline.

``pending -> running -> succeeded | failed | cancelled``, with ``awaiting_approval`` before
``pending`` when a policy gates the operation (only an approval moves it on). A failure with
retries left goes back to ``pending`` with ``retry_count + 1`` and a ``not_before`` from capped
exponential backoff with jitter (storage.errors.backoff_seconds, the one backoff of the
project); a pending operation cannot run before its ``not_before``. The first start fixes
``deadline_at`` (start + ``deadline_seconds``, across all retries, like a Kubernetes Job's
activeDeadlineSeconds); past it the daemon fails the operation with reason
``deadline_exceeded``, which no retry follows. Nothing here reads a clock: ``now`` is passed in.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Final

from pluginmon.storage.errors import backoff_seconds


class Status(StrEnum):
    PENDING = "pending"
    AWAITING_APPROVAL = "awaiting_approval"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL: Final = frozenset({Status.SUCCEEDED, Status.FAILED, Status.CANCELLED})

# What a client may ask for (PATCH). awaiting_approval -> pending is the approval's, not a
# client's; pending -> awaiting_approval never happens.
CLIENT_TRANSITIONS: Final[dict[Status, frozenset[Status]]] = {
    Status.PENDING: frozenset({Status.RUNNING, Status.CANCELLED}),
    Status.AWAITING_APPROVAL: frozenset({Status.CANCELLED}),
    Status.RUNNING: frozenset({Status.SUCCEEDED, Status.FAILED, Status.CANCELLED}),
}

OPERATION_TYPES: Final = (
    "install",
    "uninstall",
    "update",
    "enable",
    "disable",
    "configure",
    "rollback",
    "backup",
    "restore",
    "health_check",
)

# status_reason values
REASON_RETRY_SCHEDULED = "retry_scheduled"
REASON_RETRIES_EXHAUSTED = "retries_exhausted"
REASON_DEADLINE_EXCEEDED = "deadline_exceeded"
REASON_APPROVAL_EXPIRED = "approval_expired"
REASON_APPROVAL_REJECTED = "approval_rejected"
REASON_CANCELLED = "cancelled"


class IllegalTransitionError(Exception):
    """The requested status cannot follow the current one."""

    def __init__(self, current: Status, requested: Status) -> None:
        super().__init__(f"an operation cannot go from {current.value} to {requested.value}")
        self.current = current
        self.requested = requested


class TooEarlyError(Exception):
    """A retry asked to run before its backoff ended."""

    def __init__(self, not_before: datetime) -> None:
        super().__init__(f"the retry may not run before {not_before.isoformat()} (backoff)")
        self.not_before = not_before


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Backoff before retry n (0 = the first retry): up to initial * 2**n, capped."""

    initial_seconds: float = 10.0
    max_seconds: float = 600.0
    random_fraction: Callable[[], float] = random.random

    def delay(self, retry: int) -> timedelta:
        return timedelta(
            seconds=backoff_seconds(
                retry,
                initial_seconds=self.initial_seconds,
                max_seconds=self.max_seconds,
                random_fraction=self.random_fraction,
            )
        )


@dataclass(frozen=True, slots=True)
class OperationState:
    status: Status
    retry_count: int
    retry_limit: int
    started_at: datetime
    finished_at: datetime | None = None
    duration_ms: int | None = None
    deadline_seconds: int | None = None
    deadline_at: datetime | None = None
    not_before: datetime | None = None
    error: str | None = None
    status_reason: str | None = None


def _duration_ms(started: datetime, finished: datetime) -> int:
    return max(0, (finished - started) // timedelta(milliseconds=1))


def _finish(state: OperationState, status: Status, now: datetime, reason: str) -> OperationState:
    ran = state.status is Status.RUNNING
    return replace(
        state,
        status=status,
        # Never before the start: the wall clock may step back between two requests (a time
        # sync on a VM), and the table's CHECK (finished_at >= started_at) would refuse it.
        finished_at=max(now, state.started_at),
        # Only an attempt that ran has a duration; waiting for approval or backoff is not one.
        duration_ms=_duration_ms(state.started_at, now) if ran else None,
        not_before=None,
        status_reason=reason,
    )


def initial_status(*, needs_approval: bool) -> Status:
    return Status.AWAITING_APPROVAL if needs_approval else Status.PENDING


def transition(
    state: OperationState,
    requested: Status,
    *,
    now: datetime,
    retry: RetryPolicy,
    error: str | None = None,
) -> OperationState:
    """The state after a client asks for ``requested`` at ``now``.

    Raises IllegalTransitionError (naming both states) or TooEarlyError (a retry in backoff).
    ``failed`` with retries left yields ``pending`` with the next retry scheduled.
    """
    if requested not in CLIENT_TRANSITIONS.get(state.status, frozenset()):
        raise IllegalTransitionError(state.status, requested)
    if requested is Status.RUNNING:
        if state.not_before is not None and now < state.not_before:
            raise TooEarlyError(state.not_before)
        deadline_at = state.deadline_at
        if deadline_at is None and state.deadline_seconds is not None:
            deadline_at = now + timedelta(seconds=state.deadline_seconds)
        return replace(
            state,
            status=Status.RUNNING,
            started_at=now,
            deadline_at=deadline_at,
            not_before=None,
            status_reason=None,
        )
    if requested is Status.SUCCEEDED:
        return replace(_finish(state, Status.SUCCEEDED, now, "succeeded"), error=None)
    if requested is Status.CANCELLED:
        return _finish(state, Status.CANCELLED, now, REASON_CANCELLED)
    # failed
    if state.retry_count < state.retry_limit:
        return replace(
            state,
            status=Status.PENDING,
            retry_count=state.retry_count + 1,
            not_before=now + retry.delay(state.retry_count),
            duration_ms=_duration_ms(state.started_at, now),
            error=error,
            status_reason=REASON_RETRY_SCHEDULED,
        )
    # (With retry_limit 0 there were no retries to exhaust; the reason reads the same.)
    return replace(_finish(state, Status.FAILED, now, REASON_RETRIES_EXHAUSTED), error=error)


def approved(state: OperationState) -> OperationState:
    """``awaiting_approval`` -> ``pending``: the approval gate opened."""
    if state.status is not Status.AWAITING_APPROVAL:
        raise IllegalTransitionError(state.status, Status.PENDING)
    return replace(state, status=Status.PENDING, status_reason="approved")


def cancelled_by_approval(state: OperationState, *, now: datetime, reason: str) -> OperationState:
    """``awaiting_approval`` -> ``cancelled`` because the approval was rejected or expired."""
    if state.status is not Status.AWAITING_APPROVAL:
        raise IllegalTransitionError(state.status, Status.CANCELLED)
    return _finish(state, Status.CANCELLED, now, reason)


def overdue(state: OperationState, now: datetime) -> bool:
    """Started, not finished, and past its deadline."""
    return (
        not state.status.terminal
        and state.status is not Status.AWAITING_APPROVAL
        and state.deadline_at is not None
        and now >= state.deadline_at
    )


def deadline_exceeded(state: OperationState, *, now: datetime) -> OperationState:
    """The daemon's verdict on an overdue operation: failed, no retry."""
    return replace(
        _finish(state, Status.FAILED, now, REASON_DEADLINE_EXCEEDED),
        error=state.error or "deadline exceeded",
    )
