#!/usr/bin/env python
"""Compare fine-tuning methods the way a reviewer would want: the learning rate chosen on held-out
validation data, several seeds, paired confidence intervals, and the cost of each method.

    python analysis/compare.py runs/sweeps/<study> --out docs/results/glue_minilm
    python analysis/compare.py runs/sweeps/<a> runs/sweeps/<b> --reference dora --at best_val
    python analysis/compare.py --wandb ENTITY/PROJECT --out report/      # summaries only (no bootstrap)

The protocol, per task:
1. Runs are grouped by method: the variant with its rank, alpha and ``variant.*`` knobs, as
   ``glue_table.method`` defines it, except the learning rate, which is what gets selected.
   Runs that failed, or that have no ``val`` split (``task.val_fraction`` unset), are skipped
   and listed with the reason.
2. All runs of a task must share every setting but the method's own (``MAY_DIFFER``): the task
   data (data_dir, val_fraction, example caps), the model, batch size, steps, schedule, precision,
   budget; otherwise the comparison stops and says which key differs (``--allow-mixed`` compares
   them anyway and says so in the report). Two runs of one method, rate and seed are refused too.
3. For each method the learning rate with the highest **median over seeds of the validation
   metric** is chosen; the test metric (the task's ``main`` set: GLUE's dev set) is then reported
   for that learning rate's runs: median (min–max), mean ± std, n seeds. ``--at final`` (default)
   uses each run's last evaluation, ``--at best_val`` the step with its best validation metric.
   ``--select-seed S`` is the two-stage protocol (conf/experiment/glue_minilm_converged.yaml):
   the rate is chosen on seed S's validation metric alone (stage 1 ran the whole grid on that
   seed; stage 2 ran only the chosen rate on the other seeds), and each rate's validation value is
   shown with its standard error (a bootstrap over the validation examples).
4. Each method is compared with ``--reference`` (default lora) by a paired bootstrap over the
   test examples from the saved predictions (``predictions.npz``): every resample draws the same
   examples for both methods and all seeds they share, the statistic is the mean over those seeds
   of (method − reference), its interval covering both the seeds' spread and test-set sampling
   (``paired_bootstrap``). ``--delta median`` reports the difference of the medians over seeds
   instead, the table's headline column, which one failed seed moves little; its interval is
   the bootstrap's percentile interval, over test examples alone.

Writes ``report.md``, ``report.csv``, ``report.json`` and three plots (metric vs trainable
parameters, metric vs step time, and each seed as a dot) into ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf
from scipy import stats

from analysis import convergence
from analysis.collect_runs import flatten
from analysis.glue_table import PAPER_ORDER, labels, run_method
from training import metrics, rundir
from training.metrics import Predictions, higher_is_better

# Config keys that may differ between the runs of one comparison: the method and its rate, the seed,
# and what does not change results. Every other key (data, model, steps, schedule, precision,
# budget...) and the summary's number of steps must be equal within a task.
MAY_DIFFER = ("variant.", "seed", "trainer.lr", "rank", "alpha", "adapter_dropout", "lr_point", "lr_grid.", "lr_grid_of",
              "init_from", "resume", "tracking.", "glue_dir", "trainer.log_every", "trainer.checkpoint_every",
              "trainer.eval_batch_size", "trainer.forgetting.", "skip_completed")
AT = ("final", "best_val")


class CompareError(ValueError):
    """Bad input: reported in one line, exit status 2."""


@dataclass
class Run:
    run_dir: Path | None
    task: str
    method: tuple
    lr: float
    seed: int
    metric: str
    val: float
    test: float
    step: int               # the evaluation reported (last, or best on val)
    summary: dict[str, Any]
    config: dict[str, Any]
    forgetting: float | None = None  # the probe's headline metric at that evaluation (training/forgetting.py)

    def predictions(self, eval_set: str = "main") -> tuple[np.ndarray, np.ndarray] | None:
        """(labels, predicted) on ``eval_set`` (``main``: the test set) at ``step``; None without them."""
        if self.run_dir is None:
            return None
        saved = rundir.read_predictions(self.run_dir)
        scores = saved.get(f"{eval_set}.step{self.step}")
        if scores is None:
            return None
        gold = saved[f"{eval_set}.labels"]
        return gold, Predictions(gold, scores).predicted



@dataclass
class Row:
    """One method on one task at its chosen learning rate."""

    task: str
    method: tuple
    name: str
    lr: float
    runs: list[Run]
    grid: dict[float, float]  # lr -> median val metric over seeds (-inf for a missing or undefined one)
    grid_n: dict[float, int]  # lr -> seeds that completed
    seeds: int                # seeds the method ran with on this task, over all its rates
    delta: dict[str, Any] = field(default_factory=dict)
    grid_se: dict[float, float | None] = field(default_factory=dict)  # --select-seed: lr -> standard error of val
    speed: dict[str, Any] = field(default_factory=dict)  # analysis/convergence.py, over the row's runs

    @property
    def tests(self) -> list[float]:
        return [r.test for r in self.runs]


# ---------------------------------------------------------------- loading

def load_runs(roots: list[Path], at: str) -> tuple[list[Run], list[tuple[str, str]]]:
    """(comparable runs, [(run dir, why skipped)]) below ``roots``."""
    runs, skipped = [], []
    for root in roots:
        for path in sorted(root.rglob(rundir.SUMMARY)):
            try:
                summary = json.loads(path.read_text())
                config_path = path.parent / rundir.CONFIG
                config = flatten(OmegaConf.to_container(OmegaConf.load(config_path))) if config_path.is_file() else {}
                run, why = _run(summary, config, at, path.parent)
            except Exception as err:  # noqa: BLE001  (a half-written or foreign file: skip it, say why)
                run, why = None, f"unreadable ({type(err).__name__}: {err})"
            if run is None:
                skipped.append((str(path.parent), why))
            else:
                runs.append(run)
    return runs, skipped


def load_wandb(project: str, at: str) -> tuple[list[Run], list[tuple[str, str]]]:
    """Runs from a W&B project's summaries and configs (no predictions: no bootstrap)."""
    try:
        import wandb

        found = [(r.id, _plain(r.summary), flatten(_plain(r.config))) for r in wandb.Api().runs(project)]
    except Exception as err:  # noqa: BLE001  (no network, no login, no such project: say so in one line)
        raise CompareError(f"--wandb={project!r}: could not read its runs ({type(err).__name__}: {err})") from None
    runs, skipped = [], []
    for run_id, summary, config in found:
        try:
            run, why = _run(summary, config, at, None)
        except Exception as err:  # noqa: BLE001  (a foreign run's summary: skip it, say why)
            run, why = None, f"unreadable ({type(err).__name__}: {err})"
        if run is None:
            skipped.append((f"wandb:{run_id}", why))
        else:
            runs.append(run)
    return runs, skipped


