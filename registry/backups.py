"""Backup records and restore points: registering what the platform's backup job wrote,
recording each verification, restore points checked against their backup, expiry.

A backup is registered ``completed`` (the job calls the API when it has finished one) with
its provider, location, size and SHA-256. Verification re-reads the artifact
(registry.backup_readers) and records the outcome both as a history row and as the backup's
latest state; ``verified_at`` moves only on success. A restore point records the checksum of
what a restore produced; it is ``restored`` and verified when that equals the backup's
checksum, ``invalid`` otherwise. That a restore point's backup is of the same plugin and
tenant is the database's rule (sql/080_backups.sql), not this module's.

Every write leaves one audit entry in the caller's transaction.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

import asyncpg

from pluginmon.registry import audit, plugins
from pluginmon.registry.actor import Actor
from pluginmon.registry.backup_readers import Expected, Outcome, Readers, VerifyStatus
from pluginmon.registry.errors import ConflictError, InvalidError, NotFoundError

SHA256_HEX_RE = re.compile(r"^[0-9a-f]{64}$")
CHECKSUM_PREFIX = "sha256:"


class Provider(StrEnum):
    """The seed's storage providers (plugin_backups_provider_check)."""

    S3 = "s3"
    GCS = "gcs"
    AZURE_BLOB = "azure_blob"
    LOCAL = "local"
    SFTP = "sftp"
    NFS = "nfs"


@dataclass(frozen=True, slots=True)
class LastVerification:
    at: datetime
    status: VerifyStatus
    result: str
    transient: bool
    reason: str | None


@dataclass(frozen=True, slots=True)
class Backup:
    id: int
    tenant_id: str
    plugin_id: int
    plugin: str
    environment: str
    provider: Provider
    location: str
    size_bytes: int
    checksum_sha256: str
    plugin_version: str | None
    status: str
    created_by: str | None
    created_at: datetime
    completed_at: datetime | None
    verified_at: datetime | None
    expires_at: datetime | None
    last_verification: LastVerification | None

    @property
    def expected(self) -> Expected:
        return Expected(size_bytes=self.size_bytes, sha256_hex=self.checksum_sha256)


@dataclass(frozen=True, slots=True)
class Verification:
    id: int
    backup_id: int
    started_at: datetime
    duration_ms: int
    status: VerifyStatus
    result: str
    transient: bool
    reason: str | None
    observed_size_bytes: int | None
    observed_checksum_sha256: str | None


@dataclass(frozen=True, slots=True)
class RestorePoint:
    id: int
    backup_id: int
    plugin: str
    environment: str
    label: str
    provider: str
    location: str
    checksum_sha256: str | None
    status: str
    verified: bool
    plugin_version: str | None
    restored_at: datetime | None
    created_by: str | None
    created_at: datetime


BACKUP_SELECT = """
SELECT b.id, b.tenant_id, b.plugin_id, p.name AS plugin, b.environment, b.provider, b.location,
       b.size_bytes, b.checksum, b.plugin_version, b.status, b.created_by, b.created_at,
       b.completed_at, b.verified_at, b.expires_at, b.last_verification_at,
       b.last_verification_status, b.last_verification_result, b.last_verification_transient,
       b.last_verification_reason
  FROM plugin_backups b JOIN plugins p ON p.id = b.plugin_id AND p.tenant_id = b.tenant_id
"""


def _hex(checksum: str | None) -> str:
    return (checksum or "").removeprefix(CHECKSUM_PREFIX)


def backup_of(row: asyncpg.Record) -> Backup:
    last = None
    if row["last_verification_at"] is not None:
        last = LastVerification(
            at=row["last_verification_at"],
            status=VerifyStatus(row["last_verification_status"]),
            result=row["last_verification_result"],
            transient=row["last_verification_transient"],
            reason=row["last_verification_reason"],
        )
    return Backup(
        id=row["id"],
        tenant_id=row["tenant_id"],
        plugin_id=row["plugin_id"],
        plugin=row["plugin"],
        environment=row["environment"],
        provider=Provider(row["provider"]),
        location=row["location"],
        size_bytes=row["size_bytes"] or 0,
        checksum_sha256=_hex(row["checksum"]),
        plugin_version=row["plugin_version"],
        status=row["status"],
        created_by=row["created_by"],
        created_at=row["created_at"],
        completed_at=row["completed_at"],
        verified_at=row["verified_at"],
        expires_at=row["expires_at"],
        last_verification=last,
    )


