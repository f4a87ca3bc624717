"""Stopping a run on purpose: a cluster's warning signal, a wall-clock budget, a dead launcher.

A job that reaches its time limit or is preempted gets a signal (SIGTERM, or the SIGUSR1 an
sbatch ``--signal`` asks for), then SIGKILL after the cluster's grace period. :class:`StopWatch`
turns the signals named in ``train.exit_signals`` into a flag; at every step boundary all ranks
agree (an all-reduce of the flag, so no rank stops alone and no collective hangs) and the loop
saves a complete checkpoint and ends with :data:`EXIT_STOPPED`. A signal that arrives during
the save only sets the flag again: the save finishes, and the checkpoint becomes ``latest`` only
once it is complete, as always. ``train.exit_duration_minutes`` stops the run the same way
when the next regular save would come after the budget.

:func:`die_with_parent` makes a rank die when its launcher does (Linux ``PR_SET_PDEATHSIG``),
so a SIGKILLed torchrun leaves no rank training and writing into the run directory.
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_srp import compat
from megatron_srp.units import write_atomic
from megatron_srp.validation import signal_numbers

#: Where a stopped run tells its launcher so (torchrun reports a rank's exit 75 as a plain
#: failure, so the sbatch script reads this file instead): a path in this variable.
STOP_MARKER_ENV = "SRP_STOP_MARKER"

#: The exit status of a run that stopped on a signal or its time budget, after saving
#: (EX_TEMPFAIL: "try again later"; under torchrun the sbatch script reads the stop marker).
EXIT_STOPPED = 75

_PR_SET_PDEATHSIG = 1


class StopWatch:
    """The signals and the time budget of one run; :meth:`should_stop` is collective."""

    def __init__(self, signals: Sequence[str], exit_duration_minutes: Optional[float]) -> None:
        self.received: Optional[str] = None
        self.budget_s = None if exit_duration_minutes is None else 60.0 * exit_duration_minutes
        self.started = time.monotonic()
        self._previous = {}
        for sig in signal_numbers(signals):
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name
            print(f"received {self.received}: stopping after this step, with a checkpoint",
                  file=sys.stderr, flush=True)

    @contextmanager
    def ignored(self) -> Iterator[None]:
        """Ignore the stop signals while the body starts long-lived helper processes.

        A cluster signals every process of the job. Megatron-Core's checkpoint results queue
        is served by a spawned manager process, which would die of the signal and take the
        stop's save with it; started inside this block it inherits the ignored disposition
        (which, unlike a blocked mask, survives the new interpreter's start) and lives.
        Forked helpers inherit this process's handler and need nothing. A signal that
        arrives during the block itself is lost, so keep it short."""
        for sig in self._previous:
            signal.signal(sig, signal.SIG_IGN)
        try:
            yield
        finally:
            for sig in self._previous:
                signal.signal(sig, self._on_signal)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def should_stop(self, seconds_to_next_save: float) -> Optional[str]:
        """On every rank, the same answer: why to stop now (a signal's name, or
        ``exit_duration``), or None. Called at a step boundary. The signal travels as its
        number, so every rank names the same one, also a rank it has not reached yet (a
        cluster signals the nodes one after another)."""
        local = 0
        if self.received is not None:
            local = 2 + signal.Signals[self.received].value
        elif self.budget_s is not None and (time.monotonic() - self.started
                                            + seconds_to_next_save > self.budget_s):
            local = 1
        flag = torch.tensor([local], dtype=torch.int32, device=compat.device())
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        code = int(flag.item())
        if code >= 2:
            return signal.Signals(code - 2).name
        return "exit_duration" if code == 1 else None


def record_stop(reason: str, iteration: int, checkpoint: Optional[str]) -> Optional[Path]:
    """Write ``$SRP_STOP_MARKER`` (JSON: why, at which step, the checkpoint saved), atomically,
    after the stop's checkpoint is complete; nothing when the variable is unset."""
    path = os.environ.get(STOP_MARKER_ENV)
    if not path:
        return None
    marker = Path(path)
    write_atomic(marker, json.dumps({"reason": reason, "iteration": iteration,
                                     "checkpoint": checkpoint}) + "\n")
    return marker


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux only);
    returns whether that is in place. If the parent is already gone, exit at once."""
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent or parent == 1:  # the parent died before the request took
        os.kill(os.getpid(), sig)
    return True
