#!/usr/bin/env python
"""Intruder dimensions (Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of
Equivalence", Algorithm 1): singular vectors of a fine-tuned weight that resemble none of the
pretrained weight's.

    python analysis/intruders.py RUN [RUN ...] [--k 10] [--epsilon 0.5] [--modules REGEX]
                                 [--which last|best] [--out DIR]

For every backbone linear layer a run changed (analysis/weights.py: W0 before, W = W0 + ΔW
after; any variant, full fine-tuning and staged included), with W0 = U0·S0·V0ᵀ and W = U·S·Vᵀ:

    the j-th singular vector of W is an intruder  ⇔  max_i |cos(U[:, j], U0[:, i])| < ε

for j among W's top k (by singular value) and i over *all* of W0's left singular vectors (a full
basis when d_out ≤ d_in, so a vector close to any of them is not new). The absolute value because a
singular vector's sign is arbitrary. Two cases known by hand: a ΔW along W0's own top direction
adds no intruder (W's singular vectors stay W0's); a ΔW along a random direction with a singular
value above W0's largest adds one, since a random unit vector of R^d has cosines of order
√(2 ln d / d) with every basis vector (0.18 for d = 384).

Outputs in --out (default: intruders/ in the current folder):
  intruders.csv            run, variant, rank, module, k, epsilon, intruders, positions (1-based j)
  intruders_epsilon.csv    run, variant, rank, epsilon, intruders (summed over modules), ε from 0.1 to 0.9
  intruders.png            total intruders vs ε per run (the paper's Fig. 4 axes), and where in W's
                           ranking they sit (count by position j)
and a Markdown table (one row per run) on stdout, then a note for a variant whose numbers are not
comparable with LoRA's.
"""

from __future__ import annotations

import argparse
import csv
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

EPSILONS = tuple(round(0.1 * i, 1) for i in range(1, 10))


def max_similarity(before: torch.Tensor, after: torch.Tensor, k: int) -> torch.Tensor:
    """For each of ``after``'s top-``k`` left singular vectors, its largest |cosine| with any
    left singular vector of ``before``: ``(k,)`` (fewer if the matrix has fewer)."""
    u_before = torch.linalg.svd(before, full_matrices=False).U  # (d_out, n), unit columns
    u_after = torch.linalg.svd(after, full_matrices=False).U[:, :k]
    return (u_after.t() @ u_before).abs().amax(dim=1)


def intruder_positions(similarity: torch.Tensor, epsilon: float) -> list[int]:
    """The 1-based positions j (in W's ranking) of the intruders: similarity below ε."""
    return [j + 1 for j in torch.nonzero(similarity < epsilon).flatten().tolist()]


def analyse(run_dirs: list[Path], k: int, modules: str | None, which: str) -> list[dict]:
    """One row per run and changed module, with its ``similarity`` (k,) for the ε sweep."""
    rows = []
    for run_dir, label in zip(run_dirs, run_labels(run_dirs)):
        config = variants.read_adapter_config(adapter_file(run_dir, which))
        for module, (before, after) in weight_changes(run_dir, modules, which).items():
            rows.append({"run": label, "variant": config.get("variant"), "rank": config.get("rank"),
                         "module": module, "similarity": max_similarity(before, after, k)})
    return rows


def totals(rows: list[dict], epsilon: float) -> dict[str, int]:
    """Intruders summed over each run's modules."""
    out: dict[str, int] = {}
    for row in rows:
        out[row["run"]] = out.get(row["run"], 0) + len(intruder_positions(row["similarity"], epsilon))
    return out


def plot(rows: list[dict], k: int, epsilon: float, path: Path) -> None:
    runs = list(dict.fromkeys(row["run"] for row in rows))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        left.plot(EPSILONS, [totals(rows, e).get(run, 0) for e in EPSILONS], marker="o", label=run)
        counts = [0] * k
        for row in rows:
            if row["run"] == run:
                for j in intruder_positions(row["similarity"], epsilon):
                    counts[j - 1] += 1
        right.plot(range(1, k + 1), counts, marker="o", label=run)
    left.set(xlabel="ε (cosine threshold)", ylabel=f"intruders among each layer's top {k}, summed",
             title="intruder dimensions vs ε")
    right.set(xlabel="position j of W's singular vector", ylabel="layers with an intruder there",
              title=f"where the intruders sit (ε = {epsilon})")
    left.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(rows: list[dict], k: int, epsilon: float, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (out / "intruders.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "variant", "rank", "module", "k", "epsilon", "intruders", "positions"])
        for row in rows:
            positions = intruder_positions(row["similarity"], epsilon)
            writer.writerow([row["run"], row["variant"], row["rank"], row["module"], k, epsilon, len(positions),
                             " ".join(map(str, positions))])
    with (out / "intruders_epsilon.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "variant", "rank", "epsilon", "intruders"])
        first = {row["run"]: row for row in reversed(rows)}
        for e in EPSILONS:
            for run, count in totals(rows, e).items():
                writer.writerow([run, first[run]["variant"], first[run]["rank"], e, count])
    plot(rows, k, epsilon, out / "intruders.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories")
    parser.add_argument("--k", type=int, default=10, help="W's top singular vectors examined per layer (paper: 10)")
    parser.add_argument("--epsilon", type=float, default=0.5, help="cosine threshold ε (paper's figures: 0.5)")
    parser.add_argument("--modules", help="regex: keep only matching layer names (e.g. 'attention')")
    parser.add_argument("--which", choices=sorted(WHICH), default="last",
                        help="the adapter at the end of training (last) or at the best validation evaluation (best)")
    parser.add_argument("--out", type=Path, default=Path("intruders"), help="output folder")
    args = parser.parse_args(argv)
    if args.k < 1 or not 0 < args.epsilon < 1:
        print(f"error: --k must be >= 1 and --epsilon in (0, 1), got {args.k} and {args.epsilon}", file=sys.stderr)
        return 2
    try:
        rows = analyse(args.runs, args.k, args.modules, args.which)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not rows:
        print("error: no run changed a backbone linear layer" + (" matching --modules" if args.modules else ""),
              file=sys.stderr)
        return 2
    write(rows, args.k, args.epsilon, args.out)
    counts = totals(rows, args.epsilon)
    print(f"| run | variant | rank | layers changed | intruders (top {args.k}, ε = {args.epsilon}) | per layer |")
    print("|---|---|---|---|---|---|")
    for run, count in counts.items():
        mine = [row for row in rows if row["run"] == run]
        print(f"| {run} | {mine[0]['variant']} | {mine[0]['rank'] or '–'} | {len(mine)} | {count} | "
              f"{count / len(mine):.2f} |")
    for name, why in caveats(*args.runs, analysis="intruders").items():
        print(f"note ({name}): {why}")
    print(f"outputs: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
