"""Request and response models of /api/v1 (pydantic), the source of the OpenAPI document.

Requests are strict (JSON types as written, no "yes" for true) and forbid unknown fields, so
a misspelt or derived field (``duration_ms``) is an error that names it. Responses are built
from the registry's dataclasses by the ``of()`` constructors; the plugin responses are
serialized straight from them (:func:`plugin_json`, the hottest reads).

Over 500 lines on purpose: every request and response model of /api/v1 is here, so that the
OpenAPI document and the wire format have one source to read and to review.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Any, Final, Generic, Literal, TypeVar, get_args

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, TypeAdapter

from pluginmon.registry import alert_actions, audit, operations, plugins
from pluginmon.registry.approvals import MAX_COMMENT_CHARS, Approval
from pluginmon.registry.lifecycle import OPERATION_TYPES
from pluginmon.registry.operations import (
    DEFAULT_DEADLINE_SECONDS,
    MAX_DEADLINE_SECONDS,
    MAX_ERROR_CHARS,
    MAX_RETRY_LIMIT,
)

PluginSource = Literal[
    "MARKETPLACE",
    "GIT_REPOSITORY",
    "NPM_REGISTRY",
    "LOCAL_FILE",
    "DOCKER_REGISTRY",
    "INTERNAL",
    "CUSTOM",
]
PluginStatus = Literal[
    "discovered", "installing", "installed", "updating", "failed", "uninstalling", "uninstalled"
]
OperationType = Literal[
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
]
OperationStatus = Literal[
    "pending", "awaiting_approval", "running", "succeeded", "failed", "cancelled"
]
ApprovalStatus = Literal["pending", "approved", "rejected", "expired", "cancelled"]
AlertStatus = Literal["open", "pending", "firing", "resolved", "acknowledged", "silenced"]
Severity = Literal["info", "warning", "critical"]

NAME_PATTERN = plugins.NAME_RE.pattern
ENVIRONMENT_PATTERN = plugins.ENVIRONMENT_RE.pattern
# Keeps the literal in step with the registry's list: a new operation type fails this import.
assert get_args(OperationType) == OPERATION_TYPES


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Query(BaseModel):
    """Query strings: values arrive as text, so conversion is lax; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    limit: int = Field(default=100, ge=1, le=1000)


class Response(BaseModel):
    model_config = ConfigDict(frozen=True)


# --- errors --------------------------------------------------------------------------------------


class ErrorBody(Response):
    code: str
    message: str
    field: str | None = None


class ErrorOut(Response):
    error: ErrorBody


T = TypeVar("T", bound=BaseModel)


class Items(Response, Generic[T]):
    items: list[T]


@dataclasses.dataclass(frozen=True, slots=True)
class Encoded:
    """A response body encoded already: the route's model, serialized straight from the
    registry's dataclasses (no model built per item; see :func:`plugin_json`)."""

    body: bytes


# --- plugins ---------------------------------------------------------------------------------------


class PluginCreate(Request):
    name: str = Field(pattern=NAME_PATTERN)
    version: str | None = Field(default=None, max_length=128)
    description: str | None = Field(default=None, max_length=4000)
    installed_from: PluginSource | None = None
    # Only an operator token may set it; otherwise it is the token's name.
    installed_by: str | None = Field(default=None, max_length=256)
    installed_at: AwareDatetime | None = None
    config_schema: dict[str, Any] | None = None
    status: PluginStatus | None = None
    enabled: bool | None = None
    dependencies: list[str] | None = Field(default=None, max_length=256)


class PluginUpdate(Request):
    """Only the fields sent change; ``null`` clears a nullable field."""

    version: str | None = Field(default=None, max_length=128)
    description: str | None = Field(default=None, max_length=4000)
    installed_from: PluginSource | None = None
    installed_by: str | None = Field(default=None, max_length=256)
    config_schema: dict[str, Any] | None = None
    status: PluginStatus | None = None
    enabled: bool | None = None
    dependencies: list[str] | None = Field(default=None, max_length=256)


class EnvironmentUpdate(Request):
    version: str | None = Field(default=None, max_length=128)
    status: PluginStatus | None = None
    enabled: bool | None = None


class PluginListQuery(Query):
    status: PluginStatus | None = None
    enabled: bool | None = None


class EnvironmentOut(Response):
    environment: str
    version: str | None
    status: str
    enabled: bool
    health_score: float | None
    last_health_check: datetime | None
    cpu_usage: float | None
    memory_usage: int | None
    updated_at: datetime

    @classmethod
    def of(cls, state: plugins.EnvironmentState) -> EnvironmentOut:
        return cls(
            environment=state.environment,
            version=state.version,
            status=state.status,
            enabled=state.enabled,
            health_score=state.health_score,
            last_health_check=state.last_health_check,
            cpu_usage=state.cpu_usage,
            memory_usage=state.memory_usage,
            updated_at=state.updated_at,
        )


