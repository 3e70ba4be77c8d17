"""The HTTP glue of /api/v1: body limits, parsing into models, bearer-token authentication,
one transaction per request under row-level security, and the error shape.

Order of checks for a request: the body's size (413) before anything touches the database;
then, inside one transaction on one pooled connection: the token (401), the route's role
(403), the tenant (the token's, or for an operator token the ``X-Pluginmon-Tenant`` header),
the switch to the ``pluginmon_api`` role with ``pluginmon.tenant_id`` set (SET LOCAL, so it
ends with the transaction), the query string and the body (400 malformed JSON, 422 a value
or an unknown field, named), and finally the handler, whose writes and audit entries commit
together or not at all. Any error rolls everything back: bad input changes nothing.

A handler whose work is slow and needs no database (re-reading a backup artifact) answers
:class:`Deferred`: the first transaction commits and its connection goes back to the pool,
the slow part runs holding neither, and its result is written in a second short transaction
(the token authenticated again, the same tenant and role checks).

Errors are ``{"error": {"code": ..., "message": ..., "field": ...}}``; messages name fields
and states, never echo a submitted value (it may be a secret) nor a database message.

Over 500 lines on purpose: the checks above, the error mapping and the Deferred second
transaction are one request's life; split, the order of checks would be in no one place.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, TypeVar

import asyncpg
from aiohttp import web
from pydantic import BaseModel, ValidationError

from pluginmon.daemon.api_metrics import ApiMetrics
from pluginmon.daemon.api_models import Encoded, ErrorBody, ErrorOut, Query, Request
from pluginmon.registry import tokens
from pluginmon.registry.actor import Actor
from pluginmon.registry.errors import (
    ConflictError,
    ForbiddenError,
    InvalidError,
    NotFoundError,
    RegistryError,
)
from pluginmon.registry.operations import Operation
from pluginmon.registry.tokens import Principal, Role
from pluginmon.storage.errors import TRANSIENT_ERRORS, constraint_name, refused_where
from pluginmon.storage.pool import mark_session_untouched
from pluginmon.storage.queries import TenantScope, detect_tenant_scope

logger = logging.getLogger(__name__)

API_PREFIX: Final = "/api/v1"
# The role every request runs as (sql/030_api.sql); subject to row-level security.
API_DATABASE_ROLE: Final = "pluginmon_api"
TENANT_HEADER: Final = "X-Pluginmon-Tenant"
REQUEST_ID_HEADER: Final = "X-Request-Id"
DEFAULT_MAX_BODY_BYTES: Final = 1024 * 1024
_PARSE_IN_THREAD_BYTES = 256 * 1024  # larger JSON bodies are parsed off the event loop
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_BODY_CHUNK_BYTES = 64 * 1024

_STATUS_OF: Final[dict[type[RegistryError], int]] = {
    NotFoundError: 404,
    ConflictError: 409,
    InvalidError: 422,
    ForbiddenError: 403,
}


def status_of(exc: RegistryError) -> int:
    """The HTTP status of a domain error, by its nearest class in the table (a subclass of
    ConflictError is still a 409); 422 for any other RegistryError."""
    for cls in type(exc).__mro__:
        status = _STATUS_OF.get(cls)
        if status is not None:
            return status
    return 422


class ApiError(Exception):
    """An HTTP error in the contract's shape."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        field: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = dict(headers or {})


def error_response(error: ApiError) -> web.Response:
    body = ErrorOut(error=ErrorBody(code=error.code, message=error.message, field=error.field))
    return web.Response(
        status=error.status,
        body=body.model_dump_json().encode(),
        content_type="application/json",
        headers=error.headers,
    )


def json_response(model: BaseModel | Encoded, *, status: int = 200) -> web.Response:
    body = model.body if isinstance(model, Encoded) else model.model_dump_json().encode()
    return web.Response(status=status, body=body, content_type="application/json")


@dataclass(slots=True)
class Call:
    """One authenticated request, inside its transaction, as a handler sees it.

    A handler changes transaction-local state only (``set_config(..., true)``, ``SET
    LOCAL``, ``pg_advisory_xact_lock``): its connection goes back to the pool without the
    reset query (storage.pool.mark_session_untouched), so a session-level ``SET``,
    ``LISTEN`` or advisory lock would outlive the request.
    """

    conn: asyncpg.Connection
    principal: Principal
    actor: Actor
    tenant_id: str
    now: datetime
    params: Mapping[str, str]
    body: Any
    query: Any
    # Operations whose status this request changed, counted in the metrics after commit.
    operations: list[Operation] = field(default_factory=list)
    # A raw-body route's body (Route.raw_body) and its Content-Type.
    raw: bytes = b""
    content_type: str = ""
    # Run after the transaction committed, in order (in-memory state that must follow only
    # a committed write, such as the live set of pushed series).
    after_commit: list[Callable[[], None]] = field(default_factory=list)
    # False when the handler knows its write moved no dependency result (a route that could
    # move one then skips the recompute, api_dependencies); None: not known, recompute.
    dependency_inputs_changed: bool | None = None

    def param_int(self, name: str) -> int:
        # The route's pattern admits digits only; this guards the int's range.
        value = int(self.params[name])
        if value > 2**63 - 1:
            raise NotFoundError(f"no such {name}", field=name)
        return value


