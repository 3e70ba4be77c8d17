"""Why a sample row was lost: the reasons of pluginmon_dropped_samples_total, counted where each drop happens."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from enum import StrEnum

from prometheus_client.core import CounterMetricFamily, Metric

from pluginmon.storage.spool import Spool, SpoolCodecError, SpoolFullError


class DropReason(StrEnum):
    """The ``reason`` label of pluginmon_dropped_samples_total: one per way a row is lost."""

    # The writer's rows in memory were lost: its queue overflowed (or, with no spool to
    # take them, the shutdown deadline passed).
    BUFFER_FULL = "buffer_full"
    SPOOL_FULL = "spool_full"  # a batch did not fit under the spool's size cap
    SPOOL_IO = "spool_io_error"  # the disk refused a spool append
    SPOOL_CODEC = "spool_codec_error"  # a value the spool codec cannot carry
    SPOOL_DISCARDED = "spool_discarded"  # a spooled batch that no longer decodes
    REJECTED = "rejected_by_database"  # a row the database refused (constraint, type)
    INVALID_PLUGIN = "invalid_plugin"  # a plugin the schema refuses (a bad tenant id)


def spool_append_failure(exc: BaseException) -> DropReason:
    """The reason for rows whose spool append raised ``exc`` (SpoolFullError,
    SpoolCodecError or OSError, as ``Spool.append`` documents)."""
    if isinstance(exc, SpoolFullError):
        return DropReason.SPOOL_FULL
    if isinstance(exc, SpoolCodecError):
        return DropReason.SPOOL_CODEC
    return DropReason.SPOOL_IO


class DropCounts:
    """Rows lost so far, by reason; counted on the event loop, read by scrapes in a thread."""

    def __init__(self) -> None:
        self._counts: dict[DropReason, int] = dict.fromkeys(DropReason, 0)
        self._lock = threading.Lock()

    def add(self, reason: DropReason, rows: int) -> None:
        with self._lock:
            self._counts[reason] += rows

    def snapshot(self) -> Mapping[DropReason, int]:
        """Every reason (zeros included), as of now."""
        with self._lock:
            return dict(self._counts)

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self._counts.values())


class SpoolLosses:
    """prometheus-client Collector: records each spool lost to damage on disk, by reason.

    One collector over every spool (a ``spool`` label names each), since one registry can
    hold each family only once. Counted in records, not rows: a damaged record's row count
    cannot be trusted. Reads ``Spool.stats()``, which takes no lock, at scrape time.
    """

    def __init__(self, spools: Mapping[str, Spool]) -> None:
        self._spools = dict(spools)

    def collect(self) -> Iterator[Metric]:
        lost = CounterMetricFamily(
            "pluginmon_spool_lost_records",
            "Spool records lost to damage on disk (torn tail, bad header, checksum), by reason",
            labels=["spool", "reason"],
        )
        for name, spool in sorted(self._spools.items()):
            for reason, records in sorted(spool.stats().lost_records.items()):
                lost.add_metric([name, reason], records)
        yield lost
