"""Which plugins get a health_score row and a plugins.health_score update this cycle: on change, else at a bounded rate (pure)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import compress, repeat
from operator import attrgetter, is_not, le

from pluginmon.alerts.health import HealthScore
from pluginmon.collectors.models import PluginKey

_KEY = attrgetter("key")
# The golden ratio's fraction: successive plugins' first heartbeats land evenly spread over
# the interval, so a fleet that appeared in one cycle does not write in one burst forever.
_SPREAD = 0.6180339887498949


@dataclass(frozen=True, slots=True)
class HealthDue:
    """One plugin to write this cycle: its ``health_score`` row, its plugins row, or both."""

    index: int  # position in the scores of the cycle
    score: HealthScore
    row: bool
    plugin: bool


class HealthWriteSchedule:
    """Decides, per cycle, which plugins' health is written, keeping the rate bounded.

    A plugin's ``health_score`` row is written when its score moved by at least
    ``min_change`` points or its weakest component changed since its last row, and
    otherwise once every ``row_interval_seconds`` (0: every cycle, every plugin).
    ``plugins.health_score`` is rewritten when the score moved by ``min_change`` since the
    last rewrite, otherwise every ``plugin_interval_seconds``. A plugin's first cycle writes
    both; its periodic writes are then spread over the interval.

    So a fleet of N plugins whose scores do not move costs N / ``row_interval_seconds`` rows
    a second whatever the evaluation interval; only plugins whose health moves are written
    every cycle. The check is C-level passes over the cycle's scores (a score object that is
    the same as last cycle's did not move: alerts.scoring returns the previous object for a
    plugin whose inputs did not change); Python work is left for the candidates.

    Call :meth:`due` with the cycle's scores, write what it returns, then :meth:`written`
    with what was written (nothing is recorded for a write that failed: it is due again).
    """

    def __init__(
        self,
        *,
        row_interval_seconds: float,
        plugin_interval_seconds: float,
        min_change: float = 0.5,
    ) -> None:
        if row_interval_seconds < 0 or plugin_interval_seconds < 0:
            raise ValueError("health write intervals must be >= 0")
        self._row_every = row_interval_seconds
        self._plugin_every = plugin_interval_seconds
        self._min_change = min_change
        # Aligned with the previous cycle's scores: what was last written for each plugin.
        self._keys: list[PluginKey] = []
        self._row_score: list[HealthScore | None] = []
        self._row_at: list[float] = []  # when the next periodic row is due
        self._plugin_score: list[float | None] = []
        self._plugin_at: list[float] = []  # when the next periodic plugins update is due
        self._spread_seq = 0

    def due(self, scores: Sequence[HealthScore], now: float) -> list[HealthDue]:
        """What to write this cycle (``now``: unix seconds), in the order of ``scores``."""
        keys = list(map(_KEY, scores))
        if keys != self._keys:
            self._realign(keys)
        n = len(scores)
        candidates = set(compress(range(n), map(le, self._plugin_at, repeat(now))))
        if self._row_every <= 0:
            candidates = set(range(n))
        else:
            candidates.update(compress(range(n), map(is_not, scores, self._row_score)))
            candidates.update(compress(range(n), map(le, self._row_at, repeat(now))))
        out: list[HealthDue] = []
        for i in sorted(candidates):
            score = scores[i]
            row = self._row_due(i, score, now)
            plugin_last = self._plugin_score[i]
            plugin = (
                plugin_last is None
                or abs(plugin_last - score.score) >= self._min_change
                or now >= self._plugin_at[i]
            )
            if row or plugin:
                out.append(HealthDue(i, score, row, plugin))
        return out

    def _row_due(self, i: int, score: HealthScore, now: float) -> bool:
        if self._row_every <= 0:
            return True
        last = self._row_score[i]
        if last is None or now >= self._row_at[i]:
            return True
        if last is score:
            return False
        if abs(last.score - score.score) >= self._min_change:
            return True
        weakest, last_weakest = score.weakest, last.weakest
        return (weakest is None) != (last_weakest is None) or (
            weakest is not None and last_weakest is not None and weakest.name != last_weakest.name
        )

    def written(self, done: Sequence[HealthDue], now: float) -> None:
        """Record what :meth:`due` returned and was written at ``now``."""
        for item in done:
            i = item.index
            # One fraction for both writes of a plugin's first cycle: with equal intervals
            # its row and its plugins update stay due in the same cycle, one write.
            spread = 1.0
            if (item.row and self._row_score[i] is None) or (
                item.plugin and self._plugin_score[i] is None
            ):
                spread = self._spread()
            if item.row:
                first = self._row_score[i] is None
                self._row_score[i] = item.score
                self._row_at[i] = now + self._row_every * (spread if first else 1.0)
            if item.plugin:
                first = self._plugin_score[i] is None
                self._plugin_score[i] = item.score.score
                self._plugin_at[i] = now + self._plugin_every * (spread if first else 1.0)

    def _spread(self) -> float:
        """A fraction in (0, 1]: where in the interval a plugin's first periodic write lands."""
        self._spread_seq += 1
        return 1.0 - (self._spread_seq * _SPREAD) % 1.0

    def _realign(self, keys: list[PluginKey]) -> None:
        """Plugins came, went or moved: carry each one's state to its new position. One
        that left and comes back later is new again (its first row is written at once)."""
        old = {k: i for i, k in enumerate(self._keys)}
        positions = [old.get(k) for k in keys]
        self._row_score = [None if p is None else self._row_score[p] for p in positions]
        self._row_at = [-math.inf if p is None else self._row_at[p] for p in positions]
        self._plugin_score = [None if p is None else self._plugin_score[p] for p in positions]
        self._plugin_at = [-math.inf if p is None else self._plugin_at[p] for p in positions]
        self._keys = keys
