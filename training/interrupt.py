"""A stop asked for from outside the run: SIGTERM, what a scheduler sends before it kills a job
(SLURM at a time limit or a preemption, torchrun's agent to its workers, ``kill``).

``run.py`` installs the handler. The trainer stops at the next step boundary, every process at
the same step (``distributed.any_true``), writes a checkpoint there and raises ``Interrupted``;
the run dir's summary says ``"status": "interrupted"`` and the step, and run.py exits with
128 + the signal's number (143), so a sweep starts no further job. ``resume=<run dir>``, or the
sweep's command again with ``skip_completed=true``, continues from that step and ends as the
uninterrupted run would. A second SIGTERM kills at once, as does SIGKILL: the run then
continues from its last periodic checkpoint (``trainer.checkpoint_every``)."""

from __future__ import annotations

import signal

_received: int | None = None


class Interrupted(Exception):
    """The run stopped at ``step`` because a signal asked it to; the checkpoint of that step holds it."""

    def __init__(self, step: int, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}, whose checkpoint is kept: "
                         "continue with resume=<run dir> (a sweep: its command again with skip_completed=true)")
        self.step, self.signum = step, signum


def install() -> None:
    """SIGTERM asks the trainer to stop (the process's main thread; run.py)."""
    signal.signal(signal.SIGTERM, _on_signal)


def _on_signal(signum: int, _frame) -> None:
    global _received
    _received = signum
    signal.signal(signum, signal.SIG_DFL)  # a second one kills


def requested() -> int | None:
    """The signal that asked this process to stop, or None."""
    return _received
