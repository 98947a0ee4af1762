#!/usr/bin/env python
"""The spectrum of each method's update ΔW = W − W0, per layer: how many directions it uses.

    python analysis/spectrum.py RUN [RUN ...] [--modules REGEX] [--which last|best] [--top 64] [--out DIR]

For every backbone linear layer a run changed (analysis/weights.py; full fine-tuning and staged
included), with σ₁ ≥ σ₂ ≥ … the singular values of ΔW:

    effective rank   erank = exp(−Σ pᵢ ln pᵢ),  pᵢ = σᵢ / Σⱼ σⱼ      (Roy & Vetterli 2007)
    rank90           the fewest directions holding 90% of the energy: min k, Σᵢ≤k σᵢ² ≥ 0.9 Σ σᵢ²
                     (Biderman et al. 2024's "rank needed to explain 90% of the variance")
    spectrum         σᵢ / σ₁, the normalised singular values

A rank-r LoRA has erank and rank90 at most r (PiSSA's and LoRA-GA's update from their start,
s·(B·A − B₀·A₀), at most 2r); full fine-tuning's ΔW is not low-rank by construction, and how
far from it it is, is what Biderman et al. measure (10–100× the ranks LoRA is used with, on
LLaMA-2-7B). Hand-checkable cases: ΔW = c·u·vᵀ has erank 1 and rank90 1; ΔW = c·I (d × d) has
erank d and rank90 ⌈0.9 d⌉.

Outputs in --out (default: spectrum/):
  spectrum.csv        run, variant, rank, module, norm, erank, rank90, d (= min(d_out, d_in))
  spectrum_values.csv run, module, i, sigma, sigma_over_first
  spectrum.png        σᵢ/σ₁ against i (median over each run's layers, log scale), and each
                      layer's effective rank per run
and a Markdown table (one row per run: medians over its layers) on stdout.
"""

from __future__ import annotations

import argparse
import csv
import math
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


def effective_rank(sigma: torch.Tensor) -> float:
    """exp of the entropy of the singular values normalised to sum 1 (zeros contribute 0)."""
    p = sigma[sigma > 0] / sigma.sum()
    return math.exp(float(-(p * p.log()).sum()))


def energy_rank(sigma: torch.Tensor, share: float = 0.9) -> int:
    """The fewest leading singular values whose squares hold ``share`` of the total."""
    energy = sigma.pow(2).cumsum(0)
    # a tolerance of 1e-12 of the total: ΔW = c·I must count ⌈0.9 d⌉, not one more from rounding
    return int(torch.searchsorted(energy, share * energy[-1] * (1 - 1e-12)).item()) + 1


def analyse(run_dirs: list[Path], modules: str | None, which: str) -> list[dict]:
    rows = []
    for run_dir, label in zip(run_dirs, run_labels(run_dirs)):
        config = variants.read_adapter_config(adapter_file(run_dir, which))
        for module, (before, after) in weight_changes(run_dir, modules, which).items():
            sigma = torch.linalg.svdvals(after - before)
            rows.append({"run": label, "variant": config.get("variant"), "rank": config.get("rank"),
                         "module": module, "norm": float(sigma.pow(2).sum().sqrt()),
                         "erank": effective_rank(sigma), "rank90": energy_rank(sigma), "d": sigma.numel(),
                         "sigma": sigma})
    return rows


def plot(rows: list[dict], top: int, path: Path) -> None:
    runs = list(dict.fromkeys(row["run"] for row in rows))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for index, run in enumerate(runs):
        mine = [row for row in rows if row["run"] == run]
        normalised = torch.stack([row["sigma"][:top] / row["sigma"][0] for row in mine
                                  if row["sigma"].numel() >= top and row["sigma"][0] > 0])
        if len(normalised):
            left.plot(range(1, normalised.shape[1] + 1), normalised.median(0).values, label=run)
        right.scatter([index] * len(mine), [row["erank"] for row in mine], s=10)
    left.set(xlabel="i", ylabel="σᵢ / σ₁ (median over layers)", yscale="log", title="spectrum of ΔW")
    left.legend(fontsize=7)
    right.set_xticks(range(len(runs)), runs, rotation=30, ha="right", fontsize=7)
    right.set(ylabel="effective rank of ΔW", yscale="log", title="each layer's effective rank")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(rows: list[dict], top: int, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    columns = ["run", "variant", "rank", "module", "norm", "erank", "rank90", "d"]
    with (out / "spectrum.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    with (out / "spectrum_values.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "module", "i", "sigma", "sigma_over_first"])
        for row in rows:
            first = float(row["sigma"][0]) or 1.0
            for i, value in enumerate(row["sigma"].tolist(), start=1):
                writer.writerow([row["run"], row["module"], i, f"{value:.6g}", f"{value / first:.6g}"])
    plot(rows, top, out / "spectrum.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories")
    parser.add_argument("--modules", help="regex: keep only matching layer names")
    parser.add_argument("--which", choices=sorted(WHICH), default="last",
                        help="the adapter at the end of training (last) or at the best validation evaluation (best)")
    parser.add_argument("--top", type=int, default=64, help="singular values drawn per layer")
    parser.add_argument("--out", type=Path, default=Path("spectrum"), help="output folder")
    args = parser.parse_args(argv)
    try:
        rows = analyse(args.runs, args.modules, args.which)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not rows:
        print("error: no run changed a backbone linear layer" + (" matching --modules" if args.modules else ""),
              file=sys.stderr)
        return 2
    write(rows, args.top, args.out)
    print("| run | variant | rank | layers changed | erank (median, min–max) | rank90 (median) | ‖ΔW‖_F (median) |")
    print("|---|---|---|---|---|---|---|")
    for run in dict.fromkeys(row["run"] for row in rows):
        mine = [row for row in rows if row["run"] == run]
        eranks = [row["erank"] for row in mine]
        print(f"| {run} | {mine[0]['variant']} | {mine[0]['rank'] or '–'} | {len(mine)} | "
              f"{statistics.median(eranks):.1f} ({min(eranks):.1f}–{max(eranks):.1f}) | "
              f"{statistics.median(row['rank90'] for row in mine):g} | {statistics.median(row['norm'] for row in mine):.3g} |")
    for name, why in caveats(*args.runs, analysis="spectrum").items():
        print(f"note ({name}): {why}")
    print(f"outputs: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
