#!/usr/bin/env python
"""The two-stage learning-rate protocol of conf/experiment/glue_minilm_converged.yaml: what stage 1
chose, what to run next, and what it all cost.

    python analysis/two_stage.py runs/sweeps/glue_converged/stsb_s1_*            # choices and next commands
    python analysis/two_stage.py runs/sweeps/glue_converged/* --cost             # CPU hours per task and method
    python analysis/two_stage.py docs/results/glue_converged/runs/stsb_s1_* --commands \
        --sweep-root runs/sweeps/glue_converged                                     # the next commands alone

Stage 1 runs every rate of a method's grid on one seed (``--seed``, default 0). Per task and
method this prints each rate's validation metric (at the run's best evaluation, as
``compare.py --at best_val`` reads it) and the choice: the best, ties to the smaller rate. A
choice at the lowest or highest rate tried is at the edge of what was tried, and the next command
extends the grid a step (the grid's own factor) beyond it, as a new point (``++lr_grid.G.pK=rate``);
otherwise the next command is stage 2, the chosen rate on the other seeds (``--seeds``). A method
whose grid has points without a completed run gets no command: stage 1 is not finished. Each
command repeats the job's own overrides (``.hydra/overrides.yaml``; where a copied run dir lacks
it, the method's: ``variant=`` and, for a grid that is not the variant's own, ``lr_grid_of=`` and
``variant.targets=``) and writes into a fixed sweep dir (``--sweep-root``, default: beside the
first stage-1 dir) with ``skip_completed=true``, so rerunning it after a cut-off finishes what is
missing.

``--cost`` sums each run's wall time (``summary.json``'s ``wall_time_s``, which for a resumed run
adds the earlier processes' training seconds; one thread per job, so wall seconds are CPU seconds)
per task and method, completed runs only.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

from omegaconf import OmegaConf

from training import rundir

FIXED = ("lr_point=", "seed=", "skip_completed=", "task=", "hydra.", "+experiment=")  # set by each command itself


class TwoStageError(ValueError):
    """Bad input: one line, exit status 2."""


def jobs(roots: list[Path]) -> list[dict]:
    """Every completed job below ``roots``: its summary, resolved config and own overrides."""
    found = []
    for root in roots:
        for path in sorted(root.rglob(rundir.SUMMARY)):
            job = path.parent
            try:
                summary = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if summary.get("status") != "completed" or not (job / rundir.CONFIG).is_file():
                continue
            config = OmegaConf.load(job / rundir.CONFIG)
            overrides_file = job / rundir.HYDRA_OVERRIDES
            overrides = (OmegaConf.to_container(OmegaConf.load(overrides_file)) if overrides_file.is_file()
                         else method_overrides(config))
            found.append({"dir": job, "summary": summary, "config": config,
                          "overrides": [o for o in overrides if not o.startswith(FIXED)]})
    return found


def method_overrides(config) -> list[str]:
    """What selects a run's method, read back from its resolved config (for copied run dirs
    without ``.hydra/``)."""
    grid = config.get("lr_grid_of") or config.variant.name
    if grid == config.variant.name:
        return [f"variant={config.variant.name}"]
    return [f"variant={config.variant.name}", f"variant.targets={config.variant.targets}", f"lr_grid_of={grid}"]


def grid_name(job: dict) -> str:
    return job["config"].get("lr_grid_of") or job["summary"]["variant"]


def val_at_best(summary: dict) -> float:
    chosen = summary.get("eval_at_best_val")
    if not chosen:
        raise TwoStageError(f"a run has no eval_at_best_val (task.val_fraction unset?): {summary.get('variant')}")
    value = chosen["val"][summary["main_metric"]]
    return -math.inf if math.isnan(value) else value


def plan(found: list[dict], seed: int, seeds: list[int], sweep_root: Path) -> list[str]:
    """One block per (task, grid): the rates tried on ``seed``, the choice and the next command."""
    by_cell: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for job in found:
        if job["summary"]["seed"] == seed:
            by_cell[(job["summary"]["task"], grid_name(job))].append(job)
    lines = []
    for (task, grid), cell in sorted(by_cell.items()):
        tried = sorted(cell, key=lambda j: j["config"].trainer.lr)
        best = max(tried, key=lambda j: (val_at_best(j["summary"]), -j["config"].trainer.lr))
        rates = [j["config"].trainer.lr for j in tried]
        lr = best["config"].trainer.lr
        metric = best["summary"]["main_metric"]
        lines.append(f"## {task} / {grid} (seed {seed}, validation {metric} at each run's best evaluation)")
        missing = sorted(set(best["config"].lr_grid[grid]) - {j["config"].lr_point for j in tried})
        for job in tried:
            mark = "  <- chosen" if job is best else ""
            stop = job["summary"].get("stopped", {})
            lines.append(f"  lr {job['config'].trainer.lr:g}: {100 * val_at_best(job['summary']):.2f} "
                         f"(best at step {job['summary']['eval_at_best_val']['step']}, "
                         f"{stop.get('reason', '?')} after {stop.get('epochs', float('nan')):.1f} epochs){mark}")
        base = ["python run.py +experiment=glue_minilm_converged", f"task={task}", *best["overrides"],
                "skip_completed=true"]
        if missing:
            lines += [f"  stage 1 unfinished: no completed run at {', '.join(missing)}; no choice yet", ""]
            continue
        if len(rates) > 1 and lr in (rates[0], rates[-1]):
            factor = rates[1] / rates[0] if lr == rates[0] else rates[-1] / rates[-2]
            new = lr / factor if lr == rates[0] else lr * factor
            point = _new_point(best["config"].lr_grid[grid], below=lr == rates[0])
            lines.append(f"  at the {'low' if lr == rates[0] else 'high'} edge of the grid: extend it to {new:.3g}")
            lines.append("  " + " ".join([*base, f"++lr_grid.{grid}.{point}={new:.3g}", f"lr_point={point}",
                                          f"seed={seed}", f"hydra.sweep.dir={sweep_root}/{task}_s1x_{grid}_{point}"]))
        else:
            point = best["config"].lr_point
            lines.append(f"  stage 2: lr {lr:g} ({point}) on seeds {','.join(map(str, seeds))}")
            lines.append("  " + " ".join([*base, f"lr_point={point}", f"seed={','.join(map(str, seeds))}",
                                          f"hydra.sweep.dir={sweep_root}/{task}_s2_{grid}"]))
        lines.append("")
    return lines


def _new_point(grid: dict, below: bool) -> str:
    """The next free point name beyond a grid's end: p4, p5, ... above; m1, m2, ... below."""
    prefix, start = ("m", 1) if below else ("p", len([k for k in grid if k.startswith("p")]))
    k = start
    while f"{prefix}{k}" in grid:
        k += 1
    return f"{prefix}{k}"


