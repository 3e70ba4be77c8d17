"""Plugins' own metrics, the pure parts: parsing under limits, label injection, the push shape, kinds read as values, pushed-series expiry, endpoint labels and the config schema."""

from __future__ import annotations

import json
import math
from datetime import timedelta

import pytest

from pluginmon.alerts.metric_values import (
    describe,
    histogram_quantile,
    metric_ref_problem,
    parse_metric_ref,
    value_of,
    values_by_plugin,
)
from pluginmon.collectors.exposition import (
    OPENMETRICS_TYPE,
    ExpositionLimits,
    Parsed,
    Rejected,
    RejectReason,
    parse_exposition,
    parse_json_push,
)
from pluginmon.collectors.labels import parse_metrics_url
from pluginmon.collectors.models import MetricKind, MetricPoint, PluginKey
from pluginmon.collectors.push import PushConfig, PushStore, parse_push
from pluginmon.daemon.config_schema import ConfigError
from pluginmon.daemon.config_sections import parse_rules
from pluginmon.daemon.settings import Settings
from pluginmon.storage.plugin_metrics import SeriesWindow
from tests.alerts_helpers import T0

TEXT = "text/plain; version=0.0.4; charset=utf-8"
KEY = PluginKey("acme", "resizer", "production")


def parsed(body: str, limits: ExpositionLimits | None = None, content_type: str = TEXT) -> Parsed:
    result = parse_exposition(
        body.encode(), content_type=content_type, limits=limits or ExpositionLimits()
    )
    assert isinstance(result, Parsed), result
    return result


def rejected(body: str | bytes, limits: ExpositionLimits | None = None) -> Rejected:
    raw = body.encode() if isinstance(body, str) else body
    result = parse_exposition(raw, content_type=TEXT, limits=limits or ExpositionLimits())
    assert isinstance(result, Rejected), result
    return result


def by_series(result: Parsed) -> dict[tuple[str, str], MetricPoint]:
    return {(p.name, p.labels_json): p for p in result.points}


KINDS_TEXT = """\
# HELP jobs_total Jobs done
# TYPE jobs_total counter
jobs_total{queue="a"} 5
# HELP jobs_created Creation time
# TYPE jobs_created gauge
jobs_created{queue="a"} 1.7e9
# TYPE latency histogram
latency_bucket{le="0.5"} 3
latency_bucket{le="+Inf"} 4
latency_sum 1.5
latency_count 4
# TYPE rpc summary
rpc{quantile="0.9"} 0.2
rpc_sum 3
rpc_count 7
# TYPE depth gauge
depth 12
untyped_thing 2.5
"""


def test_each_kind_is_kept_with_its_kind_and_created_series_are_dropped() -> None:
    points = by_series(parsed(KINDS_TEXT))
    kinds = {(name, labels): p.kind for (name, labels), p in points.items()}
    assert kinds == {
        ("jobs_total", '{"queue":"a"}'): MetricKind.COUNTER,
        ("latency_bucket", '{"le":"0.5"}'): MetricKind.HISTOGRAM,
        ("latency_bucket", '{"le":"+Inf"}'): MetricKind.HISTOGRAM,
        ("latency_sum", "{}"): MetricKind.HISTOGRAM,
        ("latency_count", "{}"): MetricKind.HISTOGRAM,
        ("rpc", '{"quantile":"0.9"}'): MetricKind.SUMMARY,
        ("rpc_sum", "{}"): MetricKind.SUMMARY,
        ("rpc_count", "{}"): MetricKind.SUMMARY,
        ("depth", "{}"): MetricKind.GAUGE,
        ("untyped_thing", "{}"): MetricKind.GAUGE,
    }
    assert points[("jobs_total", '{"queue":"a"}')].value == 5.0
    assert points[("latency_sum", "{}")].value == 1.5


def test_openmetrics_is_parsed_with_its_own_parser() -> None:
    body = '# TYPE jobs counter\njobs_total{q="a"} 5\njobs_created{q="a"} 1.7e9\n# EOF\n'
    result = parsed(body, content_type=f"{OPENMETRICS_TYPE}; version=1.0.0; charset=utf-8")
    assert [(p.name, p.kind, p.value) for p in result.points] == [
        ("jobs_total", MetricKind.COUNTER, 5.0)
    ]
    # The OpenMetrics parser insists on "# EOF": the text parser would not.
    missing_eof = parse_exposition(
        b"# TYPE jobs counter\njobs_total 5\n",
        content_type=OPENMETRICS_TYPE,
        limits=ExpositionLimits(),
    )
    assert isinstance(missing_eof, Rejected)
    assert missing_eof.reason is RejectReason.PARSE_ERROR


