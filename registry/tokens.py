"""API tokens: issuing (32 random bytes, stored only as a SHA-256), checking, listing, revoking.

A token reads ``pmt_<key_id>_<secret>``: ``key_id`` (8 random bytes, hex) finds the row
without revealing anything, ``secret`` (32 random bytes, base64url) is hashed and compared
with the stored hash in constant time. The secret itself is never stored or logged; the only
time it exists outside the caller's hands is the return value of :func:`create_token`.
Revocation takes effect on the next request: every request looks the token up again.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

import asyncpg

from pluginmon.registry import audit
from pluginmon.registry.actor import Actor
from pluginmon.registry.errors import ConflictError, InvalidError, NotFoundError
from pluginmon.storage.queries import PLAIN_SCOPE, TenantScope

TOKEN_PREFIX = "pmt_"  # noqa: S105 - the visible prefix, not a secret
SECRET_BYTES = 32
_TOKEN_RE = re.compile(r"^pmt_(?P<key_id>[0-9a-f]{16})_(?P<secret>[A-Za-z0-9_-]{43})$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@:-]{0,127}$")
TENANT_SLUG_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
# Compared against when the key id is unknown, so a miss costs the same as a wrong secret.
_DUMMY_DIGEST = hashlib.sha256(b"pluginmon: no such token").digest()


class Role(StrEnum):
    READER = "reader"
    WRITER = "writer"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return _RANKS[self]

    def allows(self, needed: Role) -> bool:
        return self.rank >= needed.rank


_RANKS = {Role.READER: 0, Role.WRITER: 1, Role.ADMIN: 2}


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated token. ``tenant_id`` is None for an operator token."""

    token_id: int
    name: str
    tenant_id: str | None
    role: Role

    @property
    def operator(self) -> bool:
        return self.tenant_id is None


@dataclass(frozen=True, slots=True)
class TokenInfo:
    id: int
    name: str
    tenant_id: str | None
    role: Role
    created_by: str
    created_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True, slots=True, repr=False)
class IssuedToken:
    key_id: str
    secret: bytes

    @property
    def text(self) -> str:
        encoded = base64.urlsafe_b64encode(self.secret).rstrip(b"=").decode("ascii")
        return f"{TOKEN_PREFIX}{self.key_id}_{encoded}"

    def __repr__(self) -> str:
        return f"IssuedToken(key_id={self.key_id!r}, secret=***)"


def issue() -> IssuedToken:
    return IssuedToken(key_id=secrets.token_hex(8), secret=secrets.token_bytes(SECRET_BYTES))


def parse(text: str) -> IssuedToken | None:
    """The parts of a token string, or None when it is not one of ours."""
    match = _TOKEN_RE.match(text)
    if match is None:
        return None
    try:
        secret = base64.urlsafe_b64decode(match["secret"] + "=")
    except (binascii.Error, ValueError):
        return None
    if len(secret) != SECRET_BYTES:
        return None
    token = IssuedToken(key_id=match["key_id"], secret=secret)
    # 32 bytes are 43 characters whose last one carries 2 unused bits: other spellings of
    # the same bytes (a last character changed only in those bits) are not the token issued.
    if not hmac.compare_digest(token.text, text):
        return None
    return token


def digest(secret: bytes) -> bytes:
    return hashlib.sha256(secret).digest()


def check_tenant_slug(tenant: str, *, field: str = "tenant") -> str:
    if not TENANT_SLUG_RE.fullmatch(tenant):
        raise InvalidError(
            f"tenant {tenant!r} is not a valid slug (lower-case letters, digits, '_' and '-', "
            "starting with a letter or digit, at most 63 characters)",
            field=field,
        )
    return tenant


def _info(row: asyncpg.Record) -> TokenInfo:
    return TokenInfo(
        id=row["id"],
        name=row["name"],
        tenant_id=row["tenant_id"],
        role=Role(row["role"]),
        created_by=row["created_by"],
        created_at=row["created_at"],
        revoked_at=row["revoked_at"],
    )


