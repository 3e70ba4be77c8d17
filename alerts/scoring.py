"""Health tracking: per-plugin history and the latest health score, keyed by plugin key (pure)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime

from pluginmon.alerts.health import (
    HealthConfig,
    HealthScore,
    HealthSettings,
    PluginHistory,
    score_health,
)
from pluginmon.collectors.models import PluginKey, PluginSample


class HealthTracker:
    """Scores every sample with :func:`~pluginmon.alerts.health.score_health`, keeping what
    scoring needs from a plugin's past (restarts, the RSS trend) in a bounded
    :class:`~pluginmon.alerts.health.PluginHistory` per plugin.

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
        scores: list[HealthScore] = []
        append = scores.append
        settings_for = self._settings
        histories = self._history
        latest = self._latest
        for sample in samples:
            key = sample.key
            settings = settings_for.get(key)
            if settings is None:
                settings = settings_for[key] = self._config.settings_for(key)
            history = histories.get(key)
            if history is None:
                history = histories[key] = PluginHistory(
                    window_seconds=settings.leak_window_seconds,
                    min_points=settings.leak_min_points,
                )
            history.add(sample, restart_window_seconds=settings.restart_window_seconds)
            score = score_health(
                sample,
                settings=settings,
                now=now,
                restart_events=history.restart_events,
                metrics=metrics.get(key),
                leak_slope=history.leak_slope,
            )
            latest[key] = score
            append(score)
        self._forget_stale(now.timestamp())
        return scores

    def latest(self) -> dict[PluginKey, HealthScore]:
        """The latest score of every plugin scored within ``forget_after_seconds``."""
        return dict(self._latest)

    def _forget_stale(self, now: float) -> None:
        # A sweep is a pass over every plugin: a few times per forget period is enough.
        if self._swept_at is not None and now - self._swept_at < self._forget_after / 4:
            return
        self._swept_at = now
        cutoff = now - self._forget_after
        gone = [k for k, s in self._latest.items() if s.timestamp.timestamp() < cutoff]
        for key in gone:
            del self._latest[key]
            self._history.pop(key, None)
            self._settings.pop(key, None)


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
    # names are fixed identifiers or metric names; the detail text goes through json.
    components = ",".join(f"{json.dumps(c.name)}:{round(c.score, 2)}" for c in score.components)
    if weakest is None:
        return f'{{"components":{{{components}}}}}'
    return (
        f'{{"components":{{{components}}},"weakest":{json.dumps(weakest.name)},'
        f'"weakest_detail":{json.dumps(weakest.detail)},'
        f'"weakest_score":{round(weakest.score, 2)}}}'
    )
