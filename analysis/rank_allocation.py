#!/usr/bin/env python
"""Where did AdaLoRA's rank budget go? Plots one run's final allocation and its trace.

    python analysis/rank_allocation.py runs/<adalora run> [--out rank_allocation.png] [--csv ranks.csv]

Reads ``adapter_report`` from the run's summary.json (``rank_allocation``: module → final rank;
``rank_trace``: module → [[step, rank], ...] at every pruning decision). Writes a PNG with the
final rank as a heatmap (rows: layers, columns: module kinds such as query/value) next to the
rank of every module over training, prints the final allocation per module kind and layer, and
with ``--csv`` writes the trace as rows of (module, step, rank).
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

LAYER_INDEX = re.compile(r"\.(\d+)\.")


def read_report(run_dir: Path) -> dict:
    path = run_dir / "summary.json"
    if not path.is_file():
        raise SystemExit(f"error: {run_dir} has no summary.json (is it a finished run dir?)")
    report = json.loads(path.read_text()).get("adapter_report", {})
    if "rank_allocation" not in report:
        raise SystemExit(f"error: {run_dir} has no rank allocation; it is not a run of a rank-allocating variant (adalora)")
    return report


def split_name(module: str) -> tuple[int, str]:
    """(layer index, module kind) from e.g. ``bert.encoder.layer.3.attention.self.query``."""
    match = LAYER_INDEX.search(module)
    return (int(match.group(1)) if match else 0), module.rsplit(".", 1)[-1]


def allocation_grid(allocation: dict[str, int]) -> tuple[np.ndarray, list[int], list[str]]:
    cells = {split_name(m): r for m, r in allocation.items()}
    layers = sorted({layer for layer, _ in cells})
    kinds = sorted({kind for _, kind in cells})
    grid = np.full((len(layers), len(kinds)), np.nan)
    for (layer, kind), rank in cells.items():
        grid[layers.index(layer), kinds.index(kind)] = rank
    return grid, layers, kinds


def plot(report: dict, out: Path, title: str) -> None:
    grid, layers, kinds = allocation_grid(report["rank_allocation"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5), gridspec_kw={"width_ratios": [1, 2]})
    image = left.imshow(grid, cmap="viridis", aspect="auto", origin="lower")
    left.set_xticks(range(len(kinds)), kinds)
    left.set_yticks(range(len(layers)), layers)
    left.set_ylabel("layer")
    left.set_title(f"final rank (total {report['total_rank']} of {report['initial_total_rank']})")
    for (i, j), rank in np.ndenumerate(grid):
        if not np.isnan(rank):
            left.text(j, i, int(rank), ha="center", va="center", color="white", fontsize=8)
    fig.colorbar(image, ax=left)
    cmap = plt.get_cmap("viridis")
    for module, trace in report["rank_trace"].items():
        layer, kind = split_name(module)
        steps, ranks = zip(*trace)
        right.step(steps, ranks, where="post", color=cmap(layer / max(1, max(layers))),
                   linestyle="-" if kind == kinds[0] else "--", alpha=0.8, label=f"{kind} {layer}")
    right.set_xlabel("step")
    right.set_ylabel("kept rank")
    right.set_title("rank over training (colour: layer; line style: module kind)")
    right.legend(fontsize=6, ncol=2, loc="upper right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, help="PNG path (default: <run_dir>/rank_allocation.png)")
    parser.add_argument("--csv", type=Path, help="also write the trace as CSV (module, step, rank)")
    args = parser.parse_args(argv)
    report = read_report(args.run_dir)
    out = args.out or args.run_dir / "rank_allocation.png"
    plot(report, out, args.run_dir.name)
    grid, layers, kinds = allocation_grid(report["rank_allocation"])
    print("layer  " + "  ".join(f"{k:>6}" for k in kinds))
    for layer, row in zip(layers, grid):
        print(f"{layer:>5}  " + "  ".join(f"{int(r):>6}" if not np.isnan(r) else "     -" for r in row))
    print(f"total {report['total_rank']} of {report['initial_total_rank']}; figure: {out}")
    if args.csv:
        with args.csv.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["module", "step", "rank"])
            for module, trace in report["rank_trace"].items():
                writer.writerows([module, step, rank] for step, rank in trace)


if __name__ == "__main__":
    sys.exit(main())
