"""Plugin configuration values: set, read, history and rollback per (plugin, environment, key),
validated against the plugin's ``config_schema`` with the full JSON Schema vocabulary, secrets
encrypted before they reach the database (registry/crypto.py).

Like registry/plugins.py, every query runs on a connection scoped to one tenant (row-level
security); environments never mix, because every statement names the environment. Each write
inserts a new version (sql/001's trigger retires the previous one and numbers it), so the
history is the table itself. Messages name the key, the JSON path and the schema's rule, never
the submitted value: a value may be a secret, and the message of a non-secret one has no
reason to differ.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import asyncpg

from pluginmon.registry import audit, crypto
from pluginmon.registry.actor import Actor
from pluginmon.registry.config_validation import json_path, validate_value
from pluginmon.registry.errors import ConflictError, InvalidError, NotFoundError
from pluginmon.registry.plugins import Plugin, check_environment, check_name, get_plugin
from pluginmon.storage.queries import detect_tenant_scope

MASK: Final = "***"
KEY_RE: Final = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
MAX_VALUE_BYTES: Final = 64 * 1024


@dataclass(frozen=True, slots=True)
class ConfigValue:
    """One version of one key. ``value`` is :data:`MASK` for a secret unless revealed."""

    key: str
    environment: str
    value: Any
    secret: bool
    version: int
    current: bool
    created_by: str | None
    created_at: datetime
    key_id: str | None
    rollback_of: int | None

    def audit_view(self) -> dict[str, Any]:
        """What an audit entry records: the value of a plain key, never a secret's."""
        view: dict[str, Any] = {"version": self.version, "encrypted": self.secret}
        if self.secret:
            view["encryption_key_id"] = self.key_id
        else:
            view["value"] = self.value
        if self.rollback_of is not None:
            view["rollback_of"] = self.rollback_of
        return view


def missing_keyring_error(message: str, *, field: str | None = None) -> ConflictError:
    """No keyring configured or usable (a ConflictError: the HTTP glue maps classes exactly)."""
    return ConflictError(message, field=field, code="no_keyring")


def check_key(key: str) -> str:
    if not KEY_RE.fullmatch(key):
        raise InvalidError(
            f"config key {key!r} must be 1-128 letters, digits, '_', '.' or '-'", field="key"
        )
    return key


# -- reading ---------------------------------------------------------------------------------------

_SELECT = """
SELECT c.id, c.key, c.environment, c.value::text AS value, c.is_secret, c.version,
       c.is_current, c.created_by, c.created_at, c.secret_key_id, c.rollback_of,
       c.secret_ciphertext
  FROM plugin_config c
"""


# The current values of one environment in two branches. Plain values: the predicate repeats
# the seed's partial index idx_plugin_config_non_secret ((tenant_id, environment, key) WHERE
# is_current AND NOT is_secret), so the planner may read them through it and no secret row
# enters that read. Secrets: masked, so neither their value column nor ciphertext is read.
LIST_CURRENT_SQL: Final = """
SELECT c.id, c.key, c.environment, c.value::text AS value, c.is_secret, c.version,
       c.is_current, c.created_by, c.created_at, c.secret_key_id, c.rollback_of
  FROM plugin_config c
 WHERE c.tenant_id = (SELECT p.tenant_id FROM plugins p WHERE p.id = $1)
   AND c.environment = $2 AND c.is_current AND NOT c.is_secret AND c.plugin_id = $1
UNION ALL
SELECT c.id, c.key, c.environment, NULL::text AS value, c.is_secret, c.version,
       c.is_current, c.created_by, c.created_at, c.secret_key_id, c.rollback_of
  FROM plugin_config c
 WHERE c.plugin_id = $1 AND c.environment = $2 AND c.is_current AND c.is_secret
 ORDER BY key LIMIT $3"""


