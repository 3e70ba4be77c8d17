"""The daemon process's life: the data_dir lock, signals, the shared shutdown deadline, exit codes."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

from pluginmon.daemon.logs import redact
from pluginmon.daemon.runtime import LoopChoice, run_event_loop
from pluginmon.daemon.signal_guard import (
    HANDLED_SIGNALS,
    RELOAD_SIGNAL,
    STOP_SIGNALS,
    SUMMARY_SIGNAL,
    SignalGuard,
)

logger = logging.getLogger(__name__)

EXIT_OK: Final = 0
# A runtime failure; also a forced stop (a second signal): what was in memory may be lost.
# DESIGN allows 0, 1 and 2 only, so never 128+n.
EXIT_FAILURE: Final = 1  # also signal_guard.FORCED_EXIT


# -- the data_dir lock ----------------------------------------------------------------------------


class DataDirLockedError(RuntimeError):
    """Another pluginmon runs on this data_dir."""


class DataDirLock:
    """An exclusive flock(2) on ``data_dir/pluginmon.lock`` for the daemon's lifetime.

    Taken before anything under data_dir is touched (the embedded server, the spools), so
    a second daemon on the same data_dir exits without stopping or adopting the first one's
    server. The kernel releases the lock when the process dies, however it dies.
    """

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "pluginmon.lock"
        self._fd: int | None = None  # held between acquire() and release()

    def acquire(self) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            holder = ""
            with contextlib.suppress(OSError):
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise DataDirLockedError(
                f"data_dir {self.path.parent} is in use by another pluginmon"
                + (f" (pid {holder})" if holder else "")
            ) from exc
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


# -- the shutdown deadline ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ShutdownStage:
    """One stage of the shutdown and the part of the deadline it may spend.

    A shared stage takes at most ``fraction`` of the whole deadline and leaves ``reserve`` of
    it for the stages after it; a fixed stage is a component's own timeout of ``fraction`` of
    the deadline, set when it is built (it runs whatever is left).
    """

    name: str
    fraction: float
    reserve: float = 0.0
    fixed: bool = False


# In the order they run, from the first signal on (daemon.app registers them so).
DRAIN_JOBS: Final = ShutdownStage("running jobs finish", 0.2, reserve=0.7)
FINAL_DELIVERY: Final = ShutdownStage("due notifications delivered", 0.15, reserve=0.55)
FINAL_FLUSH: Final = ShutdownStage("writer flushes", 1.0, reserve=0.35)
WRITER_CLOSE: Final = ShutdownStage("writer closes", 0.25, fixed=True)
POOL_CLOSE: Final = ShutdownStage("pool closes", 1.0, reserve=0.05)
HTTP_STOP: Final = ShutdownStage("HTTP server stops", 0.05, fixed=True)
SHUTDOWN_STAGES: Final = (
    DRAIN_JOBS,
    FINAL_DELIVERY,
    FINAL_FLUSH,
    WRITER_CLOSE,
    POOL_CLOSE,
    HTTP_STOP,
)


class ShutdownBudget:
    """One deadline shared by every shutdown stage, started by the first signal.

    Each shared stage takes its share of what is *left*, so the stages together never
    exceed the deadline even when every one of them runs out its time.
    """

    def __init__(
        self, total_seconds: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.total_seconds = total_seconds
        self._clock = clock
        self._deadline: float | None = None  # set by start(), at the first signal

    def start(self) -> None:
        if self._deadline is None:
            self._deadline = self._clock() + self.total_seconds

    def remaining(self) -> float:
        if self._deadline is None:
            return self.total_seconds
        return max(0.0, self._deadline - self._clock())

    def seconds(self, stage: ShutdownStage) -> float:
        """How long ``stage`` may take, asked when it starts (a fixed stage: its timeout)."""
        if stage.fixed:
            return stage.fraction * self.total_seconds
        return max(
            0.0,
            min(
                stage.fraction * self.total_seconds,
                self.remaining() - stage.reserve * self.total_seconds,
            ),
        )


# -- signals and exit codes -----------------------------------------------------------------------


class Signalled(Protocol):
    """What ``run_until_signalled`` runs: ``run(stop)`` and what the other signals ask of it."""

    async def run(self, stop: asyncio.Event) -> None: ...

    def reload(self) -> None:
        """SIGHUP: reload the configuration (never blocks: the work runs as a task)."""

    def log_summary(self) -> None:
        """SIGUSR1: log one line with the daemon's state, and do nothing else."""

    def before_forced_exit(self) -> None:
        """A second stop signal: the last, quick, cleanup before ``os._exit`` (blocking)."""