def test_scraped_identity_labels_are_renamed_never_used() -> None:
    body = (
        'evil_total{tenant="other",plugin="victim",environment="staging",exported_tenant="x"} 1\n'
        "health_score 0\n"
    )
    points = parsed(body).points
    assert [(p.name, p.labels()) for p in points] == [
        (
            "evil_total",
            {
                "exported_exported_tenant": "other",  # exported_tenant was taken: prefixed again
                "exported_tenant": "x",
                "exported_plugin": "victim",
                "exported_environment": "staging",
            },
        ),
        # pluginmon's own plugin_metrics series keeps its name for pluginmon.
        ("exported_health_score", {}),
    ]
    assert not any({"tenant", "plugin", "environment"} & p.labels().keys() for p in points)


def test_label_values_that_jsonb_or_the_limits_refuse_fail_the_whole_scrape() -> None:
    limits = ExpositionLimits(max_labels_per_series=3, max_label_value_chars=10)
    many = rejected('x{a="1",b="2",c="3",d="4"} 1\n', limits)
    assert many.reason is RejectReason.LABEL_LIMIT
    assert "4 labels" in many.detail
    long = rejected('x{a="' + "v" * 11 + '"} 1\n', limits)
    assert long.reason is RejectReason.LABEL_LIMIT
    assert "longer than 10" in long.detail
    nul = rejected('x{a="bad\x00value"} 1\n')
    assert nul.reason is RejectReason.LABEL_LIMIT
    # A value with an escaped newline is a value like any other: kept, JSON-escaped.
    (point,) = parsed('x{a="line1\\nline2"} 1\n').points
    assert point.labels() == {"a": "line1\nline2"}
    assert "\n" not in point.labels_json


def test_names_outside_the_classic_rules_and_garbage_are_parse_errors() -> None:
    utf8 = rejected('{"weird.name", a="b"} 3\n')
    assert utf8.reason is RejectReason.PARSE_ERROR
    assert "weird.name" in utf8.detail
    assert rejected("this is { not metrics\n").reason is RejectReason.PARSE_ERROR
    not_utf8 = rejected(b'x{a="\xff"} 1\n')
    assert not_utf8.reason is RejectReason.PARSE_ERROR
    assert "UTF-8" in not_utf8.detail
    long_name = rejected("n" * 300 + " 1\n")
    assert long_name.reason is RejectReason.PARSE_ERROR
    assert len(long_name.detail) < 400  # the detail is cut, not the whole name


def test_the_allow_list_picks_series_and_the_cap_refuses_the_whole_scrape() -> None:
    body = "".join(f'app_requests_total{{i="{i}"}} {i}\n' for i in range(5)) + "go_goroutines 9\n"
    only_go = parsed(body, ExpositionLimits(allow=("go_*",)))
    assert [p.name for p in only_go.points] == ["go_goroutines"]
    assert only_go.series_dropped == 5
    # The family name selects a histogram's series too.
    hist = parsed(KINDS_TEXT, ExpositionLimits(allow=("latency",)))
    assert {p.name for p in hist.points} == {"latency_bucket", "latency_sum", "latency_count"}
    # Six allowed series over a cap of five: nothing is kept (never half a plugin).
    capped = rejected(body, ExpositionLimits(max_series=5))
    assert capped.reason is RejectReason.TOO_MANY_SERIES
    # Under the allow-list the same body fits.
    assert len(parsed(body, ExpositionLimits(max_series=5, allow=("app_*",))).points) == 5


def test_a_repeated_series_counts_once() -> None:
    result = parsed('x{a="1"} 1\nx{a="1"} 2\n')
    assert [p.value for p in result.points] == [1.0]


# -- the JSON push shape -------------------------------------------------------------------------