def _plain(mapping: Any) -> Any:
    """W&B's summary and config (nested mapping objects) as plain dicts."""
    if hasattr(mapping, "items"):
        return {key: _plain(value) for key, value in mapping.items()}
    return mapping


def _run(summary: dict, config: dict, at: str, run_dir: Path | None) -> tuple[Run | None, str]:
    if summary.get("status") != "completed":
        return None, f"status {summary.get('status')!r}: {summary.get('error', '')}".strip()
    if "val" not in (summary.get("eval_extra") or {}):
        return None, "no val split (task.val_fraction unset): its learning rate could only be chosen on the test set"
    metric = summary["main_metric"]
    if not higher_is_better(metric):
        return None, (f"main metric {metric!r} is better lower; the comparison selects and ranks by a metric that is "
                      "better higher (accuracy, F1, Matthews, Pearson, exact_match)")
    if at == "best_val":
        if not summary.get("eval_at_best_val"):
            return None, "no eval_at_best_val in its summary (written by runs since 2026-11-23)"
        chosen = summary["eval_at_best_val"]
        val, test, step = chosen["val"][metric], chosen["test"][metric], chosen["step"]
    else:
        val, test, step = summary["eval_extra"]["val"][metric], summary["eval"][metric], summary["steps"]
    key = run_method(summary, config)
    lr = config.get("trainer.lr") or summary["peak_lr"]  # the rate the run was configured with (with_variant_lr wrote variant.lr there); staged's peak_lr is its first phase's
    planned = (summary.get("stopped") or {}).get("planned_steps", summary["steps"])  # early stopping is the protocol
    probe = summary.get("forgetting") or {}
    measured = probe.get("final" if at == "final" else "at_best_val") or {}
    run = Run(run_dir, summary["task"], key, float(lr), summary["seed"], metric, val, test, step,
              summary, {**config, "steps": planned}, measured.get(probe.get("headline")))
    return run, ""


def check_comparable(runs: list[Run], allow_mixed: bool) -> list[str]:
    """Notes on keys that differ within a task; raises unless ``allow_mixed``."""
    notes = []
    by_task = defaultdict(list)
    for run in runs:
        by_task[run.task].append(run)
    for task, task_runs in by_task.items():
        seen: dict[tuple, Run] = {}
        for run in task_runs:
            twin = seen.setdefault((run.method, run.lr, run.seed), run)
            if twin is not run:
                raise CompareError(f"task {task}: {twin.run_dir} and {run.run_dir} are the same method, lr and seed; "
                                   "pass each sweep once (or move the repeat aside)")
        keys = sorted({k for r in task_runs for k in r.config if not k.startswith(MAY_DIFFER)})
        for key in keys:
            values = sorted({json.dumps(r.config.get(key)) for r in task_runs})
            if len(values) > 1:
                note = f"task {task}: runs differ in {key} ({', '.join(values)})"
                if not allow_mixed:
                    raise CompareError(f"{note}; compare like with like, or pass --allow-mixed")
                notes.append(note)
    return notes


