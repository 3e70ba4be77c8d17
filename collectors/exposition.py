"""A plugin's own metrics as it exposes or pushes them: Prometheus text, OpenMetrics or a small JSON shape, parsed under limits into MetricPoints (pure; CPU-bound, so callers run it in a thread).

What a plugin sends is untrusted input, like its environment labels (collectors.labels): it
becomes plugin_metrics rows, alert values and Grafana panels. So, before anything else reads it:

* the body was already cut at a byte limit by whoever read it (collectors.scrape, the push
  handler); here it is parsed with prometheus-client's own parsers
  (``prometheus_client.parser`` for the text format, ``prometheus_client.openmetrics.parser``
  for OpenMetrics), and anything they refuse, or bytes that are not UTF-8, is a
  ``parse_error`` for the whole body;
* metric names must be classic Prometheus names (``[a-zA-Z_:][a-zA-Z0-9_:]*``, at most
  ``max_name_chars``), or the whole body is a ``parse_error``;
* label names must be classic label names, values at most ``max_label_value_chars``
  characters without NUL (jsonb cannot hold it), at most ``max_labels_per_series`` labels a
  series; anything else refuses the whole body as ``label_limit``, as Prometheus's
  ``label_limit`` fails a scrape;
* the allow-list (shell globs over the series or the family name; default all) picks the
  series kept; more than ``max_series`` kept refuses the whole body as ``too_many_series``
  (Prometheus's ``sample_limit``), so a plugin never gets half its series stored;
* the labels that pluginmon sets itself (``tenant``, ``plugin``, ``environment``) are never
  taken from the body: a scraped ``tenant`` label is kept as ``exported_tenant``, the rule of
  Prometheus's ``honor_labels: false``; a series named ``health_score`` (pluginmon's own
  series in plugin_metrics) is kept as ``exported_health_score``.

Timestamps in the body are ignored: every point is stamped with the time of its scrape or
push. ``_created`` series (a counter's creation time) are dropped: they are not measurements.
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families as text_families

from pluginmon.collectors.labels import escaped_preview
from pluginmon.collectors.models import MetricKind, MetricPoint

# The labels of every per-plugin series pluginmon exports (DESIGN.md): set from the plugin's
# identity, never from what the plugin sends.
TARGET_LABELS: Final = frozenset({"tenant", "plugin", "environment"})
# plugin_metrics names pluginmon writes itself.
RESERVED_NAMES: Final = frozenset({"health_score"})
EXPORTED_PREFIX: Final = "exported_"

OPENMETRICS_TYPE: Final = "application/openmetrics-text"
JSON_TYPE: Final = "application/json"

_NAME_RE: Final = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME_RE: Final = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
# How much of a parser's complaint a rejection carries (it may quote the body).
_DETAIL_MAX_CHARS: Final = 160


class RejectReason(StrEnum):
    """The ``reason`` label of pluginmon_plugin_scrape_rejected_total."""

    TOO_LARGE = "too_large"  # the body passed max_body_bytes
    TOO_MANY_SERIES = "too_many_series"  # more than max_series after the allow-list
    PARSE_ERROR = "parse_error"  # not valid text format / OpenMetrics / JSON, or a bad name
    LABEL_LIMIT = "label_limit"  # a label name, value or count past its limit
    TIMEOUT = "timeout"  # no complete answer within the scrape timeout
    CONNECTION = "connection"  # refused, reset, unreachable
    HTTP_STATUS = "http_status"  # an answer other than 200


@dataclass(frozen=True, slots=True)
class ExpositionLimits:
    """What one scrape or push may hold; the defaults fit a plugin with a few dozen families."""

    max_body_bytes: int = 4 * 1024 * 1024
    max_series: int = 2000
    max_labels_per_series: int = 30
    max_name_chars: int = 200
    max_label_value_chars: int = 1024
    allow: tuple[str, ...] = ("*",)  # shell globs over series or family names


@dataclass(frozen=True, slots=True)
class Rejected:
    """Why a body was refused; ``detail`` is safe to log (escaped, short)."""

    reason: RejectReason
    detail: str


@dataclass(frozen=True, slots=True)
class Parsed:
    points: tuple[MetricPoint, ...]
    series_dropped: int  # left out by the allow-list


class _Refused(Exception):
    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(detail)
        self.rejected = Rejected(reason, detail)


def _short(text: str) -> str:
    return escaped_preview(text, max_chars=_DETAIL_MAX_CHARS)


def parse_exposition(
    body: bytes, *, content_type: str, limits: ExpositionLimits
) -> Parsed | Rejected:
    """The series of a /metrics body: OpenMetrics when ``content_type`` says so, else the
    Prometheus text format."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Rejected(RejectReason.PARSE_ERROR, f"not UTF-8 (byte offset {exc.start})")
    openmetrics = content_type.split(";", 1)[0].strip().lower() == OPENMETRICS_TYPE
    try:
        # The parsers are generators: list() makes them report every error here.
        families = list((openmetrics_families if openmetrics else text_families)(text))
    except (ValueError, IndexError, KeyError, TypeError) as exc:
        return Rejected(RejectReason.PARSE_ERROR, _short(f"{type(exc).__name__}: {exc}"))
    try:
        return _select(_family_points(families), limits)
    except _Refused as refused:
        return refused.rejected


