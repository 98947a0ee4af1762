#!/usr/bin/env python
"""Process memory (RSS) of a SmolLM2 run, stage by stage, one fresh process per configuration.

    python bench/process_memory.py                          # lora and qlora, q/v and all-linear
    python bench/process_memory.py --only qlora-all --steps 5 --json out.json

`summary.json`'s `peak_memory_mb` on CPU is the process's maximum RSS over the whole run: the
Python runtime and libraries, the model's load, the variant's set-up, training and generation.
This script splits that number into stages, each in a fresh process so no configuration
inherits another's heap: after the imports, after loading the model (fp32), after applying the
variant, after `malloc_trim` (what the C allocator kept of memory Python already freed, given back
to the system), and after some training steps on a batch of random tokens (``--batch`` ×
``--seq``, AdamW). Each stage reports the RSS then, split into anonymous memory and pages of
mapped files, and the peak so far (VmHWM). Linux only.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys
from pathlib import Path

CONFIGS = {  # name: (variant, targets)
    "lora-qv": ("lora", ["q_proj", "v_proj"]),
    "lora-all": ("lora", "all-linear"),
    "qlora-qv": ("qlora", ["q_proj", "v_proj"]),
    "qlora-all": ("qlora", "all-linear"),
}


def rss_mb() -> dict[str, float]:
    """This process's RSS now, its anonymous and file-backed parts (a safetensors file the model
    was loaded from is memory-mapped: its pages count once touched), and the peak, in MB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    keys = {"rss_mb": "VmRSS", "anon_mb": "RssAnon", "file_mb": "RssFile", "peak_mb": "VmHWM"}
    return {key: round(int(fields[field].split()[0]) / 1024, 1) for key, field in keys.items()}


def measure(name: str, steps: int, batch: int, seq: int, keep_layers: int | None = None) -> list[dict]:
    """The stages of one configuration, in this process."""
    stages = []

    def mark(stage: str) -> None:
        stages.append({"stage": stage, **rss_mb()})

    import torch

    import variants
    from training.models import load_model
    from training.optim import make_optimizer, param_groups

    mark("imports")
    model, _ = load_model("smollm2", model_type="causal_lm", keep_layers=keep_layers)
    mark("model loaded (fp32)")
    variant, targets = CONFIGS[name]
    variants.inject_adapters(model, variant, targets, rank=8, alpha=16, dropout=0.1)
    variants.mark_trainable(model, bias="none", train_modules=[])
    mark("variant applied")
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    mark("after malloc_trim")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = make_optimizer("adamw", param_groups(named, 0.0, "matrices"), 1e-3)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=generator)
    model.train()
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    mark(f"after {steps} training steps")
    return stages


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--keep-layers", type=int, help="only the first N blocks (a quick check of the script)")
    parser.add_argument("--json", help="also write the stages here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.steps, args.batch, args.seq, args.keep_layers)))
        return 0
    names = args.only.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        print(f"--only: unknown {', '.join(unknown)}; allowed: {', '.join(CONFIGS)}", file=sys.stderr)
        return 2
    report = {}
    for name in names:
        out = subprocess.run([sys.executable, __file__, "--child", name, "--steps", str(args.steps), "--batch",
                              str(args.batch), "--seq", str(args.seq)]
                             + (["--keep-layers", str(args.keep_layers)] if args.keep_layers else []),
                             capture_output=True, text=True, check=True)
        report[name] = json.loads(out.stdout.strip().splitlines()[-1])
    stage_names = [s["stage"] for s in next(iter(report.values()))]
    print("| stage | " + " | ".join(f"{n}: RSS (anon + file) / peak, MB" for n in names) + " |")
    print("|---|" + "---|" * len(names))
    for i, stage in enumerate(stage_names):
        cells = [f"{r['rss_mb']:.0f} ({r['anon_mb']:.0f} + {r['file_mb']:.0f}) / {r['peak_mb']:.0f}"
                 for r in (report[n][i] for n in names)]
        print(f"| {stage} | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