def _value(row: asyncpg.Record) -> ConfigValue:
    return ConfigValue(
        key=row["key"],
        environment=row["environment"],
        value=MASK if row["is_secret"] else json.loads(row["value"]),
        secret=row["is_secret"],
        version=row["version"],
        current=row["is_current"],
        created_by=row["created_by"],
        created_at=row["created_at"],
        key_id=row["secret_key_id"],
        rollback_of=row["rollback_of"],
    )


def where(plugin: str, environment: str, key: str) -> str:
    return f"secret {plugin}/{environment}/{key}"


async def list_values(
    conn: asyncpg.Connection, plugin_name: str, *, environment: str, limit: int = 1000
) -> list[ConfigValue]:
    """The current value of every key of one environment (secrets masked)."""
    check_environment(environment)
    plugin = await get_plugin(conn, plugin_name)
    rows = await conn.fetch(LIST_CURRENT_SQL, plugin.id, environment, limit)
    return [_value(r) for r in rows]


async def _row(
    conn: asyncpg.Connection,
    plugin: Plugin,
    key: str,
    *,
    environment: str,
    version: int | None = None,
) -> asyncpg.Record:
    row = await conn.fetchrow(
        _SELECT
        + """WHERE c.plugin_id = $1 AND c.environment = $2 AND c.key = $3
               AND (CASE WHEN $4::integer IS NULL THEN c.is_current ELSE c.version = $4 END)""",
        plugin.id,
        environment,
        key,
        version,
    )
    if row is None:
        what = f"version {version} of " if version is not None else ""
        raise NotFoundError(
            f"no {what}config key {key!r} for plugin {plugin.name!r} in environment "
            f"{environment!r}",
            field="version" if version is not None else "key",
        )
    return row


def _decrypt(
    keyring: crypto.Keyring | None,
    row: asyncpg.Record,
    *,
    tenant_id: str,
    plugin: str,
) -> Any:
    if keyring is None:
        raise missing_keyring_error("this server has no secret keyring configured")
    plaintext = crypto.decrypt(
        keyring,
        bytes(row["secret_ciphertext"]),
        key_id=row["secret_key_id"],
        aad=crypto.secret_aad(
            tenant_id=tenant_id, plugin=plugin, environment=row["environment"], key=row["key"]
        ),
        where=where(plugin, row["environment"], row["key"]),
    )
    return json.loads(plaintext)


async def get_value(
    conn: asyncpg.Connection,
    plugin_name: str,
    key: str,
    *,
    environment: str,
    tenant_id: str,
    actor: Actor,
    now: datetime,
    reveal: bool = False,
    keyring: crypto.Keyring | None = None,
) -> ConfigValue:
    """The current value; a secret's plaintext only with ``reveal`` (the caller checks the
    role), and then an audit entry records who saw which key (not what)."""
    check_key(key)
    check_environment(environment)
    plugin = await get_plugin(conn, plugin_name)
    row = await _row(conn, plugin, key, environment=environment)
    found = _value(row)
    if not (reveal and found.secret):
        return found
    value = _decrypt(keyring, row, tenant_id=tenant_id, plugin=plugin.name)
    await audit.append(
        conn,
        tenant_id=tenant_id,
        actor=actor,
        action="config.secret.reveal",
        entity_type="plugin_config",
        entity_id=f"{plugin.name}/{environment}/{key}",
        plugin_id=plugin.id,
        plugin_name=plugin.name,
        environment=environment,
        occurred_at=now,
        details={"version": found.version, "encryption_key_id": found.key_id},
    )
    return ConfigValue(
        key=found.key,
        environment=found.environment,
        value=value,
        secret=True,
        version=found.version,
        current=found.current,
        created_by=found.created_by,
        created_at=found.created_at,
        key_id=found.key_id,
        rollback_of=found.rollback_of,
    )


