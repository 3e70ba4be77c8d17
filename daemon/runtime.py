"""The daemon process's runtime: its event loop, the garbage collector's thresholds and returning freed heap to the system.

The event loop is uvloop's where it is installed (``event_loop = "auto"``, the default):
the API's event loop spent ~12% less CPU per request on it (bench/api.py, docs/BENCHMARKS.md),
its transports reading into one buffer where asyncio's allocate 256 KiB per read (a
mapping above the threshold below). ``event_loop = "asyncio"`` keeps the standard loop.

Memory:

Both were measured at 10,000 plugins sampled every second (docs/BENCHMARKS.md, bench/scale.py):

- Every cycle allocates tens of thousands of container objects (a sample per plugin, a row
  per sample) that die a cycle later. With CPython's default thresholds (700, 10, 10) that
  is ~55 young collections a second and a full collection every few seconds over the
  ~320,000 long-lived objects of 10,000 plugins' state, each a ~110 ms pause: 50 ms of CPU
  a second. Garbage of this kind is freed by reference counting; only cycles need the
  collector, and the daemon makes few. At (50_000, 20, 10) a collection runs when 50,000
  more container objects are alive than before, which a steady daemon does not reach.
- glibc keeps freed heap pages for reuse: after a burst (a spool replayed at start, a
  /metrics render of 15 MB) a 10,000-plugin daemon held ~70 MB more than it used.
  ``malloc_trim(0)`` returns them (~15 ms); once a minute is enough.
- glibc also raises its mmap threshold each time a large block is freed (up to 32 MB), so
  the daemon's large transient buffers (a COPY, a rendering) end up in the heap and stay
  there, spread over one arena per thread that ever allocated. A fixed threshold of 256 KB
  (large blocks are mapped and unmapped) and at most 2 arenas took the daemon at 10,000
  plugins from 202 to 154 MiB RSS at the same CPU (MALLOC_MMAP_THRESHOLD_ and
  MALLOC_ARENA_MAX in the environment do the same; set them and these calls change nothing).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import importlib.util
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar

T = TypeVar("T")
LoopChoice = Literal["auto", "uvloop", "asyncio"]

logger = logging.getLogger(__name__)

GC_THRESHOLDS = (50_000, 20, 10)
TRIM_EVERY_SECONDS = 60.0
MMAP_THRESHOLD_BYTES = 256 * 1024
MALLOC_ARENAS = 2
# mallopt(3) parameters (glibc's malloc.h).
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def uvloop_installed() -> bool:
    return importlib.util.find_spec("uvloop") is not None


def loop_kind(choice: LoopChoice) -> Literal["uvloop", "asyncio"]:
    """The loop ``choice`` runs on: ``auto`` is uvloop when installed. (``uvloop`` when it
    is not installed is refused by daemon.preflight before anything starts.)"""
    if choice == "asyncio" or (choice == "auto" and not uvloop_installed()):
        return "asyncio"
    return "uvloop"


def run_event_loop(main: Coroutine[Any, Any, T], *, choice: LoopChoice) -> T:
    """``asyncio.run(main)`` on the loop ``choice`` names (see :func:`loop_kind`)."""
    if loop_kind(choice) == "asyncio":
        return asyncio.run(main)
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def tune_process_memory() -> None:
    """The garbage collector's thresholds and glibc's allocator settings above; call once
    at start-up, before threads start (process-wide)."""
    gc.set_threshold(*GC_THRESHOLDS)
    libc = _libc()
    if libc is None:
        return
    try:
        mallopt = libc.mallopt
    except AttributeError:  # not glibc
        return
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    for param, value in ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES), (_M_ARENA_MAX, MALLOC_ARENAS)):
        if mallopt(param, value) != 1:
            logger.debug("mallopt(%d, %d) refused", param, value)


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def _libc_malloc_trim() -> Callable[[], object] | None:
    """glibc's malloc_trim(0), or None elsewhere (musl, macOS: nothing to do)."""
    libc = _libc()
    if libc is None:
        return None
    try:
        trim = libc.malloc_trim
    except AttributeError:
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: trim(0)


class HeapTrimmer:
    """Returns freed heap to the system at most once every ``every_seconds``.

    ``maybe_trim()`` is cheap when not due; call it from a worker thread (the trim itself
    takes ~15 ms at 10,000 plugins and holds the allocator's lock meanwhile).
    """

    def __init__(
        self,
        *,
        every_seconds: float = TRIM_EVERY_SECONDS,
        trim: Callable[[], object] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._every = every_seconds
        self._trim = trim if trim is not None else _libc_malloc_trim()
        self._clock = clock
        self._next = clock() + every_seconds
        self.trims = 0

    @property
    def available(self) -> bool:
        return self._trim is not None

    def maybe_trim(self) -> bool:
        """Trim if due; True when it trimmed."""
        if self._trim is None:
            return False
        now = self._clock()
        if now < self._next:
            return False
        self._next = now + self._every
        self._trim()
        self.trims += 1
        return True
