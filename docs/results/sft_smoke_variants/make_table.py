#!/usr/bin/env python
"""The README's per-variant table for SmolLM2 / sft_smoke, from the result files under runs/.

    python docs/results/sft_smoke_variants/make_table.py [runs_dir]

One row per sweep name (runs/<name>/<job dir>/summary.json with its config.yaml): targets,
trained parameters, peak learning rate per phase, exact match / answer in output / eval loss
at step 0 and at the last evaluation, median step, peak memory, wall time.
"""

import json
import sys
from pathlib import Path

import yaml

ORDER = "lora dora adalora qlora pissa milora eva rslora lora_plus lora_ga lora_pro staged head full".split()
TARGETS = {"head": "lm_head (= embeddings)", "full": "every weight", "staged": "every weight, then q_proj, v_proj"}


def label(summary: dict, variant_cfg: dict) -> str:
    knobs = []
    if variant_cfg.get("scaling") not in (None, "standard"):
        knobs.append(f"scaling={variant_cfg['scaling']}")
    if variant_cfg.get("lr_ratio") not in (None, 1, 1.0):
        knobs.append(f"lr_ratio={variant_cfg['lr_ratio']:g}")
    return f"`{summary['variant']}`" + (" " + ", ".join(knobs) if knobs else "")


def row(name: str, summary: dict, variant_cfg: dict) -> str:
    modules = summary["adapted_modules"]
    targets = TARGETS.get(name) or {210: "all-linear", 60: "q_proj, v_proj"}.get(len(modules), f"{len(modules)} modules")
    params = f"{summary['trainable_params']:,}"
    if name == "staged":  # its full phase trains every weight but the adapters'
        params = f"{summary['total_params'] - summary['trainable_params']:,} → {params}"
    rates = " → ".join(f"{phase['peak_lr']:g}" for phase in summary["phases"])
    start, end = summary["eval_at_start"], summary["eval"]
    return (f"| {label(summary, variant_cfg)} | {targets} | {params} | {rates} | "
            f"{start['exact_match']:.3f} → {end['exact_match']:.3f} | "
            f"{start['answer_in_output']:.3f} → {end['answer_in_output']:.3f} | {start['loss']:.2f} → {end['loss']:.3f} | "
            f"{summary['step_time_s']:.2f} | {summary['peak_memory_mb']:.0f} | {summary['wall_time_s'] / 60:.1f} |")


def main(root: Path) -> None:
    print("| run | targets | trained params | lr | exact match, step 0 → 200 | answer in output, 0 → 200 | "
          "eval loss, 0 → 200 | median step (s) | peak RSS (MB) | wall (min) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in ORDER:
        for path in sorted((root / name).glob("*/summary.json")):
            summary = json.loads(path.read_text())
            variant_cfg = yaml.safe_load((path.parent / "config.yaml").read_text())["variant"]
            print(row(name, summary, variant_cfg))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "runs")
