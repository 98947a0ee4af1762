#!/usr/bin/env python
"""A GLUE comparison table in the style of the LoRA paper's Table 2.

    python analysis/glue_table.py runs/ [more dirs] [--csv table.csv]
    python analysis/glue_table.py --wandb ENTITY/PROJECT [--csv table.csv]   # from W&B (online)

One row per method (a variant with its rank, alpha and ``variant.*`` knobs, labelled by those
that differ between its rows; ``--by KEY`` splits by any other config key), one column per task in the
paper's order (MNLI, SST-2, MRPC, CoLA, QNLI, QQP, RTE, STS-B, then any other task), each cell
the task's main metric ×100 as mean ± std over seeds (n = number of seeds when not all rows
have the same count), a trainable-parameter column, and the average over the tasks the row
has. Metrics are the ones each task config names as main_metric (MNLI: matched accuracy,
CoLA: Matthews correlation, STS-B: Pearson, the rest: accuracy, as in the paper).
``--select best`` takes each run's best evaluation instead of its last (the paper reports the
best epoch; the experiment config evaluates every epoch).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from analysis.collect_runs import collect, flatten

PAPER_ORDER = ("mnli", "sst2", "mrpc", "cola", "qnli", "qqp", "rte", "stsb")


def from_wandb(path: str, evaluation: str = "eval") -> list[dict]:
    """Rows like ``collect``'s from the summaries of a W&B project's finished runs."""
    import wandb

    rows = []
    for run in wandb.Api().runs(path):
        summary = dict(run.summary)
        if summary.get("status") != "completed":
            continue
        metric = summary["main_metric"]
        rows.append({**{k: summary.get(k) for k in ("variant", "rank", "alpha", "seed", "task", "trainable_params")},
                     "metric": metric, "value": summary.get(evaluation, summary["eval"])[metric],
                     "config": flatten(dict(run.config))})
    return rows


def method(row: dict, by: Sequence[str] = ()) -> tuple[str, tuple[tuple[str, str], ...]]:
    """What makes a table row: the variant, its rank and alpha, every ``variant.*`` knob of the
    run's config, and the config keys in ``by``. Runs that share all of these are seeds of one
    method; the task's own settings (the paper's per-task learning rate) do not split a row."""
    config = row.get("config", {})
    parts = [("r", row["rank"]), ("alpha", row["alpha"])]
    parts += sorted((k.removeprefix("variant."), v) for k, v in config.items()
                    if k.startswith("variant.") and k != "variant.name")
    parts += [(k, config.get(k)) for k in by]
    return row["variant"], tuple((k, json.dumps(v)) for k, v in parts)


def labels(methods: set[tuple[str, tuple[tuple[str, str], ...]]]) -> dict:
    """A name per method: the variant, plus the settings that differ between its methods."""
    by_variant = defaultdict(list)
    for variant, settings in methods:
        by_variant[variant].append(dict(settings))
    names = {}
    for variant, settings in methods:
        own = dict(settings)
        varying = [k for k in own if len({json.dumps(other.get(k)) for other in by_variant[variant]}) > 1]
        names[(variant, settings)] = " ".join([variant, *(f"{k}={own[k]}" for k in varying)])
    return names


def aggregate(rows: list[dict], by: Sequence[str] = ()) -> tuple[list[str], list[dict]]:
    """(task columns, table rows) with mean/std over seeds per method (see ``method``) × task."""
    cells: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    params: dict[tuple, list[int]] = defaultdict(list)
    for row in rows:
        key = method(row, by)
        cells[key][row["task"]].append(100 * row["value"])
        params[key].append(row["trainable_params"])
    names = labels(set(cells))
    present = {task for per_task in cells.values() for task in per_task}
    tasks = [t for t in PAPER_ORDER if t in present] + sorted(present - set(PAPER_ORDER))
    table = []
    for key, per_task in sorted(cells.items(), key=lambda item: names[item[0]]):
        entry = {"method": names[key], "trainable_params": round(statistics.mean(params[key]))}
        means = []
        for task in tasks:
            values = per_task.get(task)
            if not values:
                entry[task] = None
                continue
            mean = statistics.mean(values)
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            entry[task] = (mean, std, len(values))
            means.append(mean)
        entry["avg"] = statistics.mean(means) if means else None
        table.append(entry)
    return tasks, table


def _cell(value, show_n: bool) -> str:
    if value is None:
        return "–"
    mean, std, n = value
    return f"{mean:.1f} ± {std:.1f}" + (f" (n={n})" if show_n else "")


def markdown(tasks: list[str], table: list[dict]) -> str:
    counts = {v[2] for row in table for t in tasks if (v := row[t]) is not None}
    show_n = len(counts) > 1
    header = ["method", "# trainable params", *tasks, "avg"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table:
        cells = [row["method"], f"{row['trainable_params'] / 1e6:.3f}M", *(_cell(row[t], show_n) for t in tasks),
                 "–" if row["avg"] is None else f"{row['avg']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(path: Path, tasks: list[str], table: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "trainable_params", *[f"{t}_{s}" for t in tasks for s in ("mean", "std", "n")], "avg"])
        for row in table:
            values = []
            for task in tasks:
                values += list(row[task]) if row[task] is not None else ["", "", 0]
            writer.writerow([row["method"], row["trainable_params"], *values, row["avg"]])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("roots", nargs="*", type=Path, help="run directories or folders containing them")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read finished runs from W&B instead (online)")
    parser.add_argument("--select", choices=("final", "best"), default="final",
                        help="final: each run's last evaluation; best: its best one (the paper's protocol)")
    parser.add_argument("--by", action="append", default=[], metavar="KEY",
                        help="also split rows by this config key, e.g. --by trainer.lr (repeatable)")
    parser.add_argument("--csv", type=Path, help="also write the table as CSV")
    args = parser.parse_args(argv)
    if bool(args.roots) == bool(args.wandb):
        print("error: give run folders or --wandb ENTITY/PROJECT (one of the two)", file=sys.stderr)
        return 2
    missing = [str(r) for r in args.roots if not r.is_dir()]
    if missing:
        print(f"error: not a directory: {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        evaluation = "eval_best" if args.select == "best" else "eval"
        rows = from_wandb(args.wandb, evaluation) if args.wandb else collect(args.roots, evaluation)
    except Exception as err:  # W&B raises many types (auth, network, not found)
        print(f"error: could not read runs from W&B {args.wandb!r} ({type(err).__name__}: {err})", file=sys.stderr)
        return 2
    if not rows:
        print("error: no finished runs found", file=sys.stderr)
        return 2
    tasks, table = aggregate(rows, args.by)
    print(markdown(tasks, table))
    if args.csv:
        write_csv(args.csv, tasks, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
