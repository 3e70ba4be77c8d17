"""Prometheus exporter: per-plugin families built at scrape time, plus the daemon's own metrics.

Over 500 lines on purpose: ``PluginCollector.collect()`` (prometheus-client)
and its fast text renderer must write exactly the same families, HELP and TYPE; both read the
one family table here, and tests/test_exporter.py compares their output.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from itertools import compress, repeat
from operator import attrgetter, is_not, lt
from typing import Any, NamedTuple

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from pluginmon.collectors.models import PluginKey, PluginSample, Snapshot

PLUGIN_LABELS = ("tenant", "plugin", "environment")

_KEY = attrgetter("key")
_RESTARTS = attrgetter("restarts")
_UP = attrgetter("up")
_OLDEST_START = attrgetter("oldest_start_time")
_UNSET = object()  # a start time not read yet (never a sample's value)


@dataclass(frozen=True, slots=True)
class HealthView:
    """A plugin's latest health score and the per-component scores behind it."""

    score: float
    components: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True, slots=True)
class FiringAlert:
    key: PluginKey
    alertname: str
    severity: str


class _PluginRow(NamedTuple):
    """One plugin in a view (a NamedTuple: 10,000 of them are built per sample)."""

    key: PluginKey
    labels: str  # pre-escaped 'tenant="..",plugin="..",environment=".."'
    sample: PluginSample
    restarts_total: int
    up: int
    start_time: float | None  # seconds since the epoch


class _PluginRows:
    """The per-plugin rows of one view, built when a scrape first reads them: snapshots
    come every sample interval, scrapes every 15 s or so, so most views are never
    rendered. Built from columns nothing mutates afterwards (ExporterState copies a column
    before it changes one); two renders racing only build them twice."""

    __slots__ = ("_columns", "_rows")

    def __init__(
        self,
        keys: Sequence[PluginKey] = (),
        labels: Sequence[str] = (),
        samples: Sequence[PluginSample] = (),
        restarts: Sequence[int] = (),
        starts: Sequence[float | None] = (),
        vanished: Sequence[_PluginRow] = (),
    ) -> None:
        self._columns: tuple[Any, ...] | None = (keys, labels, samples, restarts, starts, vanished)
        self._rows: tuple[_PluginRow, ...] | None = None

    def rows(self) -> tuple[_PluginRow, ...]:
        rows = self._rows
        if rows is None:
            columns = self._columns
            assert columns is not None
            keys, labels, samples, restarts, starts, vanished = columns
            rows = (
                *map(
                    _PluginRow, keys, labels, samples, restarts, map(int, map(_UP, samples)), starts
                ),
                *vanished,
            )
            self._rows = rows
        return rows


@dataclass(frozen=True, slots=True)
class ExportView:
    """Everything one scrape renders; immutable, so a render thread can read it safely."""

    rows: _PluginRows
    health: Mapping[PluginKey, HealthView]
    alerts: tuple[FiringAlert, ...]
    # The same health keyed by the plugin's label string: str hashes are cached, a
    # dataclass key's hash is computed in Python on every lookup.
    health_by_label: Mapping[str, HealthView] = field(default_factory=dict)
    # This view rendered, by format (openmetrics: bool): several scrapers between two
    # updates (HA Prometheus pairs, a curl) render once. Kept on the view, so the ~15 MB of
    # a 10,000-plugin rendering goes with it when the next snapshot replaces it.
    rendered: dict[bool, tuple[bytes, ...]] = field(default_factory=dict, compare=False)

    @property
    def plugins(self) -> tuple[_PluginRow, ...]:
        """One row per plugin: this snapshot's, then the vanished ones in their grace."""
        return self.rows.rows()


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _label_string(key: PluginKey) -> str:
    return (
        f'tenant="{_escape(key.tenant)}",plugin="{_escape(key.plugin)}",'
        f'environment="{_escape(key.environment)}"'
    )


def _down(sample: PluginSample) -> PluginSample:
    """A vanished plugin during its grace period: down, zero usage, counters kept."""
    return dataclasses.replace(
        sample,
        up=False,
        process_count=0,
        cpu_percent=0.0,
        rss_bytes=0,
        vms_bytes=0,
        threads=0,
        restarts=0,
        uss_bytes=None if sample.uss_bytes is None else 0,
        swap_bytes=None if sample.swap_bytes is None else 0,
        fds=None if sample.fds is None else 0,
        pids=(),
    )


