"""How fast a run gets where it gets: its validation curve and the time to reach a level.

A run's validation curve is the ``eval_val/<metric>`` series of its ``metrics.jsonl`` (one value
per evaluation). Two times are read from it, in steps and in epochs (``summary.json``'s
``stopped.epochs`` over ``steps``):

- to 95% of its own best: the first evaluation at or above 0.95 × the curve's maximum, the axis
  on which LoRA-GA, PiSSA and rsLoRA claim faster convergence;
- to a reference level (``compare.py``: the reference method's median best validation value):
  the first evaluation at or above it, or None if the run never gets there.

compare.py puts both in its report and draws the curves (``curves.png``).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from training import rundir

OWN_BEST_SHARE = 0.95


def val_curve(run_dir: Path, metric: str) -> list[tuple[int, float]]:
    """[(step, validation metric)] of a run, in order ([] without metrics.jsonl)."""
    path = run_dir / rundir.METRICS
    if not path.is_file():
        return []
    key = f"eval_val/{metric}"
    records = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return [(r["step"], r[key]) for r in records if key in r]


def first_step_at(curve: list[tuple[int, float]], level: float) -> int | None:
    """The step of the first evaluation at or above ``level`` (None: never)."""
    return next((step for step, value in curve if value >= level), None)


def run_speed(run_dir: Path, metric: str, summary: dict[str, Any], reference_level: float | None) -> dict[str, Any]:
    """The run's best validation value, the steps and epochs to 95% of it and to
    ``reference_level``, the epochs it trained and why it stopped."""
    curve = val_curve(run_dir, metric)
    if not curve:
        return {}
    steps_per_epoch = summary["steps"] / summary["stopped"]["epochs"] if summary.get("stopped") else None
    best = max(value for _, value in curve)
    to_own = first_step_at(curve, OWN_BEST_SHARE * best)
    to_reference = first_step_at(curve, reference_level) if reference_level is not None else None

    def epochs(step: int | None) -> float | None:
        return None if step is None or not steps_per_epoch else step / steps_per_epoch

    stopped = summary.get("stopped") or {}
    return {"best_val": best, "steps_to_own_95": to_own, "epochs_to_own_95": epochs(to_own),
            "steps_to_reference": to_reference, "epochs_to_reference": epochs(to_reference),
            "epochs_trained": stopped.get("epochs"), "stopped_early": stopped.get("reason") == "early_stopping",
            "best_at_last_eval": curve[-1][1] >= best and len(curve) > 1}


def median_or_none(values: list[float | None]) -> float | None:
    """The median of the values, None (never reached) counting as larger than any; None if most are None."""
    ordered = sorted(values, key=lambda v: (v is None, v if v is not None else 0.0))
    middle = ordered[(len(ordered) - 1) // 2] if ordered else None
    if middle is None or len(ordered) % 2:
        return middle
    upper = ordered[len(ordered) // 2]
    return None if upper is None else statistics.mean([middle, upper])


def plot_curves(series: list[tuple[str, str, str, list[tuple[Path, dict[str, Any]]]]], path: Path) -> Path:
    """One panel per task: each method's validation curve against epochs, one line per seed.
    ``series``: (task, method name, metric, [(run dir, summary)])."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(task for task, *_ in series))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.2), squeeze=False)
    colours = {name: f"C{i % 10}" for i, name in enumerate(dict.fromkeys(name for _, name, *_ in series))}
    for ax, task in zip(axes[0], tasks):
        for _, name, metric, runs in (s for s in series if s[0] == task):
            for i, (run_dir, summary) in enumerate(runs):
                curve = val_curve(run_dir, metric)
                if not curve or not summary.get("stopped"):
                    continue
                per_epoch = summary["stopped"]["epochs"] / summary["steps"]
                ax.plot([step * per_epoch for step, _ in curve], [100 * v for _, v in curve], color=colours[name],
                        lw=1, alpha=0.8, label=name if i == 0 else None)
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"validation {metric} ×100")
        ax.set_title(f"{task}: each seed at its method's chosen rate")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