def check_sha256(value: str, *, field: str = "checksum_sha256") -> str:
    if not SHA256_HEX_RE.fullmatch(value):
        raise InvalidError(f"{field} must be 64 lowercase hex digits (SHA-256)", field=field)
    return value


def _audit_view(backup: Backup) -> dict[str, Any]:
    return {
        "provider": backup.provider.value,
        "location": backup.location,
        "size_bytes": backup.size_bytes,
        "checksum_sha256": backup.checksum_sha256,
        "status": backup.status,
        "expires_at": backup.expires_at,
    }


async def get_backup(conn: asyncpg.Connection, backup_id: int) -> Backup:
    row = await conn.fetchrow(BACKUP_SELECT + " WHERE b.id = $1", backup_id)
    if row is None:
        raise NotFoundError(f"no backup with id {backup_id}", field="id")
    return backup_of(row)


async def list_backups(
    conn: asyncpg.Connection, plugin_name: str, *, environment: str | None, limit: int
) -> list[Backup]:
    rows = await conn.fetch(
        BACKUP_SELECT
        + """ WHERE p.name = $1 AND ($2::text IS NULL OR b.environment = $2)
              ORDER BY b.created_at DESC, b.id DESC LIMIT $3""",
        plugin_name,
        environment,
        limit,
    )
    return [backup_of(r) for r in rows]


async def register_backup(
    conn: asyncpg.Connection,
    *,
    tenant_id: str,
    actor: Actor,
    now: datetime,
    plugin_name: str,
    provider: Provider,
    location: str,
    size_bytes: int,
    checksum_sha256: str,
    environment: str,
    readers: Readers,
    expires_at: datetime | None = None,
    completed_at: datetime | None = None,
    plugin_version: str | None = None,
) -> Backup:
    """Record a finished backup (status ``completed``, not yet verified). A location outside
    the provider's allow-list for ``tenant_id`` is refused here, before anything is stored."""
    plugins.check_environment(environment)
    check_sha256(checksum_sha256)
    if size_bytes < 0:
        raise InvalidError("size_bytes must be >= 0", field="size_bytes")
    if not location.strip():
        raise InvalidError("location must not be empty", field="location")
    if expires_at is not None and expires_at <= now:
        raise InvalidError("expires_at must be in the future", field="expires_at")
    refused = readers.refusal(provider.value, location, tenant=tenant_id)
    if refused is not None:
        raise InvalidError(
            f"location refused ({refused.result.value}): {refused.reason}", field="location"
        )
    plugin = await plugins.get_plugin(conn, plugin_name)
    backup_id = await conn.fetchval(
        """INSERT INTO plugin_backups (tenant_id, plugin_id, environment, provider, location,
               checksum, size_bytes, plugin_version, status, created_by, created_at,
               completed_at, expires_at)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'completed', $9, $10, $11, $12)
           RETURNING id""",
        tenant_id,
        plugin.id,
        environment,
        provider.value,
        location,
        CHECKSUM_PREFIX + checksum_sha256,
        size_bytes,
        plugin_version,
        actor.name,
        now,
        completed_at or now,
        expires_at,
    )
    backup = await get_backup(conn, backup_id)
    await audit.append(
        conn,
        tenant_id=tenant_id,
        actor=actor,
        action="backup.register",
        entity_type="backup",
        entity_id=str(backup.id),
        plugin_id=plugin.id,
        plugin_name=plugin.name,
        environment=environment,
        occurred_at=now,
        after=_audit_view(backup),
    )
    return backup


