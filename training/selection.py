"""Model selection while training: which evaluation is the best, when to stop, which state to keep.

One eval set drives it (``trainer.select_on``): ``val`` when the task holds one out of its
training data (``task.val_fraction``), else ``main``; its ``task.main_metric`` is compared,
higher being better except for a loss or perplexity. Everything here is computed from the
training state's evaluation history, so a resumed run decides exactly as the uninterrupted one.

- The best evaluation is the first one with the best value. ``summary.json``'s ``best`` (and,
  with a ``val`` set, ``eval_at_best_val``, which ``compare.py --at best_val`` reads) name its
  step; with ``trainer.keep_best`` the model's state there is ``adapter_best.safetensors``,
  rewritten whenever an evaluation beats every earlier one.
- Early stopping (``trainer.early_stopping.patience``): the run stops after ``patience``
  evaluations in a row that do not beat the reference by more than ``min_delta``; the reference
  is the first evaluation, then each one that did beat it so (as Hugging Face's
  ``EarlyStoppingCallback`` with ``early_stopping_threshold``), and never before
  ``min_epochs`` (as Lightning's ``min_epochs``: a slow starter, still at the majority class
  after a first plateau, is not cut short). The schedule stays the one planned for the full run:
  stopping early does not stretch the learning-rate decay.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from schema import ConfigError

from .checkpoint import TrainState
from .metrics import higher_is_better

History = list[tuple[int, dict[str, float]]]


def best_of(history: History, metric: str) -> tuple[int, dict[str, float]]:
    """The first (step, metrics) whose ``metric`` is best: highest, or lowest for a loss or perplexity."""
    sign = 1 if higher_is_better(metric) else -1
    return max(history, key=lambda item: sign * item[1][metric])  # max keeps the first of equals


def best_eval(history: History, main_metric: str) -> dict[str, Any]:
    """The evaluation with the best main metric (the highest; the lowest for a loss or
    perplexity; the LoRA paper reports the best epoch) and its step; ``eval`` in the summary
    stays the last one."""
    step, metrics = best_of(history, main_metric)
    return {"step": step, **metrics}


def at_best_val(val_history: History, main_history: History, main_metric: str) -> dict[str, Any]:
    """The step whose ``val`` main metric is highest, with the ``val`` and ``main`` (test)
    metrics there: the honest counterpart of ``best_eval``, which picks on the reported set."""
    step, val = best_of(val_history, main_metric)
    return {"step": step, "val": val, "test": dict(main_history)[step]}


@dataclass(frozen=True)
class Selection:
    """What picks the best evaluation and stops the run; built once by ``selection_for``."""

    eval_set: str  # the eval set compared: "val" or "main"
    metric: str  # task.main_metric
    patience: int | None = None  # evaluations without a gain before stopping; None: never stop early
    min_delta: float = 0.0  # a gain no larger than this does not count for the patience
    min_steps: int = 0  # no early stop before this step (trainer.early_stopping.min_epochs, in steps)
    keep_best: bool = False  # keep the best evaluation's state (adapter_best.safetensors)

    def history(self, state: TrainState) -> History:
        return state.eval_history if self.eval_set == "main" else state.extra_eval_history.get(self.eval_set, [])

    def _gain(self, new: float, reference: float) -> float:
        return new - reference if higher_is_better(self.metric) else reference - new

    def best(self, state: TrainState) -> dict[str, Any] | None:
        """{"set", "metric", "step", "value"} of the best evaluation so far; None before any."""
        history = self.history(state)
        if not history:
            return None
        step, metrics = best_of(history, self.metric)
        return {"set": self.eval_set, "metric": self.metric, "step": step, "value": metrics[self.metric]}

    def latest_is_best(self, state: TrainState) -> bool:
        """Whether the latest evaluation beats every earlier one (so it is ``best``)."""
        history = self.history(state)
        return bool(history) and all(self._gain(history[-1][1][self.metric], m[self.metric]) > 0
                                     for _, m in history[:-1])

    def evaluations_without_gain(self, state: TrainState) -> int:
        """Evaluations since the last one that beat the reference by more than ``min_delta``."""
        history = self.history(state)
        if not history:
            return 0
        reference, waited = history[0][1][self.metric], 0
        for _, metrics in history[1:]:
            if self._gain(metrics[self.metric], reference) > self.min_delta:
                reference, waited = metrics[self.metric], 0
            else:
                waited += 1
        return waited

    def should_stop(self, state: TrainState) -> bool:
        return (self.patience is not None and state.step >= self.min_steps
                and self.evaluations_without_gain(state) >= self.patience)


def selection_for(cfg: Any, eval_sets: list[str], metric: str, steps_per_epoch: int = 1) -> Selection:
    """The ``Selection`` of a ``trainer`` config, for a run whose eval sets are ``eval_sets`` and
    whose epochs last ``steps_per_epoch`` steps."""
    wanted = cfg.get("select_on", "auto")
    eval_set = ("val" if "val" in eval_sets else "main") if wanted == "auto" else wanted
    if eval_set not in eval_sets:
        raise ConfigError("trainer.select_on=val but the task holds no validation set out; allowed: main or auto, "
                          "or set task.val_fraction")
    stopping = cfg.get("early_stopping") or {}
    min_steps = math.ceil(stopping.get("min_epochs", 0) * steps_per_epoch)
    return Selection(eval_set, metric, patience=stopping.get("patience"), min_delta=float(stopping.get("min_delta", 0.0)),
                     min_steps=min_steps, keep_best=bool(cfg.get("keep_best", False)))

