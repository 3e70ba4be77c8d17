"""The HTTP glue of plugin configuration: /api/v1/plugins/{name}/config... (models, handlers,
routes). Handlers call one registry.config_values function each; the keyring comes from the
daemon's holder, loaded only when a secret is written or revealed."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from pydantic import Field

from pluginmon.daemon.api_http import Call, Route
from pluginmon.daemon.api_models import (
    ENVIRONMENT_PATTERN,
    Items,
    Query,
    Request,
    Response,
)
from pluginmon.registry import config_values
from pluginmon.registry.config_values import ConfigValue, missing_keyring_error
from pluginmon.registry.crypto import Keyring, KeyringError
from pluginmon.registry.errors import ForbiddenError
from pluginmon.registry.keyring import KeyringHolder
from pluginmon.registry.plugins import DEFAULT_ENVIRONMENT
from pluginmon.registry.tokens import Role

logger = logging.getLogger(__name__)


class ConfigPut(Request):
    value: Any = Field(description="Any JSON value, validated against the plugin's config_schema")
    secret: bool = Field(
        default=False, description='Encrypt at rest; read back as "***" unless revealed'
    )


class ConfigBulkPut(Request):
    """Several keys in one transaction (a schema's required keys set together)."""

    items: dict[str, ConfigPut] = Field(min_length=1, max_length=256)


class ConfigRollback(Request):
    version: int = Field(ge=1, description="The version whose value becomes current again")


class ConfigQuery(Query):
    environment: str = Field(default=DEFAULT_ENVIRONMENT, pattern=ENVIRONMENT_PATTERN)


class ConfigGetQuery(ConfigQuery):
    reveal: bool = Field(
        default=False, description="Admin tokens only: a secret's value in clear (audited)"
    )


class ConfigItemOut(Response):
    key: str
    environment: str
    value: Any
    secret: bool
    version: int
    current: bool
    created_by: str | None
    created_at: datetime
    encryption_key_id: str | None
    rollback_of: int | None

    @classmethod
    def of(cls, item: ConfigValue) -> ConfigItemOut:
        return cls(
            key=item.key,
            environment=item.environment,
            value=item.value,
            secret=item.secret,
            version=item.version,
            current=item.current,
            created_by=item.created_by,
            created_at=item.created_at,
            encryption_key_id=item.key_id,
            rollback_of=item.rollback_of,
        )


class ConfigHandlers:
    def __init__(self, keyring: KeyringHolder | None) -> None:
        self._keyring = keyring

    async def _keys(self) -> Keyring:
        if self._keyring is None:
            raise missing_keyring_error("this server has no secret keyring configured")
        try:
            return await self._keyring.get()
        except KeyringError as exc:
            # The detail (a path, a key id) is the operator's, not the caller's.
            logger.error("secret keyring unusable: %s", exc)
            raise missing_keyring_error(
                "the server's secret keyring is unusable (the daemon's log says why)"
            ) from None

    async def list_config(self, call: Call) -> Items[ConfigItemOut]:
        query: ConfigQuery = call.query
        found = await config_values.list_values(
            call.conn, call.params["name"], environment=query.environment, limit=query.limit
        )
        return Items[ConfigItemOut](items=[ConfigItemOut.of(v) for v in found])

    async def get_config_value(self, call: Call) -> ConfigItemOut:
        query: ConfigGetQuery = call.query
        if query.reveal and not call.principal.role.allows(Role.ADMIN):
            raise ForbiddenError("reveal=true needs an admin token", field="reveal")
        keyring = await self._keys() if query.reveal else None
        found = await config_values.get_value(
            call.conn,
            call.params["name"],
            call.params["key"],
            environment=query.environment,
            tenant_id=call.tenant_id,
            actor=call.actor,
            now=call.now,
            reveal=query.reveal,
            keyring=keyring,
        )
        return ConfigItemOut.of(found)

    async def put_config_value(self, call: Call) -> ConfigItemOut:
        body: ConfigPut = call.body
        query: ConfigQuery = call.query
        (written,) = await config_values.set_values(
            call.conn,
            call.params["name"],
            {call.params["key"]: (body.value, body.secret)},
            environment=query.environment,
            tenant_id=call.tenant_id,
            actor=call.actor,
            now=call.now,
            keyring=await self._keys() if body.secret else None,
        )
        return ConfigItemOut.of(written)

    async def put_config_values(self, call: Call) -> Items[ConfigItemOut]:
        body: ConfigBulkPut = call.body
        query: ConfigQuery = call.query
        written = await config_values.set_values(
            call.conn,
            call.params["name"],
            {key: (item.value, item.secret) for key, item in body.items.items()},
            environment=query.environment,
            tenant_id=call.tenant_id,
            actor=call.actor,
            now=call.now,
            keyring=await self._keys() if any(i.secret for i in body.items.values()) else None,
        )
        return Items[ConfigItemOut](items=[ConfigItemOut.of(v) for v in written])

    async def config_history(self, call: Call) -> Items[ConfigItemOut]:
        query: ConfigQuery = call.query
        found = await config_values.history(
            call.conn,
            call.params["name"],
            call.params["key"],
            environment=query.environment,
            limit=query.limit,
        )
        return Items[ConfigItemOut](items=[ConfigItemOut.of(v) for v in found])

    async def rollback_config_value(self, call: Call) -> ConfigItemOut:
        body: ConfigRollback = call.body
        query: ConfigQuery = call.query
        written = await config_values.rollback(
            call.conn,
            call.params["name"],
            call.params["key"],
            version=body.version,
            environment=query.environment,
            tenant_id=call.tenant_id,
            actor=call.actor,
            now=call.now,
            keyring=None if self._keyring is None else await self._keys(),
        )
        return ConfigItemOut.of(written)


def config_routes(h: ConfigHandlers) -> list[Route]:
    """The configuration endpoints (appended to daemon.api_routes' table)."""
    errors = (400, 404, 409, 413, 422)
    # fmt: off
    return [
        Route("GET", "/plugins/{name}/config",
              "Current configuration of one environment (secrets read as \"***\")",
              Items[ConfigItemOut], h.list_config, query=ConfigQuery, tag="config",
              errors=(404, 422)),
        Route("PATCH", "/plugins/{name}/config",
              "Set several keys of one environment in one transaction",
              Items[ConfigItemOut], h.put_config_values, role=Role.WRITER, body=ConfigBulkPut,
              query=ConfigQuery, tag="config", errors=errors),
        Route("GET", "/plugins/{name}/config/{key}",
              "One key's current value; reveal=true (admin, audited) shows a secret",
              ConfigItemOut, h.get_config_value, query=ConfigGetQuery, tag="config",
              errors=(404, 409, 422)),
        Route("PUT", "/plugins/{name}/config/{key}",
              "Set one key (a new version), validated against the config_schema",
              ConfigItemOut, h.put_config_value, role=Role.WRITER, body=ConfigPut,
              query=ConfigQuery, tag="config", errors=errors),
        Route("GET", "/plugins/{name}/config/{key}/history",
              "Every version of one key, newest first", Items[ConfigItemOut],
              h.config_history, query=ConfigQuery, tag="config", errors=(404, 422)),
        Route("POST", "/plugins/{name}/config/{key}/rollback",
              "Make an older version's value current again (as a new version)",
              ConfigItemOut, h.rollback_config_value, role=Role.WRITER, body=ConfigRollback,
              query=ConfigQuery, tag="config", errors=errors),
    ]
    # fmt: on
