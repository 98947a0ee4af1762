#!/usr/bin/env python
"""Subspace similarity between the adapters of two runs (Hu et al. 2021, §7.2, Fig. 3–4).

    python analysis/subspace_overlap.py RUN_1 RUN_2 [--side down|up] [--modules REGEX]
                                        [--zoom K] [--random-baseline] [--out DIR]

For every module adapted in both runs, with down-projections A1 (r1 × d) and A2 (r2 × d):

    φ(A1, A2, i, j) = ‖U1[:, :i]ᵀ U2[:, :j]‖²_F / min(i, j),   1 ≤ i ≤ r1, 1 ≤ j ≤ r2

where U are the right-singular vectors of A, ordered by singular value (a module AdaLoRA
pruned to rank 0 has no subspace: its row shows "–"). φ = 1 when the
top-i directions of one lie in the span of the top-j of the other, 0 when orthogonal; two
random subspaces of R^d give φ ≈ max(i, j)/d. Use a rank-8 and a rank-64 run to reproduce
Fig. 3, two runs of the same rank with different seeds for Fig. 4. The two runs must have
different seeds (else refused, see ``check_independent_init``): adapters drawn from one seed
can start from the same random numbers, and the overlap would then be the shared start's.

The matrices compared, per variant: LoRA, DoRA, QLoRA, staged, EVA: A (``--side up``: B, the
column space of ΔW); AdaLoRA: Q restricted to the kept triplets (``up``: P·Λ); PiSSA, MiLoRA,
LoRA-GA, whose A and B start at chosen directions: the factors √S·Vᵀ (``up``: U·√S) of their
update B·A − B₀·A₀ = U·S·Vᵀ, rank up to 2r (A itself would show the start, the same for every seed).

Outputs in --out (default: RUN_2/subspace_vs_<RUN_1 name>/):
  phi.json                 {module: {"r1", "r2", "phi": [[φ(i, j) for j] for i]}} (+ random baseline)
  phi.csv                  module, i, j, phi (+ phi_random with --random-baseline)
  subspace_overlap.png     one heatmap per module, i down, j across, as in the paper
  subspace_overlap_zoom.png   the same for i, j ≤ --zoom (default 8)
and a table of φ(1, 1), the top directions' overlap, on stdout, followed by a note for a variant
whose φ is not comparable with LoRA's (AdaLoRA's near-orthonormal Q has no meaningful order).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from safetensors.torch import load_file

import variants
from analysis.collect_runs import caveats
from schema import ConfigError
from training import rundir

SIDES = ("down", "up")


class Incompatible(ValueError):
    """The two runs cannot be compared (message says why)."""


def load_factors(run_dir: Path, side: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """The run's adapter config and, per adapted module, its basis matrix: rows span the
    subspace (down: A as is, ``(r, d_in)``; up: Bᵀ, ``(r, d_out)``)."""
    path = run_dir / rundir.ADAPTER
    if not path.is_file():
        raise Incompatible(f"{run_dir} has no {rundir.ADAPTER} (is it a finished run dir?)")
    config = variants.read_adapter_config(path)
    if not config.get("modules"):
        raise Incompatible(f"{path} has no adapted modules in its metadata (variant {config.get('variant')!r}); "
                           "the subspace analysis needs low-rank adapters")
    layer_cls = variants.get_variant(config["variant"])
    tensors = load_file(str(path))
    factors = {}
    for module in config["modules"]:
        prefix = module + "."
        state = {k[len(prefix):]: v.float() for k, v in tensors.items() if k.startswith(prefix)}
        down, up = layer_cls.low_rank_factors(state)
        factors[module] = down if side == "down" else up.t()
    return config, factors


def singular_basis(matrix: torch.Tensor) -> torch.Tensor:
    """Right-singular vectors of ``matrix`` (k × d) as rows, by decreasing singular value."""
    return torch.linalg.svd(matrix.double(), full_matrices=False).Vh


def phi(basis_1: torch.Tensor, basis_2: torch.Tensor) -> torch.Tensor:
    """φ(i, j) for all i ≤ r1, j ≤ r2, from two row-orthonormal bases: ``(r1, r2)``."""
    overlap = (basis_1 @ basis_2.t()).pow(2)
    cumulative = overlap.cumsum(0).cumsum(1)  # ‖U1[:, :i]ᵀ U2[:, :j]‖²_F
    i = torch.arange(1, basis_1.shape[0] + 1, dtype=overlap.dtype).unsqueeze(1)
    j = torch.arange(1, basis_2.shape[0] + 1, dtype=overlap.dtype).unsqueeze(0)
    return cumulative / torch.minimum(i, j)


def check_independent_init(run_1: Path, run_2: Path) -> None:
    """Refuse two runs whose adapters may have started from the same random draws: one seed at
    one rank starts identical, and at two ranks the streams overlap whenever the draws before
    A do not depend on the rank (here they happen to: the settings check builds a rank-sized
    layer first, so measured at init, rank 8 vs 64 on MiniLM shares no row), so φ could measure
    the shared start rather than what was learned."""
    summaries = [rundir.read_summary(run) or {} for run in (run_1, run_2)]
    seeds = [s.get("seed") for s in summaries]
    starts = [s.get("init_from") for s in summaries]
    if None in seeds:
        raise Incompatible(f"{run_1 if seeds[0] is None else run_2} has no summary.json with its seed, so an "
                           "identical start cannot be ruled out; pass --allow-shared-init to compare anyway")
    if starts[0] and starts[0] == starts[1]:
        raise Incompatible(f"both runs started from the adapters of {starts[0]} (init_from), so the overlap "
                           "would reflect that shared start; pass --allow-shared-init to measure it anyway")
    if seeds[0] == seeds[1] and not any(starts):
        raise Incompatible(
            f"both runs used seed={seeds[0]}: their adapters may start from the same random draws (at one rank "
            "they start identical), so the overlap could reflect the shared initialisation; "
            "compare runs with different seeds, or pass --allow-shared-init to measure it anyway")


def compare(
    run_1: Path, run_2: Path, side: str = "down", modules: str | None = None, random_baseline: bool = False,
    seed: int = 0, allow_shared_init: bool = False,
) -> dict[str, dict]:
    config_1, factors_1 = load_factors(run_1, side)
    config_2, factors_2 = load_factors(run_2, side)
    if not allow_shared_init and run_1.resolve() != run_2.resolve():
        check_independent_init(run_1, run_2)
    model_1, model_2 = config_1.get("model"), config_2.get("model")
    if model_1 != model_2:
        raise Incompatible(f"the runs adapt different models: {model_1!r} vs {model_2!r}")
    common = [m for m in factors_1 if m in factors_2]
    if modules:
        common = [m for m in common if re.search(modules, m)]
    if not common:
        raise Incompatible(
            f"no module is adapted in both runs{' and matches --modules' if modules else ''}: "
            f"{sorted(factors_1)[:3]}… vs {sorted(factors_2)[:3]}…"
        )
    generator = torch.Generator().manual_seed(seed)
    results: dict[str, dict] = {}
    for module in common:
        a_1, a_2 = factors_1[module], factors_2[module]
        if a_1.shape[1] != a_2.shape[1]:
            raise Incompatible(f"{module}: dimension {a_1.shape[1]} vs {a_2.shape[1]}")
        entry = {"r1": a_1.shape[0], "r2": a_2.shape[0], "dim": a_1.shape[1], "phi": []}
        if 0 in (a_1.shape[0], a_2.shape[0]):  # AdaLoRA pruned the module entirely: no subspace
            results[module] = entry
            continue
        entry["phi"] = phi(singular_basis(a_1), singular_basis(a_2)).tolist()
        if random_baseline:
            g_1 = torch.randn(a_1.shape, generator=generator, dtype=torch.float64)
            g_2 = torch.randn(a_2.shape, generator=generator, dtype=torch.float64)
            entry["phi_random"] = phi(singular_basis(g_1), singular_basis(g_2)).tolist()
        results[module] = entry
    return results


def heatmaps(results: dict[str, dict], out: Path, title: str, zoom: int | None = None, key: str = "phi") -> None:
    names = [name for name, entry in results.items() if entry["phi"]]
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.6 * rows), squeeze=False)
    image = None
    for ax, name in zip(axes.flat, names):
        grid = torch.tensor(results[name][key])
        if zoom:
            grid = grid[:zoom, :zoom]
        image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
        ax.set_title(name.replace("attention.self.", "").replace("encoder.layer.", "L"), fontsize=8)
        ax.set_xlabel("j", fontsize=8)
        ax.set_ylabel("i", fontsize=8)
        ax.set_xticks(range(0, grid.shape[1], max(1, grid.shape[1] // 8)),
                      [str(t + 1) for t in range(0, grid.shape[1], max(1, grid.shape[1] // 8))], fontsize=6)
        ax.set_yticks(range(grid.shape[0]), [str(t + 1) for t in range(grid.shape[0])], fontsize=6)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="φ(i, j)")
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_1", type=Path, help="run dir, e.g. the rank-8 run (i indexes its directions)")
    parser.add_argument("run_2", type=Path, help="run dir, e.g. the rank-64 run (j indexes its directions)")
    parser.add_argument("--side", choices=SIDES, default="down",
                        help="down: row space of A (the paper's); up: column space of ΔW (B)")
    parser.add_argument("--modules", help="regex: keep only matching module names (e.g. 'layer\\.5\\.')")
    parser.add_argument("--zoom", type=int, default=8, help="size of the zoomed heatmap (paper: 8)")
    parser.add_argument("--random-baseline", action="store_true",
                        help="also compare Gaussian matrices of the same shapes")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random baseline")
    parser.add_argument("--out", type=Path, help="output folder")
    parser.add_argument("--allow-shared-init", action="store_true",
                        help="compare runs of the same seed (their adapters start from the same random draws)")
    args = parser.parse_args(argv)
    try:
        results = compare(args.run_1, args.run_2, args.side, args.modules, args.random_baseline, args.seed,
                          args.allow_shared_init)
    except (Incompatible, ConfigError, NotImplementedError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = args.out or args.run_2 / f"subspace_vs_{args.run_1.name}"
    out.mkdir(parents=True, exist_ok=True)
    notes = caveats(args.run_1, args.run_2, analysis="subspace_overlap")
    (out / "phi.json").write_text(json.dumps(
        {"run_1": str(args.run_1), "run_2": str(args.run_2), "side": args.side, "modules": results, "notes": notes}))
    with (out / "phi.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["module", "i", "j", "phi", *(["phi_random"] if args.random_baseline else [])])
        for module, entry in results.items():
            for i, row in enumerate(entry["phi"], start=1):
                for j, value in enumerate(row, start=1):
                    extra = [entry["phi_random"][i - 1][j - 1]] if args.random_baseline else []
                    writer.writerow([module, i, j, f"{value:.6f}", *extra])
    title = f"φ({args.run_1.name}, {args.run_2.name}), {args.side} side"
    heatmaps(results, out / "subspace_overlap.png", title)
    heatmaps(results, out / "subspace_overlap_zoom.png", title + f", i, j ≤ {args.zoom}", zoom=args.zoom)
    if args.random_baseline:
        heatmaps(results, out / "subspace_overlap_random.png", "random Gaussian baseline", key="phi_random")
    print(f"| module | r1 | r2 | φ(1,1) | mean φ(1, j≤{args.zoom}) |" + (" random φ(1,1) |" if args.random_baseline else ""))
    print("|---|---|---|---|---|" + ("---|" if args.random_baseline else ""))
    for module, entry in results.items():
        if not entry["phi"]:
            print(f"| {module} | {entry['r1']} | {entry['r2']} | – | – |" + (" – |" if args.random_baseline else ""))
            continue
        first_row = entry["phi"][0][: args.zoom]
        line = f"| {module} | {entry['r1']} | {entry['r2']} | {entry['phi'][0][0]:.3f} | {sum(first_row) / len(first_row):.3f} |"
        if args.random_baseline:
            line += f" {entry['phi_random'][0][0]:.3f} |"
        print(line)
    for name, why in notes.items():
        print(f"note ({name}): {why}")
    print(f"outputs: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
