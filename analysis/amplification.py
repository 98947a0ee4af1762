#!/usr/bin/env python
"""How ΔW relates to W (Hu et al. 2021, §7.3, Table 7): which directions does the update
amplify, and by how much?

    python analysis/amplification.py RUN [RUN ...] [--modules REGEX] [--csv out.csv] [--plot out.png]

For every adapted module of every run, with r the run's rank, ΔW the adapter's update and W
the frozen weight it adds to (QLoRA: the dequantized 4-bit weight; staged: the weight after
the full fine-tuning phase):

    ‖ΔW‖_F
    ‖UᵀWV‖_F   with U, V the top-r left/right singular vectors of ΔW      ("ΔW" column)
    ‖UᵀWV‖_F   with U, V the top-r singular vectors of W itself           ("W" column: ‖W‖ on its own top-r)
    ‖UᵀWV‖_F   with U, V random orthonormal r-frames                       ("random" column)
    amplification = ‖ΔW‖_F / ‖UᵀWV‖_F with ΔW's U, V

The paper finds ΔW's directions are not W's top ones but directions W barely uses (the "ΔW"
column far below the "W" column, close to "random"), amplified by a large factor (≈ 21.5 for
r = 4 on GPT-3's W_q at layer 48). Needs the base model (the run's ``model.name_or_path``).
Prints a Markdown table, then a note for a variant whose numbers are not comparable with
LoRA's (DoRA: its ΔW includes a full-rank magnitude rescaling); ``--csv`` writes the table,
``--plot`` draws amplification per layer.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from torch import nn

import variants
from analysis.collect_runs import caveats
from analysis.weights import run_labels
from schema import ConfigError
from training import rundir

COLUMNS = ("run", "module", "rank", "delta_norm", "on_delta_dirs", "on_w_dirs", "on_random_dirs", "amplification")


def projected_norm(weight: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> float:
    """‖Uᵀ W V‖_F for U ``(d_out, r)``, V ``(d_in, r)``."""
    return float(torch.linalg.matrix_norm(left.t() @ weight @ right))


def random_frame(dim: int, rank: int, generator: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(dim, rank, generator=generator, dtype=torch.float64))
    return q


def module_stats(weight: torch.Tensor, delta: torch.Tensor, rank: int, generator: torch.Generator) -> dict[str, float]:
    if rank == 0:  # AdaLoRA pruned the whole module: nothing to amplify
        return dict.fromkeys(COLUMNS[3:], float("nan"))
    weight, delta = weight.double(), delta.double()
    u_delta, _, vh_delta = torch.linalg.svd(delta, full_matrices=False)
    u_w, _, vh_w = torch.linalg.svd(weight, full_matrices=False)
    on_delta = projected_norm(weight, u_delta[:, :rank], vh_delta[:rank].t())
    delta_norm = float(torch.linalg.matrix_norm(delta))
    return {
        "delta_norm": delta_norm,
        "on_delta_dirs": on_delta,
        "on_w_dirs": projected_norm(weight, u_w[:, :rank], vh_w[:rank].t()),
        "on_random_dirs": projected_norm(weight, random_frame(weight.shape[0], rank, generator),
                                         random_frame(weight.shape[1], rank, generator)),
        "amplification": delta_norm / on_delta,
    }


def effective_rank(model: nn.Module, layer: variants.AdapterLayer) -> int:
    """Rows of the layer's down factor (the model's variant's ``low_rank_factors``): r, or what
    AdaLoRA's pruning kept."""
    own = {name: tensor for name, tensor in layer.state_dict().items() if not name.startswith("base.")}
    return variants.variant_of(model).low_rank_factors(own)[0].shape[0]


def load_run(run_dir: Path):
    """The run's base model with its adapter loaded."""
    from training.models import load_trained

    path = run_dir / rundir.ADAPTER
    if not path.is_file():
        raise ConfigError(f"{run_dir} has no {rundir.ADAPTER} (is it a finished run dir?)")
    return load_trained(path)[0]


def analyse(run_dirs: list[Path], modules: str | None = None, seed: int = 0) -> list[dict]:
    rows = []
    generator = torch.Generator().manual_seed(seed)
    for run_dir, label in zip(run_dirs, run_labels(run_dirs)):
        model = load_run(run_dir)
        with torch.no_grad():
            for name, layer in variants.layers_of(model).items():
                if modules and not re.search(modules, name):
                    continue
                rank = effective_rank(model, layer)
                stats = module_stats(layer.frozen_weight(), layer.delta_weight().float(), rank, generator)
                rows.append({"run": label, "module": name, "rank": rank, **stats})
    return rows


def plot(rows: list[dict], out: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for (run, kind), points in _series(rows).items():
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{run} {kind}")
    ax.set_xlabel("layer")
    ax.set_ylabel("amplification ‖ΔW‖ / ‖UᵀWV‖")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def _series(rows: list[dict]) -> dict[tuple[str, str], list[tuple[int, float]]]:
    series: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for row in rows:
        match = re.search(r"\.(\d+)\.", row["module"])
        layer = int(match.group(1)) if match else 0
        series.setdefault((row["run"], row["module"].rsplit(".", 1)[-1]), []).append((layer, row["amplification"]))
    return series


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories")
    parser.add_argument("--modules", help="regex: keep only matching module names")
    parser.add_argument("--csv", type=Path, help="write the table as CSV")
    parser.add_argument("--plot", type=Path, help="write amplification per layer as PNG")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random directions")
    args = parser.parse_args(argv)
    try:
        rows = analyse(args.runs, args.modules, args.seed)
    except (ConfigError, NotImplementedError) as err:  # NotImplementedError: a variant without low-rank factors
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not rows:
        where = "matches --modules" if args.modules else "in these runs (a baseline such as full, bitfit or head adapts none)"
        print(f"error: no adapted module {where}", file=sys.stderr)
        return 2
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for row in rows:
        print("| " + " | ".join(f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in COLUMNS) + " |")
    if args.csv:
        with args.csv.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
    if args.plot:
        plot(rows, args.plot)
    for name, why in caveats(*args.runs, analysis="amplification").items():
        print(f"note ({name}): {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
