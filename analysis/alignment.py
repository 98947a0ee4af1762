#!/usr/bin/env python
"""How far each method's update lies along full fine-tuning's: the LoRA paper's subspace
similarity (§7.2) and an energy share, between a method's ΔW and full fine-tuning's ΔW on the
same task and seed (so the same validation split and data order).

    python analysis/alignment.py --full FULL_RUN [FULL_RUN ...] --runs RUN [RUN ...]
                                 [--r R] [--modules REGEX] [--which last|best] [--out DIR]

Each run is paired with the full fine-tuning run of its task and seed (``summary.json``). For
every layer both changed (analysis/weights.py), with ΔW_f = U_f·S_f·V_fᵀ full fine-tuning's
update, ΔW_m the method's, and r the method's rank (``--r`` to override; full rank: 8):

    φ_left   = ‖U_mᵀ U_f‖²_F / r     over the top-r left singular vectors of each (column spaces)
    φ_right  = ‖V_mᵀ V_f‖²_F / r     the same for the row spaces (the paper's φ(r, r), §7.2)
    share    = ‖U_fᵀ ΔW_m V_f‖²_F / ‖ΔW_m‖²_F   how much of the method's update energy lies in
               full fine-tuning's top-r directions (both sides)

each beside the same quantity with random orthonormal r-frames in place of full fine-tuning's
(φ ≈ r/d, share ≈ r²/(d_out·d_in)). Hand-checkable: a method whose ΔW is full fine-tuning's
top-r part has φ = 1 and share = 1; one orthogonal to it on both sides has 0.

Outputs in --out (default: alignment/): alignment.csv (run, variant, rank, full_run, module,
phi_left, phi_right, share and their random counterparts) and alignment.png (each layer's share
and φ_right per run, random baseline dashed); a Markdown table of medians over layers on stdout.
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
import torch

import variants
from analysis.collect_runs import caveats
from analysis.weights import WHICH, adapter_file, run_labels, weight_changes
from schema import ConfigError
from training import rundir

COLUMNS = ("run", "variant", "rank", "full_run", "module", "phi_left", "phi_right", "share",
           "phi_left_random", "phi_right_random", "share_random")


def top_frames(delta: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-r left and right singular vectors of ``delta``: ``(d_out, r)``, ``(d_in, r)``."""
    u, _, vh = torch.linalg.svd(delta, full_matrices=False)
    return u[:, :r], vh[:r].t()


def random_frame(dim: int, r: int, generator: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(dim, r, generator=generator, dtype=torch.float64)).Q


def measures(method: torch.Tensor, left: torch.Tensor, right: torch.Tensor, r: int) -> dict[str, float]:
    """φ_left, φ_right and the energy share of ``method`` (a ΔW) against the frames ``left``, ``right``."""
    u_m, v_m = top_frames(method, r)
    return {"phi_left": float((u_m.t() @ left).pow(2).sum()) / r,
            "phi_right": float((v_m.t() @ right).pow(2).sum()) / r,
            "share": float((left.t() @ method @ right).pow(2).sum() / method.pow(2).sum())}


def reference_of(run_dir: Path, full: dict[tuple, Path]) -> Path:
    summary = rundir.read_summary(run_dir) or {}
    key = (summary.get("task"), summary.get("seed"))
    if key not in full:
        raise ConfigError(f"{run_dir}: no --full run of task {key[0]!r} and seed {key[1]!r} "
                          f"(given: {sorted(map(str, full))})")
    return full[key]


def analyse(full_dirs: list[Path], run_dirs: list[Path], r: int | None, modules: str | None, which: str,
            seed: int = 0) -> list[dict]:
    full = {}
    for full_dir in full_dirs:
        summary = rundir.read_summary(full_dir) or {}
        full[(summary.get("task"), summary.get("seed"))] = full_dir
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for run_dir, label in zip(run_dirs, run_labels(run_dirs)):
        reference = reference_of(run_dir, full)
        config = variants.read_adapter_config(adapter_file(run_dir, which))
        rank = r or config.get("rank") or 8
        theirs = weight_changes(reference, modules, which)
        for module, (before, after) in weight_changes(run_dir, modules, which).items():
            if module not in theirs:
                continue
            method = after - before
            left, right = top_frames(theirs[module][1] - theirs[module][0], rank)
            real = measures(method, left, right, rank)
            chance = measures(method, random_frame(left.shape[0], rank, generator),
                              random_frame(right.shape[0], rank, generator), rank)
            rows.append({"run": label, "variant": config.get("variant"), "rank": rank, "full_run": reference.name,
                         "module": module, **real, **{f"{k}_random": v for k, v in chance.items()}})
    return rows


def plot(rows: list[dict], path: Path) -> None:
    runs = list(dict.fromkeys(row["run"] for row in rows))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in zip(axes, ("share", "phi_right"), ("energy share in full FT's top-r directions",
                                                             "φ(r, r) of the row spaces")):
        for index, run in enumerate(runs):
            mine = [row for row in rows if row["run"] == run]
            ax.scatter([index] * len(mine), [row[key] for row in mine], s=10)
            ax.hlines(statistics.median(row[f"{key}_random"] for row in mine), index - 0.3, index + 0.3,
                      linestyles="dashed", colors="grey")
        ax.set_xticks(range(len(runs)), runs, rotation=30, ha="right", fontsize=7)
        ax.set(ylim=(0, 1), title=title + " (dashed: random)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", nargs="+", type=Path, required=True, help="full fine-tuning run directories")
    parser.add_argument("--runs", nargs="+", type=Path, required=True, help="the methods' run directories")
    parser.add_argument("--r", type=int, help="directions compared (default: each run's rank)")
    parser.add_argument("--modules", help="regex: keep only matching layer names")
    parser.add_argument("--which", choices=sorted(WHICH), default="last",
                        help="the adapters at the end of training (last) or at the best validation evaluation (best)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random baseline")
    parser.add_argument("--out", type=Path, default=Path("alignment"), help="output folder")
    args = parser.parse_args(argv)
    try:
        rows = analyse(args.full, args.runs, args.r, args.modules, args.which, args.seed)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not rows:
        print("error: the runs and the full fine-tuning runs changed no layer in common", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "alignment.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, args.out / "alignment.png")
    print("| run | variant | r | vs | layers | share (random) | φ_right (random) | φ_left (random) |")
    print("|---|---|---|---|---|---|---|---|")
    for run in dict.fromkeys(row["run"] for row in rows):
        mine = [row for row in rows if row["run"] == run]
        cells = [f"{statistics.median(row[k] for row in mine):.3f} ({statistics.median(row[k + '_random'] for row in mine):.3f})"
                 for k in ("share", "phi_right", "phi_left")]
        print(f"| {run} | {mine[0]['variant']} | {mine[0]['rank']} | {mine[0]['full_run']} | {len(mine)} | "
              + " | ".join(cells) + " |")
    for name, why in caveats(*args.runs, analysis="alignment").items():
        print(f"note ({name}): {why}")
    print(f"outputs: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
