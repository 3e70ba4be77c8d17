"""Pure registry logic with an injected clock: the operation state machine (retries with capped
exponential backoff and jitter, deadline), approval policies, token format, redaction."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from pluginmon.registry import audit, tokens
from pluginmon.registry.lifecycle import (
    IllegalTransitionError,
    OperationState,
    RetryPolicy,
    Status,
    TooEarlyError,
    approved,
    cancelled_by_approval,
    deadline_exceeded,
    overdue,
    transition,
)
from pluginmon.registry.policies import ApprovalPolicy, policies_from_config, requirement

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
MIDDLE = RetryPolicy(initial_seconds=10, max_seconds=60, random_fraction=lambda: 0.5)


def _state(**changes: object) -> OperationState:
    base = OperationState(
        status=Status.PENDING, retry_count=0, retry_limit=3, started_at=T0, deadline_seconds=600
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def test_happy_path_measures_the_attempt_and_fixes_the_deadline_at_first_start() -> None:
    running = transition(_state(), Status.RUNNING, now=T0 + timedelta(seconds=5), retry=MIDDLE)
    assert running.status is Status.RUNNING
    assert running.started_at == T0 + timedelta(seconds=5)
    assert running.deadline_at == T0 + timedelta(seconds=605)
    done = transition(running, Status.SUCCEEDED, now=T0 + timedelta(seconds=7.25), retry=MIDDLE)
    assert (done.status, done.duration_ms, done.finished_at) == (
        Status.SUCCEEDED,
        2250,
        T0 + timedelta(seconds=7.25),
    )


@pytest.mark.parametrize("requested", [Status.SUCCEEDED, Status.FAILED, Status.CANCELLED])
def test_a_clock_that_stepped_back_never_finishes_before_the_start(requested: Status) -> None:
    running = _state(status=Status.RUNNING, retry_limit=0, started_at=T0)
    # The wall clock stepped back 3 ms between the request that started it and this one.
    done = transition(running, requested, now=T0 - timedelta(milliseconds=3), retry=MIDDLE)
    assert done.status is requested
    assert done.finished_at == T0
    assert done.duration_ms == 0


def test_failures_retry_with_capped_exponential_backoff_then_exhaust() -> None:
    state = _state()
    delays = []
    now = T0
    for attempt in range(3):
        state = transition(state, Status.RUNNING, now=now, retry=MIDDLE)
        now += timedelta(seconds=1)
        state = transition(state, Status.FAILED, now=now, retry=MIDDLE, error=f"boom {attempt}")
        assert state.status is Status.PENDING
        assert state.retry_count == attempt + 1
        assert state.error == f"boom {attempt}"
        assert state.finished_at is None
        assert state.not_before is not None
        delays.append((state.not_before - now).total_seconds())
        # Not before the backoff ends...
        with pytest.raises(TooEarlyError):
            transition(
                state, Status.RUNNING, now=state.not_before - timedelta(seconds=1), retry=MIDDLE
            )
        now = state.not_before
    # Ceiling 10, 20, 40 (cap 60); equal jitter at 0.5 puts each at 3/4 of its ceiling.
    assert delays == [7.5, 15.0, 30.0]
    # The deadline stays the first start's, across retries.
    assert state.deadline_at == T0 + timedelta(seconds=600)
    state = transition(state, Status.RUNNING, now=now, retry=MIDDLE)
    state = transition(
        state, Status.FAILED, now=now + timedelta(seconds=2), retry=MIDDLE, error="x"
    )
    assert (state.status, state.status_reason, state.retry_count) == (
        Status.FAILED,
        "retries_exhausted",
        3,
    )
    assert state.duration_ms == 2000


def test_backoff_is_capped_and_jittered_within_the_upper_half() -> None:
    low = RetryPolicy(initial_seconds=10, max_seconds=60, random_fraction=lambda: 0.0)
    high = RetryPolicy(initial_seconds=10, max_seconds=60, random_fraction=lambda: 0.999999)
    assert low.delay(0) == timedelta(seconds=5)
    assert high.delay(0) < timedelta(seconds=10)
    assert low.delay(10) == timedelta(seconds=30)  # ceiling capped at 60
    assert high.delay(10) <= timedelta(seconds=60)


@pytest.mark.parametrize(
    ("current", "requested"),
    [
        (Status.PENDING, Status.SUCCEEDED),
        (Status.PENDING, Status.FAILED),
        (Status.AWAITING_APPROVAL, Status.RUNNING),
        (Status.RUNNING, Status.RUNNING),
        (Status.SUCCEEDED, Status.RUNNING),
        (Status.FAILED, Status.CANCELLED),
        (Status.CANCELLED, Status.PENDING),
        (Status.RUNNING, Status.AWAITING_APPROVAL),
    ],
)
def test_illegal_transitions_name_both_states(current: Status, requested: Status) -> None:
    with pytest.raises(IllegalTransitionError) as caught:
        transition(_state(status=current), requested, now=T0, retry=MIDDLE)
    assert current.value in str(caught.value)
    assert requested.value in str(caught.value)


def test_approval_gate_and_cancellation() -> None:
    waiting = _state(status=Status.AWAITING_APPROVAL)
    assert approved(waiting).status is Status.PENDING
    expired = cancelled_by_approval(waiting, now=T0, reason="approval_expired")
    assert (expired.status, expired.status_reason, expired.duration_ms) == (
        Status.CANCELLED,
        "approval_expired",
        None,
    )
    with pytest.raises(IllegalTransitionError):
        approved(_state(status=Status.RUNNING))
    cancelled = transition(waiting, Status.CANCELLED, now=T0, retry=MIDDLE)
    assert cancelled.finished_at == T0


def test_deadline() -> None:
    running = transition(_state(deadline_seconds=60), Status.RUNNING, now=T0, retry=MIDDLE)
    assert not overdue(running, T0 + timedelta(seconds=59))
    assert overdue(running, T0 + timedelta(seconds=60))
    failed = deadline_exceeded(running, now=T0 + timedelta(seconds=61))
    assert (failed.status, failed.status_reason, failed.duration_ms) == (
        Status.FAILED,
        "deadline_exceeded",
        61_000,
    )
    # Waiting for approval never runs against the deadline; finished operations are done.
    assert not overdue(_state(status=Status.AWAITING_APPROVAL, deadline_at=T0), T0)
    assert not overdue(replace(failed, deadline_at=T0), T0 + timedelta(days=1))


def test_policies_strictest_match_wins() -> None:
    policies = [
        ApprovalPolicy(
            operation_types=frozenset({"install", "update"}), environments=frozenset({"production"})
        ),
        ApprovalPolicy(
            environments=frozenset({"production"}), required_approvals=2, expires_after_seconds=600
        ),
        ApprovalPolicy(operation_types=frozenset({"uninstall"}), expires_after_seconds=60),
    ]
    assert requirement(policies, "install", "staging") is None
    update = requirement(policies, "update", "production")
    assert update is not None
    assert (update.required_approvals, update.expires_after_seconds) == (2, 600)
    uninstall = requirement(policies, "uninstall", "staging")
    assert uninstall is not None
    assert (uninstall.required_approvals, uninstall.expires_after_seconds) == (1, 60)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (
            {"operation_types": ["explode"]},
            "approvals.policies[0].operation_types: unknown type 'explode'",
        ),
        ({"operation_types": []}, "approvals.policies[0].operation_types: must not be empty"),
        ({"required_approvals": 0}, "approvals.policies[0].required_approvals: must be >= 1"),
        (
            {"required_approvals": "2"},
            "approvals.policies[0].required_approvals: must be an integer",
        ),
        ({"expires_after_seconds": -1}, "approvals.policies[0].expires_after_seconds: must be > 0"),
        # Upper bounds: an expiry past year 9999 overflows the request's expires_at, and a
        # count beyond the integer column fails the insert (both were 500s at the first
        # operation, after check-config had passed them); an integer no float holds was a
        # traceback in check-config and run.
        (
            {"expires_after_seconds": float("inf")},
            "approvals.policies[0].expires_after_seconds: must be <= 31536000",
        ),
        (
            {"expires_after_seconds": 1e308},
            "approvals.policies[0].expires_after_seconds: must be <= 31536000",
        ),
        (
            {"expires_after_seconds": 10**400},
            "approvals.policies[0].expires_after_seconds: must be <= 31536000",
        ),
        (
            {"required_approvals": 10**12},
            "approvals.policies[0].required_approvals: must be <= 100",
        ),
        (
            {"environments": "production"},
            "approvals.policies[0].environments: must be a list of strings",
        ),
        ({"approvers": ["ann"]}, "approvals.policies[0].approvers: unknown setting"),
    ],
)
def test_policy_config_errors_name_the_field(table: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match="^" + message.replace("[", r"\[").replace("]", r"\]")):
        policies_from_config([table])


def test_policy_config_parses() -> None:
    (policy,) = policies_from_config(
        [{"operation_types": ["install"], "environments": ["production"], "required_approvals": 2}]
    )
    assert policy == ApprovalPolicy(
        operation_types=frozenset({"install"}),
        environments=frozenset({"production"}),
        required_approvals=2,
    )


def test_tokens_are_32_random_bytes_and_parse_back() -> None:
    issued = tokens.issue()
    assert len(issued.secret) == 32
    text = issued.text
    assert text.startswith("pmt_")
    assert tokens.parse(text) == issued
    assert issued.text != tokens.issue().text
    assert "secret=***" in repr(issued)
    assert text[20:] not in repr(issued)
    for bad in ("", "pmt_", text[:-1], text + "A", text.replace("pmt_", "pmx_"), text.upper()):
        assert tokens.parse(bad) is None, bad


def test_roles_are_ordered() -> None:
    assert tokens.Role.ADMIN.allows(tokens.Role.WRITER)
    assert tokens.Role.WRITER.allows(tokens.Role.READER)
    assert not tokens.Role.READER.allows(tokens.Role.WRITER)
    assert not tokens.Role.WRITER.allows(tokens.Role.ADMIN)


def test_redaction_of_secret_looking_keys() -> None:
    value = {
        "url": "https://x",
        "password": "hunter2",
        "nested": [{"apiKey": "k", "api_key": "k2", "keep": 1}],
        "client_secret": {"a": 1},
    }
    assert audit.redact(value) == {
        "url": "https://x",
        "password": "***",
        "nested": [{"apiKey": "***", "api_key": "***", "keep": 1}],
        "client_secret": "***",
    }
