"""The daemon's memory management: garbage collector thresholds and heap trimming (injected
clock; the real glibc call where there is one)."""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterator

import pytest

from pluginmon.daemon.runtime import GC_THRESHOLDS, HeapTrimmer, tune_process_memory


@pytest.fixture
def restore_gc() -> Iterator[None]:
    saved = gc.get_threshold()
    try:
        yield
    finally:
        gc.set_threshold(*saved)


def test_tune_process_memory_sets_the_documented_gc_thresholds(restore_gc: None) -> None:
    gc.set_threshold(700, 10, 10)
    tune_process_memory()  # glibc's settings too, in this test process: harmless
    assert gc.get_threshold() == GC_THRESHOLDS
    assert GC_THRESHOLDS[0] >= 10_000  # a cycle's samples die before a collection


def test_heap_trimmer_trims_at_most_once_per_period() -> None:
    now = [100.0]
    calls: list[float] = []
    trimmer = HeapTrimmer(
        every_seconds=60.0, trim=lambda: calls.append(now[0]), clock=lambda: now[0]
    )
    results = []
    for t in (100.0, 130.0, 159.9, 160.0, 161.0, 219.9, 220.0, 400.0):
        now[0] = t
        results.append(trimmer.maybe_trim())
    assert results == [False, False, False, True, False, False, True, True]
    assert calls == [160.0, 220.0, 400.0]
    assert trimmer.trims == 3


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim is Linux")
def test_the_real_malloc_trim_runs() -> None:
    now = [0.0]
    trimmer = HeapTrimmer(every_seconds=1.0, clock=lambda: now[0])
    if not trimmer.available:
        pytest.skip("no malloc_trim in this C library (not glibc)")
    junk = [bytearray(4096) for _ in range(10_000)]  # 40 MB to give back
    del junk
    now[0] = 1.0
    assert trimmer.maybe_trim() is True
    assert trimmer.trims == 1