@dataclass(frozen=True, slots=True)
class Deferred:
    """A handler's answer when part of its work must run outside any transaction: ``work``
    runs after the request's transaction committed, holding no connection; ``finish`` runs
    in a new transaction (same token, tenant and role checks) with ``work``'s result."""

    work: Callable[[], Awaitable[Any]]
    finish: Callable[[Call, Any], Awaitable[BaseModel]]


Handler = Callable[[Call], Awaitable[BaseModel | Encoded | Deferred]]
PlainHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class Route:
    """One endpoint, as data: the aiohttp route and the OpenAPI operation come from it."""

    method: str
    path: str  # below API_PREFIX, aiohttp syntax ("/plugins/{name}", "/operations/{id:\\d+}")
    summary: str
    response: type[BaseModel]
    handler: Handler
    role: Role = Role.READER
    body: type[Request] | None = None
    query: type[Query] | None = None
    status: int = 200
    tag: str = ""
    # The status codes this route can answer besides its success, for the document.
    errors: tuple[int, ...] = ()
    # The body is handed over as bytes (Call.raw), not parsed as JSON into ``body``: the push
    # of plugin metrics takes the Prometheus text format, OpenMetrics or JSON; ``body_doc``
    # documents the JSON shape in the OpenAPI document. The size limit of either kind of
    # body (413 past it) is ``max_body_bytes()`` when given, else the API's.
    raw_body: bool = False
    max_body_bytes: Callable[[], int] | None = None
    body_doc: type[BaseModel] | None = None
    description: str = ""  # the OpenAPI operation's description, when a summary is not enough


M = TypeVar("M", bound=BaseModel)


def _field_of(loc: Sequence[int | str]) -> str | None:
    parts = [str(p) for p in loc if not (isinstance(p, str) and p.startswith("function-"))]
    return ".".join(parts) or None


def validation_error(exc: ValidationError, *, what: str = "body") -> ApiError:
    """The first problem of ``exc`` as a 400 (malformed JSON) or 422 naming the field."""
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    first = errors[0]
    kind = first["type"]
    name = _field_of(first["loc"])
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    if kind == "json_invalid":
        return ApiError(400, "malformed_json", f"the {what} is not valid JSON: {first['msg']}")
    if name is None:
        return ApiError(422, "invalid_body", f"the {what} must be a JSON object")
    if kind == "extra_forbidden":
        return ApiError(
            422, "unknown_field", f"unknown field {name!r} in the {what}{more}", field=name
        )
    if kind == "missing":
        return ApiError(422, "missing_field", f"{name} is required{more}", field=name)
    return ApiError(422, "invalid_value", f"{name}: {first['msg']}{more}", field=name)


async def parse_body(model: type[M], raw: bytes) -> M:
    # No body at all means no fields (an acknowledgement needs none).
    if not raw or raw.isspace():
        raw = b"{}"
    try:
        if len(raw) > _PARSE_IN_THREAD_BYTES:
            return await asyncio.to_thread(model.model_validate_json, raw)
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise validation_error(exc) from None


def parse_query(model: type[M], request: web.Request) -> M:
    values: dict[str, str] = {}
    for key, value in request.query.items():
        if key in values:
            raise ApiError(422, "invalid_value", f"{key} is given twice", field=key)
        values[key] = value
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise validation_error(exc, what="query string") from None


async def read_body(request: web.Request, limit_bytes: int) -> bytes:
    """The whole body, or 413 as soon as it passes ``limit_bytes``."""
    too_large = ApiError(
        413, "body_too_large", f"the request body is larger than {limit_bytes} bytes"
    )
    if request.content_length is not None and request.content_length > limit_bytes:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(_BODY_CHUNK_BYTES):
        size += len(chunk)
        if size > limit_bytes:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def request_id(request: web.Request) -> str:
    """The caller's X-Request-Id when it is sane, else a new one."""
    given = request.headers.get(REQUEST_ID_HEADER, "")
    return given if _REQUEST_ID_RE.fullmatch(given) else uuid.uuid4().hex


_UNAUTHORIZED_HEADERS = {"WWW-Authenticate": 'Bearer realm="pluginmon"'}


