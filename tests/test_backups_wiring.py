"""The [backups] config table (per-provider schedule, roots, SFTP and S3 access, the S3 secret
from the environment only) and the registry job's backup duty with its Prometheus metrics."""

from __future__ import annotations

import hashlib
from pathlib import Path

import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from pluginmon.daemon.api_backups import backup_job
from pluginmon.daemon.api_metrics import ApiMetrics
from pluginmon.daemon.config_backups import S3_SECRET_ENV
from pluginmon.daemon.settings import ConfigError, load_settings
from pluginmon.registry.backup_readers import PathReader, S3Reader, SftpReader, Unsupported
from tests.api_helpers import START, Clock

TOML = """
[backups]
verify_interval_seconds = 7200
stale_after_seconds = 3600
plugin_stale_after_seconds = {{ "acme/resizer" = 60 }}

[backups.providers.local]
roots = ["{root}"]
verify_interval_seconds = 600

[backups.providers.nfs]
enabled = false

[backups.providers.sftp]
username = "pluginmon"
private_key_file = "/etc/pluginmon/backup_key"
known_hosts_file = "/etc/pluginmon/known_hosts"

[backups.providers.s3]
endpoint_url = "http://127.0.0.1:9000"
region = "us-east-1"
access_key_id = "AKIAEXAMPLE"
"""


def test_backup_settings_from_the_file_and_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(S3_SECRET_ENV, "s3cr3t-value")
    config = tmp_path / "pluginmon.toml"
    config.write_text(TOML.format(root=tmp_path / "backups"))
    settings = load_settings(config)
    schedule = settings.backups.schedule()
    assert schedule.interval_for("local") == 600.0
    assert schedule.interval_for("sftp") == 7200.0
    assert schedule.interval_for("nfs") == 7200.0
    assert schedule.disabled == frozenset({"nfs"})
    assert schedule.stale_after_for("acme", "resizer") == 60.0
    assert schedule.stale_after_for("acme", "mailer") == 3600.0
    readers = settings.backups.readers()
    local = readers.reader("local")
    assert isinstance(local, PathReader)
    assert local.roots == (tmp_path / "backups",)
    sftp = readers.reader("sftp")
    assert isinstance(sftp, SftpReader)
    assert sftp.known_hosts_file == Path("/etc/pluginmon/known_hosts")
    s3 = readers.reader("s3")
    assert isinstance(s3, S3Reader)
    assert s3.secret_access_key() == "s3cr3t-value"
    assert isinstance(readers.reader("gcs"), Unsupported)
    assert "s3cr3t-value" not in repr(settings)


def test_the_s3_secret_in_the_file_and_an_unknown_provider_are_refused(tmp_path: Path) -> None:
    config = tmp_path / "pluginmon.toml"
    config.write_text(TOML.format(root=tmp_path) + 'secret_access_key = "in-the-file"\n')
    with pytest.raises(ConfigError) as info:
        load_settings(config)
    assert info.value.located[0][0] == "backups.providers.s3.secret_access_key"
    assert S3_SECRET_ENV in info.value.problems[0]
    assert "in-the-file" not in str(info.value)

    config.write_text('[backups.providers.ftp]\nroots = ["/x"]\n')
    with pytest.raises(ConfigError) as info:
        load_settings(config)
    assert "ftp" in str(info.value)
    assert "backups.providers" in str(info.value)


async def test_the_registry_jobs_backup_duty_exports_its_metrics(
    migrated_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "backups"
    root.mkdir()
    artifact = root / "resizer.tar"
    artifact.write_bytes(b"x" * 5000)
    config = tmp_path / "pluginmon.toml"
    config.write_text(f'[backups.providers.local]\nroots = ["{root}"]\n')
    settings = load_settings(config)
    registry = CollectorRegistry()
    metrics = ApiMetrics(registry)
    clock = Clock()
    pool = await asyncpg.create_pool(migrated_db, min_size=1, max_size=2)
    try:
        async with pool.acquire() as conn:
            await conn.execute("INSERT INTO tenants (id) VALUES ('acme')")
            plugin_id = await conn.fetchval(
                "INSERT INTO plugins (tenant_id, name) VALUES ('acme', 'resizer') RETURNING id"
            )
            for location, digest in (
                (artifact, hashlib.sha256(b"x" * 5000).hexdigest()),
                (root / "missing.tar", "0" * 64),
            ):
                await conn.execute(
                    """INSERT INTO plugin_backups (tenant_id, plugin_id, environment, provider,
                           location, checksum, size_bytes, status, completed_at)
                       VALUES ('acme', $1, 'production', 'local', $2, $3, 5000, 'completed', $4)""",
                    plugin_id,
                    str(location),
                    "sha256:" + digest,
                    START,
                )
        job = backup_job(
            readers=settings.backups.readers(),
            schedule=settings.backups.schedule(),
            metrics=metrics.backups,
            clock=clock,
        )
        await job(pool)
    finally:
        await pool.close()
    sample = registry.get_sample_value
    assert sample("pluginmon_backup_verifications_total", {"result": "verified"}) == 1.0
    assert sample("pluginmon_backup_verifications_total", {"result": "not_found"}) == 1.0
    assert sample("pluginmon_backup_verifications_total", {"result": "unreachable"}) == 0.0
    labels = {"tenant": "acme", "plugin": "resizer", "environment": "production"}
    assert (
        sample("pluginmon_plugin_backup_last_verified_timestamp_seconds", labels)
        == START.timestamp()
    )
