"""What each signal does to the daemon, and the guard that holds them while no event loop does.

A signal whose disposition is still the kernel's default kills the process with 128+n and no
flush: SIGTERM from systemd in the first second, or the SIGHUP an operator sends to reload.
So ``pluginmon run`` installs this guard before anything slow (imports, the configuration's
checks, the embedded server), and again once the event loop, whose handlers replace it, has
closed. The guard only records: the loop's handlers replay what it recorded (a stop before
start-up finished is a graceful stop, a SIGHUP a reload) and act on what comes later. A
second stop signal while the guard holds forces exit 1 at once: nothing runs yet (or any
more) that could lose data.

This module imports nothing slow, so that the guard is in place a few milliseconds after
Python starts.
"""

from __future__ import annotations

import os
import signal
from typing import Final

# SIGQUIT too: only SIGKILL may stop the daemon without a flush.
STOP_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
RELOAD_SIGNAL: Final = signal.SIGHUP
SUMMARY_SIGNAL: Final = signal.SIGUSR1
# Handled by doing nothing. Not SIG_IGN: an ignored disposition survives exec, so the
# programs the daemon starts (pg_ctl, initdb) would inherit it; a handler does not.
IGNORED_SIGNALS: Final = (signal.SIGUSR2,)
HANDLED_SIGNALS: Final = (*STOP_SIGNALS, RELOAD_SIGNAL, SUMMARY_SIGNAL, *IGNORED_SIGNALS)

# What a forced stop exits with (daemon.lifecycle.EXIT_FAILURE): never 128+n.
FORCED_EXIT: Final = 1


class SignalGuard:
    """Records the daemon's signals while no event loop handles them.

    ``install()`` takes over every signal in HANDLED_SIGNALS (and ignores SIGPIPE, as Python
    does by default: a write to a closed socket is an EPIPE error, handled where it happens);
    ``take()`` hands over what arrived since, in order, once, for the loop to replay.
    """

    def __init__(self) -> None:
        self._pending: list[int] = []

    def install(self) -> None:
        for signum in HANDLED_SIGNALS:
            signal.signal(signum, self._record)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)

    def take(self) -> list[int]:
        pending, self._pending = self._pending, []
        return pending

    def _record(self, signum: int, frame: object) -> None:
        # A Python-level handler runs in the main thread between bytecodes: no logging here
        # (the main thread may be inside a logging call), only a list append.
        if signum in IGNORED_SIGNALS:
            return
        if signum in STOP_SIGNALS and any(s in STOP_SIGNALS for s in self._pending):
            os._exit(FORCED_EXIT)
        if signum not in self._pending:  # two SIGHUPs before start-up make one reload
            self._pending.append(signum)
