"""Save-on-request: a flag the train loop reads at step boundaries.

Contract with the launchers (Slurm pre-emption, `cluster/`):

1. `install()` (called by `train(cfg)` on every rank) makes SIGUSR1 set the flag; the
   handler only sets a flag, so a step in flight is never interrupted.
2. At each step boundary the loop asks `save_requested()`; in a distributed run the
   ranks agree (`collectives.agree`, a MAX all-reduce), so a signal that reached any
   one rank is enough. The
   all-reduce reads its result on the host, so a multi-rank run asks only at logging
   steps (`logging.every`), save steps and the last step, where the loop syncs anyway:
   no host-device sync per step. Give the signal that much warning (`--signal=USR1@90`
   is minutes of steps).
3. Every rank finishes its current step, a checkpoint is saved and committed, and
   `train(cfg)` returns `{"preempted": True, ...}`; the rank's process (`python -m
   scaling.train`, `vidscale train`, `vidscale resume`) exits with `EXIT_REQUEUE` (85).
   At the last step a request stops nothing: the run saves, scores and finishes (exit 0).
4. The job script sees 85 and requeues (`scontrol requeue $SLURM_JOB_ID`); the requeued
   job runs `vidscale resume RUN_DIR` (or `train ... --resume auto`) and continues.

Send the signal to the ranks (`#SBATCH --signal=USR1@90`, or from a `B:USR1` batch trap
`kill -USR1` the srun step), or call `request_save()` in-process (tests, other hooks).
"""
from __future__ import annotations

import signal
import threading

EXIT_REQUEUE = 85
"""Exit code of a rank that stopped after a requested save: 'requeue me'."""

_flag = threading.Event()


def request_save() -> None:
    _flag.set()


def save_requested() -> bool:
    return _flag.is_set()


def clear() -> None:
    _flag.clear()


def _handler(signum, frame) -> None:  # noqa: ARG001
    _flag.set()


class Interrupted(KeyboardInterrupt):
    """A stop signal (SIGTERM, SIGHUP, SIGINT) as an exception, so that `finally` blocks and
    context managers run (runs stopped, an embedded Ray cluster shut down) before the process
    exits with 128 + the signal's number, as if the signal had ended it (`scaling/cli/main.py`)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_received: list[int] = []


def interrupt(signum, frame) -> None:  # noqa: ARG001
    """A signal handler: raise `Interrupted(signum)` in the main thread."""
    _received.append(signum)
    raise Interrupted(signum)


def interrupted_by() -> int:
    """The first stop signal `interrupt` turned into an exception in this process, else SIGINT
    (Ctrl-C's own KeyboardInterrupt). A library may catch `Interrupted` and raise a plain
    KeyboardInterrupt in its place (Ray Train's fit does): the exit status still follows the
    signal."""
    return _received[0] if _received else int(signal.SIGINT)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


def stop_on(*signums: int) -> dict[int, object]:
    """Make each signal raise `Interrupted` in the main thread, unless it is ignored (nohup);
    returns the handlers replaced, for `signal.signal` to restore. Elsewhere than in the main
    thread, nothing."""
    old = {}
    if threading.current_thread() is threading.main_thread():
        for s in signums:
            if signal.getsignal(s) is not signal.SIG_IGN:
                old[s] = signal.signal(s, interrupt)
    return old


def install(signum: int = signal.SIGUSR1) -> None:
    """Route `signum` to the flag. Only the main thread may install handlers: elsewhere
    (a Ray worker thread, a test thread) this is a no-op and `request_save()` still works."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signum, _handler)
