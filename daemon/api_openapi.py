"""The OpenAPI 3.1 document of /api/v1, generated from the route table and its pydantic models."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from pluginmon.daemon.api_http import API_PREFIX, TENANT_HEADER, Route
from pluginmon.daemon.api_models import ErrorOut

_PARAM_RE = re.compile(r"\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::(?P<pattern>[^}]+))?\}")

_ERROR_DESCRIPTIONS = {
    400: "Malformed JSON, or a missing or invalid tenant header (operator tokens)",
    401: "No token, or a bad or revoked one",
    403: "The token's role is too weak, or the action is not this identity's to take",
    404: "No such object for this tenant",
    409: "The object exists, or its state does not allow the change",
    413: "The body is over the size limit",
    422: "A value or an unknown field, named in error.field",
    503: "The database is unavailable",
}


def _path_and_params(path: str) -> tuple[str, list[dict[str, Any]]]:
    params: list[dict[str, Any]] = []
    for match in _PARAM_RE.finditer(path):
        integer = match["pattern"] == r"\d+"
        params.append(
            {
                "name": match["name"],
                "in": "path",
                "required": True,
                "schema": {"type": "integer"} if integer else {"type": "string"},
            }
        )
    return _PARAM_RE.sub(lambda m: "{" + m["name"] + "}", path), params


def _query_params(model: type[BaseModel]) -> list[dict[str, Any]]:
    schema = model.model_json_schema()
    return [
        {"name": name, "in": "query", "required": False, "schema": prop}
        for name, prop in schema.get("properties", {}).items()
    ]


def openapi_document(routes: Sequence[Route], *, version: str) -> dict[str, Any]:
    """The document; its schemas are the models' own JSON Schemas (2020-12, as 3.1 uses)."""
    wanted: list[tuple[type[BaseModel], JsonSchemaMode]] = [(ErrorOut, "serialization")]
    for route in routes:
        wanted.append((route.response, "serialization"))
        if route.body is not None:
            wanted.append((route.body, "validation"))
        if route.body_doc is not None:
            wanted.append((route.body_doc, "validation"))
    unique = list(dict.fromkeys(wanted))
    refs, definitions = models_json_schema(unique, ref_template="#/components/schemas/{model}")
    error_ref = refs[(ErrorOut, "serialization")]

    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        path, params = _path_and_params(API_PREFIX + route.path)
        params.append(
            {
                "name": TENANT_HEADER,
                "in": "header",
                "required": False,
                "description": "Operator tokens only: the tenant to act for.",
                "schema": {"type": "string"},
            }
        )
        if route.query is not None:
            params.extend(_query_params(route.query))
        responses: dict[str, Any] = {
            str(route.status): {
                "description": "OK" if route.status == 200 else "Created",
                "content": {
                    "application/json": {"schema": refs[(route.response, "serialization")]}
                },
            }
        }
        for code in sorted({401, 403, 503, *route.errors}):
            responses[str(code)] = {
                "description": _ERROR_DESCRIPTIONS.get(code, "Error"),
                "content": {"application/json": {"schema": error_ref}},
            }
        operation: dict[str, Any] = {
            "operationId": route.handler.__name__.strip("_"),
            "summary": route.summary,
            "tags": [route.tag] if route.tag else [],
            "parameters": params,
            "responses": responses,
            "security": [{"bearer": []}],
            "x-pluginmon-role": route.role.value,
        }
        if route.body is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": refs[(route.body, "validation")]}},
            }
        elif route.raw_body:
            text = {"schema": {"type": "string"}}
            json_schema = (
                refs[(route.body_doc, "validation")]
                if route.body_doc is not None
                else {"type": "object"}
            )
            operation["requestBody"] = {
                "required": True,
                "content": {
                    "text/plain": text,
                    "application/openmetrics-text": text,
                    "application/json": {"schema": json_schema},
                },
            }
        if route.description:
            operation["description"] = route.description
        paths.setdefault(path, {})[route.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "pluginmon management API",
            "version": version,
            "description": (
                "Plugins, operations, approvals, alert actions and the audit trail of one "
                'tenant (the token\'s). Errors are {"error": {"code", "message", "field"}}.'
            ),
        },
        "paths": paths,
        "components": {
            "schemas": definitions.get("$defs", {}),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