async def record_verification(
    conn: asyncpg.Connection,
    backup: Backup,
    outcome: Outcome,
    *,
    actor: Actor,
    started_at: datetime,
    duration_ms: int,
) -> Verification:
    """Store ``outcome`` as history and as the backup's latest state, with its audit entry."""
    async with conn.transaction():
        row = await conn.fetchrow(
            """INSERT INTO plugin_backup_verifications (tenant_id, plugin_id, backup_id,
                   started_at, duration_ms, status, result, transient, reason,
                   observed_size_bytes, observed_checksum, actor)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
               RETURNING id""",
            backup.tenant_id,
            backup.plugin_id,
            backup.id,
            started_at,
            max(0, duration_ms),
            outcome.status.value,
            outcome.result.value,
            outcome.transient,
            outcome.reason,
            outcome.observed_size_bytes,
            None
            if outcome.observed_sha256_hex is None
            else CHECKSUM_PREFIX + outcome.observed_sha256_hex,
            actor.name,
        )
        assert row is not None
        updated = await conn.execute(
            """UPDATE plugin_backups
                  SET last_verification_at = $2, last_verification_status = $3,
                      last_verification_result = $4, last_verification_transient = $5,
                      last_verification_reason = $6,
                      verified_at = CASE WHEN $3 = 'verified' THEN $2 ELSE verified_at END
                WHERE id = $1""",
            backup.id,
            started_at,
            outcome.status.value,
            outcome.result.value,
            outcome.transient,
            outcome.reason,
        )
        if updated != "UPDATE 1":
            raise NotFoundError(f"no backup with id {backup.id}", field="id")
        await audit.append(
            conn,
            tenant_id=backup.tenant_id,
            actor=actor,
            action="backup.verify",
            entity_type="backup",
            entity_id=str(backup.id),
            plugin_id=backup.plugin_id,
            plugin_name=backup.plugin,
            environment=backup.environment,
            occurred_at=started_at,
            outcome="success" if outcome.status is VerifyStatus.VERIFIED else "failure",
            details={
                "status": outcome.status.value,
                "result": outcome.result.value,
                "transient": outcome.transient,
                "reason": outcome.reason,
            },
        )
    return Verification(
        id=row["id"],
        backup_id=backup.id,
        started_at=started_at,
        duration_ms=max(0, duration_ms),
        status=outcome.status,
        result=outcome.result.value,
        transient=outcome.transient,
        reason=outcome.reason,
        observed_size_bytes=outcome.observed_size_bytes,
        observed_checksum_sha256=outcome.observed_sha256_hex,
    )


async def backup_to_verify(conn: asyncpg.Connection, backup_id: int) -> Backup:
    """The backup ``backup_id`` if it can be verified (409 otherwise)."""
    backup = await get_backup(conn, backup_id)
    if backup.status not in ("completed", "expired"):
        raise ConflictError(f"backup {backup_id} is {backup.status}, not completed", field="id")
    return backup


async def read_artifact(backup: Backup, *, readers: Readers) -> Outcome:
    """Re-read ``backup``'s artifact. Holds no connection: call it outside any transaction (an
    artifact can take minutes to read, and an open transaction would hold back vacuum and a
    pooled connection all that time)."""
    return await readers.verify(
        backup.provider.value, backup.location, backup.expected, tenant=backup.tenant_id
    )


async def list_verifications(
    conn: asyncpg.Connection, backup_id: int, *, limit: int
) -> list[Verification]:
    await get_backup(conn, backup_id)
    rows = await conn.fetch(
        """SELECT id, backup_id, started_at, duration_ms, status, result, transient, reason,
                  observed_size_bytes, observed_checksum
             FROM plugin_backup_verifications WHERE backup_id = $1
            ORDER BY started_at DESC, id DESC LIMIT $2""",
        backup_id,
        limit,
    )
    return [
        Verification(
            id=r["id"],
            backup_id=r["backup_id"],
            started_at=r["started_at"],
            duration_ms=r["duration_ms"] or 0,
            status=VerifyStatus(r["status"]),
            result=r["result"],
            transient=r["transient"],
            reason=r["reason"],
            observed_size_bytes=r["observed_size_bytes"],
            observed_checksum_sha256=None
            if r["observed_checksum"] is None
            else _hex(r["observed_checksum"]),
        )
        for r in rows
    ]


