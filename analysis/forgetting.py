#!/usr/bin/env python
"""What each run learned against what it forgot: one dot per run (method and seed), per task, as
Biderman et al. 2024 ("LoRA Learns Less and Forgets Less", Fig. 1) plot target performance
against forgetting.

    python analysis/forgetting.py SWEEP_OR_RUN [...] [--at final|best_val] [--measure] [--out DIR]

Forgetting is training/forgetting.py's probe, read from each run's summary.json (``forgetting``,
recorded during training: encoders, 1 − CKA of the representation before and after; causal LMs,
the change in loss on text outside the task), at the evaluation ``--at`` names: the last
(``final``) or the one with the best validation metric (``best_val``). The learned side is the
task's main metric on its reported set at that same evaluation.

``--measure`` computes the probe from the run's saved weights instead (for runs trained before
the probe existed, or with trainer.forgetting.measure=false): the base model as the adapter
file's metadata names it against the trained model (``adapter.safetensors`` for ``final``,
``adapter_best.safetensors`` for ``best_val``), on the probe's inputs rebuilt from the run's
config.yaml (its data must be where that config says), on the CPU at the run's precision. Where
it differs from the probe during training: the reference is the pretrained model itself, so
QLoRA's is the unquantized base (its 4-bit rounding counts as drift) and a run started from
another's adapters (``init_from``) is measured from the pretrained model, not from that start;
a run trained on a GPU, or in bf16, can differ in the last digits (and a causal LM's starting
answers, greedy, in a token here and there). ``best_val`` needs ``adapter_best.safetensors``
saved on the validation set (trainer.keep_best with select_on val or auto).

Outputs in --out (default: forgetting/):
  forgetting.csv         run, task, method, seed, lr, metric, test, forgetting metric and value, source
  learn_vs_forget.png    per task: x forgetting, y test metric ×100, one dot per run, a colour per method
and a Markdown table (per task and method: medians over runs) on stdout.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from omegaconf import OmegaConf

from analysis.collect_runs import flatten
from analysis.glue_table import labels, run_method
from analysis.weights import adapter_file
from schema import ConfigError
from training import rundir

ADAPTER_AT = {"final": "last", "best_val": "best"}


def read_runs(roots: list[Path], at: str, measure: bool) -> tuple[list[dict], list[tuple[str, str]]]:
    """(one record per completed run below ``roots``, [(run dir, why skipped)])."""
    records, skipped = [], []
    for root in roots:
        for path in sorted(root.rglob(rundir.SUMMARY)):
            run_dir = path.parent
            try:
                record, why = _record(run_dir, rundir.read_summary(run_dir), at, measure)
            except (rundir.UnreadableSummary, ConfigError) as err:  # one run's problem: skip it, say why
                record, why = None, str(err)
            if record is None:
                skipped.append((str(run_dir), why))
            else:
                records.append(record)
    names = labels({r["key"] for r in records})
    for r in records:
        r["method"] = names[r.pop("key")]
    return records, skipped


def _record(run_dir: Path, summary: dict, at: str, measure: bool) -> tuple[dict | None, str]:
    if summary.get("status") != "completed":
        return None, f"status {summary.get('status')!r}"
    metric = summary["main_metric"]
    if at == "best_val":
        if not summary.get("eval_at_best_val"):
            return None, "no eval_at_best_val (the run held out no val split)"
        if measure and (summary.get("best") or {}).get("set") != "val":
            return None, "its adapter_best.safetensors was not chosen on the val set (trainer.select_on)"
        test = summary["eval_at_best_val"]["test"][metric]
    else:
        test = summary["eval"][metric]
    config = OmegaConf.load(run_dir / rundir.CONFIG)
    if measure:
        headline, metrics, source = measure_from_weights(run_dir, config, ADAPTER_AT[at])
    else:
        probe = summary.get("forgetting") or {}
        metrics = probe.get("final" if at == "final" else "at_best_val")
        if not metrics:
            return None, "no forgetting in its summary.json (trained without the probe: use --measure)"
        headline, source = probe["headline"], "recorded"
    key = run_method(summary, flatten(OmegaConf.to_container(config)))
    return {"run": str(run_dir), "task": summary["task"], "key": key, "seed": summary["seed"],
            "lr": summary["peak_lr"], "metric": metric, "test": test, "forgetting_metric": headline,
            "forgetting": metrics[headline], "source": source}, ""


def measure_from_weights(run_dir: Path, config, which: str) -> tuple[str, dict[str, float], str]:
    """(headline, the probe's metrics, source) for the base model against the run's saved model."""
    from training.data import load_task
    from training.device import runtime_for
    from training.experiment import completed
    from training.forgetting import build_probe
    from training.models import load_base, load_trained

    path = adapter_file(run_dir, which)
    config.trainer.forgetting = {**config.trainer.get("forgetting", {}), "measure": True}
    cfg = completed(config)
    base, tokenizer = load_base(path)
    trained, _ = load_trained(path)
    _, eval_sets = load_task(cfg.task, cfg.seed)
    probe = build_probe(cfg, tokenizer, eval_sets)
    runtime = runtime_for("cpu", cfg.trainer.precision)  # auto: fp32 on the CPU
    metrics = probe.measure(trained, runtime, probe.reference(base, runtime))
    return probe.headline, metrics, f"measured from {path.name}"


def plot(records: list[dict], path: Path) -> None:
    tasks = sorted({r["task"] for r in records})
    methods = sorted({r["method"] for r in records})
    colours = {name: plt.cm.tab10(i % 10) for i, name in enumerate(methods)}
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks), 4.0), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        mine = [r for r in records if r["task"] == task]
        for name in methods:
            dots = [r for r in mine if r["method"] == name]
            if dots:
                ax.scatter([r["forgetting"] for r in dots], [100 * r["test"] for r in dots], color=colours[name],
                           label=name, s=22)
        ax.set(title=f"{task}", xlabel=f"forgetting ({mine[0]['forgetting_metric']}; right: more)",
               ylabel=f"{mine[0]['metric']} ×100 (test)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(records: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    columns = ["run", "task", "method", "seed", "lr", "metric", "test", "forgetting_metric", "forgetting", "source"]
    with (out / "forgetting.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(records)
    plot(records, out / "learn_vs_forget.png")


def table(records: list[dict]) -> list[str]:
    lines = ["| task | method | runs | test ×100 (median) | forgetting (median, min–max) |", "|---|---|---|---|---|"]
    for task in sorted({r["task"] for r in records}):
        for name in sorted({r["method"] for r in records if r["task"] == task}):
            mine = [r for r in records if r["task"] == task and r["method"] == name]
            values = [r["forgetting"] for r in mine]
            lines.append(f"| {task} | {name} | {len(mine)} | {100 * statistics.median(r['test'] for r in mine):.1f} | "
                         f"{statistics.median(values):.4f} ({min(values):.4f}–{max(values):.4f}) "
                         f"{mine[0]['forgetting_metric']} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("roots", nargs="+", type=Path, help="run or sweep directories")
    parser.add_argument("--at", choices=sorted(ADAPTER_AT), default="final",
                        help="final: the last evaluation | best_val: the evaluation with the best validation metric")
    parser.add_argument("--measure", action="store_true", help="compute the probe from the saved weights")
    parser.add_argument("--out", type=Path, default=Path("forgetting"), help="output folder")
    args = parser.parse_args(argv)
    try:
        records, skipped = read_runs(args.roots, args.at, args.measure)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for where, why in skipped:
        print(f"skipped {where}: {why}", file=sys.stderr)
    if not records:
        print("error: no completed run with a forgetting measurement below " + " ".join(map(str, args.roots)),
              file=sys.stderr)
        return 2
    write(records, args.out)
    print("\n".join(table(records)))
    print(f"outputs: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