# ---------------------------------------------------------------- selection and statistics

def select(runs: list[Run], select_seed: int | None = None) -> list[Row]:
    """Per task and method, the learning rate with the best median validation metric over seeds
    (ties: the smaller rate); the test metric is never looked at here. A seed that the method ran
    at some rate but that did not complete at this one (it diverged, or failed) counts as the
    worst possible value, as does an undefined metric (NaN: constant predictions), so a rate is
    never chosen on its surviving seeds alone. With ``select_seed``, only that seed's runs choose
    (a rate it did not complete counts as the worst value) and the grid carries their standard errors."""
    groups: dict[tuple, dict[float, list[Run]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        groups[(run.task, run.method)][run.lr].append(run)
    names = labels({m for _, m in groups})
    rows = []
    for (task, key), by_lr in groups.items():
        seeds = len({r.seed for lr_runs in by_lr.values() for r in lr_runs})
        if select_seed is None:
            grid = {lr: _median_val(lr_runs, seeds) for lr, lr_runs in sorted(by_lr.items())}
            grid_n, grid_se = {lr: len(lr_runs) for lr, lr_runs in by_lr.items()}, {}
        else:
            chosen_by = {lr: [r for r in lr_runs if r.seed == select_seed] for lr, lr_runs in sorted(by_lr.items())}
            grid = {lr: _median_val(lr_runs, 1) for lr, lr_runs in chosen_by.items()}
            grid_n = {lr: len(lr_runs) for lr, lr_runs in chosen_by.items()}
            grid_se = {lr: val_standard_error(lr_runs[0]) if lr_runs else None for lr, lr_runs in chosen_by.items()}
        best = max(grid, key=lambda lr: (grid[lr], -lr))
        rows.append(Row(task, key, names[key], best, sorted(by_lr[best], key=lambda r: r.seed), grid,
                        grid_n, seeds if select_seed is None else 1, grid_se=grid_se))
    return sorted(rows, key=lambda row: (_task_order(row.task), row.name))


def val_standard_error(run: Run, resamples: int = 1000) -> float | None:
    """The standard error of a run's reported validation metric: the spread of the metric over
    bootstrap resamples of the validation examples (None without its predictions)."""
    found = run.predictions("val")
    if found is None:
        return None
    gold, predicted = found
    draws = np.random.default_rng(0).integers(0, len(gold), size=(resamples, len(gold)))
    return float(np.nanstd(batch_metric(run.metric, predicted[draws], gold[draws]), ddof=1))


def _median_val(runs: list[Run], seeds: int) -> float:
    values = [-math.inf if math.isnan(r.val) else r.val for r in runs]
    return statistics.median(values + [-math.inf] * (seeds - len(values)))


def _task_order(task: str) -> tuple[int, str]:
    return (PAPER_ORDER.index(task) if task in PAPER_ORDER else len(PAPER_ORDER), task)


def batch_metric(name: str, predicted: np.ndarray, gold: np.ndarray) -> np.ndarray:
    """``name`` over the last axis of (..., n) arrays: training/metrics.py's ``batch_metric``
    (the trainer's numbers); one it does not compute is bad input here."""
    try:
        return metrics.batch_metric(name, predicted, gold)
    except metrics.MetricError as err:
        raise CompareError(str(err)) from None


def paired_bootstrap(metric: str, gold: np.ndarray, method_preds: list[np.ndarray], reference_preds: list[np.ndarray],
                     resamples: int = 2000, confidence: float = 0.95, seed: int = 0,
                     center: str = "mean") -> dict[str, Any]:
    """The mean over seeds of metric(method) − metric(reference) on the test set, and an interval
    that covers both sources of chance: which runs the seeds gave, and which test examples were drawn.
    ``center="median"``: the median over seeds of metric(method) minus that of metric(reference),
    which one failed seed moves no further than to its neighbour's value, with the percentile
    interval of the same paired bootstrap (test examples alone; the seeds' spread is ``per_seed``).

    ``method_preds[i]`` and ``reference_preds[i]`` come from the same seed. With n seeds the
    interval is Δ ± t(ν)·√(s²/n + v): s is the standard deviation of the n per-seed differences,
    v the variance of Δ under a paired bootstrap over test examples (the same resampled examples
    for every prediction array; seeds fixed), and ν the Welch–Satterthwaite degrees of freedom
    (n − 1 when the seeds' spread dominates). With one seed only the percentile bootstrap
    interval is left, and it says nothing about seeds. ``test_low``/``test_high``: the bootstrap
    interval alone."""
    pairs = len(method_preds)

    def statistic(gold, *preds, axis=-1):
        method = np.stack([batch_metric(metric, preds[i], gold) for i in range(pairs)])  # (seeds, resamples)
        reference = np.stack([batch_metric(metric, preds[pairs + i], gold) for i in range(pairs)])
        if center == "median":
            return np.median(method, axis=0) - np.median(reference, axis=0)
        return np.mean(method - reference, axis=0)

    data = (gold, *method_preds, *reference_preds)
    per_seed = [float(batch_metric(metric, m, gold) - batch_metric(metric, r, gold))
                for m, r in zip(method_preds, reference_preds)]
    observed = float(statistic(*data))
    result = stats.bootstrap(data, statistic, paired=True, vectorized=True, n_resamples=resamples,
                             confidence_level=confidence, method="percentile", batch=100,
                             rng=np.random.default_rng(seed))
    test_low, test_high = (float(bound) for bound in result.confidence_interval)
    if pairs > 1 and center == "mean":
        seed_part = np.var(per_seed, ddof=1) / pairs
        test_part = np.var(result.bootstrap_distribution, ddof=1)
        # Welch–Satterthwaite degrees of freedom: n − 1 when the seeds' spread dominates, the
        # normal quantile when it vanishes (the bootstrap variance rests on many resamples).
        dof = (seed_part + test_part) ** 2 * (pairs - 1) / seed_part ** 2 if seed_part > 0 else math.inf
        half = float(stats.t.ppf((1 + confidence) / 2, dof) * np.sqrt(seed_part + test_part))
        low, high = observed - half, observed + half
    else:
        low, high = test_low, test_high
    defined = not (np.isnan(low) or np.isnan(high))  # NaN: some resample's metric undefined (constant scores)
    covers = ("test examples only (one seed)" if pairs == 1 else "seeds and test examples" if center == "mean"
              else "test examples only (the seeds' spread: per_seed)")
    return {"difference": observed, "center": center, "low": low, "high": high, "confidence": confidence,
            "seeds": pairs, "per_seed": per_seed, "test_low": test_low, "test_high": test_high, "covers": covers,
            "excludes_zero": bool(defined and (low > 0 or high < 0))}


def compare_with_reference(rows: list[Row], reference: str, resamples: int, confidence: float,
                           center: str = "mean") -> None:
    """Fill each row's ``delta`` against the reference method's row of its task (``paired_bootstrap``'s ``center``)."""
    for task in {row.task for row in rows}:
        task_rows = [row for row in rows if row.task == task]
        refs = [row for row in task_rows if row.name == reference]
        for row in task_rows:
            row.delta = _delta(row, refs[0] if refs else None, reference, resamples, confidence, center)


def _delta(row: Row, ref: Row | None, reference: str, resamples: int, confidence: float,
           center: str) -> dict[str, Any]:
    if ref is None:
        return {"note": f"no {reference!r} row for this task"}
    if ref is row:
        return {"note": "reference"}
    shared = sorted({r.seed for r in row.runs} & {r.seed for r in ref.runs})
    if not shared:
        return {"note": "no seed in common with the reference"}
    mine, theirs = {r.seed: r for r in row.runs}, {r.seed: r for r in ref.runs}
    if any(r.run_dir is None for r in (*row.runs, *ref.runs)):
        return {"note": "no per-example predictions (W&B keeps summaries only; pass the run dirs)"}
    loaded = [(mine[s].predictions("main"), theirs[s].predictions("main")) for s in shared]
    if any(a is None or b is None for a, b in loaded):
        return {"note": "predictions.npz missing (or not at the reported step)"}
    gold = loaded[0][0][0]
    if any(len(a[0]) != len(gold) or not np.array_equal(a[0], gold) or not np.array_equal(b[0], gold)
           for a, b in loaded):
        return {"note": "test labels differ between runs: not the same test set"}
    return paired_bootstrap(row.runs[0].metric, gold, [a[1] for a, _ in loaded], [b[1] for _, b in loaded],
                            resamples, confidence, center=center)


def add_convergence(rows: list[Row], reference: str) -> None:
    """Each row's ``speed``: per run, the epochs to 95% of its own best validation value and to
    the reference row's median best validation value (``analysis/convergence.py``), and the
    medians over the row's runs (None: most never got there)."""
    for row in rows:
        if any(r.run_dir is None for r in row.runs):
            continue
        ref = next((other for other in rows if other.task == row.task and other.name == reference), None)
        level = None
        if ref is not None and all(r.run_dir is not None for r in ref.runs):
            bests = [convergence.val_curve(r.run_dir, r.metric) for r in ref.runs]
            level = statistics.median(max(v for _, v in curve) for curve in bests) if all(bests) else None
        per_run = [convergence.run_speed(r.run_dir, r.metric, r.summary, level) for r in row.runs]
        if not all(per_run):
            continue
        row.speed = {"reference_level": level, "runs": per_run,
                     **{key: convergence.median_or_none([p[key] for p in per_run])
                        for key in ("best_val", "epochs_to_own_95", "epochs_to_reference", "epochs_trained")},
                     "stopped_early": sum(p["stopped_early"] for p in per_run),
                     "best_at_last_eval": sum(p["best_at_last_eval"] for p in per_run)}


# ---------------------------------------------------------------- report

def costs(row: Row) -> dict[str, Any]:
    """Trainable parameters (the method's, without the head, and % of the model), adapter size on
    disk, median step time and peak memory over the row's runs."""
    def median_of(key: str) -> float | None:
        values = [r.summary.get(key) for r in row.runs if r.summary.get(key) is not None]
        return statistics.median(values) if values else None

    summary = row.runs[0].summary
    # AdaLoRA under a budget: its count at the final rank (what the budget equalises), not the start's 1.5x
    params = (summary.get("budget") or {}).get("method_params") or summary.get("method_params")
    return {"method_params": params,
            "method_percent": 100 * params / summary["total_params"] if params is not None else None,
            "trainable_params": summary.get("trainable_params"), "adapter_mb": median_of("adapter_mb"),
            "step_time_s": median_of("step_time_s"), "peak_memory_mb": median_of("peak_memory_mb"),
            "peak_memory_kind": summary.get("peak_memory_kind")}


def record(row: Row) -> dict[str, Any]:
    tests = row.tests
    return {"task": row.task, "method": row.name, "metric": row.runs[0].metric, "lr": row.lr,
            "val_median": row.grid[row.lr], "test_median": statistics.median(tests), "test_min": min(tests),
            "test_max": max(tests), "test_mean": statistics.mean(tests),
            "test_std": statistics.stdev(tests) if len(tests) > 1 else 0.0, "seeds": [r.seed for r in row.runs],
            "n": len(tests), "lr_grid": {f"{lr:g}": v if math.isfinite(v) else None for lr, v in row.grid.items()},
            "lr_grid_n": {f"{lr:g}": n for lr, n in row.grid_n.items()}, "seeds_run": row.seeds,
            "lr_grid_se": {f"{lr:g}": se for lr, se in row.grid_se.items()},
            "lr_at_grid_edge": len(row.grid) > 1 and row.lr in (min(row.grid), max(row.grid)),
            "runs": [str(r.run_dir) for r in row.runs if r.run_dir is not None], **forgetting(row),
            **costs(row), "vs_reference": row.delta, "convergence": row.speed}


def forgetting(row: Row) -> dict[str, Any]:
    """The forgetting probe's headline metric, median over the row's runs that measured it; none
    where they measured it on different inputs (the probe's settings differ between them)."""
    measured = [r for r in row.runs if r.forgetting is not None]
    if len({r.summary["forgetting"]["measure"] for r in measured}) > 1:
        return {"forgetting": None, "forgetting_metric": "mixed (different probe inputs)", "forgetting_n": 0}
    return {"forgetting": statistics.median(r.forgetting for r in measured) if measured else None,
            "forgetting_metric": measured[0].summary["forgetting"]["headline"] if measured else None,
            "forgetting_n": len(measured)}


def _forgetting_text(r: dict) -> str:
    """The median, with how many of the row's runs measured it where not all did."""
    if r["forgetting"] is None:
        return "–"
    return f"{r['forgetting']:.4f}" + ("" if r["forgetting_n"] == r["n"] else f" ({r['forgetting_n']}/{r['n']})")


def _delta_text(delta: dict[str, Any]) -> str:
    if "note" in delta:
        return delta["note"]
    if np.isnan(delta["low"]):
        return f"{100 * delta['difference']:+.1f} [interval undefined]"
    mark = " *" if delta["excludes_zero"] else ""
    seeds = ", ".join(f"{100 * d:+.1f}" for d in delta["per_seed"])
    return f"{100 * delta['difference']:+.1f} [{100 * delta['low']:+.1f}, {100 * delta['high']:+.1f}]{mark} ({seeds})"


def _delta_method(args: argparse.Namespace, level: int) -> str:
    """How the Δ column was computed (``--delta``), for the report's first paragraph."""
    if args.delta == "median":
        return (f"the median over shared seeds of the method's test metric minus the reference's [{level}% "
                f"percentile interval of a paired bootstrap over test examples ({args.resamples} resamples), "
                "the seeds held fixed: it does not cover which seeds were run, the per-seed differences show that]")
    return (f"mean over shared seeds of the paired difference [{level}% interval: Δ ± t(ν)·√(s²/n + v), s the "
            f"spread of the per-seed differences, v the variance of Δ in a paired bootstrap over test examples "
            f"({args.resamples} resamples), ν Welch–Satterthwaite's degrees of freedom; with one seed, the "
            "bootstrap interval alone]")


def _number(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def markdown(records: list[dict], skipped: list[tuple[str, str]], notes: list[str], args: argparse.Namespace) -> str:
    at = "each run's last evaluation" if args.at == "final" else "each run's step with the best validation metric"
    level = round(100 * args.confidence)
    chosen_by = ("the median over seeds of the validation metric" if args.select_seed is None else
                 f"seed {args.select_seed}'s validation metric alone (stage 1 of two: the grid on that seed, then the "
                 "chosen rate on the other seeds; ± its bootstrap standard error over validation examples)")
    lines = [
        "# Method comparison", "",
        (f"Learning rate chosen per method and task by {chosen_by} "
         f"(held out of the training set); test = the task's reported set (GLUE dev), at {at}. Metric ×100: "
         f"median (min–max) and mean ± std over seeds. Δ vs {args.reference}: {_delta_method(args, level)}; "
         "* = the interval excludes 0; then each seed's difference. "
         "Params: what the method trains without the task head (AdaLoRA: at its starting rank, or at its final "
         "rank under a budget; staged: its LoRA phase, after a full phase that trains every weight)."), "",
    ]
    lines += [f"Note: {note}" for note in notes]
    tasks = sorted({r["task"] for r in records}, key=_task_order)
    lines += headline(records, tasks) + [""]
    if len(tasks) > 1:
        lines += ["Learning rate chosen on validation, per method and task:", ""] + chosen_rates(records, tasks) + [""]
    for task in tasks:
        rows = [r for r in records if r["task"] == task]
        probe = next((r["forgetting_metric"] for r in rows if r["forgetting_metric"]), None)
        lines += [f"## {task} ({rows[0]['metric']})", "",
                  "| method | lr | val | test median (min–max) | mean ± std | n | Δ vs " + args.reference
                  + " | params (%) | adapter MB | step s | peak MB |" + (f" forgetting ({probe}) |" if probe else ""),
                  "|" + "---|" * (12 if probe else 11)]
        for r in rows:
            lines.append(
                f"| {r['method']} | {r['lr']:g} | {100 * r['val_median']:.1f} | {100 * r['test_median']:.1f} "
                f"({100 * r['test_min']:.1f}–{100 * r['test_max']:.1f}) | {100 * r['test_mean']:.1f} ± "
                f"{100 * r['test_std']:.1f} | {r['n']} | {_delta_text(r['vs_reference'])} | "
                f"{_params(r)} | {_number(r['adapter_mb'], '.2f')} | {_number(r['step_time_s'], '.3f')} | "
                f"{_number(r['peak_memory_mb'], '.0f')} |" + (f" {_forgetting_text(r)} |" if probe else ""))
        lines += ["", ("Validation median per learning rate" if args.select_seed is None else
                       f"Validation metric of seed {args.select_seed} per learning rate")
                  + " (the selection; chosen in bold):", "",
                  "| method | " + " | ".join(_grid_columns(rows)) + " |", "|" + "---|" * (1 + len(_grid_columns(rows)))]
        for r in rows:
            lines.append(f"| {r['method']} | " + " | ".join(_grid_cell(r, lr) for lr in _grid_columns(rows)) + " |")
        lines += _convergence_table(rows, args.reference)
        edge = [f"{r['method']} ({r['lr']:g})" for r in rows if r["lr_at_grid_edge"]]
        if edge:
            lines += ["", "Chosen at the edge of the grid (a better rate may lie beyond it): " + ", ".join(edge) + "."]
        lines.append("")
    if skipped:
        lines += ["## Skipped runs", ""] + [f"- `{where}`: {why}" for where, why in skipped] + [""]
    return "\n".join(lines)


def _convergence_table(rows: list[dict], reference: str) -> list[str]:
    """Per method: how far and how fast its runs got on validation, and how they ended."""
    rows = [r for r in rows if r["convergence"]]
    if not rows:
        return []
    level = next((r["convergence"]["reference_level"] for r in rows if r["convergence"]["reference_level"]), None)
    reach = f"epochs to {reference}'s best val ({_number(level and 100 * level, '.1f')})"
    lines = ["", "Convergence on validation (medians over seeds; – = most runs never got there):", "",
             (f"| method | best val | epochs to 95% of own best | {reach} | epochs trained | stopped early | "
              "best at the last evaluation |"), "|" + "---|" * 7]
    for r in rows:
        c, n = r["convergence"], r["n"]
        lines.append(f"| {r['method']} | {100 * c['best_val']:.1f} | {_number(c['epochs_to_own_95'], '.1f')} | "
                     f"{_number(c['epochs_to_reference'], '.1f')} | {_number(c['epochs_trained'], '.1f')} | "
                     f"{c['stopped_early']}/{n} | {c['best_at_last_eval']}/{n} |")
    return lines


def headline(records: list[dict], tasks: list[str]) -> list[str]:
    """Methods × tasks: test median (min–max) at the chosen learning rate, and the average."""
    methods = sorted({r["method"] for r in records})
    cell = {(r["method"], r["task"]): r for r in records}
    lines = ["| method | " + " | ".join(tasks) + " | avg |", "|" + "---|" * (len(tasks) + 2)]
    for name in methods:
        found = [cell.get((name, t)) for t in tasks]
        texts = ["–" if r is None else f"{100 * r['test_median']:.1f} ({100 * r['test_min']:.1f}–{100 * r['test_max']:.1f})"
                 for r in found]
        medians = [100 * r["test_median"] for r in found if r is not None]
        average = f"{statistics.mean(medians):.1f}" if len(medians) == len(tasks) else "–"
        lines.append(f"| {name} | " + " | ".join(texts) + f" | {average} |")
    return lines


def chosen_rates(records: list[dict], tasks: list[str]) -> list[str]:
    """Methods × tasks: the learning rate each task's validation median chose."""
    cell = {(r["method"], r["task"]): r["lr"] for r in records}
    lines = ["| method | " + " | ".join(tasks) + " |", "|" + "---|" * (len(tasks) + 1)]
    for name in sorted({r["method"] for r in records}):
        lines.append(f"| {name} | " + " | ".join(f"{cell[name, t]:g}" if (name, t) in cell else "–" for t in tasks)
                     + " |")
    return lines


def _grid_cell(r: dict, lr: str) -> str:
    """The validation median at one rate; (k/n) when only k of the method's n seeds completed
    there (the others count as the worst value); "failed" when no median could be formed."""
    if lr not in r["lr_grid"]:
        return "–"
    value, se = r["lr_grid"][lr], r.get("lr_grid_se", {}).get(lr)
    text = "failed" if value is None else f"{100 * value:.1f}" + ("" if se is None else f" ± {100 * se:.1f}")
    if lr == f"{r['lr']:g}":
        text = f"**{text}**"
    done = r["lr_grid_n"][lr]
    return text if done == r["seeds_run"] else f"{text} ({done}/{r['seeds_run']})"


def _grid_columns(rows: list[dict]) -> list[str]:
    return sorted({lr for r in rows for lr in r["lr_grid"]}, key=float)


def _params(r: dict) -> str:
    if r["method_params"] is None:
        return "–"
    return f"{r['method_params'] / 1e6:.3f}M ({r['method_percent']:.2f}%)"


def write_csv(path: Path, records: list[dict]) -> None:
    columns = ["task", "method", "metric", "lr", "val_median", "test_median", "test_min", "test_max", "test_mean",
               "test_std", "n", "delta", "delta_low", "delta_high", "delta_per_seed", "lr_at_grid_edge", "method_params",
               "method_percent", "adapter_mb", "step_time_s", "peak_memory_mb", "forgetting", "forgetting_metric", "forgetting_n"]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for r in records:
            delta = r["vs_reference"]
            per_seed = " ".join(f"{d:+.4f}" for d in delta.get("per_seed", []))
            writer.writerow({**r, "delta": delta.get("difference"), "delta_low": delta.get("low"),
                             "delta_high": delta.get("high"), "delta_per_seed": per_seed})


def plot(records: list[dict], runs: list[Run], rows: list[Row], out: Path) -> list[Path]:
    """metric vs trainable parameters, metric vs step time (median, min–max bars), and each seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in records}, key=_task_order)
    written = []
    for name, x_key, x_label in (("pareto_params.png", "method_params", "trainable parameters (without head)"),
                                 ("pareto_step_time.png", "step_time_s", "median step time (s)")):
        fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.8), squeeze=False)
        for ax, task in zip(axes[0], tasks):
            for r in (r for r in records if r["task"] == task and r[x_key] is not None):
                y = 100 * r["test_median"]
                ax.errorbar(r[x_key], y, yerr=[[y - 100 * r["test_min"]], [100 * r["test_max"] - y]], fmt="o", capsize=3)
                ax.annotate(r["method"], (r[x_key], y), fontsize=7, xytext=(3, 3), textcoords="offset points")
            ax.set_xscale("symlog", linthresh=1) if x_key == "method_params" else ax.set_xscale("log")  # head: 0
            ax.set_xlabel(x_label)
            ax.set_title(f"{task} ({records[0]['metric'] if len(tasks) == 1 else _metric(records, task)})")
        axes[0][0].set_ylabel("test metric ×100 (median, min–max over seeds)")
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        written.append(out / name)
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        task_rows = [row for row in rows if row.task == task]
        for i, row in enumerate(task_rows):
            ax.scatter([i] * len(row.runs), [100 * t for t in row.tests], s=14)
            ax.hlines(100 * statistics.median(row.tests), i - 0.3, i + 0.3, color="black")
        ax.set_xticks(range(len(task_rows)), [row.name for row in task_rows], rotation=60, ha="right", fontsize=7)
        ax.set_title(f"{task} ({_metric(records, task)}): each seed, chosen lr")
    axes[0][0].set_ylabel("test metric ×100")
    fig.tight_layout()
    fig.savefig(out / "seeds.png", dpi=120)
    plt.close(fig)
    return written + [out / "seeds.png"]


def _metric(records: list[dict], task: str) -> str:
    return next(r["metric"] for r in records if r["task"] == task)


# ---------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("roots", nargs="*", type=Path, help="sweep or run directories")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read finished runs from W&B instead (online)")
    parser.add_argument("--out", type=Path, default=Path("comparison"), help="where the report goes")
    parser.add_argument("--reference", default="lora", help="the method every other is compared with (a row name)")
    parser.add_argument("--at", choices=AT, default="final", help="final: last evaluation; best_val: best on val")
    parser.add_argument("--delta", choices=("mean", "median"), default="mean",
                        help="mean: the mean of the per-seed paired differences, its interval covering seeds and "
                             "test examples; median: the difference of the medians over seeds (one failed seed "
                             "moves it little), its interval over test examples only")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples")
    parser.add_argument("--confidence", type=float, default=0.95, help="interval level")
    parser.add_argument("--allow-mixed", action="store_true", help="compare runs that differ in data, model or steps")
    parser.add_argument("--select-seed", type=int, default=None, metavar="S",
                        help="two-stage selection: choose each rate on seed S's validation metric alone")
    args = parser.parse_args(argv)
    try:
        report = run(args)
    except CompareError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report)
    return 0


def run(args: argparse.Namespace) -> str:
    if bool(args.roots) == bool(args.wandb):
        raise CompareError("give run folders or --wandb ENTITY/PROJECT (one of the two)")
    if not 0 < args.confidence < 1 or args.resamples < 1:
        raise CompareError(f"--confidence={args.confidence} must be in (0, 1) and --resamples={args.resamples} >= 1")
    missing = [str(r) for r in args.roots if not r.is_dir()]
    if missing:
        raise CompareError(f"roots: not a directory: {', '.join(missing)}")
    runs, skipped = load_wandb(args.wandb, args.at) if args.wandb else load_runs(args.roots, args.at)
    if not runs:
        where = args.wandb or ", ".join(map(str, args.roots))
        raise CompareError(f"roots: no completed run with a val split below {where} "
                           f"({len(skipped)} skipped); allowed: sweep or run dirs of runs with task.val_fraction set")
    notes = check_comparable(runs, args.allow_mixed)
    rows = select(runs, args.select_seed)
    if args.reference not in {row.name for row in rows}:
        raise CompareError(f"--reference={args.reference!r} is not a method here; allowed: "
                           f"{', '.join(sorted({row.name for row in rows}))}")
    compare_with_reference(rows, args.reference, args.resamples, args.confidence, args.delta)
    add_convergence(rows, args.reference)
    records = [record(row) for row in rows]
    args.out.mkdir(parents=True, exist_ok=True)
    text = markdown(records, skipped, notes, args)
    (args.out / "report.md").write_text(text + "\n")
    write_csv(args.out / "report.csv", records)
    (args.out / "report.json").write_text(json.dumps(
        {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                      if k != "roots"} | {"roots": [str(r) for r in args.roots]},
         "notes": notes, "skipped": [{"run": w, "why": y} for w, y in skipped], "rows": records}, indent=2) + "\n")
    plot(records, runs, rows, args.out)
    series = [(row.task, row.name, row.runs[0].metric, [(r.run_dir, r.summary) for r in row.runs])
              for row in rows if row.speed]
    if series:
        convergence.plot_curves(series, args.out / "curves.png")
    return text


if __name__ == "__main__":
    sys.exit(main())
