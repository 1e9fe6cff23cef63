"""Fault injection for the fault-tolerance tests: ``MOECL_FAULT=ACTION@POINT[:TASK[:STEP]][,...]``.

ACTION is ``kill`` (SIGKILL this process, like an OOM killer or a preempted node), ``stop`` (SIGSTOP: a rank that hangs without dying), ``term`` / ``int`` (send it
SIGTERM, as a scheduler preempting it, or SIGINT, as Ctrl-C) or ``nan`` (the loss becomes NaN). POINT is
``step`` (after backward, before the optimizer step), ``checkpoint`` (files written, manifest not yet), ``between`` (after a task-end checkpoint, before the next task) or ``ddas`` (in the DDAS stage).
``MOECL_FAULT_RANK`` limits it to one rank. Unset: nothing happens (one environment lookup per call).

``MOECL_STEP_LOG=FILE`` makes resume tests able to fail: every finished optimizer step and every checkpoint
put in place is appended to FILE, and a step that a checkpoint already held (a resume that trained it again)
prints what repeated and SIGKILLs the process.
"""
from __future__ import annotations

import os
import signal
import sys
from typing import Optional


def _matches(point: str, task: Optional[int], step: Optional[int], rank: int) -> set[str]:
    """The actions of every comma-separated spec that fires here."""
    spec = os.environ.get("MOECL_FAULT")
    if not spec:
        return set()
    want_rank = os.environ.get("MOECL_FAULT_RANK")
    if want_rank is not None and int(want_rank) != rank:
        return set()
    found = set()
    for one in spec.split(","):
        action, _, where = one.strip().partition("@")
        parts = where.split(":")
        if parts[0] != point:
            continue
        if len(parts) > 1 and task is not None and int(parts[1]) != task:
            continue
        if len(parts) > 2 and step is not None and int(parts[2]) != step:
            continue
        found.add(action)
    return found


SIGNALS = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP, "term": signal.SIGTERM, "int": signal.SIGINT}


def maybe_kill(point: str, task: Optional[int] = None, step: Optional[int] = None, rank: int = 0) -> None:
    for action in _matches(point, task, step, rank) & SIGNALS.keys():
        os.kill(os.getpid(), SIGNALS[action])


def nan_here(task: int, step: int, rank: int = 0) -> bool:
    return "nan" in _matches("step", task, step, rank)


def _step_log() -> Optional[str]:
    return os.environ.get("MOECL_STEP_LOG") or None


def step_finished(task: int, step: int, rank: int = 0) -> None:
    """Record optimizer step ``step`` of ``task`` as done; kill if a checkpoint written after an earlier run of
    this very step already held it (a resume must continue after its checkpoint, never redo what it holds)."""
    path = _step_log()
    if not path:
        return
    ran_before = False
    with open(path, "a+") as f:
        f.seek(0)
        for line in f:
            kind, *fields = line.split()
            if kind == "step" and int(fields[1]) == rank and (int(fields[2]), int(fields[3])) == (task, step):
                ran_before = True
            elif kind == "checkpoint" and ran_before and (int(fields[1]), int(fields[2])) > (task, step):
                print(f"MOECL_STEP_LOG: task {task} step {step} ran again on rank {rank}, but checkpoint (task "
                      f"{fields[1]}, step {fields[2]}) already held it", file=sys.stderr, flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
        f.write(f"step {os.getpid()} {rank} {task} {step}\n")


def checkpoint_saved(task: int, step: int) -> None:
    """Record a checkpoint put in place that holds every step before (task, step)."""
    path = _step_log()
    if path:
        with open(path, "a") as f:
            f.write(f"checkpoint {os.getpid()} {task} {step}\n")


class FaultHooks:
    """The trainer's fault-injection points (rank-bound). :func:`fault_hooks` gives the no-op
    :class:`NoFaults` unless MOECL_FAULT or MOECL_STEP_LOG is set when the trainer starts."""

    def __init__(self, rank: int = 0):
        self.rank = rank

    def at(self, point: str, task: Optional[int] = None, step: Optional[int] = None) -> None:
        """A kill / stop / term / int fault planned at ``point`` fires here."""
        maybe_kill(point, task, step, self.rank)

    def nan_loss(self, task: int, step: int) -> bool:
        """True when this step's loss is to become NaN."""
        return nan_here(task, step, self.rank)

    def step_done(self, task: int, step: int) -> None:
        step_finished(task, step, self.rank)

    def checkpoint_done(self, task: int, step: int) -> None:
        checkpoint_saved(task, step)


class NoFaults(FaultHooks):
    """Nothing injected, nothing recorded (a normal run)."""

    def at(self, point: str, task: Optional[int] = None, step: Optional[int] = None) -> None:
        pass

    def nan_loss(self, task: int, step: int) -> bool:
        return False

    def step_done(self, task: int, step: int) -> None:
        pass

    def checkpoint_done(self, task: int, step: int) -> None:
        pass


def fault_hooks(rank: int = 0) -> FaultHooks:
    """The hooks for this process: live when the environment asks for faults or a step log, else no-ops."""
    if os.environ.get("MOECL_FAULT") or os.environ.get("MOECL_STEP_LOG"):
        return FaultHooks(rank)
    return NoFaults(rank)


def resources() -> dict[str, int]:
    """Resident memory and open file descriptors of this process (for the soak test and train.log)."""
    import resource
    rss = 0
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    try:
        fds = len(os.listdir("/proc/self/fd"))
    except OSError:
        fds = -1
    return {"rss_bytes": rss, "open_files": fds}
