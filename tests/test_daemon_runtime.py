"""The daemon's runtime: the event loop it runs on, garbage collector thresholds and heap
trimming (injected clock; the real glibc call where there is one)."""

from __future__ import annotations

import asyncio
import gc
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pluginmon.daemon.runtime import (
    GC_THRESHOLDS,
    HeapTrimmer,
    loop_kind,
    run_event_loop,
    tune_process_memory,
    uvloop_installed,
)
from pluginmon.daemon.settings import Settings


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


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_the_event_loop_is_uvloop_unless_asyncio_is_chosen() -> None:
    assert uvloop_installed()  # a dependency on Linux
    assert (loop_kind("auto"), loop_kind("uvloop"), loop_kind("asyncio")) == (
        "uvloop",
        "uvloop",
        "asyncio",
    )
    assert run_event_loop(_loop_module(), choice="auto").startswith("uvloop")
    assert run_event_loop(_loop_module(), choice="asyncio") == "asyncio.unix_events"


def test_uvloop_chosen_but_missing_is_refused_naming_the_field(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import pluginmon.daemon.preflight as preflight_module

    settings = Settings(event_loop="uvloop", data_dir=tmp_path)
    assert [f for f, _ in preflight_module.preflight(settings)] == []
    monkeypatch.setattr(preflight_module, "uvloop_installed", lambda: False)
    problems = dict(preflight_module.preflight(settings))
    assert "uvloop is not installed" in problems["event_loop"]
    assert preflight_module.preflight(Settings(event_loop="auto", data_dir=tmp_path)) == []
