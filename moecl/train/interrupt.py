"""SIGTERM (cluster preemption) and Ctrl-C: finish the current step, checkpoint, exit with one line.

SLURM and Kubernetes preempt with SIGTERM and kill a little later; Ctrl-C is the same request from a person.
The handler only records the request; the trainer polls it at every step boundary (all ranks agree), writes a
checkpoint there and raises :class:`Interrupted`, which the command line prints as
``interrupted at task T step S; resume with --resume auto`` (exit 128 + signal number, as a shell reports a
signal). A second signal stops at once: the previous checkpoint is the resume point.
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Callable, Optional

from ..errors import MoeclError

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(MoeclError):
    """The run stopped on a signal; ``exit_code`` is 128 + the signal number."""

    def __init__(self, message: str, signum: int = signal.SIGTERM):
        super().__init__(message)
        self.exit_code = 128 + int(signum)


def interrupted_line(task: int, step: int) -> str:
    return f"interrupted at task {task} step {step}; resume with --resume auto"


class StopRequest:
    """Installs the handlers (main thread only) for the lifetime of a ``with`` block."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._old: dict[int, object] = {}
        self.where: Callable[[], tuple[int, int]] = lambda: (0, 0)

    def _handler(self, signum: int, frame) -> None:
        if self.signum is not None:  # the second request: stop now, from wherever this is
            raise Interrupted(interrupted_line(*self.where()) + " (stopped at once on a second signal: the last "
                              "complete checkpoint is the resume point)", signum)
        self.signum = signum
        name = signal.Signals(signum).name
        # os.write: no locks taken inside a signal handler (print or logging could be mid-write on this thread)
        os.write(2, f"moecl: {name} received: stopping after the current step, with a checkpoint (send it "
                    "again to stop at once)\n".encode())

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()
