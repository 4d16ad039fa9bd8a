"""Ways a run stops on purpose, and the exit status of each (README, "Exit status").

A `RunStopped` is raised on every rank alike (they agree first: the global gradient norm, the
preemption flag and a checkpoint's write result are the same on every rank), so the workers
end normally with a `stopped` record instead of failing: the launcher does not restart them,
and `paratrain train` prints the one line and exits with the status.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import signal
import sys
import threading

DONE = 0  # trained every step
FAILED = 1  # a worker failed (after every restart allowed)
BAD_INPUT = 2  # refused before any worker started
HANG = 3  # a collective did not complete within --collective-timeout
NON_FINITE = 4  # a NaN or inf loss or gradient norm, or too many fp16 steps skipped in a row
SAVE_FAILED = 5  # a checkpoint could not be written (no space left, permission denied)


def preempted_status(signum: int) -> int:
    """128 + the signal, as a shell reports a process ended by it: 143 for SIGTERM, 130 for SIGINT."""
    return 128 + int(signum)


class RunStopped(Exception):
    """The run stopped on every rank at `step` for the reason in `message` (one line)."""

    status = FAILED

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.message, self.step = message, step

    def record(self) -> dict:
        """What a worker returns instead of its results: {"stopped": {status, message, step}}."""
        return {"stopped": {"status": self.status, "message": self.message, "step": self.step,
                            "reason": type(self).__name__}}


class NonFiniteError(RunStopped):
    status = NON_FINITE


class SaveFailed(RunStopped):
    status = SAVE_FAILED


class Preempted(RunStopped):
    def __init__(self, message: str, step: int, signum: int = signal.SIGTERM):
        super().__init__(message, step)
        self.status = preempted_status(signum)


def non_finite_norm(step: int, norm: float, loss: float, grad_clip: float) -> str:
    hint = "lower --lr" if grad_clip > 0 else "lower --lr or use --grad-clip"
    return (f"non-finite gradient norm ({norm}) at step {step} (loss {loss:.4g}); the update was not applied "
            f"and nothing was saved after step {step - 1}; {hint}")


def non_finite_loss(step: int, loss: float, norm: float) -> str:
    return (f"non-finite loss ({loss}) at step {step} (gradient norm {norm:.4g}); nothing was saved after "
            f"step {step - 1}; lower --lr")


def non_finite_update(step: int, norm: float, loss: float, grad_clip: float) -> NonFiniteError:
    """The stop for an update not applied because its norm or its loss is not finite."""
    if math.isfinite(norm):
        return NonFiniteError(non_finite_loss(step, loss, norm), step)
    return NonFiniteError(non_finite_norm(step, norm, loss, grad_clip), step)


def overflowed(step: int, n: int, loss: float) -> str:
    """fp16: `n` steps in a row up to `step` overflowed (the --max-skipped-steps bound)."""
    return (f"fp16 gradients overflowed in {n} steps in a row (steps {step - n + 1}-{step}, loss {loss:.4g}), "
            f"all skipped (--max-skipped-steps {n}): the model is as after step {step - n}; lower --lr or use "
            f"--precision bf16")


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class StopSignals:
    """While installed, SIGTERM and SIGINT only note the first signal's number (`signum`): the
    ranks agree on it after a step and stop together there (fit.py), instead of dying mid-step."""

    def __init__(self):
        self.signum = 0
        self.previous: dict = {}

    def note(self, signum: int, frame) -> None:
        self.signum = self.signum or signum

    def install(self) -> "StopSignals | None":
        """Handle SIGTERM and SIGINT in this process (main thread only, else None)."""
        if threading.current_thread() is not threading.main_thread():
            return None
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self.note)
        return self

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}


def end_quietly_on_signals() -> None:
    """Where no loop stops at a step (parameter servers): SIGINT ends the process as SIGTERM
    does, without a traceback per rank."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_DFL)


def leave_if_unread(grace_s: float = 3.0) -> None:
    """A local worker that stopped for a signal: a launcher that got the signal too shuts down
    without reading the workers' results, and torch's elastic worker waits for that read until
    it is SIGKILLed. So leave `grace_s` after returning unless the read came first (the result
    is in the launcher's pipe by then). Nothing to do under torchrun (a process of its own)."""
    if multiprocessing.parent_process() is None:
        return

    def leave() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    timer = threading.Timer(grace_s, leave)
    timer.daemon = True
    timer.start()


def installed_stop_signals() -> StopSignals | None:
    """The StopSignals that handles SIGTERM in this process now, if any."""
    owner = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
    return owner if isinstance(owner, StopSignals) else None


def requested_signal() -> int:
    """The stop signal this process received (0: none or not handled by a StopSignals)."""
    signals = installed_stop_signals()
    return signals.signum if signals else 0
