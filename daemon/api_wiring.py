"""Wiring of the management API: the /api/v1 app from settings, the registry's periodic job,
and ``pluginmon api`` (the API, its probes and metrics, without sampling)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.exposition import choose_encoder

from pluginmon.collectors.push import PushStore
from pluginmon.daemon.api_backups import backup_job
from pluginmon.daemon.api_http import API_PREFIX
from pluginmon.daemon.api_metrics import ApiMetrics
from pluginmon.daemon.api_plugin_metrics import PluginMetricsHandlers, reemit_job
from pluginmon.daemon.api_routes import build_api_app
from pluginmon.daemon.http import HttpServer, Readiness, tls_context
from pluginmon.daemon.plugin_metrics import push_families
from pluginmon.daemon.settings import Settings
from pluginmon.registry import maintenance
from pluginmon.registry.crypto import KeyringError
from pluginmon.registry.keyring import (
    DEFAULT_KEY_FILE_NAME,
    KeyringHolder,
    KeyringLocation,
    environment_location,
)
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


def keyring_location(settings: Settings) -> KeyringLocation | None:
    """PLUGINMON_SECRET_KEYS (the key file's path, or the keys themselves: see
    :func:`environment_location`), else secret_keys_file, else (embedded database only) a key
    file under data_dir created on first start. None: secrets are refused, since keys made up
    on each host of a shared database would leave each host unable to read the others'."""
    if settings.secret_keys is not None and settings.secret_keys.get_secret_value().strip():
        return environment_location(settings.secret_keys.get_secret_value(), cwd=Path.cwd())
    if settings.secret_keys_file is not None:
        return KeyringLocation(path=settings.secret_keys_file)
    if settings.embedded:
        return KeyringLocation(path=settings.data_dir / DEFAULT_KEY_FILE_NAME, create=True)
    return None


def api_app(
    settings: Settings,
    pool: PoolSource,
    *,
    version: str,
    metrics: ApiMetrics | None,
    plugin_metrics: PluginMetricsHandlers,
) -> web.Application:
    location = keyring_location(settings)
    keyring = None if location is None else KeyringHolder(location, clock=utc_now)
    app = build_api_app(
        pool,
        version=version,
        policies=approval_policies(settings),
        retry=retry_policy(settings),
        max_body_bytes=settings.api.max_body_bytes,
        max_document_bytes=settings.api.max_document_bytes,
        metrics=metrics,
        keyring=keyring,
        plugin_metrics=plugin_metrics,
        backup_readers=settings.backups.readers(),
    )

    async def load_keyring(_: web.Application) -> None:
        # At start, so the embedded default's key file is created (and said so) on first
        # start, and a broken keyring is reported now rather than at the first secret.
        if keyring is None:
            logger.warning(
                "no secret keyring (secret_keys_file or PLUGINMON_SECRET_KEYS): config "
                "secrets are refused"
            )
            return
        try:
            loaded = await keyring.get()
        except KeyringError as exc:
            logger.error("secret keyring unusable, config secrets are refused: %s", exc)
            return
        logger.info(
            "secret keyring from %s: primary key %s, %d key(s)",
            loaded.source,
            loaded.primary_id,
            len(loaded.keys),
        )

    app.on_startup.append(load_keyring)
    return app


def api_subapps(
    settings: Settings,
    pool: PoolSource,
    *,
    version: str,
    metrics: ApiMetrics | None,
    pushes: PushStore | None = None,
) -> list[tuple[str, web.Application]]:
    """What ``pluginmon run`` mounts on its HTTP server: /api/v1 when ``api.enabled``.
    ``pushes`` is the plugin-metrics service's live set: the service re-emits what the push
    route records in it (a new one with the configured limits when not given)."""
    if not settings.api.enabled:
        return []
    if pushes is None:
        pushes = PushStore(settings.plugin_metrics.to_push())
    app = api_app(
        settings,
        pool,
        version=version,
        metrics=metrics,
        plugin_metrics=PluginMetricsHandlers(pushes),
    )
    return [(API_PREFIX, app)]


class _PushCounts:
    """The push metrics of ``pluginmon api`` (prometheus-client Collector)."""

    def __init__(self, pushes: PushStore) -> None:
        self._pushes = pushes

    def collect(self) -> Iterator[Metric]:
        return push_families(self._pushes, now=utc_now())


async def _reemit_loop(
    job: Callable[[], Awaitable[int]], *, interval_seconds: float, stop: asyncio.Event
) -> None:
    while not stop.is_set():
        try:
            async with asyncio.timeout(interval_seconds):
                await stop.wait()
            return
        except TimeoutError:
            pass
        try:
            await job()
        except Exception:
            logger.exception(
                "re-emitting pushed metrics failed; next try in %.0f s", interval_seconds
            )


def backups_duty(
    settings: Settings, metrics: ApiMetrics | None
) -> Callable[[asyncpg.Pool], Awaitable[None]]:
    """Backup retention and scheduled verification for the registry job ([backups]), once
    per maintenance interval for the database."""
    return backup_job(
        readers=settings.backups.readers(),
        schedule=settings.backups.schedule(),
        metrics=None if metrics is None else metrics.backups,
        interval_seconds=settings.maintenance_interval_seconds,
        instance=settings.host,
    )


def registry_job(
    pool: PoolSource,
    *,
    metrics: ApiMetrics | None,
    clock: Callable[[], datetime] = utc_now,
    usage_window_seconds: float = 120.0,
    backups: Callable[[asyncpg.Pool], Awaitable[None]] | None = None,
    vulnerability_db: Path | None = None,
    interval_seconds: float | None = None,
    instance: str = "",
) -> Callable[[], Awaitable[None]]:
    """The periodic registry duties: approvals expire, operations past their deadline fail,
    operation health gauges and the plugins' usage columns are refreshed. Once per database
    (an advisory lock); the others skip; with ``interval_seconds`` (the caller's schedule)
    also once per interval for the database, however many processes run it. With
    ``vulnerability_db``, SBOMs are matched offline when they or the database change."""
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
                    interval_seconds=interval_seconds,
                    instance=instance,
                )
            if backups is not None:
                # its own advisory lock: artifacts are read outside the transaction above
                await backups(source)
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
            metrics.dependencies.update(report.dependencies_unsatisfied)
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
    # Pushed series are stored by the route; this process re-emits them until they expire
    # (no sampler runs here to do it): daemon.api_plugin_metrics.
    pushes = PushStore(settings.plugin_metrics.to_push())
    registry.register(_PushCounts(pushes))
    plugin_metrics = PluginMetricsHandlers(pushes)
    reemit_seconds = settings.plugin_metrics.interval_seconds or settings.sample_interval_seconds
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
        app = api_app(
            settings,
            lambda: pool,
            version=version,
            metrics=metrics,
            plugin_metrics=plugin_metrics,
        )
        job = registry_job(
            lambda: pool,
            metrics=metrics,
            backups=backups_duty(settings, metrics),
            vulnerability_db=settings.vulnerability_db,
            interval_seconds=settings.maintenance_interval_seconds,
            instance=settings.host,
        )
        reemit = asyncio.create_task(
            _reemit_loop(
                reemit_job(lambda: pool, pushes, plugin_metrics, clock=utc_now),
                interval_seconds=reemit_seconds,
                stop=stop,
            ),
            name="pushed-metrics",
        )
        try:
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
        finally:
            reemit.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reemit
