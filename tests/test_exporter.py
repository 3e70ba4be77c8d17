"""Exporter: per-plugin families from hand-built Snapshots, each test with its own registry."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics import exposition as openmetrics_exposition
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as _parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families as parse_text

from pluginmon.collectors.models import PluginKey, PluginSample, Snapshot
from pluginmon.daemon.exporter import (
    DaemonMetrics,
    ExporterState,
    FiringAlert,
    HealthView,
    MetricsRenderer,
    PluginCollector,
)

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
RESIZER = PluginKey("acme", "image-resizer", "production")
INDEXER = PluginKey("globex", 'in"dex\\er', "staging")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def sample(key: PluginKey, **overrides: object) -> PluginSample:
    values: dict[str, object] = {
        "key": key,
        "timestamp": T0,
        "up": True,
        "process_count": 3,
        "cpu_percent": 42.5,
        "rss_bytes": 200 * 1024 * 1024,
        "vms_bytes": 900 * 1024 * 1024,
        "threads": 17,
        "oldest_start_time": datetime(2026, 1, 1, 11, 0, tzinfo=UTC),
    }
    values.update(overrides)
    return PluginSample(**values)  # type: ignore[arg-type]


def snapshot(*samples: PluginSample, **overrides: object) -> Snapshot:
    values: dict[str, object] = {
        "timestamp": T0,
        "host": "h1",
        "samples": samples,
        "duration_seconds": 0.012,
        "processes_seen": 250,
        "errors": (("no_such_process", 2), ("access_denied", 0)),
    }
    values.update(overrides)
    return Snapshot(**values)  # type: ignore[arg-type]


def parse_openmetrics(text: str) -> object:
    return _parse_openmetrics(text)  # type: ignore[no-untyped-call]


def labels(key: PluginKey, **extra: str) -> dict[str, str]:
    return {"tenant": key.tenant, "plugin": key.plugin, "environment": key.environment, **extra}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def state(clock: FakeClock) -> ExporterState:
    return ExporterState(grace_seconds=60, clock=clock)


@pytest.fixture
def registry(state: ExporterState) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(PluginCollector(state))
    return registry


def test_per_plugin_gauges(state: ExporterState, registry: CollectorRegistry) -> None:
    state.update_snapshot(
        snapshot(sample(RESIZER, restarts=1), sample(INDEXER, up=False, process_count=0))
    )
    get = registry.get_sample_value
    assert get("pluginmon_plugin_up", labels(RESIZER)) == 1
    assert get("pluginmon_plugin_up", labels(INDEXER)) == 0
    assert get("pluginmon_plugin_cpu_percent", labels(RESIZER)) == 42.5
    assert get("pluginmon_plugin_memory_rss_bytes", labels(RESIZER)) == 200 * 1024 * 1024
    assert get("pluginmon_plugin_memory_vms_bytes", labels(RESIZER)) == 900 * 1024 * 1024
    assert get("pluginmon_plugin_threads", labels(RESIZER)) == 17
    assert get("pluginmon_plugin_processes", labels(RESIZER)) == 3
    assert get("pluginmon_plugin_restarts_total", labels(RESIZER)) == 1
    assert get("pluginmon_plugin_start_time_seconds", labels(RESIZER)) == (
        datetime(2026, 1, 1, 11, 0, tzinfo=UTC).timestamp()
    )
    # Not collected -> absent, never 0-for-unknown.
    assert get("pluginmon_plugin_memory_uss_bytes", labels(RESIZER)) is None
    assert get("pluginmon_plugin_open_fds", labels(RESIZER)) is None


def test_optional_fields_and_counters(state: ExporterState, registry: CollectorRegistry) -> None:
    state.update_snapshot(
        snapshot(
            sample(
                RESIZER,
                uss_bytes=100,
                swap_bytes=5,
                fds=12,
                read_bytes=4096,
                write_bytes=8192,
                ctx_switches_voluntary=7,
                ctx_switches_involuntary=3,
                restarts=2,
            )
        )
    )
    state.update_snapshot(snapshot(sample(RESIZER, restarts=1)))
    get = registry.get_sample_value
    assert get("pluginmon_plugin_restarts_total", labels(RESIZER)) == 3  # accumulated deltas
    state.update_snapshot(
        snapshot(sample(RESIZER, uss_bytes=100, fds=12, read_bytes=4096, write_bytes=8192))
    )
    assert get("pluginmon_plugin_memory_uss_bytes", labels(RESIZER)) == 100
    assert get("pluginmon_plugin_open_fds", labels(RESIZER)) == 12
    assert get("pluginmon_plugin_io_read_bytes_total", labels(RESIZER)) == 4096
    assert get("pluginmon_plugin_io_write_bytes_total", labels(RESIZER)) == 8192


def test_vanished_plugin_down_during_grace_then_gone(
    state: ExporterState, registry: CollectorRegistry, clock: FakeClock
) -> None:
    state.update_snapshot(snapshot(sample(RESIZER), sample(INDEXER)))
    clock.now += 30
    state.update_snapshot(snapshot(sample(RESIZER)))
    get = registry.get_sample_value
    assert get("pluginmon_plugin_up", labels(INDEXER)) == 0
    assert get("pluginmon_plugin_cpu_percent", labels(INDEXER)) == 0
    assert get("pluginmon_plugin_memory_rss_bytes", labels(INDEXER)) == 0
    clock.now += 31  # 61 s unseen > 60 s grace
    state.update_snapshot(snapshot(sample(RESIZER)))
    assert get("pluginmon_plugin_up", labels(INDEXER)) is None
    assert get("pluginmon_plugin_up", labels(RESIZER)) == 1


def test_a_plugin_removed_from_the_configuration_skips_the_grace_period(
    state: ExporterState, registry: CollectorRegistry, clock: FakeClock
) -> None:
    state.update_snapshot(snapshot(sample(RESIZER), sample(INDEXER)))
    clock.now += 10
    state.update_snapshot(snapshot(sample(RESIZER)))  # INDEXER stopped: down, in its grace
    get = registry.get_sample_value
    assert get("pluginmon_plugin_up", labels(INDEXER)) == 0
    # Removed from the configuration while vanished, and while still sampled.
    state.forget({INDEXER})
    state.update_snapshot(snapshot(sample(RESIZER)))
    assert get("pluginmon_plugin_up", labels(INDEXER)) is None
    state.update_snapshot(snapshot(sample(RESIZER), sample(INDEXER)))
    assert get("pluginmon_plugin_up", labels(INDEXER)) == 1
    state.forget({INDEXER})
    state.update_snapshot(snapshot(sample(RESIZER)))
    assert get("pluginmon_plugin_up", labels(INDEXER)) is None
    assert get("pluginmon_plugin_up", labels(RESIZER)) == 1
    # forget() applies once: a plugin that stops later gets its grace period again.
    state.update_snapshot(snapshot(sample(RESIZER), sample(INDEXER)))
    state.update_snapshot(snapshot(sample(INDEXER)))
    assert get("pluginmon_plugin_up", labels(RESIZER)) == 0


def test_health_and_alerts(state: ExporterState, registry: CollectorRegistry) -> None:
    state.update_snapshot(snapshot(sample(RESIZER), sample(INDEXER)))
    state.update_health(
        {RESIZER: HealthView(score=61.5, components=(("up", 100.0), ("cpu", 23.0)))}
    )
    state.update_alerts([FiringAlert(RESIZER, "PluginCpuHigh", "warning")])
    get = registry.get_sample_value
    assert get("pluginmon_plugin_health_score", labels(RESIZER)) == 61.5
    assert get("pluginmon_plugin_health_score", labels(INDEXER)) is None
    assert get("pluginmon_plugin_health_component_score", labels(RESIZER, component="cpu")) == 23
    assert (
        get(
            "pluginmon_alerts_firing",
            labels(RESIZER, alertname="PluginCpuHigh", severity="warning"),
        )
        == 1
    )
    state.update_alerts([])
    assert (
        get(
            "pluginmon_alerts_firing",
            labels(RESIZER, alertname="PluginCpuHigh", severity="warning"),
        )
        is None
    )


def _samples_of(families: object) -> set[tuple[str, tuple[tuple[str, str], ...], float]]:
    out = set()
    for family in families:  # type: ignore[attr-defined]
        for s in family.samples:
            out.add((s.name, tuple(sorted(s.labels.items())), float(s.value)))
    return out


def _headers(text: str) -> list[str]:
    """The HELP and TYPE lines, in order (each family's pair must be exactly the same)."""
    return [line for line in text.splitlines() if line.startswith(("# HELP ", "# TYPE "))]


def test_fast_text_equals_prometheus_client(
    state: ExporterState, registry: CollectorRegistry
) -> None:
    from prometheus_client import generate_latest

    state.update_snapshot(
        snapshot(
            sample(RESIZER, fds=3, read_bytes=1, write_bytes=2, ctx_switches_voluntary=5),
            sample(INDEXER, cpu_percent=float("nan")),
        )
    )
    state.update_health({RESIZER: HealthView(score=90.0, components=(("memory", 80.0),))})
    state.update_alerts([FiringAlert(INDEXER, "PluginDown", "critical")])
    collector = PluginCollector(state)
    reference = generate_latest(registry).decode()
    fast = collector.render_text()
    ref_samples = _samples_of(parse_text(reference))
    fast_samples = _samples_of(parse_text(fast))
    # NaN != NaN: compare its presence separately.
    assert {s for s in ref_samples if s[2] == s[2]} == {s for s in fast_samples if s[2] == s[2]}
    assert len(ref_samples) == len(fast_samples) > 20
    # The same HELP text and TYPE for the same families, in the same order.
    assert _headers(fast) == _headers(reference)
    # 15 families: all 17 of the contract but uss and swap, not collected here.
    assert len(_headers(fast)) == 2 * 15
    # and as OpenMetrics, which Prometheus asks for first
    om = collector.render_text(openmetrics=True) + "# EOF\n"
    om_samples = _samples_of(parse_openmetrics(om))
    assert {s for s in om_samples if s[2] == s[2]} == {s for s in fast_samples if s[2] == s[2]}
    om_reference = generate_openmetrics(registry).decode()
    assert _headers(om) == _headers(om_reference)


def test_daemon_metrics_and_renderer(state: ExporterState) -> None:
    registry = CollectorRegistry()
    metrics = DaemonMetrics(registry, version="1.2.3")
    snap = snapshot(sample(RESIZER), sample(INDEXER))
    metrics.observe_snapshot(snap)
    metrics.observe_snapshot(snap)
    # The counters other components hold are their own collectors (tests/test_daemon_app.py).
    get = registry.get_sample_value
    assert get("pluginmon_samples_total") == 4
    assert get("pluginmon_sample_duration_seconds_count") == 2
    assert get("pluginmon_processes_seen") == 250
    assert get("pluginmon_process_read_errors_total", {"kind": "no_such_process"}) == 4
    assert get("pluginmon_build_info", {"version": "1.2.3"}) == 1

    state.update_snapshot(snap)
    renderer = MetricsRenderer(registry, PluginCollector(state))
    body, content_type = renderer.render(None)
    assert content_type.startswith("text/plain")
    text_samples = _samples_of(parse_text(body.decode()))
    assert ("pluginmon_samples_total", (), 4.0) in text_samples
    assert ("pluginmon_plugin_cpu_percent", tuple(sorted(labels(RESIZER).items())), 42.5) in (
        text_samples
    )
    chunks, content_type = renderer.render_chunks(
        "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
    )
    assert content_type.startswith("application/openmetrics-text")
    text = b"".join(chunks).decode()
    assert text.endswith("# EOF\n")
    assert text.count("# EOF") == 1
    om_samples = _samples_of(parse_openmetrics(text))
    assert ("pluginmon_plugin_cpu_percent", tuple(sorted(labels(RESIZER).items())), 42.5) in (
        om_samples
    )
    assert ("pluginmon_samples_total", (), 4.0) in om_samples


def test_nan_and_infinities_spelled_as_the_formats_want(state: ExporterState) -> None:
    state.update_snapshot(snapshot(sample(RESIZER, cpu_percent=float("inf"))))
    state.update_health(
        {RESIZER: HealthView(score=float("nan"), components=(("leak", float("-inf")),))}
    )
    text = PluginCollector(state).render_text()
    lines = {
        line.split("{")[0]: line.rsplit(" ", 1)[1] for line in text.splitlines() if "{" in line
    }
    assert lines["pluginmon_plugin_cpu_percent"] == "+Inf"
    assert lines["pluginmon_plugin_health_score"] == "NaN"
    assert lines["pluginmon_plugin_health_component_score"] == "-Inf"
    assert lines["pluginmon_plugin_memory_rss_bytes"] == str(200 * 1024 * 1024)


def test_concurrent_updates_and_scrapes_keep_every_part_of_the_view(
    state: ExporterState,
) -> None:
    """The sampling thread folds snapshots in while the loop publishes health and alerts and
    a render thread scrapes, all at the same time (a barrier starts them together; a tiny
    GIL switch interval makes them interleave within each update). Each writer publishes an
    increasing value, so a scrape must never see one go backwards (an update that rebuilt
    the view from a stale copy of another's part) or vanish once published, and the final
    view holds the last value of each."""
    rounds = 1000
    barrier = threading.Barrier(4)
    writers_done = threading.Event()
    failures: list[BaseException] = []
    texts: list[str] = []
    collector = PluginCollector(state)

    def run(target: Callable[[], None]) -> Callable[[], None]:
        def wrapped() -> None:
            try:
                barrier.wait(timeout=30)
                target()
            except BaseException as exc:  # reported by the main thread
                failures.append(exc)

        return wrapped

    # 300 other plugins make each snapshot fold take a while, and health and alert update i
    # are published once snapshot fold i has begun: they land in the middle of it, where a
    # fold that rebuilt the view from a stale copy would lose them.
    others = [sample(PluginKey("acme", f"other-{j}", "production")) for j in range(300)]
    folds_begun = [0]

    def snapshots() -> None:
        for i in range(1, rounds + 1):
            folds_begun[0] = i
            state.update_snapshot(snapshot(sample(RESIZER, cpu_percent=float(i)), *others))

    def fold_begun(i: int) -> None:
        deadline = time.monotonic() + 30
        while folds_begun[0] < i:
            assert time.monotonic() < deadline, f"snapshot fold {i} never began"
            time.sleep(0)

    def health() -> None:
        for i in range(1, rounds + 1):
            fold_begun(i)
            state.update_health({RESIZER: HealthView(score=100.0 * i / rounds)})

    def alerts() -> None:
        for i in range(1, rounds + 1):
            fold_begun(i)
            state.update_alerts([FiringAlert(RESIZER, f"Alert{i:05d}", "warning")])

    def scrape() -> None:
        # Bounded: the writers end after `rounds` updates each; one last scrape after them.
        # Parsed afterwards, so scrapes come as often as renders can.
        while not writers_done.is_set() and len(texts) < 20_000:
            texts.append(collector.render_text())
        texts.append(collector.render_text())

    writers = [threading.Thread(target=run(f)) for f in (snapshots, health, alerts)]
    scraper = threading.Thread(target=run(scrape))
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        for thread in (*writers, scraper):
            thread.start()
        for thread in writers:
            thread.join(timeout=60)
        writers_done.set()
        scraper.join(timeout=60)
    finally:
        sys.setswitchinterval(interval)
    assert not failures, failures
    assert not any(t.is_alive() for t in (*writers, scraper))
    scrapes = [scraped(text) for text in texts]

    # The scrapes really overlapped the updates: some saw a state in the middle.
    assert any(cpu is not None and 1 < cpu < rounds for cpu, _, _ in scrapes), scrapes[:5]
    for column, name in enumerate(("cpu", "health", "alert")):
        seen = [values[column] for values in scrapes]
        published = [value for value in seen if value is not None]
        first = seen.index(published[0]) if published else len(seen)
        assert None not in seen[first:], f"{name} vanished from the view after it was published"
        assert published == sorted(published), f"{name} went backwards: {published}"
    assert scrapes[-1] == (float(rounds), 100.0, rounds)

    view = state.view()
    assert view.health[RESIZER].score == 100.0
    assert [row.sample.cpu_percent for row in view.plugins if row.key == RESIZER] == [float(rounds)]
    assert len(view.plugins) == 1 + len(others)
    assert [alert.alertname for alert in view.alerts] == [f"Alert{rounds:05d}"]


def scraped(text: str) -> tuple[float | None, float | None, int | None]:
    """(cpu, health score, number in the firing alert's name) of RESIZER in one scrape."""
    cpu = health = None
    alert = None
    mark = 'plugin="image-resizer"'
    for line in text.splitlines():
        if mark not in line:
            continue
        name, value = line.split("{", 1)[0], line.rsplit(" ", 1)[1]
        if name == "pluginmon_plugin_cpu_percent":
            cpu = float(value)
        elif name == "pluginmon_plugin_health_score":
            health = float(value)
        elif name == "pluginmon_alerts_firing" and float(value) == 1:
            alert = int(line.split('alertname="Alert', 1)[1].split('"', 1)[0])
    return cpu, health, alert


def generate_openmetrics(registry: CollectorRegistry) -> bytes:
    """prometheus-client's OpenMetrics exposition (its function is not typed)."""
    return bytes(openmetrics_exposition.generate_latest(registry))  # type: ignore[no-untyped-call]
