"""The files of a run directory, named in one place, and the small writers that touch them.

    config.yaml            the fully resolved config
    metrics.jsonl          one JSON record per log/eval step (the W&B keys)
    summary.json           the run's results, or ``"status": "failed"`` and the error
    adapter.safetensors    what trained, with the metadata to rebuild the model
    checkpoint.pt          the training checkpoint while the run is unfinished
    run.log, .hydra/       Hydra's log and the unresolved config and overrides
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
ADAPTER = "adapter.safetensors"
CHECKPOINT = "checkpoint.pt"
LOG = "run.log"
HYDRA_OVERRIDES = Path(".hydra") / "overrides.yaml"


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