class PluginOut(Response):
    name: str
    version: str | None
    description: str | None
    installed_from: str | None
    installed_by: str | None
    installed_at: datetime | None
    config_schema: dict[str, Any] | None
    status: str
    enabled: bool
    dependencies: list[str]
    health_score: float | None
    last_health_check: datetime | None
    cpu_usage: float | None
    memory_usage: int | None
    created_at: datetime
    updated_at: datetime
    environments: list[EnvironmentOut]

    @classmethod
    def of(cls, plugin: plugins.Plugin) -> PluginOut:
        return cls(
            name=plugin.name,
            version=plugin.version,
            description=plugin.description,
            installed_from=plugin.installed_from,
            installed_by=plugin.installed_by,
            installed_at=plugin.installed_at,
            config_schema=plugin.config_schema,
            status=plugin.status,
            enabled=plugin.enabled,
            dependencies=list(plugin.dependencies),
            health_score=plugin.health_score,
            last_health_check=plugin.last_health_check,
            cpu_usage=plugin.cpu_usage,
            memory_usage=plugin.memory_usage,
            created_at=plugin.created_at,
            updated_at=plugin.updated_at,
            environments=[EnvironmentOut.of(e) for e in plugin.environments],
        )


# PluginOut is Plugin without its id, and EnvironmentOut is EnvironmentState: the same fields in
# the same order, so a plugin's dataclass serializes to the model's JSON without building a
# model (the values are the registry's, typed by the database); a list is written by the
# database itself (registry.plugins.list_plugins_json). Checked here and by
# tests/test_api_encoded.py.
_PLUGIN_HIDDEN: Final = frozenset({"id"})
assert [f.name for f in dataclasses.fields(plugins.Plugin) if f.name not in _PLUGIN_HIDDEN] == list(
    PluginOut.model_fields
)
# pydantic's exclude argument, made once (a plugin is one of the API's hottest responses).
_EXCLUDE_ONE: Final = set(_PLUGIN_HIDDEN)
assert [f.name for f in dataclasses.fields(plugins.EnvironmentState)] == list(
    EnvironmentOut.model_fields
)
_PLUGIN: Final = TypeAdapter(plugins.Plugin)


def plugin_json(plugin: plugins.Plugin) -> Encoded:
    """``PluginOut.of(plugin)``'s JSON."""
    return Encoded(_PLUGIN.dump_json(plugin, exclude=_EXCLUDE_ONE))


# --- operations ---------------------------------------------------------------------------------------


class OperationCreate(Request):
    type: OperationType
    environment: str = Field(default=plugins.DEFAULT_ENVIRONMENT, pattern=ENVIRONMENT_PATTERN)
    version: str | None = Field(default=None, max_length=128)
    retry_limit: int = Field(default=3, ge=0, le=MAX_RETRY_LIMIT)
    deadline_seconds: int = Field(default=DEFAULT_DEADLINE_SECONDS, ge=1, le=MAX_DEADLINE_SECONDS)
    details: dict[str, Any] | None = None


class OperationUpdate(Request):
    """A transition. ``duration_ms`` is derived from the attempt's start and end, never sent."""

    status: Literal["running", "succeeded", "failed", "cancelled"]
    error: str | None = Field(default=None, max_length=MAX_ERROR_CHARS)


class OperationListQuery(Query):
    status: OperationStatus | None = None
    environment: str | None = None
    type: OperationType | None = None


class OperationsQuery(OperationListQuery):
    plugin: str | None = None


class OperationOut(Response):
    id: int
    plugin: str
    type: str
    environment: str
    version: str | None
    status: OperationStatus
    status_reason: str | None
    retry_count: int
    retry_limit: int
    duration_ms: int | None
    error: str | None
    requested_by: str | None
    approval_id: int | None
    deadline_seconds: int | None
    deadline_at: datetime | None
    not_before: datetime | None
    started_at: datetime
    finished_at: datetime | None
    created_at: datetime
    updated_at: datetime
    details: dict[str, Any]

    @classmethod
    def of(cls, op: operations.Operation) -> OperationOut:
        s = op.state
        return cls(
            id=op.id,
            plugin=op.plugin,
            type=op.type,
            environment=op.environment,
            version=op.version,
            status=s.status.value,
            status_reason=s.status_reason,
            retry_count=s.retry_count,
            retry_limit=s.retry_limit,
            duration_ms=s.duration_ms,
            error=s.error,
            requested_by=op.requested_by,
            approval_id=op.approval_id,
            deadline_seconds=s.deadline_seconds,
            deadline_at=s.deadline_at,
            not_before=s.not_before,
            started_at=s.started_at,
            finished_at=s.finished_at,
            created_at=op.created_at,
            updated_at=op.updated_at,
            details=op.details,
        )


# --- approvals -----------------------------------------------------------------------------------------


