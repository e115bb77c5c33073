"""Stop requests: the one owner of the stop signals in a training process.

A run is asked to stop by a signal: SIGUSR1 (a user, ``kill -USR1``), SIGUSR2 (SLURM,
``--signal-delay`` seconds before the time limit) or SIGTERM (``scancel``, preemption, a
launcher forwarding its own SIGTERM/SIGINT). Whatever the signal and whichever rank gets
it, the outcome is the same: the ranks agree at the next log interval (one all-reduce of a
flag, ``DistEnv.all_reduce_flag``), every rank writes the checkpoint, the final evaluation
is skipped on every rank alike, the MLflow run is marked KILLED, and each rank exits 3.
Running the same command again resumes.

A second SIGTERM while a stop is already under way means "now": the process exits at once
with 128 + SIGTERM, without a checkpoint (``latest`` is intact: checkpoints are published
atomically). That only works while the main thread runs Python; a rank stuck inside a
collective is ended by its launcher's grace period (SIGKILL) instead.

Why one process-wide object: signal handlers are process-wide state, so two owners (a
checkpointer flag, a SLURM latch, handlers in the entry point, as before) can only
overwrite each other. ``install()`` is called on the first line of every rank, before any
heavy import, so no window exists in which a signal takes Python's default action.
The handler only records the signal -- it may interrupt any line, logging included.
This module imports only the standard library.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)
EXIT_STOPPED = 3  # every rank's exit code after a stop that wrote its checkpoint


class StopRequest:
    """Records the first stop signal; ``requested`` is this process's view (not yet agreed)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.installed: tuple[int, ...] = ()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGTERM:
            os._exit(128 + signal.SIGTERM)  # asked twice: no checkpoint, no clean-up
        if self.signum is None:
            self.signum = signum

    def install(self, signals: tuple[int, ...] = STOP_SIGNALS) -> StopRequest:
        """Own ``signals`` from now on. Idempotent; must run in the main thread."""
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("stop signal handlers can only be installed from the main thread")
        for signum in signals:
            signal.signal(signum, self._handle)
        self.installed = tuple(dict.fromkeys(self.installed + tuple(signals)))
        return self

    def request(self, signum: int = signal.SIGUSR1) -> None:
        """Ask for a stop from code (tests, a watchdog) exactly as the signal would."""
        self._handle(signum, None)

    def clear(self) -> None:
        """Forget a request (a process that runs several trainings, e.g. tests)."""
        self.signum = None


STOP = StopRequest()


def install(signals: tuple[int, ...] = STOP_SIGNALS) -> StopRequest:
    """The process's ``StopRequest`` with its handlers installed."""
    return STOP.install(signals)