def cost(found: list[dict]) -> list[str]:
    """CPU hours per task and method (wall seconds of one-thread jobs), and the runs counted."""
    hours: dict[tuple[str, str], list[float]] = defaultdict(list)
    for job in found:
        hours[(job["summary"]["task"], grid_name(job))].append(job["summary"]["wall_time_s"] / 3600)
    lines = ["| task | method (grid) | runs | CPU hours | per run (median) |", "|---|---|---|---|---|"]
    for (task, grid), values in sorted(hours.items()):
        lines.append(f"| {task} | {grid} | {len(values)} | {sum(values):.2f} | {sorted(values)[len(values) // 2]:.2f} |")
    total = sum(sum(v) for v in hours.values())
    lines.append(f"| all | | {sum(len(v) for v in hours.values())} | {total:.2f} | |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("roots", nargs="+", type=Path, help="sweep dirs (stage 1, or every stage for --cost)")
    parser.add_argument("--seed", type=int, default=0, help="the seed stage 1 ran the grid on")
    parser.add_argument("--seeds", default="1,2", help="stage 2's seeds")
    parser.add_argument("--cost", action="store_true", help="CPU hours per task and method instead")
    parser.add_argument("--commands", action="store_true", help="print the next commands alone, one per line")
    parser.add_argument("--sweep-root", type=Path, help="where the commands' sweep dirs go (default: the "
                        "first root's parent)")
    args = parser.parse_args(argv)
    try:
        missing = [str(r) for r in args.roots if not r.is_dir()]
        if missing:
            raise TwoStageError(f"roots: not a directory: {', '.join(missing)}")
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else []
        found = jobs(args.roots)
        if not found:
            raise TwoStageError(f"roots: no completed run below {', '.join(map(str, args.roots))}")
        lines = cost(found) if args.cost else plan(found, args.seed, seeds, args.sweep_root or args.roots[0].parent)
        if args.commands:
            lines = [line.strip() for line in lines if line.strip().startswith("python run.py")]
        print("\n".join(lines))
    except (TwoStageError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
