#!/usr/bin/env python
"""What ``trainer.group_by_length`` (and bf16 autocast) save on real GLUE training data: padding,
and the time of a training step, side by side in one process.

    python bench/group_by_length.py                       # STS-B, MRPC, RTE, CoLA from ../shared/glue
    python bench/group_by_length.py --tasks stsb,mrpc --batches 30 --json out.json

Per task: the training set as the converged comparison trains it (10% held out, seed 0, max
length 128, batch 16) is batched for one epoch both ways, plain shuffling and grouped by length,
and the padding counted over the whole epoch (padded positions / all positions). Then MiniLM with
LoRA (r 8, W_q and W_v) trains on the first ``--batches`` batches of each epoch, in fp32 and under
bf16 autocast: four configurations, each its own copy of the same weights and AdamW, timed in
rounds that alternate between them (the start rotating) with the process's CPU clock, so other
jobs on the machine slow them all alike. An epoch's time is the mean step time times the number
of batches, which is the same both ways, so the ratios of mean step times are the epoch speedups.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

import variants
from training.data import load_task, make_loader
from training.models import load_model
from training.optim import make_optimizer, param_groups

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"stsb": "STS-B", "mrpc": "MRPC", "rte": "RTE", "cola": "CoLA"}
CONFIGS = (("plain", "fp32"), ("plain", "bf16"), ("grouped", "fp32"), ("grouped", "bf16"))


def loaders(cfg, tokenizer, batch_size: int) -> dict[str, torch.utils.data.DataLoader]:
    """The task's training epoch both ways: plain shuffling and grouped by length."""
    train, _ = load_task(cfg, seed=0)
    return {kind: make_loader(train, tokenizer, list(cfg.text_fields), 128, batch_size, shuffle=True, seed=0,
                              group_by_length=kind == "grouped")
            for kind in ("plain", "grouped")}


def padding(loader) -> dict[str, float]:
    """Real and padded positions over one epoch."""
    real = total = 0
    for batch in loader:
        real += int(batch["attention_mask"].sum())
        total += batch["attention_mask"].numel()
    return {"real_tokens": real, "positions": total, "padding_share": 1 - real / total}


def bench_task(task: str, glue_dir: Path, n_batches: int, rounds: int) -> dict:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):  # the task as run.py composes it
        cfg = compose(config_name="config", overrides=[f"task={task}", f"task.data_dir={glue_dir / FOLDERS[task]}",
                                                       "task.val_fraction=0.1"]).task
    base, tokenizer = load_model("minilm", num_labels=cfg.num_labels)
    by_kind = loaders(cfg, tokenizer, 16)
    result = {"task": task, "batches_per_epoch": len(by_kind["plain"]),
              **{f"{kind}_{k}": v for kind, loader in by_kind.items() for k, v in padding(loader).items()}}
    batches = {kind: [b for _, b in zip(range(n_batches), loader)] for kind, loader in by_kind.items()}
    setups = {}
    for kind, precision in CONFIGS:
        model = copy.deepcopy(base)
        variants.inject_adapters(model, "lora", ["query", "value"], rank=8, alpha=16, dropout=0.1)
        variants.mark_trainable(model, train_modules=["classifier"])
        model.train()
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        setups[kind, precision] = (model, make_optimizer("adamw", param_groups(named, 0.0, "matrices"), 1e-3))
    times: dict[tuple[str, str], list[float]] = {c: [] for c in CONFIGS}
    per_round = max(1, n_batches // rounds)
    for r in range(rounds):
        order = CONFIGS[r % len(CONFIGS):] + CONFIGS[:r % len(CONFIGS)]
        for kind, precision in order:
            model, optimizer = setups[kind, precision]
            for batch in batches[kind][r * per_round:(r + 1) * per_round]:
                started = time.process_time()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                    loss = model(**batch).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                times[kind, precision].append(time.process_time() - started)
    plain = statistics.mean(times["plain", "fp32"])
    for kind, precision in CONFIGS:
        mean = statistics.mean(times[kind, precision])
        result[f"{kind}_{precision}_step_s"] = mean
        result[f"{kind}_{precision}_speedup"] = plain / mean
    result["grouping_speedup_bf16"] = result["plain_bf16_step_s"] / result["grouped_bf16_step_s"]
    return result


def table(results: list[dict]) -> str:
    lines = [("| task | batches/epoch | padding plain | padding grouped | step s plain fp32 | speedup: bf16 | "
              "grouped | grouped + bf16 | grouping under bf16 |"), "|" + "---|" * 9]
    for r in results:
        lines.append(f"| {r['task']} | {r['batches_per_epoch']} | {100 * r['plain_padding_share']:.1f}% | "
                     f"{100 * r['grouped_padding_share']:.1f}% | {r['plain_fp32_step_s']:.3f} | "
                     f"{r['plain_bf16_speedup']:.2f}x | {r['grouped_fp32_speedup']:.2f}x | "
                     f"{r['grouped_bf16_speedup']:.2f}x | {r['grouping_speedup_bf16']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--glue-dir", type=Path, default=Path(os.environ.get("GLUE_DIR", ROOT.parent / "shared" / "glue")))
    parser.add_argument("--tasks", default="stsb,mrpc,rte,cola")
    parser.add_argument("--batches", type=int, default=40, help="timed batches per configuration")
    parser.add_argument("--rounds", type=int, default=4, help="rounds the batches are split into")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    tasks = args.tasks.split(",")
    unknown = [t for t in tasks if t not in FOLDERS]
    if unknown or not args.glue_dir.is_dir():
        print(f"error: --tasks must name {', '.join(FOLDERS)} and --glue-dir a GLUE folder "
              f"(got {args.tasks!r}, {str(args.glue_dir)!r})", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    results = [bench_task(task, args.glue_dir, args.batches, args.rounds) for task in tasks]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU clock per step\n")
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