async def authenticate(
    conn: asyncpg.Connection, request: web.Request, scope: TenantScope
) -> Principal:
    """The request's token; the transaction then runs as the API role with the tenant set
    the way ``scope`` says (the operator's tenant header is checked afterwards, in
    :func:`tenant_of`)."""
    header = request.headers.get("Authorization")
    if not header:
        raise ApiError(
            401,
            "unauthorized",
            "missing Authorization: Bearer <token>",
            headers=_UNAUTHORIZED_HEADERS,
        )
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise ApiError(
            401,
            "unauthorized",
            "the Authorization header must be 'Bearer <token>'",
            headers=_UNAUTHORIZED_HEADERS,
        )
    named = request.headers.get(TENANT_HEADER)
    principal = await tokens.authenticate(
        conn,
        value.strip(),
        enter_role=API_DATABASE_ROLE,
        operator_tenant=named if named and tokens.TENANT_SLUG_RE.fullmatch(named) else None,
        scope=scope,
    )
    if principal is None:
        raise ApiError(
            401, "unauthorized", "invalid or revoked token", headers=_UNAUTHORIZED_HEADERS
        )
    return principal


def tenant_of(principal: Principal, request: web.Request) -> str:
    named = request.headers.get(TENANT_HEADER)
    if principal.operator:
        if not named:
            raise ApiError(
                400,
                "tenant_required",
                f"an operator token names the tenant in the {TENANT_HEADER} header",
                field=TENANT_HEADER,
            )
        if not tokens.TENANT_SLUG_RE.fullmatch(named):
            raise ApiError(
                400, "invalid_tenant", f"{TENANT_HEADER} is not a tenant id", field=TENANT_HEADER
            )
        return named
    assert principal.tenant_id is not None
    if named and named != principal.tenant_id:
        raise ApiError(
            403,
            "tenant_mismatch",
            f"this token acts for its own tenant only; drop the {TENANT_HEADER} header",
            field=TENANT_HEADER,
        )
    return principal.tenant_id