def _family_points(
    families: list[Metric],
) -> Iterator[tuple[str, str, MetricKind, Mapping[str, str], float]]:
    """(family name, series name, kind, labels, value) of every measurement."""
    # In the text format a counter's creation time is a separate family, X_created.
    cumulative = {f.name for f in families if f.type in ("counter", "histogram", "summary")}
    for family in families:
        kind = _KINDS.get(family.type, MetricKind.GAUGE)
        if (
            family.type in ("unknown", "gauge")
            and family.name.endswith("_created")
            and family.name.removesuffix("_created") in cumulative
        ):
            continue
        for sample in family.samples:
            name = sample.name
            if kind is not MetricKind.GAUGE and name.endswith("_created"):
                continue
            yield family.name, name, kind, sample.labels, float(sample.value)


_KINDS: Final = {
    "counter": MetricKind.COUNTER,
    "histogram": MetricKind.HISTOGRAM,
    "summary": MetricKind.SUMMARY,
    # A gauge histogram's buckets go up and down: gauges, as its _gsum and _gcount.
    "gaugehistogram": MetricKind.GAUGE,
}


def _select(
    points: Iterable[tuple[str, str, MetricKind, Mapping[str, str], float]],
    limits: ExpositionLimits,
) -> Parsed:
    """The allowed points, checked and relabelled; raises _Refused for the whole body."""
    allow = limits.allow
    allow_all = "*" in allow
    kept: list[MetricPoint] = []
    seen: set[tuple[str, str]] = set()
    # Names repeat across a body's series: each is checked once (the hot loop of a scrape).
    names_ok: set[str] = set()
    label_names_ok: set[str] = set()
    dropped = 0
    for family, name, kind, labels, value in points:
        if not allow_all and not any(
            fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(family, pattern)
            for pattern in allow
        ):
            dropped += 1
            continue
        if name not in names_ok:
            _check_name(name, limits)
            names_ok.add(name)
        labels_json = _labels_json(labels, limits, label_names_ok) if labels else "{}"
        if name in RESERVED_NAMES:
            name = EXPORTED_PREFIX + name
        identity = (name, labels_json)
        if identity in seen:
            continue  # a repeated series: the first one counts
        seen.add(identity)
        if len(kept) >= limits.max_series:
            raise _Refused(
                RejectReason.TOO_MANY_SERIES,
                f"more than {limits.max_series} series (max_series) after the allow-list",
            )
        kept.append(MetricPoint(name, kind, labels_json, value))
    return Parsed(points=tuple(kept), series_dropped=dropped)


def _check_name(name: str, limits: ExpositionLimits) -> None:
    if len(name) > limits.max_name_chars:
        raise _Refused(
            RejectReason.PARSE_ERROR,
            f"metric name longer than {limits.max_name_chars} characters: {_short(name)}",
        )
    if _NAME_RE.fullmatch(name) is None:
        raise _Refused(RejectReason.PARSE_ERROR, f"not a Prometheus metric name: {_short(name)}")


