"""The HTTP glue of plugin dependencies under /api/v1: the request and response models, the
routes (each one registry call), and the wrapper that recomputes a tenant's dependency
results after every other write that can move them (a plugin, an environment, an operation),
in the same transaction."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

from pluginmon.daemon.api_http import Call, Deferred, Handler, Route
from pluginmon.daemon.api_models import (
    ENVIRONMENT_PATTERN,
    Encoded,
    Items,
    Query,
    Request,
    Response,
)
from pluginmon.registry import dependencies, plugins
from pluginmon.registry.semver import MAX_RANGE_CHARS
from pluginmon.registry.tokens import Role

DependencyKind = Literal["runtime", "dev"]


class DependencySet(Request):
    # npm semver range syntax: ^2.0.0, ~1.4, 1.x, 1.2.3 - 2.0.0, >=1 <3 || 4.x
    version_range: str = Field(default="*", max_length=MAX_RANGE_CHARS)
    kind: DependencyKind = "runtime"


class DependencyQuery(Query):
    environment: str = Field(default=plugins.DEFAULT_ENVIRONMENT, pattern=ENVIRONMENT_PATTERN)


class ProblemsQuery(Query):
    environment: str | None = Field(default=None, pattern=ENVIRONMENT_PATTERN)
    limit: int = Field(default=1000, ge=1, le=10000)


class DependencyOut(Response):
    plugin: str
    dependency: str
    version_range: str
    kind: str
    environment: str
    satisfied: bool
    conflict: bool
    # ERESOLVE-style: who wants which range of what, and what is installed there.
    reason: str
    problem: str | None
    installed_version: str | None
    changed_at: datetime | None

    @classmethod
    def of(cls, item: dependencies.DependencyItem) -> DependencyOut:
        return cls(**dataclasses.asdict(item))


class DependencyRemoved(Response):
    plugin: str
    dependency: str
    removed: bool


async def put_dependency(call: Call) -> DependencyOut:
    body: DependencySet = call.body
    item = await dependencies.set_dependency(
        call.conn,
        call.params["name"],
        call.params["dependency"],
        version_range=body.version_range,
        kind=body.kind,
        tenant_id=call.tenant_id,
        actor=call.actor,
        now=call.now,
    )
    return DependencyOut.of(item)


async def delete_dependency(call: Call) -> DependencyRemoved:
    await dependencies.remove_dependency(
        call.conn,
        call.params["name"],
        call.params["dependency"],
        tenant_id=call.tenant_id,
        actor=call.actor,
        now=call.now,
    )
    return DependencyRemoved(
        plugin=call.params["name"], dependency=call.params["dependency"], removed=True
    )


async def list_dependencies(call: Call) -> Items[DependencyOut]:
    query: DependencyQuery = call.query
    found = await dependencies.list_dependencies(
        call.conn, call.params["name"], environment=query.environment
    )
    return Items[DependencyOut](items=[DependencyOut.of(i) for i in found])


async def list_problems(call: Call) -> Items[DependencyOut]:
    query: ProblemsQuery = call.query
    found = await dependencies.list_problems(call.conn, environment=query.environment)
    return Items[DependencyOut](items=[DependencyOut.of(i) for _, i in found[: query.limit]])


def dependency_routes() -> list[Route]:
    # fmt: off
    return [
        Route("GET", "/plugins/{name}/dependencies",
              "A plugin's dependencies with satisfied, conflict and reason in one environment",
              Items[DependencyOut], list_dependencies, query=DependencyQuery,
              tag="dependencies", errors=(404, 422)),
        Route("PUT", "/plugins/{name}/dependencies/{dependency}",
              "Declare a dependency with an npm semver version_range (runtime or dev)",
              DependencyOut, put_dependency, role=Role.WRITER, body=DependencySet,
              tag="dependencies", errors=(400, 404, 409, 413, 422)),
        Route("DELETE", "/plugins/{name}/dependencies/{dependency}", "Remove a dependency",
              DependencyRemoved, delete_dependency, role=Role.WRITER, tag="dependencies",
              errors=(404,)),
        Route("GET", "/dependencies/problems",
              "Every unsatisfied or conflicting dependency of the tenant (dev ones included)",
              Items[DependencyOut], list_problems, query=ProblemsQuery, tag="dependencies",
              errors=(422,)),
    ]
    # fmt: on


def _moves_results(route: Route) -> bool:
    """A write that can change a dependency result: a plugin's version, status, enabled
    flag or existence, in the catalogue, an environment, or through an operation."""
    if route.method == "GET":
        return False
    path = route.path
    return (
        path in ("/plugins", "/plugins/{name}")
        or path.startswith("/plugins/{name}/environments/")
        or path.startswith("/operations/")
    )


def _recomputing(handler: Handler) -> Handler:
    @functools.wraps(handler)  # the OpenAPI operationId is the handler's name
    async def handle(call: Call) -> BaseModel | Encoded | Deferred:
        result = await handler(call)
        if call.dependency_inputs_changed is False:
            # An operation's transition without an effect, an update of other fields: the
            # results read nothing it wrote (a round trip saved on most writes).
            return result
        # Cheap for a tenant without dependencies: one indexed EXISTS.
        if await call.conn.fetchval("SELECT EXISTS (SELECT 1 FROM plugin_dependencies)"):
            await dependencies.refresh(
                call.conn, now=call.now, tenant_id=call.tenant_id, actor=call.actor
            )
        return result

    return handle


def with_dependency_recompute(routes: Sequence[Route]) -> list[Route]:
    """``routes`` with every write that can move a result followed by a recompute of the
    tenant's dependency results (the dependency routes recompute themselves)."""
    out = []
    for route in routes:
        if _moves_results(route):
            route = dataclasses.replace(route, handler=_recomputing(route.handler))
        out.append(route)
    return out
