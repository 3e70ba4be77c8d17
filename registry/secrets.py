"""Key rotation chores across all tenants: which keys encrypt how many secrets, and the
rewrap of every secret (history included) to the primary key in batches.

Rewrap is resumable by construction: each batch is its own transaction, selecting the secrets
whose key is not the primary yet (``FOR UPDATE SKIP LOCKED``, so two runs share the work), so
a run killed in the middle leaves committed batches done and the rest for the next run. Only
data keys are re-wrapped (registry/crypto.py): no value is ever decrypted, so no plaintext
exists in the process to leak. Runs on the owner's connection (the CLI's), which row-level
security does not restrict.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from pluginmon.registry import audit, crypto
from pluginmon.registry.actor import Actor

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 500


@dataclass(frozen=True, slots=True)
class KeyUsage:
    key_id: str
    values: int  # every version, current or not


async def key_usage(conn: asyncpg.Connection) -> list[KeyUsage]:
    rows = await conn.fetch(
        """SELECT secret_key_id, count(*) AS n FROM plugin_config
            WHERE is_secret GROUP BY secret_key_id ORDER BY secret_key_id"""
    )
    return [KeyUsage(key_id=r["secret_key_id"], values=r["n"]) for r in rows]


async def values_under(conn: asyncpg.Connection, key_id: str) -> int:
    count = await conn.fetchval(
        "SELECT count(*) FROM plugin_config WHERE is_secret AND secret_key_id = $1", key_id
    )
    return int(count)


@dataclass(frozen=True, slots=True)
class RewrapReport:
    batches: int
    values: int
    remaining: int


async def rewrap_batch(
    conn: asyncpg.Connection,
    keyring: crypto.Keyring,
    *,
    batch_size: int,
    actor: Actor,
    now: datetime,
) -> int:
    """Re-wrap up to ``batch_size`` secrets to the primary key in one transaction; how many.
    An audit entry per tenant in the batch records the count and the keys (no value).

    Tenant by tenant: Citus locks rows only within one shard group (the same rows, in a few
    more statements, on the other backends). The tenants are read without a lock."""
    primary = keyring.primary_id
    done = 0
    async with conn.transaction():
        tenants = await conn.fetch(
            """SELECT DISTINCT tenant_id FROM plugin_config
                WHERE is_secret AND secret_key_id <> $1 ORDER BY tenant_id""",
            primary,
        )
        for tenant in tenants:
            if done >= batch_size:
                break
            done += await _rewrap_tenant(
                conn,
                keyring,
                tenant_id=tenant["tenant_id"],
                limit=batch_size - done,
                actor=actor,
                now=now,
            )
    return done


async def _rewrap_tenant(
    conn: asyncpg.Connection,
    keyring: crypto.Keyring,
    *,
    tenant_id: str,
    limit: int,
    actor: Actor,
    now: datetime,
) -> int:
    primary = keyring.primary_id
    rows = await conn.fetch(
        """SELECT c.id, c.tenant_id, p.name AS plugin, c.environment, c.key,
                  c.secret_ciphertext, c.secret_key_id
             FROM plugin_config c JOIN plugins p ON p.id = c.plugin_id AND p.tenant_id = c.tenant_id
            WHERE c.is_secret AND c.secret_key_id <> $1 AND c.tenant_id = $3
            ORDER BY c.id
            LIMIT $2
              FOR UPDATE OF c SKIP LOCKED""",
        primary,
        limit,
        tenant_id,
    )
    if not rows:
        return 0
    ids: list[int] = []
    blobs: list[bytes] = []
    counts: Counter[str] = Counter()
    for r in rows:
        blobs.append(
            crypto.rewrap(
                keyring,
                bytes(r["secret_ciphertext"]),
                key_id=r["secret_key_id"],
                aad=crypto.secret_aad(
                    tenant_id=r["tenant_id"],
                    plugin=r["plugin"],
                    environment=r["environment"],
                    key=r["key"],
                ),
                where=f"secret {r['plugin']}/{r['environment']}/{r['key']} of tenant "
                f"{r['tenant_id']} (row {r['id']})",
            )
        )
        ids.append(r["id"])
        counts[r["secret_key_id"]] += 1
    await conn.execute(
        """UPDATE plugin_config c SET secret_ciphertext = u.ciphertext, secret_key_id = $3
             FROM unnest($1::bigint[], $2::bytea[]) AS u(id, ciphertext)
            WHERE c.id = u.id AND c.tenant_id = $4""",
        ids,
        blobs,
        primary,
        tenant_id,
    )
    await audit.append(
        conn,
        tenant_id=tenant_id,
        actor=actor,
        action="config.secret.rewrap",
        entity_type="keyring",
        entity_id=primary,
        occurred_at=now,
        details={"values": sum(counts.values()), "from_key_ids": dict(counts)},
    )
    return len(rows)


async def rewrap_all(
    conn: asyncpg.Connection,
    keyring: crypto.Keyring,
    *,
    actor: Actor,
    clock: Callable[[], datetime],
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Callable[[int], None] | None = None,
) -> RewrapReport:
    """Batches until no secret is left under another key than the primary."""
    batches = 0
    total = 0
    while True:
        done = await rewrap_batch(conn, keyring, batch_size=batch_size, actor=actor, now=clock())
        if done == 0:
            break
        batches += 1
        total += done
        if progress is not None:
            progress(total)
    remaining = await conn.fetchval(
        "SELECT count(*) FROM plugin_config WHERE is_secret AND secret_key_id <> $1",
        keyring.primary_id,
    )
    logger.info(
        "rewrap: %d secret(s) re-wrapped to key %s in %d batch(es)",
        total,
        keyring.primary_id,
        batches,
    )
    return RewrapReport(batches=batches, values=total, remaining=int(remaining))
