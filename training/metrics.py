"""Evaluation metrics by name: a classifier's, computed with scikit-learn and SciPy, and a
causal LM's (``training/evaluation.py`` computes those: they need the model's generations)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import stats
from sklearn import metrics as skm


@dataclass(frozen=True)
class Predictions:
    """One evaluation's per-example outputs, in the eval set's order: ``labels`` (n,) and
    ``scores``, the logits (n, classes) or the regression output (n,)."""

    labels: np.ndarray
    scores: np.ndarray

    @property
    def predicted(self) -> np.ndarray:
        """Class ids (argmax of the logits), or the regression output itself."""
        return self.scores if self.scores.ndim == 1 else self.scores.argmax(-1)

    def reordered(self, order: np.ndarray) -> Predictions:
        """Row i of these belongs at position ``order[i]``: the predictions in that order."""
        labels, scores = np.empty_like(self.labels), np.empty_like(self.scores)
        labels[order], scores[order] = self.labels, self.scores
        return Predictions(labels, scores)

    def arrays(self, eval_set: str, step: int) -> dict[str, np.ndarray]:
        """What ``predictions.npz`` keeps of them: the labels once, the scores per step."""
        return {f"{eval_set}.labels": self.labels, f"{eval_set}.step{step}": self.scores.astype("float32")}


Metric = Callable[[np.ndarray, np.ndarray], float]

METRICS: dict[str, Metric] = {
    "accuracy": lambda pred, gold: skm.accuracy_score(gold, pred),
    "f1": lambda pred, gold: skm.f1_score(gold, pred),
    "matthews": lambda pred, gold: skm.matthews_corrcoef(gold, pred),
    "pearson": lambda pred, gold: stats.pearsonr(pred, gold)[0],
    "spearman": lambda pred, gold: stats.spearmanr(pred, gold)[0],
}


# A causal-LM task's (schema.groups.LM_METRICS): mean loss per response token and its exp, and two
# scores of the greedy generations against the reference answers (training/evaluation.py).
LOWER_IS_BETTER = ("loss", "perplexity")


def higher_is_better(name: str) -> bool:
    return name not in LOWER_IS_BETTER


def compute_metrics(names: list[str], predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    return {name: float(METRICS[name](predictions, labels)) for name in names}


class MetricError(ValueError):
    """A metric asked of ``batch_metric`` that it does not compute."""


def batch_metric(name: str, predicted: np.ndarray, gold: np.ndarray) -> np.ndarray:
    """``METRICS[name]`` over the last axis of (..., n) arrays at once: the same numbers for each
    row (a bootstrap's resamples, say) as for one. F1 and Matthews for two classes (0/1); where
    one is undefined it is 0, as scikit-learn gives."""
    if name == "accuracy":
        return (predicted == gold).mean(-1)
    if name in ("f1", "matthews"):
        if gold.max(initial=0) > 1 or predicted.max(initial=0) > 1:
            raise MetricError(f"metric {name!r} is computed here for two classes (0/1); these runs have more")
        p, g = predicted.astype(bool), gold.astype(bool)
        tp, fp = (p & g).sum(-1, dtype=float), (p & ~g).sum(-1, dtype=float)
        fn, tn = (~p & g).sum(-1, dtype=float), (~p & ~g).sum(-1, dtype=float)
        with np.errstate(invalid="ignore", divide="ignore"):
            if name == "f1":
                value = 2 * tp / (2 * tp + fp + fn)
            else:
                value = (tp * tn - fp * fn) / np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        return np.nan_to_num(value)  # sklearn's convention: 0 where undefined
    if name in ("pearson", "spearman"):
        if name == "spearman":
            predicted, gold = stats.rankdata(predicted, axis=-1), stats.rankdata(gold, axis=-1)
        x = predicted - predicted.mean(-1, keepdims=True)
        y = gold - gold.mean(-1, keepdims=True)
        return (x * y).sum(-1) / np.sqrt((x * x).sum(-1) * (y * y).sum(-1))
    raise MetricError(f"metric {name!r} has no bootstrap form; allowed: {', '.join(METRICS)}")
