"""What a rule, a health threshold or `pluginmon status` reads from a plugin's own metrics: a gauge's value, a counter's rate, a histogram's quantile.

A rule's ``metric`` (or a ``[[health.metrics]]`` name) that is not a sample field names
plugin_metrics series, and their kind decides what the name means:

* a **gauge** (also an untyped series, a summary's quantile series): the newest value; when
  the plugin exposes the name with several label sets, the sum of those in its newest scrape
  (``sum(x)``); series that were not in the newest scrape no longer count;
* a **counter** (also a histogram's or summary's ``_count``, ``_sum``, ``_bucket``): its rate
  per second over the rate window (default 5 minutes, like ``rate(x[5m])``), with resets (a
  restarted plugin starting again from 0) handled; summed over label sets; no value until a
  series has two points in the window;
* ``<histogram>:p95`` (any ``:pNN`` or ``:pNN.N``, 0 < NN < 100): the quantile of the
  observations in the rate window, interpolated within the buckets as Prometheus's
  ``histogram_quantile(0.95, sum by (le) (rate(<histogram>_bucket[5m])))``; no value without
  observations in the window. For a summary, ``<summary>:p95`` is its ``quantile="0.95"``
  series (the largest one over label sets: quantiles cannot be added).

The functions on SeriesWindow lists are pure; ``plugin_metric_values`` runs the one query.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

import asyncpg

from pluginmon.storage.plugin_metrics import SeriesWindow, series_windows

# Like rate(x[5m]): at least four scrapes at the default 10 s... up to a 75 s interval.
DEFAULT_RATE_WINDOW_SECONDS: Final = 300.0

_QUANTILE_RE: Final = re.compile(r"(?P<base>.+):p(?P<percent>[0-9]+(?:\.[0-9]+)?)")
_CUMULATIVE_SUFFIXES: Final = ("_bucket", "_count", "_sum")


@dataclass(frozen=True, slots=True)
class MetricRef:
    """A plugin_metrics name as a rule writes it: ``name``, or ``name:p95`` for a quantile."""

    text: str
    name: str
    quantile: float | None = None

    @property
    def stored_names(self) -> tuple[str, ...]:
        """The metric_name values to read: a histogram's buckets or a summary's quantiles."""
        if self.quantile is None:
            return (self.name,)
        return (f"{self.name}_bucket", self.name)


def parse_metric_ref(text: str) -> MetricRef:
    """``text`` as a MetricRef; ValueError when a ``:pNN`` suffix is not 0 < NN < 100."""
    match = _QUANTILE_RE.fullmatch(text)
    if match is None:
        return MetricRef(text=text, name=text)
    percent = float(match["percent"])
    if not 0 < percent < 100:
        raise ValueError(f"quantile :p{match['percent']} must be between p0 and p100 (exclusive)")
    return MetricRef(text=text, name=match["base"], quantile=percent / 100)


def metric_ref_problem(text: str) -> str | None:
    """Why ``text`` cannot name a plugin_metrics value, or None."""
    try:
        parse_metric_ref(text)
    except ValueError as exc:
        return str(exc)
    return None


def is_cumulative(kind: str, name: str) -> bool:
    """Whether a series only grows between restarts (read as a rate)."""
    if kind == "counter":
        return True
    if kind == "histogram":
        return name.endswith(_CUMULATIVE_SUFFIXES)
    if kind == "summary":
        return name.endswith(("_count", "_sum"))
    return False


def rate_per_second(series: Iterable[SeriesWindow]) -> float | None:
    """The summed per-second rate of cumulative series over their windows; None when no
    series has two points in its window."""
    rates = [
        s.increase / s.rate_seconds for s in series if s.rate_points >= 2 and s.rate_seconds > 0
    ]
    return math.fsum(rates) if rates else None


def histogram_quantile(quantile: float, buckets: Iterable[tuple[float, float]]) -> float | None:
    """The ``quantile`` of observations counted in cumulative ``(upper bound, count)``
    buckets, interpolated linearly inside the bucket it falls in, as Prometheus does.

    None without a +Inf bucket, with fewer than two buckets or with no observations. In the
    +Inf bucket the answer is the largest finite bound; in a first bucket whose bound is
    <= 0, that bound.
    """
    ordered = sorted(buckets)
    if len(ordered) < 2 or not math.isinf(ordered[-1][0]):
        return None
    # Counts read at slightly different moments can dip; cumulative counts never do.
    counts: list[float] = []
    for _, count in ordered:
        counts.append(max(count, counts[-1]) if counts else count)
    total = counts[-1]
    if not total > 0:
        return None
    rank = quantile * total
    index = next(i for i, count in enumerate(counts) if count >= rank)
    if index == len(ordered) - 1:
        return ordered[-2][0]
    upper = ordered[index][0]
    if index == 0 and upper <= 0:
        return upper
    lower = 0.0 if index == 0 else ordered[index - 1][0]
    below = 0.0 if index == 0 else counts[index - 1]
    in_bucket = counts[index] - below
    if in_bucket <= 0:
        return upper
    return lower + (upper - lower) * (rank - below) / in_bucket


def _newest(series: Sequence[SeriesWindow]) -> list[SeriesWindow]:
    """The series present in the newest scrape or push (the others went away)."""
    newest = max(s.last_at for s in series)
    return [s for s in series if s.last_at == newest]


def value_of(ref: MetricRef, series: Sequence[SeriesWindow]) -> float | None:
    """The value ``ref`` names, from one plugin's (one environment's) series; None when
    there is none (the rule's condition does not hold, the health component is left out)."""
    if ref.quantile is None:
        named = [s for s in series if s.name == ref.name]
        if not named:
            return None
        cumulative = [s for s in named if is_cumulative(s.kind, s.name)]
        if cumulative:
            return rate_per_second(cumulative)
        return math.fsum(s.last_value for s in _newest(named))
    bucket_name = f"{ref.name}_bucket"
    increases: dict[float, float] = defaultdict(float)
    for s in series:
        if s.name == bucket_name and s.kind == "histogram" and s.rate_points >= 2:
            le = _float(s.labels.get("le"))
            if le is not None:
                increases[le] += s.increase
    if increases:
        return histogram_quantile(ref.quantile, increases.items())
    quantiles = [
        s
        for s in series
        if s.name == ref.name
        and s.kind == "summary"
        and _float(s.labels.get("quantile")) == ref.quantile
    ]
    if quantiles:
        return max(s.last_value for s in _newest(quantiles))
    return None


def _float(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        return None


def values_by_plugin(
    refs: Iterable[MetricRef], series: Iterable[SeriesWindow]
) -> dict[tuple[int, str, str], float]:
    """``{(plugin id, environment, ref text): value}`` for every ref with a value."""
    grouped: dict[tuple[int, str], list[SeriesWindow]] = defaultdict(list)
    for s in series:
        grouped[(s.plugin_id, s.environment)].append(s)
    wanted = list(refs)
    out: dict[tuple[int, str, str], float] = {}
    for (plugin_id, environment), own in grouped.items():
        for ref in wanted:
            value = value_of(ref, own)
            if value is not None:
                out[(plugin_id, environment, ref.text)] = value
    return out


async def plugin_metric_values(
    conn: asyncpg.Connection,
    plugins: Sequence[tuple[int, str]],
    names: Sequence[str],
    since: datetime,
    *,
    now: datetime,
    rate_window_seconds: float = DEFAULT_RATE_WINDOW_SECONDS,
) -> dict[tuple[int, str, str], float]:
    """The value of each of ``names`` (rule metrics, health metric names) per (plugin id,
    environment) pair, from series with a point since ``since``; a name that is not a valid
    reference has no value."""
    refs: list[MetricRef] = []
    for name in names:
        try:
            refs.append(parse_metric_ref(name))
        except ValueError:
            continue  # refused by the config schema; nothing to read
    stored = sorted({n for ref in refs for n in ref.stored_names})
    rate_since = max(since, now - timedelta(seconds=rate_window_seconds))
    series = await series_windows(conn, plugins, stored, since=since, rate_since=rate_since)
    return values_by_plugin(refs, series)


def describe(series: Sequence[SeriesWindow]) -> dict[str, float | None]:
    """One plugin's metrics as `pluginmon status` shows them: each gauge's value, each
    counter's rate (``name`` + ``/s``), each histogram's p50/p95/p99 (``name:pNN``)."""
    out: dict[str, float | None] = {}
    names = sorted({s.name for s in series})
    histograms = {
        s.name.removesuffix("_bucket")
        for s in series
        if s.kind == "histogram" and s.name.endswith("_bucket")
    }
    summaries = {s.name for s in series if s.kind == "summary" and "quantile" in s.labels}
    for name in names:
        if name.endswith("_bucket") and name.removesuffix("_bucket") in histograms:
            continue  # shown as quantiles
        if name in summaries:
            continue  # the quantile series, shown as quantiles
        ref = MetricRef(text=name, name=name)
        kind = next(s.kind for s in series if s.name == name)
        label = f"{name}/s" if is_cumulative(kind, name) else name
        out[label] = value_of(ref, series)
    for base in sorted(histograms | summaries):
        for percent in (50, 95, 99):
            ref = parse_metric_ref(f"{base}:p{percent}")
            out[ref.text] = value_of(ref, series)
    return out
