#!/usr/bin/env python
"""A GLUE comparison table in the style of the LoRA paper's Table 2.

    python analysis/glue_table.py runs/ [more dirs] [--csv table.csv]
    python analysis/glue_table.py runs/ --paper          # the paper's convention (below)
    python analysis/glue_table.py --wandb ENTITY/PROJECT [--csv table.csv]   # from W&B (online)

One row per method (a variant with its rank, alpha and ``variant.*`` knobs, labelled by those
that differ between its rows; ``--by KEY`` splits by any other config key), one column per task in the
paper's order (MNLI, SST-2, MRPC, CoLA, QNLI, QQP, RTE, STS-B, then any other task; MNLI's
mismatched dev set as its own column, ``mnli-mm``), each cell the task's main metric ×100 over
seeds (n = number of seeds when not all cells have the same count), and the average over the
tasks the row has (main dev sets only). Metrics are the ones each task config names as
main_metric (MNLI: accuracy, CoLA: Matthews correlation, STS-B: Pearson, the rest: accuracy,
as in the paper). ``# params`` is what the method trains without the task head (the paper's
column: LoRA's 0.3M on RoBERTa-base), ``# head`` the head's share.

``--stat mean`` (default): mean ± std over seeds. ``--stat median``: median (min–max).
``--select best`` takes each run's best evaluation instead of its last. ``--paper`` is the LoRA
paper's convention, both at once: the median over seeds (5 in the paper) of each run's best
epoch. The best epoch is chosen on the same dev set that is reported, so it is optimistic; the
printed caption says which convention a table uses.
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
from typing import Any

from analysis.collect_runs import collect, flatten, summary_row

PAPER_ORDER = ("mnli", "mnli-mm", "sst2", "mrpc", "cola", "qnli", "qqp", "rte", "stsb")
EXTRA_COLUMN = {"mismatched": "mm"}  # eval set name -> column suffix
STATS = ("mean", "median")


def from_wandb(path: str, evaluation: str = "eval") -> list[dict]:
    """Rows like ``collect``'s from the summaries of a W&B project's finished runs."""
    import wandb

    rows = []
    for run in wandb.Api().runs(path):
        summary = dict(run.summary)
        if summary.get("status") != "completed":
            continue
        rows.append({**summary_row(summary, evaluation), "config": flatten(dict(run.config))})
    return rows


def method(row: dict, by: Sequence[str] = ()) -> tuple[str, tuple[tuple[str, str], ...]]:
    """What makes a table row: the variant, its rank and alpha, every ``variant.*`` knob of the
    run's config, whether it started from another run's adapters (``init_from``), and the config
    keys in ``by``. Runs that share all of these are seeds of one
    method; the task's own settings (the paper's per-task learning rate) do not split a row."""
    config = row.get("config", {})
    knobs = {k.removeprefix("variant."): v for k, v in config.items() if k.startswith("variant.") and k != "variant.name"}
    # a run from before a knob existed ran at its default: counted so, it is a seed of the same method
    knobs = {**_setting_defaults(row["variant"]), **knobs}
    parts = [("r", row["rank"]), ("alpha", row["alpha"])]
    parts += sorted(knobs.items())
    parts += [("warm_start", bool(config.get("init_from")))]  # init_from: started from another run's adapters
    parts += [(k, config.get(k)) for k in by]
    return row["variant"], tuple((k, _text(v)) for k, v in parts)


def run_method(summary: dict, config: dict) -> tuple[str, tuple[tuple[str, str], ...]]:
    """``method`` of one run from its summary and flattened config; the learning rate
    (``variant.lr``) is left out: it is what a comparison selects, not what makes the method."""
    return method({"variant": summary["variant"], "rank": summary["rank"], "alpha": summary["alpha"],
                   "config": {k: v for k, v in config.items() if k != "variant.lr"}})


def _text(value: Any) -> str:
    """A setting as text, numbers by value: alpha 16 and 16.0 (a float field of the schema) are one."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return json.dumps(value)


def _setting_defaults(variant: str) -> dict:
    """The variant's setting defaults, and ``bias`` (a runner key that configs written before the
    schema completed them leave out for the variants that do not set it); ({} but ``bias`` for a
    variant this checkout does not know)."""
    import variants
    from schema import ConfigError
    from schema.variant import VariantKeys

    try:
        return {"bias": VariantKeys().bias, **variants.get_variant(variant).setting_defaults()}
    except ConfigError:
        return {"bias": VariantKeys().bias}


def labels(methods: set[tuple[str, tuple[tuple[str, str], ...]]]) -> dict:
    """A name per method: the variant, plus the settings that differ between its methods, except a
    knob at its default (LoRA and LoRA+ are ``lora`` and ``lora lr_ratio=16``). Names stay unique:
    two methods that differ in a knob cannot both hold its default."""
    by_variant = defaultdict(list)
    for variant, settings in methods:
        by_variant[variant].append(dict(settings))
    names = {}
    for variant, settings in methods:
        own = dict(settings)
        defaults = {k: _text(v) for k, v in _setting_defaults(variant).items()}
        varying = [k for k in own if len({other.get(k) for other in by_variant[variant]}) > 1
                   and own[k] != defaults.get(k)]
        names[(variant, settings)] = " ".join([variant, *(f"{k}={own[k]}" for k in varying)])
    return names


