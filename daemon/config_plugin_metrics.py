"""The config schema of a plugin's own metrics: ``[plugin_metrics]`` (the defaults, the push
TTLs) and the field types of the ``metrics_*`` keys of ``[[plugins]]`` (config_sections)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Annotated, ClassVar, Final, Protocol

from pydantic import AfterValidator, Field, model_validator

from pluginmon.collectors.exposition import ExpositionLimits
from pluginmon.collectors.push import PushConfig
from pluginmon.collectors.scrape import ScrapeConfig, ScrapeTarget
from pluginmon.daemon.config_schema import (
    DAY,
    HOUR,
    YEAR,
    Expect,
    Table,
    problems_error,
    seconds,
)

MIB: Final = 1024 * 1024
MAX_SCRAPE_BODY_BYTES: Final = 1024 * MIB
MAX_SCRAPE_SERIES: Final = 1_000_000
METRICS_URL_PROBLEM = (
    "must be an http:// or https:// URL, on loopback unless metrics_allow_remote = true"
)

ScrapeInterval = Annotated[float, seconds(gt=0, le=HOUR)]
ScrapeBodyBytes = Annotated[int, Field(ge=1024, le=MAX_SCRAPE_BODY_BYTES)]
ScrapeSeries = Annotated[int, Field(ge=1, le=MAX_SCRAPE_SERIES)]


def _globs(value: list[str]) -> list[str]:
    if not value:
        raise ValueError('must not be empty (["*"] keeps every series)')
    if any(not pattern for pattern in value):
        raise ValueError("must hold non-empty glob strings")
    return value


AllowList = Annotated[list[str], Expect("must be an array of glob strings"), AfterValidator(_globs)]


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address (127.0.0.0/8, ::1)."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class HasScrapeTarget(Protocol):
    """A ``[[plugins]]`` table, as far as scraping is concerned."""

    def to_target(self, defaults: ScrapeConfig) -> ScrapeTarget | None: ...


class PluginMetricsTable(Table):
    """``[plugin_metrics]``: scraping plugins' own /metrics endpoints and accepting pushes;
    the defaults of every plugin's ``metrics_*`` keys."""

    unknown_key: ClassVar[str] = "unknown setting"

    enabled: bool = True
    # Scrape the endpoints label-discovered plugins declare (PLUGINMON_METRICS_PORT/PATH).
    discovered: bool = True
    interval_seconds: ScrapeInterval | None = None  # default: sample_interval_seconds
    timeout_seconds: ScrapeInterval = 5.0
    max_body_bytes: ScrapeBodyBytes = 4 * MIB
    max_series: ScrapeSeries = 2000
    max_labels_per_series: Annotated[int, Field(ge=1, le=1000)] = 30
    max_label_value_chars: Annotated[int, Field(ge=1, le=65536)] = 1024
    allow: AllowList = Field(default_factory=lambda: ["*"])
    max_concurrent_scrapes: Annotated[int, Field(ge=1, le=10_000)] = 32
    push_ttl_seconds: Annotated[float, seconds(gt=0, le=YEAR)] = 600.0
    push_max_ttl_seconds: Annotated[float, seconds(gt=0, le=YEAR)] = DAY

    @model_validator(mode="after")
    def _ttl(self) -> PluginMetricsTable:
        if self.push_ttl_seconds > self.push_max_ttl_seconds:
            raise problems_error(
                [
                    (
                        ("push_ttl_seconds",),
                        f"must be <= push_max_ttl_seconds ({self.push_max_ttl_seconds:g})",
                    )
                ]
            )
        return self

    @property
    def limits(self) -> ExpositionLimits:
        return ExpositionLimits(
            max_body_bytes=self.max_body_bytes,
            max_series=self.max_series,
            max_labels_per_series=self.max_labels_per_series,
            max_label_value_chars=self.max_label_value_chars,
            allow=tuple(self.allow),
        )

    def to_scrape(
        self, plugins: Iterable[HasScrapeTarget], *, sample_interval_seconds: float
    ) -> ScrapeConfig:
        """What to scrape; nothing when disabled."""
        interval = self.interval_seconds or sample_interval_seconds
        defaults = ScrapeConfig(
            discovered=self.enabled and self.discovered,
            interval_seconds=interval,
            timeout_seconds=min(self.timeout_seconds, interval),
            limits=self.limits,
            max_concurrent=self.max_concurrent_scrapes,
        )
        if not self.enabled:
            return defaults
        targets = tuple(t for t in (p.to_target(defaults) for p in plugins) if t is not None)
        return ScrapeConfig(
            targets=targets,
            discovered=defaults.discovered,
            interval_seconds=defaults.interval_seconds,
            timeout_seconds=defaults.timeout_seconds,
            limits=defaults.limits,
            max_concurrent=defaults.max_concurrent,
        )

    def to_push(self) -> PushConfig:
        return PushConfig(
            default_ttl_seconds=self.push_ttl_seconds,
            max_ttl_seconds=self.push_max_ttl_seconds,
            limits=self.limits,
        )
