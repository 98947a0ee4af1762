#!/usr/bin/env python
"""Where a DoRA layer's step goes, against LoRA's, on one LLaMA-1B-shaped layer (CPU).

    python bench/layer_profile.py                       # 2048 -> 5632 (gate/up), 512 tokens, r 16
    python bench/layer_profile.py --d-in 2048 --d-out 2048 --dropout 0

One frozen ``nn.Linear`` wrapped by each configuration (ours and peft's, the same weights), forward
and backward of a sum of squares, alternating in rounds; CPU time per step (median), and
``torch.profiler``'s self CPU time per op over the timed steps of each: what the step is made of.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch
from torch import nn

import variants


def build(kind: str, base: nn.Linear, rank: int, dropout: float) -> nn.Module:
    model = nn.Sequential(copy.deepcopy(base))
    if kind.startswith("peft-"):
        import peft

        config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=dropout, target_modules=["0"],
                                 use_dora=kind == "peft-dora")
        return peft.get_peft_model(model, config).train()
    variant, _, option = kind.partition(":")
    settings = {"lean_backward": False, "column_norm": "direct"} if option == "plain" else {}
    if variant == "lora":
        settings.pop("column_norm", None)
    variants.inject_adapters(model, variant, ["0"], rank=rank, alpha=2 * rank, dropout=dropout, **settings)
    variants.mark_trainable(model)
    with torch.no_grad():
        for layer in variants.layers_of(model).values():
            layer.lora_B.normal_(std=0.02)
    return model.train()


def step(model: nn.Module, x: torch.Tensor) -> float:
    start = time.process_time()
    model(x).pow(2).sum().backward()
    for p in model.parameters():
        p.grad = None
    return time.process_time() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-in", type=int, default=2048)
    parser.add_argument("--d-out", type=int, default=5632)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", default="lora,lora:plain,peft-lora,dora,dora:plain,peft-dora")
    parser.add_argument("--top", type=int, default=6, help="ops per configuration in the profile")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    base = nn.Linear(args.d_in, args.d_out)
    base.requires_grad_(False)
    x = torch.randn(args.tokens, args.d_in, requires_grad=True)
    models = {kind: build(kind, base, args.rank, args.dropout) for kind in args.only.split(",")}
    times: dict[str, list[float]] = {kind: [] for kind in models}
    for model in models.values():
        step(model, x)  # warm-up
    for round_ in range(args.rounds):
        kinds = list(models)[round_ % len(models):] + list(models)[: round_ % len(models)]
        for kind in kinds:
            times[kind].append(step(models[kind], x))
    reference = statistics.median(times[next(iter(models))])
    print(f"{args.tokens} tokens x ({args.d_in} -> {args.d_out}), rank {args.rank}, dropout {args.dropout}, "
          f"1 thread, CPU time, median of {args.rounds}")
    print("| configuration | step (ms) | / first |\n|---|---|---|")
    for kind, t in times.items():
        print(f"| {kind} | {1000 * statistics.median(t):.1f} | {statistics.median(t) / reference:.2f} |")
    for kind, model in models.items():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            step(model, x)
        ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[: args.top]
        print(f"\n{kind}: " + ", ".join(f"{e.key} {e.self_cpu_time_total / 1000:.1f} ms x{e.count}" for e in ops))
    return 0


if __name__ == "__main__":
    sys.exit(main())