def test_the_json_shape_gives_the_same_kinds_as_a_scrape() -> None:
    body = {
        "metrics": [
            {"name": "jobs_total", "kind": "counter", "value": 3, "labels": {"queue": "a"}},
            {"name": "last_success", "kind": "gauge", "value": 1.7e9},
            {
                "name": "job_seconds",
                "kind": "histogram",
                "buckets": {"0.5": 1, "2": 3},
                "sum": 2.5,
                "count": 4,
            },
            {"name": "step", "kind": "summary", "quantiles": {"0.9": 0.7}, "sum": 3, "count": 5},
            {"name": "x", "kind": "gauge", "value": 1, "labels": {"tenant": "other"}},
        ]
    }
    result = parse_json_push(json.dumps(body).encode(), limits=ExpositionLimits())
    assert isinstance(result, Parsed)
    got = {(p.name, p.labels_json): (p.kind.value, p.value) for p in result.points}
    assert got == {
        ("jobs_total", '{"queue":"a"}'): ("counter", 3.0),
        ("last_success", "{}"): ("gauge", 1.7e9),
        ("job_seconds_bucket", '{"le":"0.5"}'): ("histogram", 1.0),
        ("job_seconds_bucket", '{"le":"2.0"}'): ("histogram", 3.0),
        ("job_seconds_bucket", '{"le":"+Inf"}'): ("histogram", 4.0),  # added from count
        ("job_seconds_sum", "{}"): ("histogram", 2.5),
        ("job_seconds_count", "{}"): ("histogram", 4.0),
        ("step", '{"quantile":"0.9"}'): ("summary", 0.7),
        ("step_sum", "{}"): ("summary", 3.0),
        ("step_count", "{}"): ("summary", 5.0),
        ("x", '{"exported_tenant":"other"}'): ("gauge", 1.0),
    }


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"metrics": [{"name": "x", "kind": "meter", "value": 1}]}, "metrics[0].kind"),
        ({"metrics": [{"name": "x", "kind": "gauge", "value": "1"}]}, "metrics[0].value"),
        ({"metrics": [{"name": "x", "kind": "gauge", "value": True}]}, "metrics[0].value"),
        ({"metrics": [{"name": "x", "kind": "gauge", "value": 1, "extra": 1}]}, "metrics[0].extra"),
        ({"metrics": [{"kind": "gauge", "value": 1}]}, "metrics[0].name"),
        (
            {"metrics": [{"name": "h", "kind": "histogram", "sum": 1, "count": 1}]},
            "metrics[0].buckets",
        ),
        ({"metrics": {}}, "metrics"),
        ({"series": []}, "body"),
    ],
)
def test_a_bad_json_push_names_its_field(body: object, field: str) -> None:
    result = parse_json_push(json.dumps(body).encode(), limits=ExpositionLimits())
    assert isinstance(result, Rejected)
    assert result.reason is RejectReason.PARSE_ERROR
    assert result.detail.startswith(f"{field}:"), result.detail


def test_a_push_body_over_the_limit_is_refused_before_parsing() -> None:
    limits = ExpositionLimits(max_body_bytes=1024)
    result = parse_push(b"x 1\n" * 300, content_type=TEXT, limits=limits)
    assert isinstance(result, Rejected)
    assert result.reason is RejectReason.TOO_LARGE
    ok = parse_push(b'{"metrics": []}', content_type="application/json", limits=limits)
    assert isinstance(ok, Parsed)
    assert ok.points == ()


# -- pushed series expire ----------------------------------------------------------------------


def test_pushed_series_are_reemitted_until_they_expire() -> None:
    store = PushStore(PushConfig(default_ttl_seconds=60, max_ttl_seconds=120))
    first = parsed("jobs_total 3\nlast_run 100\n")
    accepted = store.accept(KEY, first, now=T0)
    assert not isinstance(accepted, Rejected)
    assert accepted.expires_at == T0 + timedelta(seconds=60)
    assert [p.name for p in accepted.metrics.points] == ["jobs_total", "last_run"]
    # 30 s later one series is pushed again (with a longer TTL, capped at the maximum).
    again = store.accept(
        KEY, parsed("jobs_total 5\n"), now=T0 + timedelta(seconds=30), ttl_seconds=600
    )
    assert not isinstance(again, Rejected)
    assert again.expires_at == T0 + timedelta(seconds=150)
    live = store.live(now=T0 + timedelta(seconds=45))
    assert [(m.timestamp, [(p.name, p.value) for p in m.points]) for m in live] == [
        (T0 + timedelta(seconds=45), [("jobs_total", 5.0), ("last_run", 100.0)])
    ]
    # last_run expires 60 s after its only push; jobs_total lives on.
    live = store.live(now=T0 + timedelta(seconds=60))
    assert [[p.name for p in m.points] for m in live] == [["jobs_total"]]
    assert store.expired_series == 1
    assert store.live(now=T0 + timedelta(seconds=150)) == []
    assert store.expired_series == 2
    assert store.live_series(now=T0 + timedelta(seconds=150)) == 0
    with pytest.raises(ValueError, match="ttl_seconds"):
        store.accept(KEY, first, now=T0, ttl_seconds=math.nan)