class DecisionRequest(Request):
    decision: Literal["approved", "rejected"]
    comment: str = Field(default="", max_length=MAX_COMMENT_CHARS)


class ApprovalListQuery(Query):
    status: ApprovalStatus | None = None


class DecisionOut(Response):
    decided_by: str
    decision: str
    comment: str
    decided_at: datetime


class ApprovalOut(Response):
    id: int
    operation_id: int | None
    plugin: str
    environment: str
    type: str
    version: str | None
    status: ApprovalStatus
    requested_by: str
    requested_at: datetime
    expires_at: datetime | None
    required_approvals: int
    approvals: int
    decisions: list[DecisionOut]
    decided_by: str | None
    decided_at: datetime | None
    reason: str | None

    @classmethod
    def of(cls, a: Approval) -> ApprovalOut:
        return cls(
            id=a.id,
            operation_id=a.operation_id,
            plugin=a.plugin,
            environment=a.environment,
            type=a.request_type,
            version=a.requested_version,
            status=a.status.value,
            requested_by=a.requested_by,
            requested_at=a.requested_at,
            expires_at=a.expires_at,
            required_approvals=a.required_approvals,
            approvals=a.approvals,
            decisions=[
                DecisionOut(
                    decided_by=d.decided_by,
                    decision=d.decision.value,
                    comment=d.comment,
                    decided_at=d.decided_at,
                )
                for d in a.decisions
            ],
            decided_by=a.decided_by,
            decided_at=a.decided_at,
            reason=a.reason,
        )


# --- alerts and silences ----------------------------------------------------------------------------------


class AlertListQuery(Query):
    status: AlertStatus | None = None
    severity: Severity | None = None
    plugin: str | None = None


class AlertOut(Response):
    fingerprint: str
    rule: str
    plugin: str
    environment: str
    severity: str
    status: str
    value: float | None
    labels: dict[str, Any]
    annotations: dict[str, Any]
    started_at: datetime
    fired_at: datetime | None
    resolved_at: datetime | None
    acknowledged_at: datetime | None
    acknowledged_by: str | None
    silenced_until: datetime | None

    @classmethod
    def of(cls, a: alert_actions.AlertItem) -> AlertOut:
        return cls(
            fingerprint=a.fingerprint,
            rule=a.rule,
            plugin=a.plugin,
            environment=a.environment,
            severity=a.severity,
            status=a.status,
            value=a.value,
            labels=a.labels,
            annotations=a.annotations,
            started_at=a.started_at,
            fired_at=a.fired_at,
            resolved_at=a.resolved_at,
            acknowledged_at=a.acknowledged_at,
            acknowledged_by=a.acknowledged_by,
            silenced_until=a.silenced_until,
        )


class SilenceCreate(Request):
    """Label name -> shell glob; an alert is silenced when every matcher matches."""

    matchers: dict[str, str] = Field(max_length=alert_actions.MAX_MATCHERS)
    ends_at: AwareDatetime
    starts_at: AwareDatetime | None = None
    comment: str = Field(default="", max_length=alert_actions.MAX_COMMENT_CHARS)


class SilenceListQuery(Query):
    active: bool | None = None


class SilenceOut(Response):
    id: int
    matchers: dict[str, str]
    starts_at: datetime
    ends_at: datetime
    created_by: str
    comment: str
    created_at: datetime
    active: bool

    @classmethod
    def of(cls, s: alert_actions.SilenceItem, *, now: datetime) -> SilenceOut:
        return cls(
            id=s.id,
            matchers=s.matchers,
            starts_at=s.starts_at,
            ends_at=s.ends_at,
            created_by=s.created_by,
            comment=s.comment,
            created_at=s.created_at,
            active=s.starts_at <= now < s.ends_at,
        )


# --- audit -------------------------------------------------------------------------------------------------


class AuditListQuery(Query):
    actor: str | None = None
    action: str | None = None
    target: str | None = None
    since: AwareDatetime | None = None
    until: AwareDatetime | None = None
    before_id: int | None = Field(default=None, ge=1)


class AuditEntryOut(Response):
    id: int
    lane: int
    seq: int
    occurred_at: datetime
    actor: str
    # True: the actor is an operator (cross-tenant) token acting on this tenant's object.
    actor_operator: bool
    action: str
    target: str
    plugin: str | None
    environment: str | None
    outcome: str
    request_id: str | None
    source_address: str | None
    before: Any
    after: Any
    details: Any

    @classmethod
    def of(cls, e: audit.AuditEntry) -> AuditEntryOut:
        return cls(
            id=e.id,
            lane=e.lane,
            seq=e.seq,
            occurred_at=e.occurred_at,
            actor=e.actor,
            actor_operator=e.actor_operator,
            action=e.action,
            target=e.target,
            plugin=e.plugin_name,
            environment=e.environment,
            outcome=e.outcome,
            request_id=e.request_id,
            source_address=e.source_address,
            before=e.before,
            after=e.after,
            details=e.details,
        )