async def history(
    conn: asyncpg.Connection, plugin_name: str, key: str, *, environment: str, limit: int = 100
) -> list[ConfigValue]:
    """Every version of one key in one environment, newest first (secrets masked)."""
    check_key(key)
    check_environment(environment)
    plugin = await get_plugin(conn, plugin_name)
    rows = await conn.fetch(
        _SELECT
        + """WHERE c.plugin_id = $1 AND c.environment = $2 AND c.key = $3
             ORDER BY c.version DESC LIMIT $4""",
        plugin.id,
        environment,
        key,
        limit,
    )
    if not rows:
        raise NotFoundError(
            f"no config key {key!r} for plugin {plugin.name!r} in environment {environment!r}",
            field="key",
        )
    return [_value(r) for r in rows]


# -- writing ---------------------------------------------------------------------------------------


async def _missing_required(
    conn: asyncpg.Connection, plugin: Plugin, environment: str
) -> list[str]:
    """The schema's required keys this environment lacks (the rule sql/001's deferred trigger
    enforces at commit; checked here first to answer with names instead of a constraint)."""
    required = (plugin.config_schema or {}).get("required")
    if not isinstance(required, list) or not required:
        return []
    present = await conn.fetch(
        """SELECT key FROM plugin_config
            WHERE plugin_id = $1 AND environment = $2 AND is_current
              AND (is_secret OR value <> 'null'::jsonb)""",
        plugin.id,
        environment,
    )
    have = {r["key"] for r in present}
    return sorted(str(k) for k in required if k not in have)


def _validate_all(
    schema: Mapping[str, Any] | None, prepared: list[tuple[str, Any, bool, str]]
) -> None:
    for key, value, secret, _text in prepared:
        validate_value(schema, key, value, secret=secret)


# Retire the key's current version and return the next version number (1 for a new key).
_NEXT_VERSION = """
WITH retired AS (
    UPDATE plugin_config SET is_current = false
     WHERE tenant_id = $1 AND plugin_id = $2 AND environment = $3 AND key = $4 AND is_current
    RETURNING version
)
SELECT coalesce(max(version), 0) + 1 FROM plugin_config
 WHERE tenant_id = $1 AND plugin_id = $2 AND environment = $3 AND key = $4
"""