class ExporterState:
    """The latest per-plugin view, updated by the sampling thread and the event loop, read by
    scrapes in a render thread.

    Updates build new immutable objects and swap one reference, so a concurrent render sees
    either the old view or the new one, never a half-updated mix.
    """

    def __init__(
        self, *, grace_seconds: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._grace_seconds = grace_seconds
        self._clock = clock
        # The previous snapshot's plugins in its order, and per position what carries over
        # from one snapshot to the next: the label string, the restarts so far, the start
        # time (the sampler's datetime object, and its float).
        self._keys: list[PluginKey] = []
        self._samples: Sequence[PluginSample] = ()
        self._label_col: list[str] = []
        self._restart_col: list[int] = []
        self._start_obj: list[object] = []
        self._start_val: list[float | None] = []
        # Plugins gone from the snapshots, exported as down during their grace period:
        # key -> (the row exported, monotonic time last seen, restarts so far, label string)
        self._vanished: dict[PluginKey, tuple[_PluginRow, float, int, str]] = {}
        self._seen_at = 0.0  # monotonic time of the previous snapshot
        self._forgotten: frozenset[PluginKey] = frozenset()  # see forget()
        # Updates may come from the sampling thread and the event loop: the fields that
        # make up a view are swapped together under this lock (held for microseconds).
        self._lock = threading.Lock()
        self._labels: dict[PluginKey, str] = {}
        self._view = ExportView(rows=_PluginRows(), health={}, alerts=())
        self._health: Mapping[PluginKey, HealthView] = {}
        self._health_by_label: Mapping[str, HealthView] = {}
        self._alerts: tuple[FiringAlert, ...] = ()

    def update_snapshot(self, snapshot: Snapshot) -> None:
        """Fold a snapshot in; safe to call from the sampling worker thread.

        In snapshot order (no sort: Prometheus does not care about series order), then
        vanished plugins: down during their grace period, gone after it. With the same
        plugins as the previous snapshot (the usual case) the rows are built by C-level
        passes (label strings, restart totals and start times carry over by position);
        a change of plugins realigns that state by key once.
        """
        now = self._clock()
        samples = snapshot.samples
        keys = list(map(_KEY, samples))
        if keys != self._keys:
            self._realign(keys, now)
        if self._forgotten:
            # Removed from the configuration: no grace period as "down" (forget()).
            for key in self._forgotten:
                self._vanished.pop(key, None)
                self._labels.pop(key, None)
            self._forgotten = frozenset()
        self._samples = samples
        self._seen_at = now
        n = len(samples)
        restarts = list(map(_RESTARTS, samples))
        if n and max(restarts) > 0:
            # A copy: the previous views keep reading the old column (rows are built lazily).
            column = self._restart_col = self._restart_col.copy()
            for i in compress(range(n), map(lt, repeat(0), restarts)):
                column[i] += restarts[i]
        starts: list[object] = list(map(_OLDEST_START, samples))
        if starts != self._start_obj:
            values = self._start_val = self._start_val.copy()
            for i in compress(range(n), map(is_not, starts, self._start_obj)):
                started = starts[i]
                values[i] = started.timestamp() if isinstance(started, datetime) else None
            self._start_obj = starts
        rows = _PluginRows(
            keys,
            self._label_col,
            samples,
            self._restart_col,
            self._start_val,
            self._vanished_rows(now) if self._vanished else (),
        )
        with self._lock:
            self._view = ExportView(
                rows=rows,
                health=self._health,
                alerts=self._alerts,
                health_by_label=self._health_by_label,
            )

    def forget(self, keys: Collection[PluginKey]) -> None:
        """Drop these plugins now rather than after the grace period (they were removed
        from the configuration, not stopped: a plugin_up of 0 would say they are down).
        Takes effect at the next ``update_snapshot``; call it from the thread that calls
        that, before it, never concurrently with it."""
        self._forgotten = frozenset(keys)
        for key in keys:
            self._vanished.pop(key, None)

    def _realign(self, keys: list[PluginKey], now: float) -> None:
        """The plugins changed: carry each one's label, restarts and start time to its new
        position; plugins that left go to the vanished ones, returning ones come back."""
        old = {k: i for i, k in enumerate(self._keys)}
        current = set(keys)
        for key, i in old.items():
            if key not in current:
                label, restarts = self._label_col[i], self._restart_col[i]
                down = _down(self._samples[i])
                self._vanished[key] = (
                    _PluginRow(key, label, down, restarts, 0, self._start_val[i]),
                    self._seen_at,
                    restarts,
                    label,
                )
        labels = self._labels
        label_col: list[str] = []
        restart_col: list[int] = []
        start_obj: list[object] = []
        start_val: list[float | None] = []
        for key in keys:
            at = old.get(key)
            if at is not None:
                label_col.append(self._label_col[at])
                restart_col.append(self._restart_col[at])
                start_obj.append(self._start_obj[at])
                start_val.append(self._start_val[at])
                continue
            back = self._vanished.pop(key, None)
            if back is not None:
                label, restarts = back[3], back[2]
            else:
                label = labels.get(key) or _label_string(key)
                restarts = 0
            labels[key] = label
            label_col.append(label)
            restart_col.append(restarts)
            start_obj.append(_UNSET)  # computed from the sample
            start_val.append(None)
        self._keys = keys
        self._label_col = label_col
        self._restart_col = restart_col
        self._start_obj = start_obj
        self._start_val = start_val

    def _vanished_rows(self, now: float) -> list[_PluginRow]:
        rows: list[_PluginRow] = []
        for key, (row, seen_at, _restarts, _label) in list(self._vanished.items()):
            if now - seen_at > self._grace_seconds:
                del self._vanished[key]
                self._labels.pop(key, None)
            else:
                rows.append(row)
        return rows

    def update_health(self, health: Mapping[PluginKey, HealthView]) -> None:
        health = dict(health)
        labels = self._labels
        by_label: dict[str, HealthView] = {}
        for key, value in health.items():
            label = labels.get(key)
            if label is None:
                label = labels[key] = _label_string(key)
            by_label[label] = value
        with self._lock:
            self._health = health
            self._health_by_label = by_label
            self._view = dataclasses.replace(
                self._view, health=self._health, health_by_label=self._health_by_label
            )

    def update_health_changes(
        self, changed: Mapping[PluginKey, HealthView], removed: Iterable[PluginKey] = ()
    ) -> None:
        """Apply what changed since the previous update (``update_health`` replaces all):
        at 10,000 plugins most scores do not move from one cycle to the next."""
        removed = tuple(removed)
        if not changed and not removed:
            return
        # Copies (C-level, no rehashing): a render thread may be reading the current ones.
        health = dict(self._health)
        by_label = dict(self._health_by_label)
        labels = self._labels
        for key in removed:
            if health.pop(key, None) is not None:
                by_label.pop(labels.get(key) or _label_string(key), None)
        for key, value in changed.items():
            label = labels.get(key)
            if label is None:
                label = labels[key] = _label_string(key)
            health[key] = value
            by_label[label] = value
        with self._lock:
            self._health = health
            self._health_by_label = by_label
            self._view = dataclasses.replace(
                self._view, health=self._health, health_by_label=self._health_by_label
            )

    def update_alerts(self, firing: Sequence[FiringAlert]) -> None:
        with self._lock:
            self._alerts = tuple(firing)
            self._view = dataclasses.replace(self._view, alerts=self._alerts)

    def view(self) -> ExportView:
        return self._view


# -- per-plugin families --------------------------------------------------------------------

_Getter = Callable[[_PluginRow], float | int | None]


@dataclass(frozen=True, slots=True)
class _Family:
    name: str  # full exposition name (counters include _total)
    kind: str  # "gauge" | "counter"
    help: str
    value: _Getter
    extra_label: tuple[str, str] | None = None  # (label name, value), for kind= variants
    floats: bool = False  # values may be float (NaN/Inf need rewriting in the text)


_FAMILIES: tuple[_Family, ...] = (
    _Family(
        "pluginmon_plugin_up",
        "gauge",
        "1 if any process of the plugin runs",
        attrgetter("up"),
    ),
    _Family(
        "pluginmon_plugin_cpu_percent",
        "gauge",
        "CPU use over the last interval; 100 = one full core",
        attrgetter("sample.cpu_percent"),
        floats=True,
    ),
    _Family(
        "pluginmon_plugin_memory_rss_bytes",
        "gauge",
        "Resident set size of all processes",
        attrgetter("sample.rss_bytes"),
    ),
    _Family(
        "pluginmon_plugin_memory_vms_bytes",
        "gauge",
        "Virtual memory size of all processes",
        attrgetter("sample.vms_bytes"),
    ),
    _Family(
        "pluginmon_plugin_memory_uss_bytes",
        "gauge",
        "Unique set size of all processes (when collected)",
        attrgetter("sample.uss_bytes"),
    ),
    _Family(
        "pluginmon_plugin_memory_swap_bytes",
        "gauge",
        "Swapped-out memory of all processes (when collected)",
        attrgetter("sample.swap_bytes"),
    ),
    _Family("pluginmon_plugin_threads", "gauge", "Threads", attrgetter("sample.threads")),
    _Family("pluginmon_plugin_processes", "gauge", "Processes", attrgetter("sample.process_count")),
    _Family(
        "pluginmon_plugin_open_fds",
        "gauge",
        "Open file descriptors (when collected)",
        attrgetter("sample.fds"),
    ),
    _Family(
        "pluginmon_plugin_io_read_bytes_total",
        "counter",
        "Bytes read from storage (when collected)",
        attrgetter("sample.read_bytes"),
    ),
    _Family(
        "pluginmon_plugin_io_write_bytes_total",
        "counter",
        "Bytes written to storage (when collected)",
        attrgetter("sample.write_bytes"),
    ),
    _Family(
        "pluginmon_plugin_context_switches_total",
        "counter",
        "Context switches (when collected)",
        attrgetter("sample.ctx_switches_voluntary"),
        ("kind", "voluntary"),
    ),
    _Family(
        "pluginmon_plugin_context_switches_total",
        "counter",
        "Context switches (when collected)",
        attrgetter("sample.ctx_switches_involuntary"),
        ("kind", "involuntary"),
    ),
    _Family(
        "pluginmon_plugin_restarts_total",
        "counter",
        "Times the plugin's root process changed",
        attrgetter("restarts_total"),
    ),
    _Family(
        "pluginmon_plugin_start_time_seconds",
        "gauge",
        "Start time of the plugin's oldest process, seconds since the epoch",
        attrgetter("start_time"),
        floats=True,
    ),
)

_HEALTH_SCORE = "pluginmon_plugin_health_score"
_HEALTH_COMPONENT = "pluginmon_plugin_health_component_score"
_ALERTS_FIRING = "pluginmon_alerts_firing"


def _family_name(name: str, kind: str) -> str:
    # prometheus_client's families take the counter name without the _total suffix.
    return name.removesuffix("_total") if kind == "counter" else name


class PluginCollector(Collector):
    """Per-plugin families from the latest view; a vanished plugin's series vanish too.

    ``collect()`` is the prometheus-client interface (OpenMetrics and tests);
    ``render_text()`` writes exactly the same families in the text format without
    prometheus-client's per-sample overhead, which matters at 10,000 plugins.
    """

    def __init__(self, state: ExporterState) -> None:
        self._state = state

    def cached_chunks(self, *, openmetrics: bool = False) -> tuple[bytes, ...]:
        """``render_text()`` as UTF-8 chunks, reused while the state has not changed (the
        view holds them: races only render twice)."""
        view = self._state.view()
        chunks = view.rendered.get(openmetrics)
        if chunks is None:
            chunks = view.rendered[openmetrics] = tuple(self._render(view, openmetrics=openmetrics))
        return chunks

    def collect(self) -> Iterator[Metric]:
        view = self._state.view()
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}
        for spec in _FAMILIES:
            labels = [*PLUGIN_LABELS, *([spec.extra_label[0]] if spec.extra_label else [])]
            family = families.get(spec.name)
            if family is None:
                cls = CounterMetricFamily if spec.kind == "counter" else GaugeMetricFamily
                family = cls(_family_name(spec.name, spec.kind), spec.help, labels=labels)
                families[spec.name] = family
            extra = [spec.extra_label[1]] if spec.extra_label else []
            for row in view.plugins:
                value = spec.value(row)
                if value is not None:
                    family.add_metric(
                        [row.key.tenant, row.key.plugin, row.key.environment, *extra], value
                    )
        yield from (f for f in families.values() if f.samples)
        yield from self._health_families(view)
        yield self._alerts_family(view)

    def _health_families(self, view: ExportView) -> Iterator[Metric]:
        score = GaugeMetricFamily(_HEALTH_SCORE, "Health score 0..100", labels=PLUGIN_LABELS)
        component = GaugeMetricFamily(
            _HEALTH_COMPONENT,
            "Health score of one component 0..100",
            labels=[*PLUGIN_LABELS, "component"],
        )
        for row in view.plugins:
            health = view.health.get(row.key)
            if health is None:
                continue
            key = [row.key.tenant, row.key.plugin, row.key.environment]
            score.add_metric(key, health.score)
            for name, value in health.components:
                component.add_metric([*key, name], value)
        if score.samples:
            yield score
        if component.samples:
            yield component

    @staticmethod
    def _alerts_family(view: ExportView) -> GaugeMetricFamily:
        family = GaugeMetricFamily(
            _ALERTS_FIRING,
            "1 per firing alert (not inhibited, not silenced)",
            labels=[*PLUGIN_LABELS, "alertname", "severity"],
        )
        for alert in view.alerts:
            family.add_metric(
                [
                    alert.key.tenant,
                    alert.key.plugin,
                    alert.key.environment,
                    alert.alertname,
                    alert.severity,
                ],
                1,
            )
        return family

    def render_text(self, *, openmetrics: bool = False) -> str:
        """The same families as ``collect()``, in the text format 0.0.4 or OpenMetrics 1.0.

        For OpenMetrics the caller appends the single ``# EOF`` line. Written for speed:
        labels are escaped once per plugin, values formatted by f-strings in one
        comprehension per family (10,000 plugins render in tens of milliseconds).
        """
        return b"".join(self._render(self._state.view(), openmetrics=openmetrics)).decode()

    @staticmethod
    def _render(view: ExportView, *, openmetrics: bool) -> list[bytes]:
        # Each family is encoded as soon as it is built: the whole exposition never exists
        # as text and bytes at once (it is ~15 MB at 10,000 plugins).
        out: list[bytes] = []

        def add(text: str) -> None:
            out.append(text.encode("utf-8"))

        rows = view.plugins
        labels = [row.labels for row in rows]
        emitted_header: set[str] = set()
        for spec in _FAMILIES:
            values = list(map(spec.value, rows))
            extra = f',{spec.extra_label[0]}="{spec.extra_label[1]}"' if spec.extra_label else ""
            head, tail = spec.name + "{", extra + "} "
            body = "".join(
                [
                    f"{head}{lab}{tail}{v}\n"
                    for lab, v in zip(labels, values, strict=True)
                    if v is not None
                ]
            )
            if not body:
                continue
            if spec.name not in emitted_header:
                emitted_header.add(spec.name)
                header = _family_name(spec.name, spec.kind) if openmetrics else spec.name
                add(f"# HELP {header} {spec.help}\n# TYPE {header} {spec.kind}\n")
            special = spec.floats and not _all_finite(values)
            add(_fix_special_values(body) if special else body)
        health = view.health_by_label
        scored = [(lab, h) for lab in labels if (h := health.get(lab)) is not None]
        if scored:
            # Health values repeat a lot across a fleet (every healthy component is 100):
            # each distinct value is formatted once, through these dicts.
            score_text = _ScoreText()
            add(f"# HELP {_HEALTH_SCORE} Health score 0..100\n# TYPE {_HEALTH_SCORE} gauge\n")
            add("".join([f"{_HEALTH_SCORE}{{{lab}}} {score_text[h.score]}" for lab, h in scored]))
            suffix = _ComponentSuffix()
            component_body = "".join(
                [
                    f"{_HEALTH_COMPONENT}{{{lab}{suffix[pair]}"
                    for lab, h in scored
                    for pair in h.components
                ]
            )
            if component_body:
                add(
                    f"# HELP {_HEALTH_COMPONENT} Health score of one component 0..100\n"
                    f"# TYPE {_HEALTH_COMPONENT} gauge\n"
                )
                add(component_body)
        add(
            f"# HELP {_ALERTS_FIRING} 1 per firing alert (not inhibited, not silenced)\n"
            f"# TYPE {_ALERTS_FIRING} gauge\n"
        )
        for alert in view.alerts:
            add(
                f'{_ALERTS_FIRING}{{{_label_string(alert.key)},alertname="{_escape(alert.alertname)}",'
                f'severity="{_escape(alert.severity)}"}} 1\n'
            )
        return out


