"""Health tracking: per-plugin history and the latest health score, keyed by plugin key (pure)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from itertools import compress, repeat
from operator import attrgetter, le, ne
from typing import cast

from pluginmon.alerts.health import (
    HealthConfig,
    HealthScore,
    HealthSettings,
    PluginHistory,
    score_health,
)
from pluginmon.collectors.models import PluginKey, PluginSample

# One C-level call per sample each: what a score depends on in a sample, and its plugin.
_KEY = attrgetter("key")
_INPUTS = attrgetter("up", "cpu_percent", "rss_bytes", "restarts")
_RESTARTS = attrgetter("restarts")
_TIMESTAMP = attrgetter("timestamp")
# Slack for the float arithmetic of "is an RSS point due": one extra plugin looked at is
# harmless, one missed point is not.
_POINT_SLACK_SECONDS = 1e-6


class HealthTracker:
    """Scores every sample with :func:`~pluginmon.alerts.health.score_health`, keeping what
    scoring needs from a plugin's past (restarts, the RSS trend) in a bounded
    :class:`~pluginmon.alerts.health.PluginHistory` per plugin.

    Incremental: a plugin is scored again only when something its score depends on moved
    since its previous score: the sample's inputs (up, CPU, RSS, restarts), its history
    (an RSS point is due, restarts are in the window and may expire), or its plugin_metrics
    values. Otherwise its previous :class:`HealthScore` object is returned again (its
    ``timestamp`` is then when it was computed), which is the same score ``score_health``
    would compute. The check is a few C-level passes over the cycle (attrgetter, ``map``,
    ``compress``) aligned with the previous cycle's plugin order; per-plugin Python work is
    left for the plugins that changed. When the set or order of plugins changes, the
    state is realigned by key once.

    A plugin absent from the samples for ``forget_after_seconds`` is forgotten (history,
    settings and latest score), so label-discovered plugins that come and go do not
    accumulate and a vanished plugin's score stops being exported.
    """

    def __init__(self, config: HealthConfig, *, forget_after_seconds: float = 300.0) -> None:
        self._config = config
        self._forget_after = forget_after_seconds
        self._history: dict[PluginKey, PluginHistory] = {}
        self._settings: dict[PluginKey, HealthSettings] = {}
        self._latest: dict[PluginKey, HealthScore] = {}
        self._swept_at: float | None = None
        self.metric_names: tuple[str, ...] = _metric_names(config)
        """The plugin_metrics names the configured health thresholds score."""
        # The previous call's plugins in sample order, and per position what its score was
        # computed from, the score, and when its history takes the next RSS point.
        self._keys: list[PluginKey] = []
        self._index: dict[PluginKey, int] = {}
        self._inputs: list[object] = []
        self._scores: list[HealthScore | None] = []
        self._next_point: list[float] = []
        self._every_cycle = False  # duplicate keys in the samples: score every sample
        self._restarting: set[PluginKey] = set()  # restart events in their window
        self._metrics_seen: Mapping[PluginKey, Mapping[str, float]] | None = None
        self._last_seen: dict[PluginKey, float] = {}  # plugins absent from the last call
        self._previous_now: float | None = None
        self._changed: dict[PluginKey, HealthScore] = {}
        self._removed: set[PluginKey] = set()

    def reconfigure(self, config: HealthConfig) -> None:
        """New thresholds and weights (a configuration reload). A plugin's leak history
        starts over only if its leak window or minimum points changed."""
        for key, before in self._settings.items():
            after = config.settings_for(key)
            if (after.leak_window_seconds, after.leak_min_points) != (
                before.leak_window_seconds,
                before.leak_min_points,
            ):
                self._history.pop(key, None)
        self._settings.clear()
        self._config = config
        self.metric_names = _metric_names(config)

    def score(
        self,
        samples: Sequence[PluginSample],
        *,
        now: datetime,
        metrics: Mapping[PluginKey, Mapping[str, float]],
    ) -> list[HealthScore]:
        """One score per sample, in the order of ``samples``; ``metrics`` are the latest
        plugin_metrics values by plugin."""
        now_s = now.timestamp()
        keys = list(map(_KEY, samples))
        inputs = list(map(_INPUTS, samples))
        if keys != self._keys:
            self._realign(keys, now_s)
        n = len(keys)
        todo: Iterable[int]
        if self._every_cycle:
            todo = range(n)
        else:
            due = set(compress(range(n), map(ne, inputs, self._inputs)))
            if n:
                newest = max(map(_TIMESTAMP, samples)).timestamp() + _POINT_SLACK_SECONDS
                due.update(compress(range(n), map(le, self._next_point, repeat(newest))))
                due.update(compress(range(n), map(_RESTARTS, samples)))
            index = self._index
            due.update(index[k] for k in self._restarting if k in index)
            if self.metric_names and metrics is not self._metrics_seen:
                previous = self._metrics_seen or {}
                due.update(index[k] for k in (*metrics, *previous) if k in index)
            todo = sorted(due)  # history first in sample order, as a full pass would
        self._metrics_seen = metrics
        scores = self._scores
        for i in todo:
            scores[i] = self._score_one(samples[i], inputs[i], i, now=now, metrics=metrics)
        self._previous_now = now_s
        self._forget_stale(now_s)
        # A copy: the caller may keep it past the next call. Every position is scored now.
        return cast(list[HealthScore], scores.copy())

    def _score_one(
        self,
        sample: PluginSample,
        inputs: object,
        i: int,
        *,
        now: datetime,
        metrics: Mapping[PluginKey, Mapping[str, float]],
    ) -> HealthScore:
        key = sample.key
        settings = self._settings.get(key)
        if settings is None:
            settings = self._settings[key] = self._config.settings_for(key)
        history = self._history.get(key)
        if history is None:
            history = self._history[key] = PluginHistory(
                window_seconds=settings.leak_window_seconds,
                min_points=settings.leak_min_points,
            )
        history.add(sample, restart_window_seconds=settings.restart_window_seconds)
        if history.restart_events:
            self._restarting.add(key)
        else:
            self._restarting.discard(key)
        score = score_health(
            sample,
            settings=settings,
            now=now,
            restart_events=history.restart_events,
            metrics=metrics.get(key),
            leak_slope=history.leak_slope,
        )
        self._inputs[i] = inputs
        # A plugin that is down takes no RSS points; its next sample up changes its inputs.
        self._next_point[i] = history.next_point_at if sample.up else math.inf
        previous = self._scores[i]
        if previous is not None and _same_score(previous, score):
            # Rescored (an RSS point was due, say) to the same result: keep the object, so
            # consumers that compare by identity (health rows, the exporter) see no change.
            return previous
        self._latest[key] = score
        self._changed[key] = score
        self._removed.discard(key)
        return score

    def _realign(self, keys: list[PluginKey], now: float) -> None:
        """The plugins changed (some came, some went, or the order moved): carry each
        plugin's state to its new position; newcomers are scored in full."""
        old = self._index
        index = {k: i for i, k in enumerate(keys)}
        positions = [old.get(k) for k in keys]
        self._inputs = [None if p is None else self._inputs[p] for p in positions]
        self._scores = [None if p is None else self._scores[p] for p in positions]
        self._next_point = [-math.inf if p is None else self._next_point[p] for p in positions]
        seen_at = now if self._previous_now is None else self._previous_now
        for key in old.keys() - index.keys():
            self._last_seen[key] = seen_at
        for key in keys:
            self._last_seen.pop(key, None)
        self._keys = keys
        self._index = index
        self._every_cycle = len(index) != len(keys)

    def latest(self) -> dict[PluginKey, HealthScore]:
        """The latest score of every plugin scored within ``forget_after_seconds``."""
        return dict(self._latest)

    def take_changed(self) -> tuple[dict[PluginKey, HealthScore], set[PluginKey]]:
        """(plugins scored anew since the last call with their scores, plugins forgotten
        since then): what a consumer that mirrors :meth:`latest` has to apply."""
        changed, removed = self._changed, self._removed
        self._changed, self._removed = {}, set()
        return changed, removed

    def _forget_stale(self, now: float) -> None:
        # A sweep is a pass over the absent plugins: a few times per forget period is enough.
        if self._swept_at is not None and now - self._swept_at < self._forget_after / 4:
            return
        self._swept_at = now
        cutoff = now - self._forget_after
        gone = [k for k, seen in self._last_seen.items() if seen < cutoff]
        for key in gone:
            del self._last_seen[key]
            self._latest.pop(key, None)
            self._history.pop(key, None)
            self._settings.pop(key, None)
            self._restarting.discard(key)
            self._changed.pop(key, None)
            self._removed.add(key)


