"""Discovery's reports: refused labels and deferred matching, counted, logged at a limited
rate, and exported through a prometheus-client collect()."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Mapping

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from pluginmon.collectors.labels import REJECT_REASONS, LabelRejection

logger = logging.getLogger(__name__)

# Each kind of report is logged at most this often; every occurrence is counted.
DISCOVERY_LOG_INTERVAL_SECONDS = 60.0


class DiscoveryStats(Collector):
    """Counted by the sampling thread, read by scrapes (another thread): a lock guards both.

    Register it in the daemon's registry; every reason is exported from the start, at 0, so
    a rate() over it works before the first rejection. ``now`` is the sampler's clock.
    """

    def __init__(self, *, log_interval_seconds: float = DISCOVERY_LOG_INTERVAL_SECONDS) -> None:
        self._lock = threading.Lock()
        self._rejected = dict.fromkeys(REJECT_REASONS, 0)
        self._deferred = 0
        self._budget_exhausted = 0
        self._log_interval = log_interval_seconds
        self._rejection_log = LogRateLimit(interval_seconds=log_interval_seconds)
        self._budget_log = LogRateLimit(interval_seconds=log_interval_seconds)

    def report_rejection(self, pid: int, rejection: LabelRejection, *, now: float) -> None:
        """A process whose labels are refused: counted always, logged at a limited rate."""
        with self._lock:
            self._rejected[rejection.reason] = self._rejected.get(rejection.reason, 0) + 1
        held_back = self._rejection_log.allow(now)
        if held_back is not None:
            logger.warning(
                "ignoring the labels of process %d: %s; such processes are counted in "
                "pluginmon_discovery_rejected_total and logged at most every %g s "
                "(%d not logged since the previous line)",
                pid,
                rejection.describe(),
                self._log_interval,
                held_back,
            )

    def report_budget_exhausted(self, *, deferred: int, budget: int, now: float) -> None:
        """A cycle ran out of its match budget with ``deferred`` processes left unmatched."""
        with self._lock:
            self._budget_exhausted += 1
            self._deferred += deferred
        held_back = self._budget_log.allow(now)
        if held_back is not None:
            logger.warning(
                "the match budget of %d cmdline searches per cycle ran out: %d process(es) "
                "will be matched on a later cycle; counted in "
                "pluginmon_discovery_match_deferred_total, logged at most every %g s "
                "(%d cycle(s) not logged since the previous line)",
                budget,
                deferred,
                self._log_interval,
                held_back,
            )

    @property
    def rejected(self) -> Mapping[str, int]:
        with self._lock:
            return dict(self._rejected)

    @property
    def deferred(self) -> int:
        return self._deferred

    @property
    def budget_exhausted(self) -> int:
        return self._budget_exhausted

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            rejected = sorted(self._rejected.items())
            deferred, exhausted = self._deferred, self._budget_exhausted
        family = CounterMetricFamily(
            "pluginmon_discovery_rejected",
            "Processes skipped because their PLUGINMON_* labels were refused, by reason",
            labels=["reason"],
        )
        for reason, count in rejected:
            family.add_metric([reason], count)
        yield family
        yield CounterMetricFamily(
            "pluginmon_discovery_match_budget_exhausted",
            "Sampling cycles that ran out of their cmdline match budget",
            value=exhausted,
        )
        yield CounterMetricFamily(
            "pluginmon_discovery_match_deferred",
            "Processes whose matching was put off to a later cycle by the match budget",
            value=deferred,
        )


class LogRateLimit:
    """At most one log line per ``interval_seconds``; counts the lines it held back."""

    def __init__(self, *, interval_seconds: float) -> None:
        self._interval = interval_seconds
        self._next_at: float | None = None
        self._held_back = 0

    def allow(self, now: float) -> int | None:
        """None: do not log. Otherwise log, mentioning the returned count of lines held
        back since the previous one."""
        if self._next_at is not None and now < self._next_at:
            self._held_back += 1
            return None
        self._next_at = now + self._interval
        held_back, self._held_back = self._held_back, 0
        return held_back
