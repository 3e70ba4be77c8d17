"""Daemon settings: the only module that reads the environment (PLUGINMON_*) and the TOML file."""

from __future__ import annotations

import ipaddress
import math
import os
import re
import socket
import tomllib
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    ModelWrapValidatorHandler,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from pluginmon.daemon.config_backups import BackupSettings, file_secret_problems
from pluginmon.daemon.config_health import HealthTable
from pluginmon.daemon.config_plugin_metrics import PluginMetricsTable
from pluginmon.daemon.config_schema import (
    DAY,
    HOUR,
    ConfigError,
    Location,
    Table,
    format_errors,
    number_text,
    problems_error,
    reword,
    seconds,
)
from pluginmon.daemon.config_sections import AlertsTable, PluginTables
from pluginmon.daemon.runtime import LoopChoice
from pluginmon.registry.policies import policies_from_config
from pluginmon.storage.backend import Retention

__all__ = [
    "ENV_PREFIX",
    "OPTIONAL_FIELDS",
    "ConfigError",
    "RetentionSettings",
    "Settings",
    "load_settings",
    "parse_duration",
    "read_config_file",
]

ENV_PREFIX = "PLUGINMON_"

# Settings that hold a secret must come from the environment, never from a file that is
# typically world-readable and checked into configuration management.
_ENV_ONLY = ("http_auth_password", "secret_keys")

OPTIONAL_FIELDS = ("uss", "swap", "fds", "io", "ctx_switches")

_DURATION_RE = re.compile(r"^\s*(?P<value>\d+(?:\.\d+)?)\s*(?P<unit>s|m|h|d|w)?\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_MAX_DURATION = timedelta(days=36500)  # a century: beyond it a retention is a typo
_DURATION = "must be a duration such as '90d', '12h' or a number of seconds"


def parse_duration(value: object) -> timedelta:
    """``"90d"``, ``"12h"``, ``"30m"``, ``"45s"``, ``"2w"`` or a number of seconds."""
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, bool):
        raise ValueError(_DURATION)
    elif isinstance(value, int | float):
        # TOML integers are unbounded: one no float holds is beyond the limit below as well.
        seconds = (
            float(value)
            if isinstance(value, float) or abs(value) < 1e300
            else (1e300 if value > 0 else -1e300)
        )
    elif isinstance(value, str):
        match = _DURATION_RE.match(value)
        if match is None:
            raise ValueError(_DURATION)
        seconds = float(match["value"]) * _UNIT_SECONDS[match["unit"] or "s"]
    else:
        raise ValueError(_DURATION)
    if not math.isfinite(seconds):
        raise ValueError("must be a finite duration")
    if seconds <= 0:
        raise ValueError("must be > 0")
    if seconds > _MAX_DURATION.total_seconds():
        raise ValueError(f"must be at most {_MAX_DURATION.days}d")
    return timedelta(seconds=seconds)


def default_data_dir() -> Path:
    state = os.environ.get("XDG_STATE_HOME")
    base = Path(state) if state else Path.home() / ".local" / "state"
    return base / "pluginmon"


class RetentionSettings(Table):
    """How long each kind of data is kept (seed defaults)."""

    unknown_key: ClassVar[str] = "unknown setting"

    samples: timedelta = timedelta(days=90)
    metrics: timedelta = timedelta(days=90)
    rollup_1m: timedelta = timedelta(days=30)
    rollup_1h: timedelta = timedelta(days=365)  # the analytics rollup
    operations: timedelta = timedelta(days=30)  # completed operations
    audit: timedelta = timedelta(days=730)
    analytics: timedelta = timedelta(days=365)  # the plugin_analytics table
    compress_after: timedelta = timedelta(days=7)  # TimescaleDB: compress older chunks

    @field_validator("*", mode="before")
    @classmethod
    def _duration(cls, value: object) -> timedelta:
        return parse_duration(value)

    def to_retention(self) -> Retention:
        """The storage layer's Retention, which has rules of its own; ConfigError names the field."""
        try:
            return Retention(**dict(self))
        except ValueError as exc:
            # "retention.samples must be at least 2 day(s) ...": the field, then the problem
            match = re.match(r"^(retention\.\w+) (.*)$", str(exc), re.DOTALL)
            raise ConfigError(
                [(match[1], match[2]) if match else ("retention", str(exc))]
            ) from None


# -- numbers, paths and hosts ------------------------------------------------------------------


