"""The /api/v1 endpoints: each handler parses nothing and decides nothing, it calls one
registry function with the request's model and serialises the result; and the app factory."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import asyncpg
from aiohttp import web

from pluginmon.collectors.push import PushConfig, PushStore
from pluginmon.daemon.api_analytics import analytics_routes
from pluginmon.daemon.api_backups import backup_routes
from pluginmon.daemon.api_config import ConfigHandlers, config_routes
from pluginmon.daemon.api_dependencies import dependency_routes, with_dependency_recompute
from pluginmon.daemon.api_http import (
    DEFAULT_MAX_BODY_BYTES,
    Call,
    Dispatcher,
    Route,
    json_errors,
)
from pluginmon.daemon.api_metrics import ApiMetrics
from pluginmon.daemon.api_models import (
    AlertListQuery,
    AlertOut,
    ApprovalListQuery,
    ApprovalOut,
    AuditEntryOut,
    AuditListQuery,
    DecisionRequest,
    Encoded,
    EnvironmentOut,
    EnvironmentUpdate,
    Items,
    OperationCreate,
    OperationListQuery,
    OperationOut,
    OperationsQuery,
    OperationUpdate,
    PluginCreate,
    PluginListQuery,
    PluginOut,
    PluginUpdate,
    SilenceCreate,
    SilenceListQuery,
    SilenceOut,
    plugin_json,
)
from pluginmon.daemon.api_openapi import openapi_document
from pluginmon.daemon.api_plugin_metrics import PluginMetricsHandlers, metrics_routes
from pluginmon.daemon.api_vulns import DEFAULT_MAX_DOCUMENT_BYTES, vulnerability_routes
from pluginmon.registry import alert_actions, approvals, audit, operations, plugins
from pluginmon.registry.backup_readers import Readers
from pluginmon.registry.keyring import KeyringHolder
from pluginmon.registry.lifecycle import RetryPolicy
from pluginmon.registry.policies import ApprovalPolicy
from pluginmon.registry.tokens import Role


def utc_now() -> datetime:
    return datetime.now(UTC)


class ApiHandlers:
    """The handlers, with the configuration they pass on (approval policies, retry backoff)."""

    def __init__(self, *, policies: Sequence[ApprovalPolicy], retry: RetryPolicy) -> None:
        self._policies = tuple(policies)
        self._retry = retry

    # -- plugins -------------------------------------------------------------------------------

    async def create_plugin(self, call: Call) -> Encoded:
        body: PluginCreate = call.body
        plugin = await plugins.create_plugin(
            call.conn,
            tenant_id=call.tenant_id,
            actor=call.actor,
            now=call.now,
            values=body.model_dump(exclude_unset=True),
        )
        return plugin_json(plugin)

    async def list_plugins(self, call: Call) -> Encoded:
        query: PluginListQuery = call.query
        return Encoded(
            await plugins.list_plugins_json(
                call.conn, status=query.status, enabled=query.enabled, limit=query.limit
            )
        )

    async def get_plugin(self, call: Call) -> Encoded:
        return plugin_json(await plugins.get_plugin(call.conn, call.params["name"]))

    async def update_plugin(self, call: Call) -> Encoded:
        body: PluginUpdate = call.body
        plugin, call.dependency_inputs_changed = await plugins.update_plugin(
            call.conn,
            call.params["name"],
            tenant_id=call.tenant_id,
            actor=call.actor,
            now=call.now,
            changes=body.model_dump(exclude_unset=True),
        )
        return plugin_json(plugin)

    async def put_environment(self, call: Call) -> EnvironmentOut:
        body: EnvironmentUpdate = call.body
        state = await plugins.set_environment(
            call.conn,
            call.params["name"],
            call.params["environment"],
            tenant_id=call.tenant_id,
            actor=call.actor,
            now=call.now,
            changes=body.model_dump(exclude_unset=True),
        )
        return EnvironmentOut.of(state)

    # -- operations ----------------------------------------------------------------------------

    async def create_operation(self, call: Call) -> OperationOut:
        body: OperationCreate = call.body
        op = await operations.create_operation(
            call.conn,
            tenant_id=call.tenant_id,
            actor=call.actor,
            now=call.now,
            plugin_name=call.params["name"],
            operation_type=body.type,
            environment=body.environment,
            policies=self._policies,
            retry_limit=body.retry_limit,
            deadline_seconds=body.deadline_seconds,
            version=body.version,
            details=body.details,
        )
        call.operations.append(op)
        return OperationOut.of(op)

    async def list_plugin_operations(self, call: Call) -> Items[OperationOut]:
        query: OperationListQuery = call.query
        name = call.params["name"]
        await plugins.get_plugin(call.conn, name)  # 404 for an unknown plugin, not []
        found = await operations.list_operations(
            call.conn,
            plugin=name,
            status=query.status,
            environment=query.environment,
            operation_type=query.type,
            limit=query.limit,
        )
        return Items[OperationOut](items=[OperationOut.of(o) for o in found])

    async def list_operations(self, call: Call) -> Items[OperationOut]:
        query: OperationsQuery = call.query
        found = await operations.list_operations(
            call.conn,
            plugin=query.plugin,
            status=query.status,
            environment=query.environment,
            operation_type=query.type,
            limit=query.limit,
        )
        return Items[OperationOut](items=[OperationOut.of(o) for o in found])

    async def get_operation(self, call: Call) -> OperationOut:
        return OperationOut.of(
            await operations.get_operation(
                call.conn, call.param_int("id"), tenant_id=call.tenant_id
            )
        )

    async def update_operation(self, call: Call) -> OperationOut:
        body: OperationUpdate = call.body
        op = await operations.change_status(
            call.conn,
            call.param_int("id"),
            tenant_id=call.tenant_id,
            actor=call.actor,
            now=call.now,
            status=body.status,
            error=body.error,
            retry=self._retry,
        )
        call.dependency_inputs_changed = operations.changed_plugin_state(op)
        call.operations.append(op)
        return OperationOut.of(op)

    # -- approvals -----------------------------------------------------------------------------

    async def list_approvals(self, call: Call) -> Items[ApprovalOut]:
        query: ApprovalListQuery = call.query
        # Expiry is a rule of time: apply it before answering what is pending.
        await approvals.expire_due(call.conn, now=call.now, tenant_id=call.tenant_id)
        found = await approvals.list_approvals(call.conn, status=query.status, limit=query.limit)
        return Items[ApprovalOut](items=[ApprovalOut.of(a) for a in found])

    async def get_approval(self, call: Call) -> ApprovalOut:
        await approvals.expire_due(call.conn, now=call.now, tenant_id=call.tenant_id)
        return ApprovalOut.of(
            await approvals.get_approval(call.conn, call.param_int("id"), tenant_id=call.tenant_id)
        )

    async def decide(self, call: Call) -> ApprovalOut:
        body: DecisionRequest = call.body
        approval = await approvals.decide(
            call.conn,
            call.param_int("id"),
            tenant_id=call.tenant_id,
            actor=call.actor,
            now=call.now,
            decision=body.decision,
            comment=body.comment,
        )
        if (
            approval.operation_id is not None
            and approval.status is not approvals.ApprovalStatus.PENDING
        ):
            call.operations.append(
                await operations.get_operation(
                    call.conn, approval.operation_id, tenant_id=call.tenant_id
                )
            )
        return ApprovalOut.of(approval)

    # -- alerts ----------------------------------------------------------------------------------

    async def list_alerts(self, call: Call) -> Items[AlertOut]:
        query: AlertListQuery = call.query
        found = await alert_actions.list_alerts(
            call.conn,
            status=query.status,
            severity=query.severity,
            plugin=query.plugin,
            limit=query.limit,
        )
        return Items[AlertOut](items=[AlertOut.of(a) for a in found])

    async def acknowledge_alert(self, call: Call) -> AlertOut:
        alert, _changed = await alert_actions.acknowledge(
            call.conn,
            call.params["fingerprint"],
            tenant_id=call.tenant_id,
            actor=call.actor,
            now=call.now,
        )
        return AlertOut.of(alert)

    async def create_silence(self, call: Call) -> SilenceOut:
        body: SilenceCreate = call.body
        silence = await alert_actions.create_silence(
            call.conn,
            tenant_id=call.tenant_id,
            actor=call.actor,
            now=call.now,
            matchers=body.matchers,
            ends_at=body.ends_at,
            starts_at=body.starts_at,
            comment=body.comment,
        )
        return SilenceOut.of(silence, now=call.now)

    async def list_silences(self, call: Call) -> Items[SilenceOut]:
        query: SilenceListQuery = call.query
        found = await alert_actions.list_silences(
            call.conn, now=call.now, active=query.active, limit=query.limit
        )
        return Items[SilenceOut](items=[SilenceOut.of(s, now=call.now) for s in found])

    async def expire_silence(self, call: Call) -> SilenceOut:
        silence = await alert_actions.expire_silence(
            call.conn,
            call.param_int("id"),
            tenant_id=call.tenant_id,
            actor=call.actor,
            now=call.now,
        )
        return SilenceOut.of(silence, now=call.now)

    # -- audit -----------------------------------------------------------------------------------

    async def list_audit(self, call: Call) -> Items[AuditEntryOut]:
        query: AuditListQuery = call.query
        found = await audit.query(
            call.conn,
            audit.AuditQuery(
                actor=query.actor,
                action=query.action,
                target=query.target,
                since=query.since,
                until=query.until,
                before_id=query.before_id,
                limit=query.limit,
            ),
        )
        return Items[AuditEntryOut](items=[AuditEntryOut.of(e) for e in found])


def api_routes(h: ApiHandlers) -> list[Route]:
    """Every endpoint below /api/v1 (the OpenAPI document aside)."""
    plugin_errors = (404, 422)
    # fmt: off
    return [
        Route("POST", "/plugins", "Register a plugin", PluginOut, h.create_plugin,
              role=Role.WRITER, body=PluginCreate, status=201, tag="plugins",
              errors=(400, 409, 413, 422)),
        Route("GET", "/plugins", "List plugins", Items[PluginOut], h.list_plugins,
              query=PluginListQuery, tag="plugins", errors=(422,)),
        Route("GET", "/plugins/{name}", "Read a plugin with its environments", PluginOut,
              h.get_plugin, tag="plugins", errors=(404,)),
        Route("PATCH", "/plugins/{name}", "Change a plugin's catalogue fields", PluginOut,
              h.update_plugin, role=Role.WRITER, body=PluginUpdate, tag="plugins",
              errors=(400, 404, 413, 422)),
        Route("PUT", "/plugins/{name}/environments/{environment}",
              "Set a plugin's version, status or enabled flag in one environment",
              EnvironmentOut, h.put_environment, role=Role.WRITER, body=EnvironmentUpdate,
              tag="plugins", errors=(400, 404, 413, 422)),
        Route("GET", "/plugins/{name}/operations", "List a plugin's operations",
              Items[OperationOut], h.list_plugin_operations, query=OperationListQuery,
              tag="operations", errors=plugin_errors),
        Route("POST", "/plugins/{name}/operations",
              "Record an operation (awaiting_approval when a policy names it)", OperationOut,
              h.create_operation, role=Role.WRITER, body=OperationCreate, status=201,
              tag="operations", errors=(400, 404, 413, 422)),
        Route("GET", "/operations", "List operations", Items[OperationOut], h.list_operations,
              query=OperationsQuery, tag="operations", errors=(422,)),
        Route("GET", r"/operations/{id:\d+}", "Read an operation", OperationOut,
              h.get_operation, tag="operations", errors=(404,)),
        Route("PATCH", r"/operations/{id:\d+}",
              "Move an operation: running, succeeded, failed (retried while retries are left) "
              "or cancelled", OperationOut, h.update_operation, role=Role.WRITER,
              body=OperationUpdate, tag="operations", errors=(400, 404, 409, 413, 422)),
        Route("GET", "/approvals", "List approval requests", Items[ApprovalOut],
              h.list_approvals, query=ApprovalListQuery, tag="approvals", errors=(422,)),
        Route("GET", r"/approvals/{id:\d+}", "Read an approval request", ApprovalOut,
              h.get_approval, tag="approvals", errors=(404,)),
        Route("POST", r"/approvals/{id:\d+}/decision",
              "Approve or reject (never the requester's own token)", ApprovalOut, h.decide,
              role=Role.ADMIN, body=DecisionRequest, tag="approvals",
              errors=(400, 404, 409, 413, 422)),
        Route("GET", "/alerts", "List alerts", Items[AlertOut], h.list_alerts,
              query=AlertListQuery, tag="alerts", errors=(422,)),
        Route("POST", "/alerts/{fingerprint}/ack", "Acknowledge an open alert", AlertOut,
              h.acknowledge_alert, role=Role.WRITER, tag="alerts", errors=(404,)),
        Route("POST", "/silences", "Silence alerts whose labels match until ends_at",
              SilenceOut, h.create_silence, role=Role.WRITER, body=SilenceCreate, status=201,
              tag="alerts", errors=(400, 413, 422)),
        Route("GET", "/silences", "List silences", Items[SilenceOut], h.list_silences,
              query=SilenceListQuery, tag="alerts", errors=(422,)),
        Route("POST", r"/silences/{id:\d+}/expire", "End a silence now", SilenceOut,
              h.expire_silence, role=Role.WRITER, tag="alerts", errors=(404, 409)),
        Route("GET", "/audit", "Read the audit trail (newest first)", Items[AuditEntryOut],
              h.list_audit, query=AuditListQuery, tag="audit", errors=(422,)),
    ]
    # fmt: on


def build_api_app(
    pool: asyncpg.Pool | Callable[[], asyncpg.Pool | None],
    *,
    version: str,
    policies: Sequence[ApprovalPolicy] = (),
    retry: RetryPolicy | None = None,
    clock: Callable[[], datetime] = utc_now,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_document_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES,
    metrics: ApiMetrics | None = None,
    keyring: KeyringHolder | None = None,
    plugin_metrics: PluginMetricsHandlers | None = None,
    backup_readers: Readers | None = None,
) -> web.Application:
    """The /api/v1 application, to mount with ``root.add_subapp("/api/v1", app)``.

    ``keyring``: where config secrets are encrypted (none: secrets are refused).
    ``plugin_metrics`` holds the live set of pushed series; whoever builds the app re-emits
    it (daemon.api_plugin_metrics). Without one, pushes get the default limits and TTLs.
    ``backup_readers``: how backups are read back for verification, per provider.
    ``max_document_bytes``: the body limit of SBOM uploads and scanner report imports
    (``max_body_bytes`` is every other JSON body's).
    """
    if plugin_metrics is None:
        plugin_metrics = PluginMetricsHandlers(PushStore(PushConfig()))
    # Dependencies (daemon/api_dependencies.py): their routes, and a recompute after the
    # catalogue's writes that can move a result.
    routes = [
        *with_dependency_recompute(
            api_routes(ApiHandlers(policies=policies, retry=retry or RetryPolicy()))
        ),
        *dependency_routes(),
        *config_routes(ConfigHandlers(keyring)),
        *metrics_routes(plugin_metrics),
        *backup_routes(
            readers=backup_readers, metrics=None if metrics is None else metrics.backups
        ),
        *vulnerability_routes(max_document_bytes=max_document_bytes),
        *analytics_routes(),
    ]
    dispatcher = Dispatcher(
        pool,
        clock=clock,
        max_body_bytes=max_body_bytes,
        metrics=metrics,
    )
    document = json.dumps(openapi_document(routes, version=version)).encode()

    async def openapi(request: web.Request) -> web.Response:
        return web.Response(body=document, content_type="application/json")

    app = web.Application(middlewares=[json_errors])
    app.router.add_get("/openapi.json", openapi)
    for route in routes:
        app.router.add_route(route.method, route.path, dispatcher.handler(route))
    return app