# --- restore points -------------------------------------------------------------------------------

_RESTORE_SELECT = """
SELECT r.id, r.backup_id, p.name AS plugin, r.environment, r.label, r.provider, r.location,
       r.checksum, r.status, r.verified_at, r.plugin_version, r.restored_at, r.created_by,
       r.created_at
  FROM plugin_restore_points r JOIN plugins p ON p.id = r.plugin_id AND p.tenant_id = r.tenant_id
"""


def _restore_point(row: asyncpg.Record) -> RestorePoint:
    return RestorePoint(
        id=row["id"],
        backup_id=row["backup_id"],
        plugin=row["plugin"],
        environment=row["environment"],
        label=row["label"],
        provider=row["provider"],
        location=row["location"],
        checksum_sha256=None if row["checksum"] is None else _hex(row["checksum"]),
        status=row["status"],
        verified=row["verified_at"] is not None,
        plugin_version=row["plugin_version"],
        restored_at=row["restored_at"],
        created_by=row["created_by"],
        created_at=row["created_at"],
    )


async def create_restore_point(
    conn: asyncpg.Connection,
    backup_id: int,
    *,
    tenant_id: str,
    actor: Actor,
    now: datetime,
    label: str,
    checksum_sha256: str,
    plugin_name: str | None = None,
    environment: str | None = None,
    restored_at: datetime | None = None,
) -> RestorePoint:
    """Record a restore from ``backup_id``: ``restored`` (and verified) when the restored
    artifact's checksum is the backup's, ``invalid`` otherwise. ``plugin_name`` is the plugin
    restored (the backup's by default); another plugin's backup is refused by the database."""
    check_sha256(checksum_sha256)
    if not label.strip():
        raise InvalidError("label must not be empty", field="label")
    backup = await get_backup(conn, backup_id)
    plugin_id = backup.plugin_id
    if plugin_name is not None and plugin_name != backup.plugin:
        plugin_id = (await plugins.get_plugin(conn, plugin_name)).id
    matches = checksum_sha256 == backup.checksum_sha256
    row_id = await conn.fetchval(
        """INSERT INTO plugin_restore_points (tenant_id, plugin_id, backup_id, environment, label,
               plugin_version, provider, location, checksum, status, verified_at, restored_at,
               created_by, created_at)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
           RETURNING id""",
        tenant_id,
        plugin_id,
        backup.id,
        plugins.check_environment(environment or backup.environment),
        label,
        backup.plugin_version,
        backup.provider.value,
        backup.location,
        CHECKSUM_PREFIX + checksum_sha256,
        "restored" if matches else "invalid",
        now if matches else None,
        restored_at or now,
        actor.name,
        now,
    )
    row = await conn.fetchrow(_RESTORE_SELECT + " WHERE r.id = $1", row_id)
    assert row is not None
    point = _restore_point(row)
    await audit.append(
        conn,
        tenant_id=tenant_id,
        actor=actor,
        action="restore_point.create",
        entity_type="restore_point",
        entity_id=str(point.id),
        plugin_id=plugin_id,
        plugin_name=point.plugin,
        environment=point.environment,
        occurred_at=now,
        outcome="success" if matches else "failure",
        after={
            "backup_id": backup.id,
            "label": label,
            "checksum_sha256": checksum_sha256,
            "status": point.status,
        },
    )
    return point


async def list_restore_points(conn: asyncpg.Connection, backup_id: int) -> list[RestorePoint]:
    await get_backup(conn, backup_id)
    rows = await conn.fetch(
        _RESTORE_SELECT + " WHERE r.backup_id = $1 ORDER BY r.created_at DESC, r.id DESC",
        backup_id,
    )
    return [_restore_point(r) for r in rows]