def install_signal_handlers(
    loop: asyncio.AbstractEventLoop,
    stop: asyncio.Event,
    *,
    on_second: Callable[[int], None],
    on_reload: Callable[[], None] | None = None,
    on_summary: Callable[[], None] | None = None,
) -> Callable[[int], None]:
    """Route every signal in ``signal_guard.HANDLED_SIGNALS`` through ``loop``.

    First SIGTERM/SIGINT/SIGQUIT: graceful stop (exit 0). Second: ``on_second(signum)``,
    which exits at once with status 1. SIGHUP: ``on_reload()``; SIGUSR1: ``on_summary()``
    (without them: logged and ignored); SIGUSR2: ignored. Returns the handler, which also
    replays signals recorded before the loop ran (``SignalGuard.take()``).
    """

    def handle(signum: int) -> None:
        name = signal.Signals(signum).name
        if signum in STOP_SIGNALS:
            if stop.is_set():
                logger.warning("second %s: exiting now", name)
                on_second(signum)
                return
            logger.info("%s received: stopping", name)
            stop.set()
        elif signum == RELOAD_SIGNAL and on_reload is not None:
            on_reload()
        elif signum == SUMMARY_SIGNAL and on_summary is not None:
            on_summary()
        else:
            logger.info("%s received: ignored", name)

    for signum in HANDLED_SIGNALS:
        loop.add_signal_handler(signum, handle, signum)
    return handle


def _exit_now(signum: int) -> None:
    logging.shutdown()
    # Whatever the spools hold is replayed on the next start; memory is not.
    os._exit(EXIT_FAILURE)


def run_until_signalled(
    build: Callable[[], Signalled],
    *,
    cannot_start: tuple[type[BaseException], ...],
    guard: SignalGuard | None = None,
    event_loop: LoopChoice = "auto",
) -> int:
    """Run ``build().run(stop)`` on a new event loop, ``stop`` set by the first stop signal.

    ``build`` is called inside the loop (components bind to it). ``guard``, installed by the
    caller before anything slow, held the signals until now: what it recorded is replayed
    through the loop's handlers (a SIGTERM during start-up is a graceful stop), and it takes
    over again when the loop is gone, so that no signal kills the process on its way out.

    The exit code: 0 after a clean shutdown; 1 on a runtime failure, logged with its
    traceback, or without one for ``cannot_start`` errors (their message says it all: a
    migration refused, another daemon on the data_dir, ...); 1 on a forced stop.
    """

    async def signalled() -> None:
        stop = asyncio.Event()
        target = build()

        def forced(signum: int) -> None:
            try:
                target.before_forced_exit()
            except Exception:
                logger.exception("cleanup before the forced exit failed")
            _exit_now(signum)

        handle = install_signal_handlers(
            asyncio.get_running_loop(),
            stop,
            on_second=forced,
            on_reload=target.reload,
            on_summary=target.log_summary,
        )
        for signum in guard.take() if guard is not None else ():
            logger.info("%s arrived during start-up", signal.Signals(signum).name)
            handle(signum)
        await target.run(stop)

    try:
        run_event_loop(signalled(), choice=event_loop)
    except KeyboardInterrupt:
        # Only a SIGINT before the handlers are installed (or one the loop could not route
        # to them) gets here: not a graceful stop.
        logger.error("pluginmon interrupted before it could shut down gracefully")
        return EXIT_FAILURE
    except cannot_start as exc:
        logger.error("pluginmon cannot start: %s", redact(str(exc)))
        return EXIT_FAILURE
    except Exception:
        logger.exception("pluginmon stopped by an error")
        return EXIT_FAILURE
    finally:
        # Closing the loop reset its signals to the kernel's defaults.
        if guard is not None:
            guard.install()
    logger.info("pluginmon stopped")
    return EXIT_OK