class Dispatcher:
    """Turns a :class:`Route` into an aiohttp handler with the request pipeline above."""

    def __init__(
        self,
        pool: asyncpg.Pool | Callable[[], asyncpg.Pool | None],
        *,
        clock: Callable[[], datetime],
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        metrics: ApiMetrics | None = None,
    ) -> None:
        # A callable: the daemon serves HTTP before its pool exists and its schema is
        # migrated; until then requests get 503.
        self._pool_source: Callable[[], asyncpg.Pool | None] = (
            pool if callable(pool) else lambda: pool
        )
        self._clock = clock
        self._max_body_bytes = max_body_bytes
        self._metrics = metrics
        # How requests enter their tenant: asked of the database once per pool (the backend
        # of a database never changes, see storage.migrate).
        self._scope: tuple[asyncpg.Pool, TenantScope] | None = None

    async def _tenant_scope(self, pool: asyncpg.Pool, conn: asyncpg.Connection) -> TenantScope:
        if self._scope is None or self._scope[0] is not pool:
            self._scope = (pool, await detect_tenant_scope(conn))
        return self._scope[1]

    def handler(self, route: Route) -> PlainHandler:
        template = API_PREFIX + route.path

        async def handle(request: web.Request) -> web.StreamResponse:
            started = time.perf_counter()
            rid = request_id(request)
            call: Call | None = None
            try:
                call, model = await self._run(route, request, rid)
                response = json_response(model, status=route.status)
            except ApiError as exc:
                response = error_response(exc)
            except RegistryError as exc:
                response = error_response(
                    ApiError(status_of(exc), exc.code, exc.message, field=exc.field)
                )
            except asyncpg.InsufficientPrivilegeError:
                # Row-level security refused a row (a bug in a handler, or a grant missing
                # from sql/): the database is the isolation, and it held.
                logger.warning(
                    "api: the database refused %s %s (privilege)", request.method, template
                )
                response = error_response(
                    ApiError(403, "forbidden", "the database refused this change for this tenant")
                )
            except TRANSIENT_ERRORS as exc:
                logger.warning(
                    "api: database unavailable for %s %s: %s",
                    request.method,
                    template,
                    type(exc).__name__,
                )
                response = error_response(
                    ApiError(503, "database_unavailable", "the database is not reachable; retry")
                )
            except asyncpg.IntegrityConstraintViolationError as exc:
                # A rule only the database knows (a constraint or trigger). Its message may
                # quote values, so only the constraint's name goes out, or where the error
                # names none (a NOT NULL, a trigger's RAISE) its SQLSTATE, table and column.
                name = constraint_name(exc)
                where = name or refused_where(exc)
                if name is None:
                    logger.warning(
                        "api: %s %s refused by the database without a constraint name (%s)",
                        request.method,
                        template,
                        where,
                    )
                response = error_response(
                    ApiError(
                        409,
                        "constraint_violation",
                        f"the database refused the change ({where})",
                        field=name,
                    )
                )
            except asyncpg.DataError as exc:
                response = error_response(
                    ApiError(422, "invalid_value", f"a value is out of range ({exc.sqlstate})")
                )
            except Exception:
                logger.exception("api: unexpected error on %s %s", request.method, template)
                response = error_response(ApiError(500, "internal", "internal error (logged)"))
            response.headers[REQUEST_ID_HEADER] = rid
            if self._metrics is not None:
                if call is not None and response.status < 400:
                    for op in call.operations:
                        self._metrics.operation(op)
                self._metrics.requests.labels(request.method, template, str(response.status)).inc()
                self._metrics.request_duration.labels(request.method, template).observe(
                    time.perf_counter() - started
                )
            return response

        return handle

    async def _run(
        self, route: Route, request: web.Request, rid: str
    ) -> tuple[Call, BaseModel | Encoded]:
        raw = b""
        if route.raw_body or route.body is not None:
            limit = route.max_body_bytes() if route.max_body_bytes else self._max_body_bytes
            raw = await read_body(request, limit)
        pool = self._pool_source()
        if pool is None:
            raise ApiError(503, "database_unavailable", "the database is not ready yet; retry")
        async with pool.acquire() as conn:
            async with conn.transaction():
                call = await self._handle(route, request, rid, conn, raw, pool)
                answer = await route.handler(call)
            # Everything above ran in that one transaction with transaction-local settings
            # only (Call's rule for handlers): nothing for the pool's reset to undo.
            mark_session_untouched(conn)
        if isinstance(answer, Deferred):
            answer = await self._finish(route, request, call, answer)
        model = answer
        for after in call.after_commit:
            after()
        return call, model

    async def _handle(
        self,
        route: Route,
        request: web.Request,
        rid: str,
        conn: asyncpg.Connection,
        raw: bytes,
        pool: asyncpg.Pool,
    ) -> Call:
        """The request's checks inside its transaction, up to the handler's Call."""
        principal = await authenticate(conn, request, await self._tenant_scope(pool, conn))
        if not principal.role.allows(route.role):
            raise ApiError(
                403,
                "forbidden",
                f"this needs a {route.role.value} token; this one is {principal.role.value}",
            )
        # (authenticate() has switched to the API role with the tenant set already.)
        tenant_id = tenant_of(principal, request)
        if principal.operator and not await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM tenants WHERE id = $1)", tenant_id
        ):
            raise ApiError(404, "tenant_not_found", "no such tenant", field=TENANT_HEADER)
        query = parse_query(route.query, request) if route.query is not None else None
        if route.query is None and request.query:
            name = next(iter(request.query))
            raise ApiError(422, "unknown_field", f"unknown query parameter {name!r}", field=name)
        body = await parse_body(route.body, raw) if route.body is not None else None
        call = Call(
            conn=conn,
            principal=principal,
            actor=Actor(
                name=principal.name,
                token_id=principal.token_id,
                operator=principal.operator,
                request_id=rid,
                source_address=request.remote,
            ),
            tenant_id=tenant_id,
            now=self._clock(),
            params=request.match_info,
            body=body,
            query=query,
            raw=raw if route.raw_body else b"",
            content_type=request.headers.get("Content-Type", ""),
        )
        return call

    async def _finish(
        self, route: Route, request: web.Request, call: Call, deferred: Deferred
    ) -> BaseModel:
        result = await deferred.work()
        pool = self._pool_source()
        if pool is None:
            raise ApiError(503, "database_unavailable", "the database is not ready yet; retry")
        async with pool.acquire() as conn:
            async with conn.transaction():
                # The token may have been revoked (or the tenant changed) while the work ran.
                principal = await authenticate(conn, request, await self._tenant_scope(pool, conn))
                if not principal.role.allows(route.role) or tenant_of(principal, request) != (
                    call.tenant_id
                ):
                    raise ApiError(403, "forbidden", "the token no longer allows this")
                call.conn = conn
                call.principal = principal
                model = await deferred.finish(call, result)
            mark_session_untouched(conn)
        return model


@web.middleware
async def json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Unknown paths and methods under /api/v1 answer in the error shape too; anything
    unexpected is a logged 500 that says nothing about its cause."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status == 404:
            return error_response(ApiError(404, "not_found", f"no such resource: {request.path}"))
        if exc.status == 405:
            return error_response(
                ApiError(405, "method_not_allowed", f"{request.method} is not allowed here")
            )
        raise
    except Exception:
        logger.exception("api: unexpected error on %s %s", request.method, request.path)
        return error_response(ApiError(500, "internal", "internal error (logged)"))
