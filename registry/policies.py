"""Approval policies (config ``[[approvals.policies]]``): which operations wait for approvers.

Pure: a policy names operation types and environments (an omitted list matches every one),
how many distinct identities must approve (never the requester) and when a pending request
expires. When several policies match, the strictest wins: the most approvals and the shortest
expiry.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pluginmon.registry.lifecycle import OPERATION_TYPES

DEFAULT_EXPIRES_AFTER_SECONDS = 86_400.0
# Upper bounds: beyond a year a pending request is a typo (and past year 9999 its expires_at
# overflows); more approvers than this is a typo too (and beyond 2**31 the insert fails).
MAX_EXPIRES_AFTER_SECONDS = 365 * 86_400.0
MAX_REQUIRED_APPROVALS = 100


@dataclass(frozen=True, slots=True)
class ApprovalPolicy:
    operation_types: frozenset[str] | None = None  # None: every type
    environments: frozenset[str] | None = None  # None: every environment
    required_approvals: int = 1
    expires_after_seconds: float = DEFAULT_EXPIRES_AFTER_SECONDS

    def __post_init__(self) -> None:
        if self.required_approvals < 1:
            raise ValueError("required_approvals: must be >= 1")
        if self.required_approvals > MAX_REQUIRED_APPROVALS:
            raise ValueError(f"required_approvals: must be <= {MAX_REQUIRED_APPROVALS}")
        if not self.expires_after_seconds > 0:
            raise ValueError("expires_after_seconds: must be > 0")
        if not self.expires_after_seconds <= MAX_EXPIRES_AFTER_SECONDS:  # inf too
            raise ValueError(f"expires_after_seconds: must be <= {MAX_EXPIRES_AFTER_SECONDS:.0f}")
        if self.operation_types is not None:
            if not self.operation_types:
                raise ValueError("operation_types: must not be empty (omit it to match every type)")
            unknown = sorted(self.operation_types - set(OPERATION_TYPES))
            if unknown:
                raise ValueError(
                    f"operation_types: unknown type {unknown[0]!r}; "
                    f"choose from {', '.join(OPERATION_TYPES)}"
                )
        if self.environments is not None and not self.environments:
            raise ValueError("environments: must not be empty (omit it to match every environment)")

    def matches(self, operation_type: str, environment: str) -> bool:
        return (self.operation_types is None or operation_type in self.operation_types) and (
            self.environments is None or environment in self.environments
        )


@dataclass(frozen=True, slots=True)
class Requirement:
    required_approvals: int
    expires_after_seconds: float


def requirement(
    policies: Iterable[ApprovalPolicy], operation_type: str, environment: str
) -> Requirement | None:
    """What an operation of this type in this environment needs, or None: no approval."""
    matching = [p for p in policies if p.matches(operation_type, environment)]
    if not matching:
        return None
    return Requirement(
        required_approvals=max(p.required_approvals for p in matching),
        expires_after_seconds=min(p.expires_after_seconds for p in matching),
    )


def policies_from_config(
    tables: Sequence[dict[str, object]], *, prefix: str = "approvals.policies"
) -> tuple[ApprovalPolicy, ...]:
    """``[[approvals.policies]]`` tables to policies; ValueError names the table and field
    (``<prefix>[i].<field>: ...``)."""
    known = {"operation_types", "environments", "required_approvals", "expires_after_seconds"}
    policies: list[ApprovalPolicy] = []
    for i, table in enumerate(tables):
        where = f"{prefix}[{i}]"
        unknown = sorted(set(table) - known)
        if unknown:
            raise ValueError(f"{where}.{unknown[0]}: unknown setting")
        lists: dict[str, frozenset[str] | None] = {}
        for name in ("operation_types", "environments"):
            value = table.get(name)
            if value is not None and (
                not isinstance(value, list) or not all(isinstance(v, str) for v in value)
            ):
                raise ValueError(f"{where}.{name}: must be a list of strings")
            lists[name] = None if value is None else frozenset(str(v) for v in value)
        required = table.get("required_approvals", 1)
        expires = table.get("expires_after_seconds", DEFAULT_EXPIRES_AFTER_SECONDS)
        if isinstance(required, bool) or not isinstance(required, int):
            raise ValueError(f"{where}.required_approvals: must be an integer")
        if isinstance(expires, bool) or not isinstance(expires, int | float):
            raise ValueError(f"{where}.expires_after_seconds: must be a number")
        try:
            # TOML integers are unbounded: one no float holds is beyond the bound as well.
            expires_seconds = (
                float(expires)
                if isinstance(expires, float) or abs(expires) < 1e300
                else (1e300 if expires > 0 else -1e300)
            )
            policies.append(
                ApprovalPolicy(
                    operation_types=lists["operation_types"],
                    environments=lists["environments"],
                    required_approvals=required,
                    expires_after_seconds=expires_seconds,
                )
            )
        except ValueError as exc:
            raise ValueError(f"{where}.{exc}") from None
    return tuple(policies)
