"""The ``[backups]`` config table: verification per provider, allowed roots, SFTP and S3 access,
and the staleness limits of PluginBackupStale; and the readers and schedule built from it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, ClassVar
from urllib.parse import urlsplit

from pydantic import BeforeValidator, Field, SecretStr, field_validator

from pluginmon.daemon.config_schema import DAY, Table
from pluginmon.registry.backup_readers import (
    ArtifactReader,
    PathReader,
    Readers,
    S3Reader,
    SftpReader,
)
from pluginmon.registry.backup_schedule import BackupSchedule
from pluginmon.registry.backups import Provider

# Where the S3 secret key must come from: the environment, never the (world-readable) file.
S3_SECRET_ENV = "PLUGINMON_BACKUPS__PROVIDERS__S3__SECRET_ACCESS_KEY"  # noqa: S105 - a name


def file_secret_problems(data: dict[str, object]) -> list[tuple[str, str]]:
    """The config file's ``[backups.providers.s3] secret_access_key``, refused by name."""
    backups = data.get("backups")
    providers = backups.get("providers") if isinstance(backups, dict) else None
    s3 = providers.get("s3") if isinstance(providers, dict) else None
    if isinstance(s3, dict) and "secret_access_key" in s3:
        return [
            (
                "backups.providers.s3.secret_access_key",
                f"must not be set in the config file; set {S3_SECRET_ENV} instead",
            )
        ]
    return []


def _path(value: object) -> object:
    # Strict mode takes a Path only; TOML and the environment give text ("" is refused: it
    # would silently mean the working directory).
    if isinstance(value, str):
        if not value.strip():
            raise ValueError("must not be empty")
        return Path(value)
    return value


PathValue = Annotated[Path, BeforeValidator(_path)]
Seconds = Annotated[float, Field(gt=0, le=365 * DAY, allow_inf_nan=False)]


class ProviderSettings(Table):
    """``[backups.providers.<provider>]``; the fields a provider does not use are refused."""

    unknown_key: ClassVar[str] = "unknown field"

    enabled: bool = True  # false: scheduled verification skips this provider
    verify_interval_seconds: Seconds | None = None
    # The allow-lists: nothing is allowed unless listed, and "{tenant}" in an entry stands for
    # the backup's tenant (so tenant A cannot name tenant B's artifacts). Checked when a backup
    # is registered (422 on location) and before every read (outside_roots, nothing touched).
    # local, nfs: the directories backups may be read from (nothing else is ever read)
    roots: list[PathValue] = Field(default_factory=list)
    # sftp: the hosts connected to ("host" is port 22, or "host:port") and the path prefixes read
    allowed_hosts: list[str] = Field(default_factory=list)
    path_prefixes: list[str] = Field(default_factory=list)
    username: str | None = None
    private_key_file: PathValue | None = None
    known_hosts_file: PathValue | None = None
    connect_timeout_seconds: Seconds = 10.0
    # s3 (an S3-compatible endpoint); the secret key from the environment
    # (PLUGINMON_BACKUPS__PROVIDERS__S3__SECRET_ACCESS_KEY) rather than the file; the objects
    # read: "bucket" (all of it) or "bucket/prefix" (keys under the prefix)
    buckets: list[str] = Field(default_factory=list)
    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: SecretStr | None = None

    @field_validator("path_prefixes")
    @classmethod
    def _absolute_prefixes(cls, value: list[str]) -> list[str]:
        for prefix in value:
            if not prefix.startswith("/") or ".." in prefix.split("/"):
                raise ValueError(f"{prefix!r} must be an absolute path without '..'")
        return value

    @field_validator("allowed_hosts")
    @classmethod
    def _host_ports(cls, value: list[str]) -> list[str]:
        for entry in value:
            try:
                parts = urlsplit("//" + entry.strip())
                parts.port  # noqa: B018 - raises on a bad port
            except ValueError:
                raise ValueError(f"{entry!r} must be host or host:port") from None
            if not parts.hostname or parts.username or parts.path:
                raise ValueError(f"{entry!r} must be host or host:port")
        return value

    @field_validator("buckets")
    @classmethod
    def _bucket_entries(cls, value: list[str]) -> list[str]:
        for entry in value:
            if not entry.split("/", 1)[0] or ".." in entry.split("/"):
                raise ValueError(f"{entry!r} must be bucket or bucket/prefix")
        return value


class BackupSettings(Table):
    """``[backups]``."""

    verify_interval_seconds: Seconds = 86400.0
    retry_after_transient_seconds: Seconds = 900.0
    verify_batch: Annotated[int, Field(ge=1, le=10_000)] = 20
    verify_timeout_seconds: Seconds = 3600.0
    # PluginBackupStale: no verified backup newer than this; per plugin as "tenant/plugin"
    stale_after_seconds: Seconds = 26 * 3600.0
    plugin_stale_after_seconds: dict[str, Seconds] = Field(default_factory=dict)
    providers: dict[str, ProviderSettings] = Field(default_factory=dict)

    @field_validator("providers")
    @classmethod
    def _known_providers(cls, value: dict[str, ProviderSettings]) -> dict[str, ProviderSettings]:
        unknown = sorted(set(value) - {p.value for p in Provider})
        if unknown:
            known = ", ".join(p.value for p in Provider)
            raise ValueError(f"unknown provider {unknown[0]!r} (known: {known})")
        return value

    def schedule(self) -> BackupSchedule:
        intervals = {
            name: p.verify_interval_seconds or self.verify_interval_seconds
            for name, p in self.providers.items()
        }
        return BackupSchedule(
            interval_seconds=intervals,
            disabled=frozenset(name for name, p in self.providers.items() if not p.enabled),
            default_interval_seconds=self.verify_interval_seconds,
            retry_seconds=self.retry_after_transient_seconds,
            batch=self.verify_batch,
            stale_after_seconds=self.stale_after_seconds,
            plugin_stale_after_seconds=dict(self.plugin_stale_after_seconds),
        )

    def readers(self) -> Readers:
        by_provider: dict[str, ArtifactReader] = {}
        for name in ("local", "nfs"):
            p = self.providers.get(name, ProviderSettings())
            by_provider[name] = PathReader(name, tuple(r.absolute() for r in p.roots))
        sftp = self.providers.get("sftp", ProviderSettings())
        by_provider["sftp"] = SftpReader(
            username=sftp.username,
            private_key_file=sftp.private_key_file,
            known_hosts_file=sftp.known_hosts_file,
            connect_timeout_seconds=sftp.connect_timeout_seconds,
            allowed_hosts=tuple(sftp.allowed_hosts),
            path_prefixes=tuple(sftp.path_prefixes),
        )
        # Always an S3Reader, so that s3 without configuration allows nothing (not_configured)
        # rather than registering any bucket as "unsupported".
        s3 = self.providers.get("s3", ProviderSettings())
        secret = s3.secret_access_key
        by_provider["s3"] = S3Reader(
            endpoint_url=s3.endpoint_url,
            region=s3.region,
            access_key_id=s3.access_key_id,
            secret_access_key=lambda: None if secret is None else secret.get_secret_value(),
            buckets=tuple(s3.buckets),
        )
        return Readers(by_provider=by_provider, timeout_seconds=self.verify_timeout_seconds)