def test_live_pushed_series_are_capped_per_plugin() -> None:
    store = PushStore(PushConfig(limits=ExpositionLimits(max_series=3)))
    assert not isinstance(store.accept(KEY, parsed("a 1\nb 1\n"), now=T0), Rejected)
    refused = store.accept(KEY, parsed("c 1\nd 1\n"), now=T0)
    assert isinstance(refused, Rejected)
    assert refused.reason is RejectReason.TOO_MANY_SERIES
    # Replacing live series does not add any.
    assert not isinstance(store.accept(KEY, parsed("a 2\nb 2\nc 1\n"), now=T0), Rejected)
    assert store.series(KEY, now=T0) == 3


# -- values by kind ----------------------------------------------------------------------------


def window(
    name: str,
    kind: str,
    *,
    labels: dict[str, str] | None = None,
    last: float = 0.0,
    increase: float = 0.0,
    seconds: float = 60.0,
    points: int = 7,
    at_offset: float = 0.0,
    plugin_id: int = 1,
) -> SeriesWindow:
    return SeriesWindow(
        plugin_id=plugin_id,
        environment="production",
        name=name,
        kind=kind,
        labels=labels or {},
        last_value=last,
        last_at=T0 + timedelta(seconds=at_offset),
        rate_points=points,
        increase=increase,
        rate_seconds=seconds,
    )