def positive_up_to(high: float) -> AfterValidator:
    """> 0 and at most ``high``: a zero interval spins, 1e308 s overflows the scheduler."""

    def check(value: float | None) -> float | None:
        if value is None:
            return None
        if not value > 0:
            raise ValueError("must be > 0")
        if value > high:
            raise ValueError(f"must be <= {number_text(high)}")
        return value

    return AfterValidator(check)


Finite = Field(allow_inf_nan=False)


def _path(value: object) -> object:
    """A path from the file or the environment; "" would silently mean the working directory."""
    if isinstance(value, str):
        if not value.strip():
            raise ValueError("must not be empty")
        return Path(value)
    return value


def _data_dir(value: Path) -> Path:
    # The environment's "" arrives as Path("") == Path("."): refused the same way.
    if value == Path():
        raise ValueError('must not be empty or "." (the working directory)')
    return value


_HOST_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def check_host(value: str) -> str:
    """An IP address or a DNS name (RFC 1123); whether it resolves is checked before start."""
    if not value:
        raise ValueError('must not be empty ("0.0.0.0" listens on every interface)')
    try:
        ipaddress.ip_address(value)
    except ValueError:
        labels = value.removesuffix(".").split(".")
        if (
            len(value) > 253
            or not all(_HOST_LABEL.fullmatch(label) for label in labels)
            or labels[-1].isdigit()  # "999.1.1.1" is neither an address nor a name
        ):
            raise ValueError(f"{value!r} is not an IP address or a host name") from None
    return value


PathSetting = Annotated[Path, BeforeValidator(_path)]


class ApiSettings(Table):
    """The management API (/api/v1) served by ``pluginmon run`` and ``pluginmon api``."""

    enabled: bool = True
    max_body_bytes: Annotated[int, Field(ge=1024), positive_up_to(64 << 20)] = 1024 * 1024
    # SBOM uploads and scanner report imports: real CycloneDX SBOMs exceed max_body_bytes.
    max_document_bytes: Annotated[int, Field(ge=1024), positive_up_to(1 << 30)] = 32 << 20
    # Backoff before an operation's retry n: up to initial * 2**n, capped, with jitter.
    retry_initial_seconds: Annotated[float, Finite, positive_up_to(DAY)] = 10.0
    retry_max_seconds: Annotated[float, Finite, positive_up_to(7 * DAY)] = 600.0