async def authenticate(
    conn: asyncpg.Connection,
    text: str,
    *,
    enter_role: str | None = None,
    operator_tenant: str | None = None,
    scope: TenantScope = PLAIN_SCOPE,
) -> Principal | None:
    """The live token ``text`` stands for, or None (malformed, unknown, wrong, revoked).

    With ``enter_role``, the same statement also switches the transaction to that role and
    sets ``pluginmon.tenant_id`` to the token's tenant (``operator_tenant`` for an operator
    token), saving a round trip per request. The caller must roll back when the result is
    None or not allowed in: the switch happened whatever the token was. ``scope`` is the
    database's (:func:`pluginmon.storage.queries.detect_tenant_scope`): on Citus an entered
    tenant is then also sent to the workers, one more statement for a live token.
    """
    token = parse(text)
    if token is None:
        return None
    if enter_role is None:
        row = await conn.fetchrow(
            """SELECT id, name, tenant_id, role, secret_sha256, revoked_at
                 FROM api_tokens WHERE key_id = $1""",
            token.key_id,
        )
    else:
        # The table is read (and its privileges checked) as the current role before the
        # select list switches roles.
        row = await conn.fetchrow(
            """SELECT id, name, tenant_id, role, secret_sha256, revoked_at,
                      set_config('role', $2, true) AS entered_role,
                      set_config('pluginmon.tenant_id', coalesce(tenant_id, $3, ''), true)
                          AS entered_tenant
                 FROM api_tokens WHERE key_id = $1""",
            token.key_id,
            enter_role,
            operator_tenant,
        )
    stored = _DUMMY_DIGEST if row is None else bytes(row["secret_sha256"])
    matches = hmac.compare_digest(digest(token.secret), stored)
    if row is None or not matches or row["revoked_at"] is not None:
        return None
    if enter_role is not None:
        await scope.propagate(conn, row["entered_tenant"] or None)
    return Principal(
        token_id=row["id"], name=row["name"], tenant_id=row["tenant_id"], role=Role(row["role"])
    )


async def create_token(
    conn: asyncpg.Connection,
    *,
    name: str,
    tenant_id: str | None,
    role: Role,
    actor: Actor,
    now: datetime,
) -> tuple[TokenInfo, str]:
    """A new token (and its tenant when new), audited; returns the info and the token text.

    ``tenant_id=None`` makes an operator token. Names are never reused, revoked ones included.
    """
    if not _NAME_RE.fullmatch(name):
        raise InvalidError(
            f"token name {name!r} must be 1-128 letters, digits or . _ @ : - "
            "(starting with a letter or digit)",
            field="name",
        )
    if tenant_id is not None:
        check_tenant_slug(tenant_id)
    issued = issue()
    async with conn.transaction():
        if tenant_id is not None:
            created = await conn.fetchval(
                "INSERT INTO tenants (id, name) VALUES ($1, $1) ON CONFLICT (id) DO NOTHING"
                " RETURNING id",
                tenant_id,
            )
            if created is not None:
                await audit.append(
                    conn,
                    tenant_id=tenant_id,
                    actor=actor,
                    action="tenant.create",
                    entity_type="tenant",
                    entity_id=tenant_id,
                    occurred_at=now,
                )
        try:
            row = await conn.fetchrow(
                """INSERT INTO api_tokens (name, tenant_id, role, key_id, secret_sha256,
                                           created_by, created_at)
                   VALUES ($1, $2, $3, $4, $5, $6, $7)
                   RETURNING id, name, tenant_id, role, created_by, created_at, revoked_at""",
                name,
                tenant_id,
                role.value,
                issued.key_id,
                digest(issued.secret),
                actor.name,
                now,
            )
        except asyncpg.UniqueViolationError:
            raise ConflictError(
                f"a token named {name!r} exists already (names are never reused, "
                "revoked tokens keep theirs)",
                field="name",
                code="already_exists",
            ) from None
        assert row is not None
        info = _info(row)
        await audit.append(
            conn,
            tenant_id=tenant_id or audit.SYSTEM_TENANT,
            actor=actor,
            action="token.create",
            entity_type="token",
            entity_id=name,
            occurred_at=now,
            after={"name": name, "role": role.value, "operator": tenant_id is None},
        )
    return info, issued.text


async def list_tokens(conn: asyncpg.Connection) -> list[TokenInfo]:
    rows = await conn.fetch(
        """SELECT id, name, tenant_id, role, created_by, created_at, revoked_at
             FROM api_tokens ORDER BY tenant_id NULLS FIRST, name"""
    )
    return [_info(r) for r in rows]


async def revoke_token(
    conn: asyncpg.Connection, name: str, *, actor: Actor, now: datetime
) -> tuple[TokenInfo, bool]:
    """Revoke the token ``name``; returns its info and whether this call revoked it."""
    async with conn.transaction():
        row = await conn.fetchrow(
            """UPDATE api_tokens SET revoked_at = $2, revoked_by = $3
                WHERE name = $1 AND revoked_at IS NULL
            RETURNING id, name, tenant_id, role, created_by, created_at, revoked_at""",
            name,
            now,
            actor.name,
        )
        if row is None:
            existing = await conn.fetchrow(
                """SELECT id, name, tenant_id, role, created_by, created_at, revoked_at
                     FROM api_tokens WHERE name = $1""",
                name,
            )
            if existing is None:
                raise NotFoundError(f"no token named {name!r}", field="name")
            return _info(existing), False
        info = _info(row)
        await audit.append(
            conn,
            tenant_id=info.tenant_id or audit.SYSTEM_TENANT,
            actor=actor,
            action="token.revoke",
            entity_type="token",
            entity_id=name,
            occurred_at=now,
            before={"revoked": False},
            after={"revoked": True},
        )
    return info, True