class _ScoreText(dict[float, str]):
    """value -> "value\\n" as the exposition spells it."""

    def __missing__(self, value: float) -> str:
        text = self[value] = f"{_special(value)}\n"
        return text


class _ComponentSuffix(dict[tuple[str, float], str]):
    """(component, value) -> ',component="name"} value\\n'."""

    def __missing__(self, pair: tuple[str, float]) -> str:
        name, value = pair
        text = self[pair] = f',component="{_escape(name)}"}} {_special(value)}\n'
        return text


def _special(value: float) -> float | str:
    """A value as the exposition formats spell NaN and the infinities."""
    if math.isfinite(value):
        return value
    if math.isnan(value):
        return "NaN"
    return "+Inf" if value > 0 else "-Inf"


def _all_finite(values: list[Any]) -> bool:
    """No NaN or infinity among ``values`` (None ignored): one C-level sum, not a scan."""
    try:
        return math.isfinite(
            sum(v for v in values if v is not None) if None in values else sum(values)
        )
    except OverflowError:  # pragma: no cover
        return False


def _fix_special_values(body: str) -> str:
    """Python writes nan/inf; the exposition formats want NaN/+Inf/-Inf.

    A value is always the last thing on a line and label values never hold a raw newline,
    so " nan\n" can only be a value.
    """
    if " nan\n" in body or "inf\n" in body:
        body = (
            body.replace(" nan\n", " NaN\n")
            .replace(" -inf\n", " -Inf\n")
            .replace(" inf\n", " +Inf\n")
        )
    return body


