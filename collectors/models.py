"""Frozen data passed out of the collectors: plugin specs, per-plugin samples, snapshots."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Final, TypeVar, dataclass_transform

_T = TypeVar("_T")


@dataclass_transform(frozen_default=True)
def _record(cls: type[_T]) -> type[_T]:
    """A dataclass the type checker treats as frozen, built without frozen's __init__.

    A frozen dataclass sets each field through object.__setattr__: 3.6 us for a
    PluginSample against 1.5 us for plain slots, and the sampler builds one per plugin per
    cycle (10,000 a second at 10,000 plugins; docs/BENCHMARKS.md, "Scale: the per-plugin
    objects"). mypy --strict still refuses any assignment to a field. Such a record is not
    hashable, nor is anything that holds one (a Snapshot): ``hash()`` raises TypeError at
    run time, which mypy does not see (it has no check for hashability).
    """
    return dataclass(slots=True)(cls)


@dataclass(frozen=True, slots=True, order=True)
class PluginKey:
    """Identity of one monitored plugin instance: the labels of every per-plugin series.

    Its hash is computed once: each cycle looks every plugin up in several dicts and sets
    (ids, health, alerts, the exporter), and the generated __hash__ built a tuple each time.
    It is kept in the field ``_hash`` (not compared, not shown, not an argument), which
    ``dataclasses.fields()``/``asdict()`` do list: serialise a key by its three labels.
    """

    tenant: str
    plugin: str
    environment: str = "production"
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.tenant, self.plugin, self.environment)))

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(self) -> tuple[type[PluginKey], tuple[str, str, str]]:
        # str hashes differ between processes: a copy or an unpickled key hashes anew.
        return (type(self), (self.tenant, self.plugin, self.environment))


@dataclass(frozen=True, slots=True)
class Match:
    """How a plugin's processes are recognised; any non-empty field must match (AND)."""

    name: str | None = None  # process name (comm), exact
    exe: str | None = None  # executable path, exact
    cmdline: str | None = None  # regex searched in the space-joined command line
    pidfile: str | None = None  # path of a file holding the root pid
    cgroup: str | None = None  # glob over the process's cgroup v2 path
    env: str | None = None  # "KEY=VALUE" that must be in /proc/PID/environ
    systemd_unit: str | None = None  # unit name, e.g. "resizer.service"


@dataclass(frozen=True, slots=True)
class PluginSpec:
    key: PluginKey
    match: Match
    # "config" for [[plugins]] entries, "label" for processes found by PLUGINMON_* env labels.
    origin: str = "config"


@_record
class PluginSample:
    """One plugin's resource usage at one instant (all its processes summed).

    Opt-in fields are None when not collected in this cycle, never 0-for-unknown.
    Counters (read/write bytes, context switches) are cumulative per plugin and never go
    backwards when a child exits.
    """

    key: PluginKey
    timestamp: datetime  # timezone-aware, UTC
    up: bool
    process_count: int
    cpu_percent: float  # 100.0 = one full core, over the interval since the last sample
    rss_bytes: int
    vms_bytes: int
    threads: int
    restarts: int = 0  # times the root process changed since the previous sample
    oldest_start_time: datetime | None = None
    uss_bytes: int | None = None
    swap_bytes: int | None = None
    fds: int | None = None
    read_bytes: int | None = None
    write_bytes: int | None = None
    ctx_switches_voluntary: int | None = None
    ctx_switches_involuntary: int | None = None
    pids: tuple[int, ...] = ()


# The measured PluginSample attributes, in plugin_samples column order: each is also the name
# of its plugin_samples column (storage.writer) and a metric an alert rule can name (alerts.rules).
SAMPLE_MEASUREMENTS: Final[tuple[str, ...]] = (
    "cpu_percent",
    "rss_bytes",
    "vms_bytes",
    "uss_bytes",
    "swap_bytes",
    "threads",
    "fds",
    "read_bytes",
    "write_bytes",
    "ctx_switches_voluntary",
    "ctx_switches_involuntary",
    "process_count",
    "restarts",
    "up",
)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything one sampling cycle saw; one fetch serves the writer, exporter and alerts.

    Not hashable, though frozen: its samples are not (see ``_record``)."""

    timestamp: datetime  # timezone-aware, UTC
    host: str
    samples: tuple[PluginSample, ...]
    duration_seconds: float
    processes_seen: int = 0
    # per-process read failures this cycle, by kind ("no_such_process", "zombie", "access_denied")
    errors: tuple[tuple[str, int], ...] = field(default=())


# -- a plugin's own metrics (scraped from its /metrics or pushed) ------------------------------


class MetricKind(StrEnum):
    """The ``metric_kind`` of a plugin_metrics row: what its value means over time.

    ``counter``: cumulative, only grows until the plugin restarts (read as a rate);
    ``histogram``: a ``_bucket`` (cumulative count per ``le``), ``_sum`` or ``_count`` series;
    ``summary``: a quantile series (``quantile`` label), ``_sum`` or ``_count``;
    ``gauge``: any value at an instant (also untyped, info and stateset series).
    """

    GAUGE = "gauge"
    COUNTER = "counter"
    HISTOGRAM = "histogram"
    SUMMARY = "summary"


@dataclass(frozen=True, slots=True)
class MetricPoint:
    """One series' value at one scrape or push.

    ``name`` is the series name as exposed (``http_requests_total``, ``latency_bucket``);
    ``labels_json`` its labels as canonical JSON text (sorted keys): what the plugin_metrics
    ``labels`` column holds, serialised once, off the event loop, where the body is parsed.
    """

    name: str
    kind: MetricKind
    labels_json: str
    value: float

    def labels(self) -> dict[str, str]:
        loaded: dict[str, str] = json.loads(self.labels_json)
        return loaded


@dataclass(frozen=True, slots=True)
class PluginMetrics:
    """What one scrape or push of one plugin yielded: its points, all stamped ``timestamp``."""

    key: PluginKey
    timestamp: datetime  # timezone-aware, UTC
    points: tuple[MetricPoint, ...]
