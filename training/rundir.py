"""The files of a run directory, named in one place, and the small writers that touch them.

    config.yaml            the fully resolved config
    metrics.jsonl          one JSON record per log/eval step (the W&B keys)
    predictions.npz        per-example labels and scores of every evaluated set at every evaluation
    summary.json           the run's results, or ``"status": "failed"`` and the error
    adapter.safetensors    what trained, with the metadata to rebuild the model
    adapter_best.safetensors   the same at the best evaluation (trainer.keep_best; its step in the metadata)
    checkpoint.pt          the training checkpoint while the run is unfinished
    run.log, .hydra/       Hydra's log and the unresolved config and overrides
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
PREDICTIONS = "predictions.npz"
SUMMARY = "summary.json"
ADAPTER = "adapter.safetensors"
ADAPTER_BEST = "adapter_best.safetensors"
CHECKPOINT = "checkpoint.pt"
LOG = "run.log"
HYDRA_OVERRIDES = Path(".hydra") / "overrides.yaml"


def remove_if_unused(run_dir: Path) -> bool:
    """Remove a run dir that holds nothing but what Hydra wrote when the job started (``.hydra/``
    and ``run.log``): a run refused by its config check leaves no empty dir behind."""
    if not run_dir.is_dir() or not {p.name for p in run_dir.iterdir()} <= {".hydra", LOG}:
        return False
    shutil.rmtree(run_dir)
    return True


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / SUMMARY
    return json.loads(path.read_text()) if path.is_file() else None


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop the records written after ``step`` (a resumed run writes them again)."""
    path = run_dir / METRICS
    if path.is_file():
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))


def read_predictions(run_dir: Path) -> dict[str, np.ndarray]:
    """``predictions.npz`` as a dict: ``<set>.labels`` (n,) once per eval set, and
    ``<set>.step<N>`` the scores at step N, logits (n, classes) or the regression output (n,)."""
    path = run_dir / PREDICTIONS
    if not path.is_file():
        return {}
    with np.load(path) as saved:
        return {key: saved[key] for key in saved.files}


def write_predictions(run_dir: Path, arrays: dict[str, np.ndarray]) -> None:
    """Replace ``predictions.npz`` atomically (a run killed mid-write keeps the old file)."""
    partial = run_dir / (PREDICTIONS + ".partial.npz")
    np.savez(partial, **arrays)
    os.replace(partial, run_dir / PREDICTIONS)


def predictions_step(key: str) -> int | None:
    """N of a ``<set>.step<N>`` key; None for ``<set>.labels``."""
    match = re.fullmatch(r".+\.step(\d+)", key)
    return int(match.group(1)) if match else None


def truncate_predictions(run_dir: Path, step: int) -> None:
    """Drop the evaluations after ``step`` (a resumed run makes them again)."""
    arrays = read_predictions(run_dir)
    kept = {k: v for k, v in arrays.items() if (predictions_step(k) or 0) <= step}
    if kept != arrays:
        write_predictions(run_dir, kept)