# -- the daemon's own metrics -----------------------------------------------------------------


class DaemonMetrics:
    """The daemon's own instruments, registered in the registry the caller passes in.

    The counters other components hold (the writer, the sample sink, the database watch,
    the outbox, the scheduler) are not copied here: each one is registered in the same
    registry as a prometheus-client Collector that reads its own state at scrape time.
    """

    def __init__(self, registry: CollectorRegistry, *, version: str) -> None:
        self.samples_total = Counter("pluginmon_samples", "Plugin samples taken", registry=registry)
        self.sample_duration = Histogram(
            "pluginmon_sample_duration_seconds",
            "Duration of one sampling cycle",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=registry,
        )
        self.processes_seen = Gauge(
            "pluginmon_processes_seen", "Processes in the last sampling cycle", registry=registry
        )
        self.process_read_errors = Counter(
            "pluginmon_process_read_errors",
            "Per-process read failures, by kind",
            labelnames=["kind"],
            registry=registry,
        )
        self.build_info = Gauge(
            "pluginmon_build_info", "Always 1; the version label", ["version"], registry=registry
        )
        self.build_info.labels(version=version).set(1)

    def observe_snapshot(self, snapshot: Snapshot) -> None:
        self.samples_total.inc(len(snapshot.samples))
        self.sample_duration.observe(snapshot.duration_seconds)
        self.processes_seen.set(snapshot.processes_seen)
        for kind, count in snapshot.errors:
            if count:
                self.process_read_errors.labels(kind=kind).inc(count)


class MetricsRenderer:
    """Renders /metrics: the text format by default, OpenMetrics when the client asks for it.

    Blocking (10,000 plugins take tens of milliseconds): call it from a worker thread.
    """

    def __init__(self, registry: CollectorRegistry, plugins: PluginCollector) -> None:
        self._registry = registry
        self._plugins = plugins

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """The exposition and its content type."""
        chunks, content_type = self.render_chunks(accept)
        return b"".join(chunks), content_type

    def render_chunks(self, accept: str | None) -> tuple[list[bytes], str]:
        """The exposition as chunks (joining 15 MB only to compress it would double the
        peak memory of a scrape) and its content type."""
        encoder, content_type = choose_encoder(accept or "")
        if content_type.startswith("application/openmetrics-text"):
            own = encoder(self._registry).removesuffix(b"# EOF\n")
            plugins = self._plugins.cached_chunks(openmetrics=True)
            return [own, *plugins, b"# EOF\n"], content_type
        return [encoder(self._registry), *self._plugins.cached_chunks()], content_type
