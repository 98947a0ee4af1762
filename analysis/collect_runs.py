#!/usr/bin/env python
"""List finished runs side by side, one row per run directory, from their summary.json files.

    python analysis/collect_runs.py runs/                 # every run below runs/
    python analysis/collect_runs.py runs/sweeps/<sweep> --csv sweep.csv

Prints a Markdown table (variant, rank, alpha, seed, task, main metric: at step 0 when the run
evaluated before training (``trainer.eval_at_start``) and at its last evaluation, trainable params,
median step time, peak memory, run dir); ``--csv`` also writes the rows as CSV.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from omegaconf import OmegaConf

import variants
from training import rundir

COLUMNS = ("variant", "rank", "alpha", "seed", "task", "metric", "start", "value", "trainable_params",
           "step_time_s", "peak_memory_mb", "run_dir")


def flatten(config: dict, prefix: str = "") -> dict[str, object]:
    """``{"variant": {"lr": 1e-3}}`` → ``{"variant.lr": 1e-3}``; lists stay values."""
    flat: dict[str, object] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def summary_row(summary: dict, evaluation: str = "eval") -> dict:
    """The fields of one completed run's summary that tables use. ``evaluation``: ``eval`` (the
    last evaluation) or ``eval_best`` (the best one); ``extra`` holds the other eval sets' main
    metric at the same evaluation (MNLI mismatched). ``method_params`` is what the method trains
    without the task head (runs from before it was recorded: all trainable parameters)."""
    metric = summary["main_metric"]
    extra_key = "eval_extra_best" if evaluation == "eval_best" else "eval_extra"
    return {
        **{k: summary.get(k) for k in ("variant", "rank", "alpha", "seed", "task", "trainable_params")},
        "method_params": summary.get("method_params", summary.get("trainable_params")),
        "head_params": summary.get("head_params"),
        "metric": metric,
        "value": summary.get(evaluation, summary["eval"])[metric],
        "start": (summary.get("eval_at_start") or {}).get(metric),  # before training, if evaluated at step 0
        "extra": {name: sets[metric] for name, sets in (summary.get(extra_key) or {}).items() if metric in sets},
    }


def collect(roots: list[Path], evaluation: str = "eval") -> list[dict]:
    """One row per completed run's summary.json below ``roots`` (failed runs are skipped), with
    ``summary_row``'s fields. Baselines have rank and alpha None. ``config`` holds the run's
    resolved config.yaml, flattened, so tables can tell apart runs that differ in more than the
    seed."""
    rows = []
    for root in roots:
        for path in sorted(root.rglob(rundir.SUMMARY)):
            try:
                summary = rundir.read_summary(path.parent)
            except rundir.UnreadableSummary as err:
                print(f"skipped: {err}; counted as not completed", file=sys.stderr)
                continue
            if summary.get("status") != "completed":
                continue
            config_path = path.parent / rundir.CONFIG
            row = summary_row(summary, evaluation)
            rows.append({
                **row,
                "value": round(row["value"], 4),
                "start": "" if row["start"] is None else round(row["start"], 4),
                "step_time_s": round(summary["step_time_s"], 4),
                "peak_memory_mb": round(summary["peak_memory_mb"]),
                "run_dir": str(path.parent),
                "config": flatten(OmegaConf.to_container(OmegaConf.load(config_path)) or {}) if config_path.is_file() else {},
            })
    return rows


def caveats(*run_dirs: Path, analysis: str) -> dict[str, str]:
    """{variant: why} for the runs' variants whose numbers in ``analysis`` are not comparable
    with LoRA's (``Variant.analysis_caveats``)."""
    notes = {}
    for run_dir in run_dirs:
        name = variants.read_adapter_config(run_dir / rundir.ADAPTER).get("variant")
        if name in variants.VARIANTS and analysis in variants.get_variant(name).analysis_caveats:
            notes[name] = variants.get_variant(name).analysis_caveats[analysis]
    return notes


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(row[c]) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("roots", nargs="+", type=Path, help="run directories or folders containing them")
    parser.add_argument("--csv", type=Path, help="also write the rows to this CSV file")
    args = parser.parse_args(argv)
    missing = [str(r) for r in args.roots if not r.is_dir()]
    if missing:
        print(f"error: not a directory: {', '.join(missing)}", file=sys.stderr)
        return 2
    rows = collect(args.roots)
    if not rows:
        print(f"error: no {rundir.SUMMARY} below {', '.join(map(str, args.roots))}", file=sys.stderr)
        return 2
    print(markdown(rows))
    if args.csv:
        with args.csv.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