def columns(row: dict) -> list[tuple[str, float]]:
    """(column, value ×100) of one run: its task's main dev set, and each other dev set."""
    task = row["task"]
    return [(task, 100 * row["value"])] + [
        (f"{task}-{EXTRA_COLUMN.get(name, name)}", 100 * value) for name, value in row.get("extra", {}).items()]


def summarise(values: list[float], stat: str) -> tuple:
    """mean: (mean, std, n); median: (median, min, max, n)."""
    if stat == "median":
        return statistics.median(values), min(values), max(values), len(values)
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)


def aggregate(rows: list[dict], by: Sequence[str] = (), stat: str = "mean") -> tuple[list[str], list[dict]]:
    """(task columns, table rows): each method (see ``method``) × column summarised over seeds."""
    cells: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    params: dict[tuple, list[tuple[int, int | None]]] = defaultdict(list)
    main_columns = set()
    for row in rows:
        key = method(row, by)
        for column, value in columns(row):
            cells[key][column].append(value)
        main_columns.add(row["task"])
        params[key].append((row.get("method_params", row["trainable_params"]), row.get("head_params")))
    names = labels(set(cells))
    present = {column for per_task in cells.values() for column in per_task}
    tasks = [t for t in PAPER_ORDER if t in present] + sorted(present - set(PAPER_ORDER))
    table = []
    for key, per_task in sorted(cells.items(), key=lambda item: names[item[0]]):
        heads = [h for _, h in params[key] if h is not None]
        entry = {"method": names[key], "method_params": round(statistics.mean(p for p, _ in params[key])),
                 "head_params": round(statistics.mean(heads)) if heads else None}
        for task in tasks:
            entry[task] = summarise(per_task[task], stat) if per_task.get(task) else None
        centers = [entry[t][0] for t in tasks if t in main_columns and entry[t] is not None]
        entry["avg"] = statistics.mean(centers) if centers else None
        table.append(entry)
    return tasks, table


def _cell(value, show_n: bool) -> str:
    if value is None:
        return "–"
    if len(value) == 4:
        center, low, high, n = value
        text = f"{center:.1f} ({low:.1f}–{high:.1f})"
    else:
        center, std, n = value
        text = f"{center:.1f} ± {std:.1f}"
    return text + (f" (n={n})" if show_n else "")


def _millions(count: int | None) -> str:
    return "–" if count is None else f"{count / 1e6:.3f}M"


def caption(stat: str, select: str) -> str:
    evaluation = ("each run's best evaluation on the dev set (best epoch, as the LoRA paper; chosen on the "
                  "reported set, so optimistic)" if select == "best" else "each run's last evaluation")
    spread = "median (min–max)" if stat == "median" else "mean ± std"
    return (f"Cells: {spread} over seeds of {evaluation}, ×100. # params: what the method trains without the "
            "task head; # head: the head's share.")


def markdown(tasks: list[str], table: list[dict]) -> str:
    counts = {v[-1] for row in table for t in tasks if (v := row[t]) is not None}
    show_n = len(counts) > 1
    header = ["method", "# params", "# head", *tasks, "avg"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table:
        cells = [row["method"], _millions(row["method_params"]), _millions(row["head_params"]),
                 *(_cell(row[t], show_n) for t in tasks), "–" if row["avg"] is None else f"{row['avg']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(path: Path, tasks: list[str], table: list[dict], stat: str = "mean") -> None:
    parts = ("median", "min", "max", "n") if stat == "median" else ("mean", "std", "n")
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "method_params", "head_params", *[f"{t}_{s}" for t in tasks for s in parts], "avg"])
        for row in table:
            values = []
            for task in tasks:
                values += list(row[task]) if row[task] is not None else [""] * (len(parts) - 1) + [0]
            writer.writerow([row["method"], row["method_params"], row["head_params"], *values, row["avg"]])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("roots", nargs="*", type=Path, help="run directories or folders containing them")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read finished runs from W&B instead (online)")
    parser.add_argument("--select", choices=("final", "best"), default="final",
                        help="final: each run's last evaluation; best: its best one (the paper's protocol)")
    parser.add_argument("--stat", choices=STATS, default="mean",
                        help="mean: mean ± std over seeds; median: median (min–max)")
    parser.add_argument("--paper", action="store_true",
                        help="the LoRA paper's convention: --select best --stat median")
    parser.add_argument("--by", action="append", default=[], metavar="KEY",
                        help="also split rows by this config key, e.g. --by trainer.lr (repeatable)")
    parser.add_argument("--csv", type=Path, help="also write the table as CSV")
    args = parser.parse_args(argv)
    if args.paper:
        args.select, args.stat = "best", "median"
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
    except Exception as err:  # noqa: BLE001  (W&B raises many types: auth, network, not found)
        print(f"error: could not read runs from W&B {args.wandb!r} ({type(err).__name__}: {err})", file=sys.stderr)
        return 2
    if not rows:
        print("error: no finished runs found", file=sys.stderr)
        return 2
    tasks, table = aggregate(rows, args.by, args.stat)
    print(markdown(tasks, table))
    print()
    print(caption(args.stat, args.select))
    if args.csv:
        write_csv(args.csv, tasks, table, args.stat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