def _labels_json(labels: Mapping[str, str], limits: ExpositionLimits, names_ok: set[str]) -> str:
    """The labels as canonical JSON, checked, with pluginmon's own names renamed; ``names_ok``
    holds the label names already checked in this body."""
    if len(labels) > limits.max_labels_per_series:
        raise _Refused(
            RejectReason.LABEL_LIMIT,
            f"a series has {len(labels)} labels (max_labels_per_series {limits.max_labels_per_series})",
        )
    max_value = limits.max_label_value_chars
    for label, value in labels.items():
        if label not in names_ok:
            if len(label) > limits.max_name_chars or _LABEL_NAME_RE.fullmatch(label) is None:
                raise _Refused(RejectReason.LABEL_LIMIT, f"not a label name: {_short(label)}")
            names_ok.add(label)
        if not isinstance(value, str):
            raise _Refused(RejectReason.LABEL_LIMIT, f"label {label}: value is not a string")
        if len(value) > max_value:
            raise _Refused(
                RejectReason.LABEL_LIMIT,
                f"label {label}: value longer than {max_value} characters",
            )
        if "\x00" in value:
            raise _Refused(RejectReason.LABEL_LIMIT, f"label {label}: value holds a NUL character")
    clashes = TARGET_LABELS.intersection(labels)
    if not clashes:
        return json.dumps(labels, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    out = dict(labels)
    for label in clashes:
        # honor_labels=false: the plugin's value is kept under another name, never used as
        # pluginmon's own label. Prefixed again while that name is taken too.
        renamed = EXPORTED_PREFIX + label
        while renamed in out:
            renamed = EXPORTED_PREFIX + renamed
        out[renamed] = out.pop(label)
    return json.dumps(out, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


# -- the JSON push shape ---------------------------------------------------------------------

# {"metrics": [{"name": ..., "kind": "gauge"|"counter", "value": 1, "labels": {...}},
#              {"name": ..., "kind": "histogram", "buckets": {"0.1": 3, "+Inf": 5}, "sum": 1.2, "count": 5},
#              {"name": ..., "kind": "summary", "quantiles": {"0.5": 0.2}, "sum": 1.2, "count": 5}]}
_JSON_FIELDS: Final = {
    MetricKind.GAUGE: frozenset({"name", "kind", "labels", "value"}),
    MetricKind.COUNTER: frozenset({"name", "kind", "labels", "value"}),
    MetricKind.HISTOGRAM: frozenset({"name", "kind", "labels", "buckets", "sum", "count"}),
    MetricKind.SUMMARY: frozenset({"name", "kind", "labels", "quantiles", "sum", "count"}),
}


def parse_json_push(body: bytes, *, limits: ExpositionLimits) -> Parsed | Rejected:
    """The small JSON shape of a push (see docs/plugin-metrics.md); a problem names its
    field, e.g. ``metrics[2].buckets: must be an object of upper bound -> count``."""
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        return Rejected(RejectReason.PARSE_ERROR, _short(f"not JSON: {exc}"))
    try:
        return _select(_json_points(document), limits)
    except _Refused as refused:
        return refused.rejected


def _json_error(where: str, message: str) -> _Refused:
    return _Refused(RejectReason.PARSE_ERROR, f"{where}: {message}")


def _number(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _json_error(where, "must be a number")
    return float(value)


def _bound(text: object, where: str) -> float:
    """A bucket's upper bound or a quantile, as a string key ("0.25", "+Inf")."""
    try:
        return float(str(text))
    except ValueError:
        raise _json_error(where, f"{_short(str(text))} is not a number") from None


def _json_points(document: Any) -> Iterator[tuple[str, str, MetricKind, Mapping[str, str], float]]:
    if not isinstance(document, dict) or set(document) != {"metrics"}:
        raise _json_error("body", 'must be an object with one key, "metrics"')
    items = document["metrics"]
    if not isinstance(items, list):
        raise _json_error("metrics", "must be an array")
    for index, item in enumerate(items):
        at = f"metrics[{index}]"
        if not isinstance(item, dict):
            raise _json_error(at, "must be an object")
        name, kind_text = item.get("name"), item.get("kind")
        if not isinstance(name, str) or not name:
            raise _json_error(f"{at}.name", "required, a metric name")
        try:
            kind = MetricKind(str(kind_text))
        except ValueError:
            raise _json_error(
                f"{at}.kind", "must be one of " + ", ".join(k.value for k in MetricKind)
            ) from None
        unknown = sorted(set(item) - _JSON_FIELDS[kind])
        if unknown:
            raise _json_error(f"{at}.{unknown[0]}", f"unknown field for kind {kind.value}")
        labels = item.get("labels", {})
        if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
            raise _json_error(f"{at}.labels", "must be an object of strings")
        if kind in (MetricKind.GAUGE, MetricKind.COUNTER):
            if "value" not in item:
                raise _json_error(f"{at}.value", "required")
            yield name, name, kind, labels, _number(item["value"], f"{at}.value")
            continue
        for field in ("sum", "count"):
            if field not in item:
                raise _json_error(f"{at}.{field}", "required")
        total = _number(item["sum"], f"{at}.sum")
        count = _number(item["count"], f"{at}.count")
        if kind is MetricKind.HISTOGRAM:
            buckets = item.get("buckets")
            if not isinstance(buckets, dict) or not buckets:
                raise _json_error(f"{at}.buckets", "required, an object of upper bound -> count")
            bounds = sorted(
                (_bound(le, f"{at}.buckets"), _number(n, f"{at}.buckets.{le}"))
                for le, n in buckets.items()
            )
            if not math.isinf(bounds[-1][0]):
                bounds.append((math.inf, count))
            for le, cumulative in bounds:
                yield name, f"{name}_bucket", kind, {**labels, "le": _le_text(le)}, cumulative
        else:
            quantiles = item.get("quantiles")
            if not isinstance(quantiles, dict):
                raise _json_error(f"{at}.quantiles", "required, an object of quantile -> value")
            for q, value in quantiles.items():
                if not 0 <= _bound(q, f"{at}.quantiles") <= 1:
                    raise _json_error(f"{at}.quantiles", f"{_short(str(q))} is not in [0, 1]")
                yield (
                    name,
                    name,
                    kind,
                    {**labels, "quantile": str(q)},
                    _number(value, f"{at}.quantiles.{q}"),
                )
        yield name, f"{name}_sum", kind, labels, total
        yield name, f"{name}_count", kind, labels, count


def _le_text(le: float) -> str:
    """An upper bound as prometheus-client writes it: "+Inf", "0.25", "1.0"."""
    return "+Inf" if math.isinf(le) else repr(le)