class ApprovalsSettings(Table):
    """``[[approvals.policies]]``: which operations need approval (DESIGN.md key names)."""

    # Checked by registry.policies (errors name the table and field).
    policies: list[dict[str, Any]] = Field(default_factory=list)

    @field_validator("policies")
    @classmethod
    def _policies(cls, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        policies_from_config(value, prefix="")
        return value


class Settings(BaseSettings):
    """Every daemon setting. Precedence: environment > TOML file > defaults.

    Types are strict: the file's values must have the type of their setting (``http_port =
    true`` is an error, not 1). The environment is text: pydantic-settings converts it to the
    setting's type first (strict mode does that), so ``PLUGINMON_HTTP_PORT=9500`` is a number.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        strict=True,
        validate_default=True,
    )
    unknown_key: ClassVar[str] = "unknown setting"

    # -- database ----------------------------------------------------------------------------
    database_url: SecretStr | None = None  # unset = the embedded server under data_dir
    backend: Literal["auto", "postgres", "timescaledb", "citus"] = "auto"
    data_dir: Annotated[PathSetting, AfterValidator(_data_dir)] = Field(
        default_factory=default_data_dir
    )
    # The pool opens with no connection (min size 0), so start-up never waits on it.
    database_pool_max_size: Annotated[int, positive_up_to(100)] = 4
    # While the database cannot be used at start-up, retries back off (with jitter) up to
    # this; the reason is logged at most once per two of these (at once when it changes).
    database_retry_max_seconds: Annotated[float, Finite, positive_up_to(HOUR)] = 30.0

    # -- sampling ----------------------------------------------------------------------------
    sample_interval_seconds: Annotated[float, Finite, positive_up_to(HOUR)] = 10.0
    label_discovery: bool = True
    collect_fields: tuple[str, ...] = ()  # opt-in costlier fields, see OPTIONAL_FIELDS
    host: str = Field(default_factory=socket.gethostname)
    proc_root: PathSetting = Path("/proc")
    plugins: PluginTables = ()
    # A plugin unseen this long leaves /metrics.
    plugin_grace_seconds: Annotated[float, Finite, positive_up_to(7 * DAY)] = 300.0
    # Plugins' own metrics: scraping their endpoints, pushes (daemon.plugin_metrics).
    plugin_metrics: PluginMetricsTable = Field(default_factory=PluginMetricsTable)

    # -- writer and spool --------------------------------------------------------------------
    # A batch waits at most this long before its COPY, or is written as soon as it is full.
    flush_interval_seconds: Annotated[float, Finite, positive_up_to(HOUR)] = 2.0
    flush_max_rows: Annotated[int, positive_up_to(1_000_000)] = 5000
    # The bounded memory queue in front of the COPY, and the disk spool while the database is away.
    writer_queue_max_rows: Annotated[int, positive_up_to(10_000_000)] = 100_000
    spool_max_bytes: Annotated[int, positive_up_to(1 << 40)] = 1024 * 1024 * 1024
    # How long the ingest ledger remembers a written batch (a batch replayed after a crash
    # within this time is skipped, never written twice): above the longest time a crashed
    # daemon may stay down before it is restarted.
    ingest_ledger_retention_hours: Annotated[float, Finite, positive_up_to(24 * 366)] = 168.0

    # -- jobs ----------------------------------------------------------------------------------
    # Default: the sample interval.
    evaluate_interval_seconds: Annotated[float | None, Finite, positive_up_to(HOUR)] = None
    # Poll for due notifications (retries); fresh ones are delivered right after evaluation.
    outbox_interval_seconds: Annotated[float, Finite, positive_up_to(HOUR)] = 5.0
    # Rollups on PostgreSQL lag raw samples by at most this; an idle pass takes ~0.1 s.
    maintenance_interval_seconds: Annotated[float, Finite, positive_up_to(DAY)] = 60.0
    misfire_grace_seconds: Annotated[float, Finite, positive_up_to(DAY)] = 30.0
    # A plugin's health_score row is written when its score moves by >= 0.5 or its weakest
    # component changes, else every this many seconds (0: every evaluation, every plugin), so
    # rows a second stay bounded at a 1 s interval (docs/scaling.md). plugins.health_score
    # keeps its own rule: a move of 0.5, else every 60 s.
    health_write_interval_seconds: Annotated[float, seconds(ge=0, le=DAY)] = 60.0
    retention: RetentionSettings = Field(default_factory=RetentionSettings)

    # -- health and alerts ---------------------------------------------------------------------
    health: HealthTable = Field(default_factory=HealthTable)
    alerts: AlertsTable = Field(default_factory=AlertsTable)
    api: ApiSettings = Field(default_factory=ApiSettings)
    approvals: ApprovalsSettings = Field(default_factory=ApprovalsSettings)
    backups: BackupSettings = Field(default_factory=BackupSettings)

    # -- management API ------------------------------------------------------------------------
    # The keyring of config secrets (registry/keyring.py): a key file (secret_keys_file, or its
    # path in PLUGINMON_SECRET_KEYS as DESIGN.md names it), or the keys themselves in
    # PLUGINMON_SECRET_KEYS (environment only). None: data_dir/secret-keys.json, created on
    # first start (embedded database only).
    secret_keys_file: PathSetting | None = None
    secret_keys: SecretStr | None = None  # environment only
    # OSV advisories for offline SBOM matching: a directory of per-ecosystem zips or JSON
    # records (as osv.dev publishes them), or one zip. Unset: no offline scans.
    vulnerability_db: PathSetting | None = None

    # -- HTTP ------------------------------------------------------------------------------------
    # All interfaces, as Prometheus exporters do: Prometheus usually scrapes from another host.
    # Set 127.0.0.1 to keep the endpoint local.
    http_host: Annotated[str, AfterValidator(check_host)] = "0.0.0.0"  # noqa: S104
    http_port: int = 9464
    http_auth_username: str | None = None
    http_auth_password: SecretStr | None = None  # environment only
    http_auth_password_sha256: str | None = None  # hex digest, may live in the file
    # Basic auth on /healthz and /readyz too (orchestrator probes then need credentials).
    http_auth_probes: bool = False
    http_tls_cert_file: PathSetting | None = None
    http_tls_key_file: PathSetting | None = None

    # -- process ---------------------------------------------------------------------------------
    # auto: uvloop when it is installed (a dependency on Linux), else asyncio's own loop.
    event_loop: LoopChoice = "auto"
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    shutdown_deadline_seconds: Annotated[float, Finite, positive_up_to(HOUR)] = 10.0

    @model_validator(mode="wrap")
    @classmethod
    def _worded(cls, data: Any, handler: ModelWrapValidatorHandler[Self]) -> Self:
        try:
            return handler(data)
        except ValidationError as exc:
            raise reword(exc, cls) from None

    @field_validator("http_port")
    @classmethod
    def _port(cls, value: int) -> int:
        if not 0 < value < 65536:
            raise ValueError("must be between 1 and 65535")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("collect_fields", mode="before")
    @classmethod
    def _fields(cls, value: object) -> object:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, list | tuple):
            unknown = [str(v) for v in value if v not in OPTIONAL_FIELDS]
            if unknown:
                raise ValueError(
                    f"unknown field(s) {', '.join(unknown)}; choose from {', '.join(OPTIONAL_FIELDS)}"
                )
            return tuple(value)
        return value

    @field_validator("database_url")
    @classmethod
    def _url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        text = value.get_secret_value()
        if not text:
            return None
        if not text.startswith(("postgresql://", "postgres://")):
            # Never echo the value: it usually carries a password.
            raise ValueError("must be a postgresql:// URL")
        # A port or an option no connection attempt gets past: refused here, not retried
        # forever by run (the problems never hold the password).
        from pluginmon.storage.dsn_check import database_url_problems

        problems = database_url_problems(text)
        if problems:
            raise ValueError("; ".join(problems))
        return value

    @field_validator("secret_keys")
    @classmethod
    def _secret_keys(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value().strip():
            return value
        # The key file's path or the keys themselves (registry/keyring.py says how it tells);
        # its message never repeats the value. Imported here: loading settings should not
        # load the cryptography library.
        from pluginmon.registry.crypto import KeyringError
        from pluginmon.registry.keyring import environment_location

        try:
            environment_location(value.get_secret_value(), cwd=Path.cwd())
        except KeyringError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("http_auth_password_sha256")
    @classmethod
    def _sha256(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", value):
            raise ValueError("must be a hex SHA-256 digest (64 hex digits)")
        return value.lower() if value else value

    @model_validator(mode="after")
    def _cross_field(self) -> Settings:
        problems: list[tuple[Location, str]] = []
        has_password = self.http_auth_password is not None or self.http_auth_password_sha256
        if self.http_auth_username and not has_password:
            problems.append(
                (
                    ("http_auth_username",),
                    "needs PLUGINMON_HTTP_AUTH_PASSWORD or http_auth_password_sha256",
                )
            )
        if has_password and not self.http_auth_username:
            problems.append((("http_auth_password",), "set http_auth_username too"))
        if (self.http_tls_cert_file is None) != (self.http_tls_key_file is None):
            problems.append(
                (("http_tls_cert_file",), "set both http_tls_cert_file and http_tls_key_file")
            )
        if problems:
            raise problems_error(problems)
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML file's content arrives as init values; the environment overrides it.
        return (env_settings, init_settings)

    # -- derived values ----------------------------------------------------------------------

    @property
    def evaluate_every_seconds(self) -> float:
        return self.evaluate_interval_seconds or self.sample_interval_seconds

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def unresolved_spool_dir(self) -> Path:
        """Samples of plugins whose id the database has not given yet."""
        return self.data_dir / "spool-unresolved"

    @property
    def embedded(self) -> bool:
        return self.database_url is None


# -- loading -------------------------------------------------------------------------------------


def read_config_file(path: Path) -> dict[str, Any]:
    """The TOML file as a dict; errors name the file (and the line, for syntax errors)."""
    try:
        with Path(path).open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError([("--config", f"no such file: {path}")]) from None
    except IsADirectoryError:
        raise ConfigError([("--config", f"is a directory: {path}")]) from None
    except PermissionError:
        raise ConfigError([("--config", f"permission denied: {path}")]) from None
    except OSError as exc:
        raise ConfigError([("--config", f"cannot read {path}: {exc.strerror}")]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            [
                (
                    "--config",
                    f"{path}: not UTF-8 (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})",
                )
            ]
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([("--config", f"{path}: invalid TOML: {exc}")]) from None
    problems = [
        (name, f"must not be set in the config file; set {ENV_PREFIX}{name.upper()} instead")
        for name in _ENV_ONLY
        if name in data
    ]
    problems += file_secret_problems(data)
    if problems:
        raise ConfigError(problems)
    return data


def load_settings(config_path: Path | None = None) -> Settings:
    """Settings from the environment, the TOML file and defaults; ConfigError lists every problem."""
    file_values = read_config_file(config_path) if config_path is not None else {}
    try:
        return Settings(**file_values)
    except ValidationError as exc:
        raise ConfigError(format_errors(exc)) from None
    except SettingsError as exc:
        match = re.search(r'field "(?P<field>[^"]+)"', str(exc))
        field = match["field"] if match else "environment"
        raise ConfigError(
            [(field, f"cannot parse {ENV_PREFIX}{field.upper()} (complex values must be JSON)")]
        ) from None
