"""The /api/v1 backup endpoints (register, read, verify, restore points), their models, the
backup metrics, and the registry job's backup duty built from settings."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Literal

import asyncpg
from pydantic import AwareDatetime, Field

from pluginmon.daemon.api_http import Call, Deferred, Route
from pluginmon.daemon.api_models import ENVIRONMENT_PATTERN, NAME_PATTERN, Items, Query, Request
from pluginmon.daemon.api_models import Response as Out
from pluginmon.daemon.backup_metrics import BackupMetrics
from pluginmon.registry import backup_schedule, backups, plugins
from pluginmon.registry.backup_readers import Outcome, Readers
from pluginmon.registry.backup_schedule import BackupSchedule
from pluginmon.registry.errors import NotFoundError
from pluginmon.registry.tokens import Role
from pluginmon.storage.errors import TRANSIENT_ERRORS

logger = logging.getLogger(__name__)

SHA256_PATTERN = backups.SHA256_HEX_RE.pattern
ProviderName = Literal["s3", "gcs", "azure_blob", "local", "sftp", "nfs"]
VerifyStatusName = Literal["verified", "failed", "unverifiable"]


# --- models -------------------------------------------------------------------------------------


class BackupCreate(Request):
    provider: ProviderName
    location: str = Field(min_length=1, max_length=4096)
    size_bytes: int = Field(ge=0)
    checksum_sha256: str = Field(pattern=SHA256_PATTERN)
    environment: str = Field(default="production", pattern=ENVIRONMENT_PATTERN)
    expires_at: AwareDatetime | None = None
    completed_at: AwareDatetime | None = None
    plugin_version: str | None = Field(default=None, max_length=128)


class BackupListQuery(Query):
    environment: str | None = None


class VerificationOut(Out):
    id: int
    backup_id: int
    status: VerifyStatusName
    result: str
    transient: bool
    reason: str | None
    started_at: datetime
    duration_ms: int
    observed_size_bytes: int | None
    observed_checksum_sha256: str | None

    @classmethod
    def of(cls, v: backups.Verification) -> VerificationOut:
        return cls(
            id=v.id,
            backup_id=v.backup_id,
            status=v.status.value,
            result=v.result,
            transient=v.transient,
            reason=v.reason,
            started_at=v.started_at,
            duration_ms=v.duration_ms,
            observed_size_bytes=v.observed_size_bytes,
            observed_checksum_sha256=v.observed_checksum_sha256,
        )


class LastVerificationOut(Out):
    at: datetime
    status: VerifyStatusName
    result: str
    transient: bool
    reason: str | None


class BackupOut(Out):
    id: int
    plugin: str
    environment: str
    provider: ProviderName
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
    last_verification: LastVerificationOut | None

    @classmethod
    def of(cls, b: backups.Backup) -> BackupOut:
        last = b.last_verification
        return cls(
            id=b.id,
            plugin=b.plugin,
            environment=b.environment,
            provider=b.provider.value,
            location=b.location,
            size_bytes=b.size_bytes,
            checksum_sha256=b.checksum_sha256,
            plugin_version=b.plugin_version,
            status=b.status,
            created_by=b.created_by,
            created_at=b.created_at,
            completed_at=b.completed_at,
            verified_at=b.verified_at,
            expires_at=b.expires_at,
            last_verification=None
            if last is None
            else LastVerificationOut(
                at=last.at,
                status=last.status.value,
                result=last.result,
                transient=last.transient,
                reason=last.reason,
            ),
        )


class VerifyOut(Out):
    backup: BackupOut
    verification: VerificationOut


class RestorePointCreate(Request):
    label: str = Field(min_length=1, max_length=200)
    checksum_sha256: str = Field(pattern=SHA256_PATTERN)
    plugin: str | None = Field(default=None, pattern=NAME_PATTERN)
    environment: str | None = Field(default=None, pattern=ENVIRONMENT_PATTERN)
    restored_at: AwareDatetime | None = None


class RestorePointOut(Out):
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

    @classmethod
    def of(cls, r: backups.RestorePoint) -> RestorePointOut:
        return cls(
            id=r.id,
            backup_id=r.backup_id,
            plugin=r.plugin,
            environment=r.environment,
            label=r.label,
            provider=r.provider,
            location=r.location,
            checksum_sha256=r.checksum_sha256,
            status=r.status,
            verified=r.verified,
            plugin_version=r.plugin_version,
            restored_at=r.restored_at,
            created_by=r.created_by,
            created_at=r.created_at,
        )


# --- handlers -----------------------------------------------------------------------------------


class BackupHandlers:
    def __init__(self, *, readers: Readers, metrics: BackupMetrics | None) -> None:
        self._readers = readers
        self._metrics = metrics

    async def register(self, call: Call) -> BackupOut:
        body: BackupCreate = call.body
        backup = await backups.register_backup(
            call.conn,
            tenant_id=call.tenant_id,
            actor=call.actor,
            now=call.now,
            plugin_name=call.params["name"],
            provider=backups.Provider(body.provider),
            location=body.location,
            size_bytes=body.size_bytes,
            checksum_sha256=body.checksum_sha256,
            environment=body.environment,
            expires_at=body.expires_at,
            completed_at=body.completed_at,
            plugin_version=body.plugin_version,
            readers=self._readers,
        )
        return BackupOut.of(backup)

    async def list_backups(self, call: Call) -> Items[BackupOut]:
        query: BackupListQuery = call.query
        name = call.params["name"]
        await plugins.get_plugin(call.conn, name)  # 404 for an unknown plugin, not []
        found = await backups.list_backups(
            call.conn, name, environment=query.environment, limit=query.limit
        )
        return Items[BackupOut](items=[BackupOut.of(b) for b in found])

    async def get_backup(self, call: Call) -> BackupOut:
        return BackupOut.of(await backups.get_backup(call.conn, call.param_int("id")))

    async def verify(self, call: Call) -> Deferred:
        # Three steps so that no transaction is open while the artifact is read: the row in
        # the request's transaction, the read with no connection held, the result in a second
        # short transaction (api_http.Deferred).
        backup = await backups.backup_to_verify(call.conn, call.param_int("id"))
        started = time.monotonic()

        async def read() -> Outcome:
            return await backups.read_artifact(backup, readers=self._readers)

        async def record(call: Call, outcome: Outcome) -> VerifyOut:
            try:
                verification = await backups.record_verification(
                    call.conn,
                    backup,
                    outcome,
                    actor=call.actor,
                    started_at=call.now,
                    duration_ms=int((time.monotonic() - started) * 1000),
                )
            except NotFoundError:
                raise NotFoundError(
                    f"backup {backup.id} was removed while it was being read", field="id"
                ) from None
            if self._metrics is not None:
                metrics = self._metrics
                call.after_commit.append(lambda: metrics.verified(verification))
            fresh = await backups.get_backup(call.conn, backup.id)
            return VerifyOut(
                backup=BackupOut.of(fresh), verification=VerificationOut.of(verification)
            )

        return Deferred(work=read, finish=record)

    async def list_verifications(self, call: Call) -> Items[VerificationOut]:
        query: Query = call.query
        found = await backups.list_verifications(call.conn, call.param_int("id"), limit=query.limit)
        return Items[VerificationOut](items=[VerificationOut.of(v) for v in found])

    async def create_restore_point(self, call: Call) -> RestorePointOut:
        body: RestorePointCreate = call.body
        point = await backups.create_restore_point(
            call.conn,
            call.param_int("id"),
            tenant_id=call.tenant_id,
            actor=call.actor,
            now=call.now,
            label=body.label,
            checksum_sha256=body.checksum_sha256,
            plugin_name=body.plugin,
            environment=body.environment,
            restored_at=body.restored_at,
        )
        return RestorePointOut.of(point)

    async def list_restore_points(self, call: Call) -> Items[RestorePointOut]:
        found = await backups.list_restore_points(call.conn, call.param_int("id"))
        return Items[RestorePointOut](items=[RestorePointOut.of(r) for r in found])


def backup_routes(*, readers: Readers | None, metrics: BackupMetrics | None) -> list[Route]:
    h = BackupHandlers(readers=readers or Readers(), metrics=metrics)
    # fmt: off
    return [
        Route("POST", "/plugins/{name}/backups",
              "Register a finished backup (provider, location, size, SHA-256, expiry)",
              BackupOut, h.register, role=Role.WRITER, body=BackupCreate, status=201,
              tag="backups", errors=(400, 404, 413, 422)),
        Route("GET", "/plugins/{name}/backups", "List a plugin's backups, newest first",
              Items[BackupOut], h.list_backups, query=BackupListQuery, tag="backups",
              errors=(404, 422)),
        Route("GET", r"/backups/{id:\d+}", "Read a backup with its latest verification",
              BackupOut, h.get_backup, tag="backups", errors=(404,)),
        Route("POST", r"/backups/{id:\d+}/verify",
              "Re-read the artifact and compare size and SHA-256 now: verified, failed or "
              "unverifiable, with the named result and reason", VerifyOut, h.verify,
              role=Role.WRITER, tag="backups", errors=(404, 409)),
        Route("GET", r"/backups/{id:\d+}/verifications", "A backup's verification history",
              Items[VerificationOut], h.list_verifications, query=Query, tag="backups",
              errors=(404, 422)),
        Route("POST", r"/backups/{id:\d+}/restore-points",
              "Record a restore from this backup with the restored artifact's SHA-256 "
              "(restored when it matches the backup's, invalid otherwise)", RestorePointOut,
              h.create_restore_point, role=Role.WRITER, body=RestorePointCreate, status=201,
              tag="backups", errors=(400, 404, 409, 413, 422)),
        Route("GET", r"/backups/{id:\d+}/restore-points", "A backup's restore points",
              Items[RestorePointOut], h.list_restore_points, tag="backups", errors=(404,)),
    ]
    # fmt: on


# --- the registry job's backup duty ----------------------------------------------------------


def backup_job(
    *,
    readers: Readers,
    schedule: BackupSchedule,
    metrics: BackupMetrics | None,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    interval_seconds: float | None = None,
    instance: str = "",
) -> Callable[[asyncpg.Pool], Awaitable[None]]:
    """The backups duty; with ``interval_seconds`` done once per interval for the database
    (registry.backup_schedule.run)."""

    async def run(pool: asyncpg.Pool) -> None:
        try:
            report = await backup_schedule.run(
                pool,
                readers=readers,
                schedule=schedule,
                clock=clock,
                on_verified=None if metrics is None else metrics.verified,
                interval_seconds=interval_seconds,
                instance=instance,
            )
        except TRANSIENT_ERRORS as exc:
            logger.warning(
                "backup maintenance skipped: database unavailable (%s)", type(exc).__name__
            )
            return
        if metrics is not None:
            metrics.set_last_verified(report.last_verified)
        if report.ran and (report.verified or report.expired_deleted or report.expired_kept):
            logger.info(
                "backup maintenance: %d verified (%d not verified), %d expired record(s) removed, "
                "%d kept for their restore points",
                len(report.verified),
                sum(1 for v in report.verified if v.status.value != "verified"),
                len(report.expired_deleted),
                len(report.expired_kept),
            )

    return run
