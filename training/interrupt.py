"""A stop asked for from outside the run: SIGTERM, what a scheduler sends before it kills a job
(SLURM at a time limit or a preemption, torchrun's agent to its workers, ``kill``).

run.py installs the handler where the job runs in its own process (a single run, a torchrun
worker, a sweep under Hydra's basic launcher; not the joblib or SLURM launchers' workers). The
trainer stops at the next step boundary, every process at the same step
(``distributed.any_true``), writes a checkpoint there and raises ``Interrupted``; the run dir's
summary says ``"status": "interrupted"`` and the step, and run.py exits with 128 + the signal's
number (143), so a sweep starts no further job. ``resume=<run dir>``, or the sweep's command
again with ``skip_completed=true``, continues from that step and ends as the uninterrupted run
would. Repeated SIGTERMs are the same request (under SLURM a torchrun worker gets one from the
scheduler and one from its agent); SIGKILL ends the process at once, and the run then continues
from its last periodic checkpoint (``trainer.checkpoint_every``)."""

from __future__ import annotations

import signal
import threading

_received: int | None = None


class Interrupted(Exception):
    """The run stopped at ``step`` because a signal asked it to; the checkpoint of that step
    holds it (step 0: stopped before its first step, nothing to keep)."""

    def __init__(self, step: int, signum: int):
        name = signal.Signals(signum).name
        super().__init__(
            f"stopped by {name} after step {step}, whose checkpoint is kept: continue with resume=<run dir> "
            "(a sweep: its command again with skip_completed=true)" if step else
            f"stopped by {name} before its first step: nothing to keep; run it again "
            "(a sweep: its command again with skip_completed=true)")
        self.step, self.signum = step, signum


def install() -> None:
    """SIGTERM asks the trainer to stop (in the process's main thread only, where Python runs handlers)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_signal)


def _on_signal(signum: int, _frame) -> None:
    global _received
    _received = signum


def requested() -> int | None:
    """The signal that asked this process to stop, or None."""
    return _received