async def set_values(
    conn: asyncpg.Connection,
    plugin_name: str,
    values: Mapping[str, tuple[Any, bool]],
    *,
    environment: str,
    tenant_id: str,
    actor: Actor,
    now: datetime,
    keyring: crypto.Keyring | None,
    rollback_of: Mapping[str, int] | None = None,
) -> list[ConfigValue]:
    """Write ``values`` (key -> (value, secret)) as new versions in one transaction: each is
    validated, secrets are encrypted under the primary key, and one audit entry per key
    records the before and after (a secret's version and key id, never its value)."""
    check_name(plugin_name)
    check_environment(environment)
    if not values:
        raise InvalidError("no config values given", field="items")
    for key in values:
        check_key(key)
    plugin = await get_plugin(conn, plugin_name, for_update=True, tenant_id=tenant_id)
    prepared: list[tuple[str, Any, bool, str]] = []
    for key, (value, secret) in sorted(values.items()):
        # The size first: it bounds the work validation below may do.
        text = json.dumps(value, separators=(",", ":"))
        if len(text.encode()) > MAX_VALUE_BYTES:
            raise InvalidError(
                f"config {json_path([key])} is over {MAX_VALUE_BYTES} bytes as JSON",
                field="value",
            )
        prepared.append((key, value, secret, text))
    # Validation is pure CPU (a schema of nested allOf/anyOf over a 64 KiB value can take a
    # while even with linear-time regexes): off the event loop, which also samples and serves.
    await asyncio.to_thread(_validate_all, plugin.config_schema, prepared)
    written: list[ConfigValue] = []
    async with conn.transaction():
        for key, _, secret, text in prepared:
            before_row = await conn.fetchrow(
                _SELECT
                + """WHERE c.plugin_id = $1 AND c.environment = $2 AND c.key = $3
                       AND c.is_current""",
                plugin.id,
                environment,
                key,
            )
            ciphertext: bytes | None = None
            key_id: str | None = None
            if secret:
                if keyring is None:
                    raise missing_keyring_error(
                        "this server has no secret keyring configured; secrets cannot be stored",
                        field="secret",
                    )
                ciphertext, key_id = crypto.encrypt(
                    keyring,
                    text.encode(),
                    aad=crypto.secret_aad(
                        tenant_id=tenant_id, plugin=plugin.name, environment=environment, key=key
                    ),
                )
            # The previous current version retires and the new one takes the next number
            # here, not only in sql/001's trigger: Citus has no triggers on distributed tables
            # (sql/100). Where the trigger runs it finds the same number (the plugin row,
            # locked above, serialises writers of the plugin's keys).
            version = await conn.fetchval(_NEXT_VERSION, tenant_id, plugin.id, environment, key)
            row = await conn.fetchrow(
                """INSERT INTO plugin_config AS c (tenant_id, plugin_id, environment, key, value,
                                            is_secret, secret_ciphertext, secret_key_id,
                                            created_by, created_at, rollback_of, version)
                   VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7, $8, $9, $10, $11, $12)
                   RETURNING c.id, c.key, c.environment, c.value::text AS value, c.is_secret,
                             c.version, c.is_current, c.created_by, c.created_at,
                             c.secret_key_id, c.rollback_of""",
                tenant_id,
                plugin.id,
                environment,
                key,
                None if secret else text,
                secret,
                ciphertext,
                key_id,
                actor.name,
                now,
                (rollback_of or {}).get(key),
                version,
            )
            assert row is not None
            after = _value(row)
            written.append(after)
            await audit.append(
                conn,
                tenant_id=tenant_id,
                actor=actor,
                action="config.rollback" if after.rollback_of is not None else "config.set",
                entity_type="plugin_config",
                entity_id=f"{plugin.name}/{environment}/{key}",
                plugin_id=plugin.id,
                plugin_name=plugin.name,
                environment=environment,
                occurred_at=now,
                before=None if before_row is None else _value(before_row).audit_view(),
                after=after.audit_view(),
            )
        missing = await _missing_required(conn, plugin, environment)
        if missing:
            raise InvalidError(
                f"plugin {plugin.name!r} in environment {environment!r} would lack required "
                f"config key(s) {', '.join(missing)}; set them in the same request",
                field=missing[0],
                code="missing_required",
            )
    return written


async def rollback(
    conn: asyncpg.Connection,
    plugin_name: str,
    key: str,
    *,
    version: int,
    environment: str,
    tenant_id: str,
    actor: Actor,
    now: datetime,
    keyring: crypto.Keyring | None,
) -> ConfigValue:
    """A new version holding version ``version``'s value, checked against today's schema. A
    secret is decrypted here to be validated and re-encrypted under the primary key."""
    check_key(key)
    check_environment(environment)
    plugin = await get_plugin(conn, plugin_name)
    row = await _row(conn, plugin, key, environment=environment, version=version)
    if row["is_secret"]:
        value = _decrypt(keyring, row, tenant_id=tenant_id, plugin=plugin.name)
    else:
        value = json.loads(row["value"])
    (written,) = await set_values(
        conn,
        plugin_name,
        {key: (value, bool(row["is_secret"]))},
        environment=environment,
        tenant_id=tenant_id,
        actor=actor,
        now=now,
        keyring=keyring,
        rollback_of={key: version},
    )
    return written


async def enter_tenant(conn: asyncpg.Connection, tenant_id: str, *, role: str) -> None:
    """For the CLI: the rest of the caller's transaction runs as ``role`` under row-level
    security for ``tenant_id``, as an API request does."""
    exists = await conn.fetchval("SELECT EXISTS (SELECT 1 FROM tenants WHERE id = $1)", tenant_id)
    if not exists:
        raise NotFoundError(f"no tenant {tenant_id!r}", field="tenant")
    await (await detect_tenant_scope(conn)).enter(conn, tenant_id, role=role)