def test_histogram_quantile_interpolates_like_prometheus() -> None:
    buckets = [(0.1, 10.0), (0.5, 60.0), (1.0, 100.0), (math.inf, 100.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1 + 0.4 * 40 / 50)
    assert histogram_quantile(0.05, buckets) == pytest.approx(0.05)  # first bucket starts at 0
    assert histogram_quantile(0.99, [(0.1, 10.0), (math.inf, 100.0)]) == 0.1  # in +Inf
    assert histogram_quantile(0.5, [(0.1, 0.0), (math.inf, 0.0)]) is None  # no observations
    assert histogram_quantile(0.5, [(0.1, 5.0), (1.0, 9.0)]) is None  # no +Inf bucket
    # Counts read at slightly different moments that dip are made monotonic first.
    dipped = [(0.1, 10.0), (0.5, 9.0), (1.0, 20.0), (math.inf, 20.0)]
    assert histogram_quantile(0.75, dipped) == pytest.approx(0.5 + 0.5 * 5 / 10)


def test_counters_are_rates_gauges_values_histograms_quantiles() -> None:
    series = [
        window("requests_total", "counter", labels={"m": "GET"}, increase=600, seconds=60),
        window("requests_total", "counter", labels={"m": "POST"}, increase=60, seconds=60),
        window("depth", "gauge", labels={"q": "a"}, last=4),
        window("depth", "gauge", labels={"q": "b"}, last=6),
        window("depth", "gauge", labels={"q": "gone"}, last=100, at_offset=-30),
        *[
            window("lat_bucket", "histogram", labels={"le": le}, increase=n)
            for le, n in (("0.1", 50), ("0.5", 90), ("1", 100), ("+Inf", 100))
        ],
        window("lat_count", "histogram", increase=100, seconds=50),
        window("rpc", "summary", labels={"quantile": "0.95"}, last=0.7),
        window("rpc", "summary", labels={"quantile": "0.5"}, last=0.2),
    ]
    assert value_of(parse_metric_ref("requests_total"), series) == pytest.approx(11.0)
    # The series missing from the newest scrape no longer counts.
    assert value_of(parse_metric_ref("depth"), series) == 10.0
    assert value_of(parse_metric_ref("lat:p95"), series) == pytest.approx(0.5 + 0.5 * 5 / 10)
    assert value_of(parse_metric_ref("lat_count"), series) == pytest.approx(2.0)
    assert value_of(parse_metric_ref("rpc:p95"), series) == 0.7
    assert value_of(parse_metric_ref("rpc:p99"), series) is None
    assert value_of(parse_metric_ref("absent"), series) is None
    # A counter with one point in its window has no rate yet.
    assert value_of(parse_metric_ref("c"), [window("c", "counter", increase=0, points=1)]) is None
    shown = describe(series)
    assert shown["requests_total/s"] == pytest.approx(11.0)
    assert shown["depth"] == 10.0
    assert shown["lat:p95"] == pytest.approx(0.75)
    assert shown["lat_count/s"] == pytest.approx(2.0)
    assert shown["rpc:p95"] == 0.7
    assert "lat_bucket/s" not in shown


def test_values_are_kept_apart_per_plugin_and_environment() -> None:
    series = [
        window("depth", "gauge", last=1, plugin_id=1),
        window("depth", "gauge", last=2, plugin_id=2),
    ]
    assert values_by_plugin([parse_metric_ref("depth")], series) == {
        (1, "production", "depth"): 1.0,
        (2, "production", "depth"): 2.0,
    }


def test_metric_references() -> None:
    assert parse_metric_ref("lat:p95").quantile == 0.95
    assert parse_metric_ref("lat:p99.9").quantile == pytest.approx(0.999)
    assert parse_metric_ref("lat:p95").stored_names == ("lat_bucket", "lat")
    assert parse_metric_ref("job:rate5m").quantile is None  # a recording-rule style name
    assert metric_ref_problem("lat:p150") is not None
    assert metric_ref_problem("lat:p0") is not None
    with pytest.raises(ConfigError) as info:
        parse_rules(
            [{"name": "Slow", "metric": "lat:p100", "op": ">", "threshold": 1}],
            include_builtins=False,
        )
    assert info.value.problems == (
        "alerts.rules[0] (Slow).metric: quantile :p100 must be between p0 and p100 (exclusive)",
    )
    (rule,) = parse_rules(
        [{"name": "Slow", "metric": "lat:p95", "op": ">", "threshold": 1}], include_builtins=False
    )
    assert rule.metric == "lat:p95"


# -- endpoint labels and the config ------------------------------------------------------------


def test_the_endpoint_labels_are_checked_at_the_edge() -> None:
    assert parse_metrics_url({"PLUGINMON_METRICS_PORT": "9100"}) == "http://127.0.0.1:9100/metrics"
    assert (
        parse_metrics_url({"PLUGINMON_METRICS_PORT": "9100", "PLUGINMON_METRICS_PATH": "/x/prom"})
        == "http://127.0.0.1:9100/x/prom"
    )
    assert parse_metrics_url({}) is None
    for env, variable, reason in [
        ({"PLUGINMON_METRICS_PORT": "70000"}, "PLUGINMON_METRICS_PORT", "bad_characters"),
        ({"PLUGINMON_METRICS_PORT": "0"}, "PLUGINMON_METRICS_PORT", "bad_characters"),
        ({"PLUGINMON_METRICS_PORT": "80@evil.example"}, "PLUGINMON_METRICS_PORT", "too_long"),
        ({"PLUGINMON_METRICS_PORT": ""}, "PLUGINMON_METRICS_PORT", "empty"),
        ({"PLUGINMON_METRICS_PORT": "91\n"}, "PLUGINMON_METRICS_PORT", "bad_characters"),
        (
            {"PLUGINMON_METRICS_PORT": "9100", "PLUGINMON_METRICS_PATH": "@evil.example/m"},
            "PLUGINMON_METRICS_PATH",
            "bad_characters",
        ),
        (
            {"PLUGINMON_METRICS_PORT": "9100", "PLUGINMON_METRICS_PATH": "/../admin"},
            "PLUGINMON_METRICS_PATH",
            "bad_characters",
        ),
        (
            {"PLUGINMON_METRICS_PORT": "9100", "PLUGINMON_METRICS_PATH": "/m?x=1"},
            "PLUGINMON_METRICS_PATH",
            "bad_characters",
        ),
        (
            {"PLUGINMON_METRICS_PORT": "9100", "PLUGINMON_METRICS_PATH": "/" + "a" * 300},
            "PLUGINMON_METRICS_PATH",
            "too_long",
        ),
    ]:
        refusal = parse_metrics_url(env)
        assert refusal is not None, env
        assert not isinstance(refusal, str), env
        assert (refusal.variable, refusal.reason) == (variable, reason), env
        assert "\n" not in refusal.describe()


def plugin_table(**extra: object) -> dict[str, object]:
    return {"tenant": "acme", "name": "resizer", "match": {"name": "resizer"}, **extra}


def problems(values: dict[str, object]) -> dict[str, str]:
    """Every problem of ``values`` as settings, by field."""
    from pydantic import ValidationError

    from pluginmon.daemon.config_schema import format_errors

    with pytest.raises(ValidationError) as info:
        Settings.model_validate(values)
    return dict(format_errors(info.value))


def test_a_metrics_url_is_loopback_unless_allowed() -> None:
    at = "plugins[0] (acme/resizer)"
    assert problems({"plugins": [plugin_table(metrics_url="http://10.0.0.5:9100/metrics")]}) == {
        f"{at}.metrics_url": "must be on loopback (localhost, 127.0.0.1, ::1); set "
        "metrics_allow_remote = true to scrape another host"
    }
    assert problems({"plugins": [plugin_table(metrics_url="ftp://127.0.0.1/metrics")]}) == {
        f"{at}.metrics_url": "must be an http:// or https:// URL"
    }
    assert problems({"plugins": [plugin_table(metrics_max_series=10)]}) == {
        f"{at}.metrics_max_series": "needs metrics_url"
    }
    remote = Settings.model_validate(
        {
            "plugins": [
                plugin_table(metrics_url="http://10.0.0.5:9100/metrics", metrics_allow_remote=True)
            ]
        }
    )
    assert remote.plugins[0].metrics_url == "http://10.0.0.5:9100/metrics"
    for host in ("localhost", "127.0.0.1", "127.3.4.5", "[::1]"):
        Settings.model_validate({"plugins": [plugin_table(metrics_url=f"http://{host}:9100/m")]})


def test_scrape_targets_take_the_defaults_and_the_timeout_never_passes_the_interval() -> None:
    settings = Settings.model_validate(
        {
            "sample_interval_seconds": 15,
            "plugin_metrics": {"timeout_seconds": 30, "max_series": 500, "allow": ["app_*"]},
            "plugins": [
                plugin_table(metrics_url="http://127.0.0.1:9100/metrics"),
                plugin_table(
                    name="thumbnailer",
                    metrics_url="http://127.0.0.1:9101/metrics",
                    metrics_interval_seconds=5,
                    metrics_max_series=50,
                    metrics_allow=["thumb_*"],
                ),
                plugin_table(name="quiet"),
            ],
        }
    )
    scrape = settings.plugin_metrics.to_scrape(settings.plugins, sample_interval_seconds=15)
    first, second = scrape.targets
    assert (first.interval_seconds, first.timeout_seconds) == (15, 15)
    assert (first.limits.max_series, first.limits.allow) == (500, ("app_*",))
    assert (second.interval_seconds, second.timeout_seconds) == (5, 5)
    assert (second.limits.max_series, second.limits.allow) == (50, ("thumb_*",))
    discovered = scrape.discovered_target(KEY, "http://127.0.0.1:9200/metrics")
    assert (discovered.interval_seconds, discovered.limits.max_series) == (15, 500)
    off = Settings.model_validate(
        {
            "plugin_metrics": {"enabled": False},
            "plugins": [plugin_table(metrics_url="http://127.0.0.1:1/m")],
        }
    )
    disabled = off.plugin_metrics.to_scrape(off.plugins, sample_interval_seconds=10)
    assert disabled.targets == ()
    assert list(disabled.all_targets([(KEY, "http://127.0.0.1:2/m")])) == []


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"plugin_metrics": {"max_series": 10**9}}, "plugin_metrics.max_series"),
        ({"plugin_metrics": {"max_body_bytes": 2**62}}, "plugin_metrics.max_body_bytes"),
        ({"plugin_metrics": {"timeout_seconds": 1e308}}, "plugin_metrics.timeout_seconds"),
        ({"plugin_metrics": {"push_ttl_seconds": 1e308}}, "plugin_metrics.push_ttl_seconds"),
        (
            {"plugin_metrics": {"max_concurrent_scrapes": 10**7}},
            "plugin_metrics.max_concurrent_scrapes",
        ),
        ({"plugin_metrics": {"allow": []}}, "plugin_metrics.allow"),
        ({"plugin_metrics": {"push_ttl_seconds": 90000}}, "plugin_metrics.push_ttl_seconds"),
        (
            {
                "plugins": [
                    plugin_table(metrics_url="http://127.0.0.1:1/m", metrics_max_series=10**9)
                ]
            },
            "plugins[0] (acme/resizer).metrics_max_series",
        ),
        (
            {
                "plugins": [
                    plugin_table(metrics_url="http://127.0.0.1:1/m", metrics_interval_seconds=1e308)
                ]
            },
            "plugins[0] (acme/resizer).metrics_interval_seconds",
        ),
    ],
)
def test_plugin_metrics_numbers_have_bounds(values: dict[str, object], field: str) -> None:
    located = problems(values)
    assert field in located, located
    assert "must" in located[field]
