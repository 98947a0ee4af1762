"""Evaluation metrics by name, computed with scikit-learn and SciPy."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import stats
from sklearn import metrics as skm

from variants import ConfigError

Metric = Callable[[np.ndarray, np.ndarray], float]

METRICS: dict[str, Metric] = {
    "accuracy": lambda pred, gold: skm.accuracy_score(gold, pred),
    "f1": lambda pred, gold: skm.f1_score(gold, pred),
    "matthews": lambda pred, gold: skm.matthews_corrcoef(gold, pred),
    "pearson": lambda pred, gold: stats.pearsonr(pred, gold)[0],
    "spearman": lambda pred, gold: stats.spearmanr(pred, gold)[0],
}


def check_metric_names(names: list[str]) -> None:
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ConfigError(f"task.metrics has {unknown}; allowed: {', '.join(METRICS)}")


def compute_metrics(names: list[str], predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    return {name: float(METRICS[name](predictions, labels)) for name in names}
