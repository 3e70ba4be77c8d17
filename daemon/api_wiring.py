"""Wiring of the management API: the /api/v1 app from settings, the registry's periodic job,
and ``pluginmon api`` (the API, its probes and metrics, without sampling)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from pluginmon.daemon.api_http import API_PREFIX
from pluginmon.daemon.api_metrics import ApiMetrics
from pluginmon.daemon.api_routes import build_api_app
from pluginmon.daemon.http import HttpServer, Readiness, tls_context
from pluginmon.daemon.settings import Settings
from pluginmon.registry import maintenance
from pluginmon.registry.lifecycle import RetryPolicy
from pluginmon.registry.policies import ApprovalPolicy, policies_from_config
from pluginmon.registry.sboms import VulnerabilityDatabase
from pluginmon.storage.errors import TRANSIENT_ERRORS

logger = logging.getLogger(__name__)

PoolSource = Callable[[], asyncpg.Pool | None]


def utc_now() -> datetime:
    return datetime.now(UTC)


def approval_policies(settings: Settings) -> tuple[ApprovalPolicy, ...]:
    # Already checked when the settings were loaded; this cannot raise then.
    return policies_from_config(settings.approvals.policies)


def retry_policy(settings: Settings) -> RetryPolicy:
    return RetryPolicy(
        initial_seconds=settings.api.retry_initial_seconds,
        max_seconds=settings.api.retry_max_seconds,
    )


def api_app(
    settings: Settings, pool: PoolSource, *, version: str, metrics: ApiMetrics | None
) -> web.Application:
    return build_api_app(
        pool,
        version=version,
        policies=approval_policies(settings),
        retry=retry_policy(settings),
        max_body_bytes=settings.api.max_body_bytes,
        metrics=metrics,
    )


def api_subapps(
    settings: Settings, pool: PoolSource, *, version: str, metrics: ApiMetrics | None
) -> list[tuple[str, web.Application]]:
    """What ``pluginmon run`` mounts on its HTTP server: /api/v1 when ``api.enabled``."""
    if not settings.api.enabled:
        return []
    return [(API_PREFIX, api_app(settings, pool, version=version, metrics=metrics))]


def registry_job(
    pool: PoolSource,
    *,
    metrics: ApiMetrics | None,
    clock: Callable[[], datetime] = utc_now,
    usage_window_seconds: float = 120.0,
    vulnerability_db: Path | None = None,
) -> Callable[[], Awaitable[None]]:
    """The periodic registry duties: approvals expire, operations past their deadline fail,
    operation health gauges and the plugins' usage columns are refreshed. Once per database
    (an advisory lock); the others skip. With ``vulnerability_db``, SBOMs are matched offline
    when they or the database change."""
    advisories = None if vulnerability_db is None else VulnerabilityDatabase(vulnerability_db)

    async def run() -> None:
        source = pool()
        if source is None:
            return
        now = clock()
        try:
            async with source.acquire() as conn:
                report = await maintenance.run(
                    conn,
                    now=now,
                    usage_window_seconds=usage_window_seconds,
                    vulnerability_db=advisories,
                )
            if not report.ran:
                return
        except TRANSIENT_ERRORS as exc:
            logger.warning(
                "registry maintenance skipped: database unavailable (%s)", type(exc).__name__
            )
            return
        for scan in report.vulnerability_scans:
            logger.info(
                "offline scan of %s/%s: %d finding(s), %d new, %d fixed",
                scan.plugin,
                scan.environment,
                scan.sync.findings,
                scan.sync.opened,
                scan.sync.fixed,
            )
        if metrics is not None:
            metrics.vulnerabilities.set(report.vulnerability_counts)
            for op in report.deadline_failed:
                metrics.operation(op)
            for approval in report.approvals_expired:
                logger.info("approval %d of tenant %s expired", approval.id, approval.tenant_id)
        if report.deadline_failed or report.approvals_expired:
            logger.info(
                "registry maintenance: %d operation(s) past their deadline failed, %d approval(s) "
                "expired",
                len(report.deadline_failed),
                len(report.approvals_expired),
            )
        logger.debug(
            "registry maintenance: usage refreshed for %d plugin(s)", report.usage_refreshed
        )

    return run


class _RegistryExposition:
    """/metrics of ``pluginmon api``: the API's own registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def render_chunks(self, accept: str | None) -> tuple[list[bytes], str]:
        encoder, content_type = choose_encoder(accept or "")
        return [encoder(self._registry)], content_type


async def serve_api(
    settings: Settings, database_url: str, *, version: str, stop: asyncio.Event
) -> None:
    """``pluginmon api``: migrate, then serve /api/v1 with /healthz, /readyz and /metrics on
    the HTTP port and run the registry job, until ``stop`` is set."""
    from pluginmon.storage.migrate import Backend, migrate
    from pluginmon.storage.pool import pool_context

    backend = None if settings.backend == "auto" else Backend(settings.backend)
    result = await asyncio.to_thread(migrate, database_url, backend=backend)
    if result.applied:
        logger.info("applied %d migration(s): %s", len(result.applied), ", ".join(result.applied))
    registry = CollectorRegistry()
    metrics = ApiMetrics(registry)
    async with pool_context(
        database_url, min_size=1, max_size=settings.database_pool_max_size
    ) as pool:

        async def readiness() -> Readiness:
            try:
                async with asyncio.timeout(5), pool.acquire() as conn:
                    await conn.fetchval("SELECT 1")
            except (*TRANSIENT_ERRORS, asyncpg.PostgresError) as exc:
                return Readiness(False, (f"database: {type(exc).__name__}",))
            return Readiness(True)

        ssl_context = (
            tls_context(settings.http_tls_cert_file, settings.http_tls_key_file)
            if settings.http_tls_cert_file and settings.http_tls_key_file
            else None
        )
        app = api_app(settings, lambda: pool, version=version, metrics=metrics)
        job = registry_job(
            lambda: pool, metrics=metrics, vulnerability_db=settings.vulnerability_db
        )
        async with HttpServer(
            host=settings.http_host,
            port=settings.http_port,
            metrics=_RegistryExposition(registry),
            readiness=readiness,
            ssl_context=ssl_context,
            subapps=[(API_PREFIX, app)],
        ):
            while not stop.is_set():
                try:
                    await job()
                except Exception:
                    logger.exception(
                        "registry maintenance failed; next run in %.0f s",
                        settings.maintenance_interval_seconds,
                    )
                try:
                    async with asyncio.timeout(settings.maintenance_interval_seconds):
                        await stop.wait()
                except TimeoutError:
                    pass
