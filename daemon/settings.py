"""Daemon settings: the only module that reads the environment (PLUGINMON_*) and the TOML file."""

from __future__ import annotations

import os
import re
import socket
import tomllib
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
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

from pluginmon.registry.policies import policies_from_config

ENV_PREFIX = "PLUGINMON_"

# Settings that hold a secret must come from the environment, never from a file that is
# typically world-readable and checked into configuration management.
_ENV_ONLY = ("http_auth_password",)

OPTIONAL_FIELDS = ("uss", "swap", "fds", "io", "ctx_switches")

_DURATION_RE = re.compile(r"^\s*(?P<value>\d+(?:\.\d+)?)\s*(?P<unit>s|m|h|d|w)?\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class ConfigError(Exception):
    """The configuration is invalid; ``problems`` lists every problem, each naming its field."""

    def __init__(self, problems: list[str] | tuple[str, ...]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(self.problems))


def parse_duration(value: object) -> timedelta:
    """``"90d"``, ``"12h"``, ``"30m"``, ``"45s"``, ``"2w"`` or a number of seconds."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, bool):
        raise ValueError("must be a duration such as '90d', '12h' or a number of seconds")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        match = _DURATION_RE.match(value)
        if match is None:
            raise ValueError("must be a duration such as '90d', '12h' or a number of seconds")
        seconds = float(match["value"]) * _UNIT_SECONDS[match["unit"] or "s"]
    else:
        raise ValueError("must be a duration such as '90d', '12h' or a number of seconds")
    if seconds <= 0:
        raise ValueError("must be > 0")
    return timedelta(seconds=seconds)


def default_data_dir() -> Path:
    state = os.environ.get("XDG_STATE_HOME")
    base = Path(state) if state else Path.home() / ".local" / "state"
    return base / "pluginmon"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RetentionSettings(_Section):
    """How long each kind of data is kept (seed defaults)."""

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


class WebhookSettings(_Section):
    """One webhook receiver; the secret signs the body (HMAC-SHA256) and is never printed."""

    model_config = ConfigDict(extra="allow", frozen=True)

    # Validated (with every other webhook field) by alerts.rules.parse_webhooks.
    url: str | None = None
    secret: SecretStr | None = None

    def as_table(self) -> dict[str, Any]:
        """The table for parse_webhooks; the secret stays a SecretStr."""
        table = {k: v for k, v in self.model_dump().items() if v is not None}
        if self.secret is not None:
            table["secret"] = self.secret
        return table


class AlertsSettings(_Section):
    # Rules are validated by alerts.rules.parse_rules (errors name the rule and field).
    rules: list[dict[str, Any]] = Field(default_factory=list)
    webhooks: list[WebhookSettings] = Field(default_factory=list)
    alertmanager: dict[str, Any] | None = None  # parsed by alerts.rules.parse_alertmanager
    builtin_rules: bool = True
    external_url: str | None = None


class ApiSettings(_Section):
    """The management API (/api/v1) served by ``pluginmon run`` and ``pluginmon api``."""

    enabled: bool = True
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    # Backoff before an operation's retry n: up to initial * 2**n, capped, with jitter.
    retry_initial_seconds: float = Field(default=10.0, gt=0)
    retry_max_seconds: float = Field(default=600.0, gt=0)


class ApprovalsSettings(_Section):
    # [[approvals.policies]] tables, checked by registry.policies (errors name table and field).
    policies: list[dict[str, Any]] = Field(default_factory=list)

    @field_validator("policies")
    @classmethod
    def _policies(cls, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        policies_from_config(value, prefix="")
        return value


class Settings(BaseSettings):
    """Every daemon setting. Precedence: environment > TOML file > defaults."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        validate_default=True,
    )

    # -- database ----------------------------------------------------------------------------
    database_url: SecretStr | None = None  # unset = the embedded server under data_dir
    backend: Literal["auto", "postgres", "timescaledb"] = "auto"
    data_dir: Path = Field(default_factory=default_data_dir)
    # The pool opens with no connection (min size 0), so start-up never waits on it.
    database_pool_max_size: int = Field(default=4, ge=1)

    # -- sampling ----------------------------------------------------------------------------
    sample_interval_seconds: float = 10.0
    label_discovery: bool = True
    collect_fields: tuple[str, ...] = ()  # opt-in costlier fields, see OPTIONAL_FIELDS
    host: str = Field(default_factory=socket.gethostname)
    proc_root: Path = Path("/proc")
    plugins: list[dict[str, Any]] = Field(default_factory=list)  # parsed by collectors.specs
    plugin_grace_seconds: float = 300.0  # a plugin unseen this long leaves /metrics

    # -- writer and spool --------------------------------------------------------------------
    flush_interval_seconds: float = 2.0  # a batch waits at most this long before COPY
    flush_max_rows: int = 5000  # ... or is written as soon as it holds this many rows
    writer_queue_max_rows: int = 100_000  # bounded memory queue in front of the COPY
    spool_max_bytes: int = 1024 * 1024 * 1024  # disk spool cap while the database is away

    # -- jobs ----------------------------------------------------------------------------------
    evaluate_interval_seconds: float | None = None  # default: the sample interval
    # Poll for due notifications (retries); fresh ones are delivered right after evaluation.
    outbox_interval_seconds: float = 5.0
    # Rollups on PostgreSQL lag raw samples by at most this; an idle pass takes ~0.1 s.
    maintenance_interval_seconds: float = 60.0
    misfire_grace_seconds: float = 30.0
    retention: RetentionSettings = Field(default_factory=RetentionSettings)

    # -- health and alerts ---------------------------------------------------------------------
    # Weights and thresholds for the health score; validated by the alerts package.
    health: dict[str, Any] = Field(default_factory=dict)
    alerts: AlertsSettings = Field(default_factory=AlertsSettings)

    # -- management API ------------------------------------------------------------------------
    api: ApiSettings = Field(default_factory=ApiSettings)
    approvals: ApprovalsSettings = Field(default_factory=ApprovalsSettings)

    # -- HTTP ------------------------------------------------------------------------------------
    # All interfaces, as Prometheus exporters do: Prometheus usually scrapes from another host.
    # Set 127.0.0.1 to keep the endpoint local.
    http_host: str = "0.0.0.0"  # noqa: S104
    http_port: int = 9464
    http_auth_username: str | None = None
    http_auth_password: SecretStr | None = None  # environment only
    http_auth_password_sha256: str | None = None  # hex digest, may live in the file
    # Basic auth on /healthz and /readyz too (orchestrator probes then need credentials).
    http_auth_probes: bool = False
    http_tls_cert_file: Path | None = None
    http_tls_key_file: Path | None = None

    # -- process ---------------------------------------------------------------------------------
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    shutdown_deadline_seconds: float = 10.0

    @field_validator(
        "sample_interval_seconds",
        "plugin_grace_seconds",
        "flush_interval_seconds",
        "outbox_interval_seconds",
        "maintenance_interval_seconds",
        "misfire_grace_seconds",
        "shutdown_deadline_seconds",
    )
    @classmethod
    def _positive(cls, value: float) -> float:
        if not value > 0:
            raise ValueError("must be > 0")
        return value

    @field_validator("evaluate_interval_seconds")
    @classmethod
    def _positive_or_none(cls, value: float | None) -> float | None:
        if value is not None and not value > 0:
            raise ValueError("must be > 0")
        return value

    @field_validator("flush_max_rows", "writer_queue_max_rows", "spool_max_bytes")
    @classmethod
    def _positive_int(cls, value: int) -> int:
        if value <= 0:
            raise ValueError("must be > 0")
        return value

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
        return value

    @field_validator("http_auth_password_sha256")
    @classmethod
    def _sha256(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", value):
            raise ValueError("must be a hex SHA-256 digest (64 hex digits)")
        return value.lower() if value else value

    @model_validator(mode="after")
    def _cross_field(self) -> Settings:
        problems: list[str] = []
        has_password = self.http_auth_password is not None or self.http_auth_password_sha256
        if self.http_auth_username and not has_password:
            problems.append(
                "http_auth_username: needs PLUGINMON_HTTP_AUTH_PASSWORD or http_auth_password_sha256"
            )
        if has_password and not self.http_auth_username:
            problems.append("http_auth_password: set http_auth_username too")
        if (self.http_tls_cert_file is None) != (self.http_tls_key_file is None):
            problems.append("http_tls_cert_file: set both http_tls_cert_file and http_tls_key_file")
        for name in ("http_tls_cert_file", "http_tls_key_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                problems.append(f"{name}: no such file: {path}")
        if problems:
            raise ValueError("\n".join(problems))
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


def _format_location(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "config"


def _format_errors(error: ValidationError) -> list[str]:
    problems: list[str] = []
    for item in error.errors(include_url=False, include_input=False):
        loc = tuple(
            p for p in item["loc"] if not (isinstance(p, str) and p.startswith("function-"))
        )
        where = _format_location(loc)
        kind = item["type"]
        message = str(item["msg"])
        if kind == "extra_forbidden":
            message = "unknown setting"
        elif kind == "missing":
            message = "required"
        elif message.startswith("Value error, "):
            message = message.removeprefix("Value error, ")
        for line in message.splitlines():
            # Cross-field problems already carry their field name.
            if loc == () and ":" in line:
                problems.append(line)
            else:
                problems.append(f"{where}: {line}")
    return problems


def read_config_file(path: Path) -> dict[str, Any]:
    """The TOML file as a dict; errors name the file (and the line, for syntax errors)."""
    try:
        with Path(path).open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError([f"--config: no such file: {path}"]) from None
    except IsADirectoryError:
        raise ConfigError([f"--config: is a directory: {path}"]) from None
    except PermissionError:
        raise ConfigError([f"--config: permission denied: {path}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"--config: {path}: invalid TOML: {exc}"]) from None
    problems = [
        f"{name}: must not be set in the config file; set {ENV_PREFIX}{name.upper()} instead"
        for name in _ENV_ONLY
        if name in data
    ]
    if problems:
        raise ConfigError(problems)
    return data


def load_settings(config_path: Path | None = None) -> Settings:
    """Settings from the environment, the TOML file and defaults; ConfigError lists every problem."""
    file_values = read_config_file(config_path) if config_path is not None else {}
    try:
        return Settings(**file_values)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc)) from None
    except SettingsError as exc:
        match = re.search(r'field "(?P<field>[^"]+)"', str(exc))
        field = match["field"] if match else "environment"
        raise ConfigError(
            [f"{field}: cannot parse {ENV_PREFIX}{field.upper()} (complex values must be JSON)"]
        ) from None