def _same_score(a: HealthScore, b: HealthScore) -> bool:
    """Equal in everything but the time it was computed."""
    return (
        a.score == b.score
        and a.key == b.key
        and a.restarts_in_window == b.restarts_in_window
        and a.leak_slope_bytes_per_second == b.leak_slope_bytes_per_second
        and a.leak_forecast_seconds == b.leak_forecast_seconds
        and a.components == b.components
    )


# Component name -> its JSON string (names are a handful of constants and metric names).
_JSON_NAMES: dict[str, str] = {}


def _json_name(name: str) -> str:
    encoded = json.dumps(name)
    if len(_JSON_NAMES) < 4096:  # metric names come from the configuration: bounded anyway
        _JSON_NAMES[name] = encoded
    return encoded


def _metric_names(config: HealthConfig) -> tuple[str, ...]:
    names = {m.name for m in config.defaults.metrics}
    for override in config.overrides:
        for m in override.changes.get("metrics", ()) or ():  # type: ignore[attr-defined]
            names.add(m.name)
    return tuple(sorted(names))


def health_labels_json(score: HealthScore) -> str:
    """The labels of a ``health_score`` row in plugin_metrics: every component's score and
    the weakest one with its explanation (what dashboards/generate.py reads)."""
    weakest = score.weakest
    # Built by hand: json.dumps per row was a third of a 10k-plugin cycle. Component
    # names are fixed identifiers or metric names, each encoded once; the detail text
    # goes through json.
    names = _JSON_NAMES
    components = ",".join(
        f"{names.get(c.name) or _json_name(c.name)}:{round(c.score, 2)}" for c in score.components
    )
    if weakest is None:
        return f'{{"components":{{{components}}}}}'
    return (
        f'{{"components":{{{components}}},"weakest":{json.dumps(weakest.name)},'
        f'"weakest_detail":{json.dumps(weakest.detail)},'
        f'"weakest_score":{round(weakest.score, 2)}}}'
    )
