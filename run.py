#!/usr/bin/env python
"""Train one adapter configuration, or sweep many with ``-m``.

    python run.py                                  # the offline default: LoRA r=8 on MiniLM, smoke task
    python run.py variant=lora rank=8,16,64 -m     # a sweep, one run dir per job under runs/sweeps/
    python run.py resume=runs/<run dir>            # continue a stopped run from its checkpoint
    torchrun --nproc_per_node 2 run.py hydra.run.dir=runs/ddp   # one run, data-parallel
    python run.py --cfg job                        # print the composed config

In a sweep (-m) a job that fails is recorded as failed in its run dir and the others go on;
the sweep dir then holds sweep_summary.md listing every job's status and metric. To complete a
sweep that was cut off, run its command again with ``hydra.sweep.dir=<that dir>
skip_completed=true``: jobs whose run dir holds a completed summary are not run again, and a job
cut off after a checkpoint continues from it.
"""

from __future__ import annotations

import time

STARTED = time.time()  # before the imports below: a resume's .hydra/resumed_<n> made later is not an earlier one

import os
import sys
from contextlib import nullcontext
from pathlib import Path

import hydra
import torch
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

import training.sweep  # noqa: F401  registers ${job_dirname:...}, which names sweep job dirs (hydra.sweep.subdir)
from schema import ConfigError
from schema.door import check_overrides
from training import checkpoint, interrupt, run_experiment, rundir
from training.cli import check_group_choices, check_launcher
from training.experiment import write_failure
from training.sweep import write_summary as write_sweep_summary

CONF_DIR = Path(__file__).resolve().parent / "conf"
NEXT_JOBS = "no further job starts (a sweep: its command again with skip_completed=true)"


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    sweep = hydra_cfg.mode == RunMode.MULTIRUN
    group = Path(hydra_cfg.sweep.dir).name if sweep else None
    name = f"{group}/{run_dir.name}" if sweep else run_dir.name
    if hydra_cfg.mode == RunMode.RUN or hydra_cfg.launcher._target_.endswith(".BasicLauncher"):
        interrupt.install()  # the job runs in this process (the other launchers' workers keep the default)
    if interrupt.requested():  # between two jobs of a sweep: Hydra's files of this one are removed
        rundir.remove_if_unused(run_dir)
        _stop(hydra_cfg, sweep, interrupt.requested(), f"{run_dir} was not started; {NEXT_JOBS}")
    try:
        with rundir.owned(run_dir) if _rank_zero() else nullcontext():  # whether to skip is decided holding it
            done = _skip_or_continue(cfg, run_dir) if cfg.get("skip_completed") else None
            if done:
                print(f"skip: {run_dir} already holds a completed run (skip_completed=true)", file=sys.stderr)
                return done["eval"][done["main_metric"]]
            summary = run_experiment(cfg, run_dir, group=group, run_name=name)
    except rundir.InUse as err:  # another process's run: nothing of it is touched
        if sweep and cfg.get("skip_completed"):  # another worker on this sweep runs it: this one takes the next
            print(f"skip: {run_dir} is being run by {err.owner} (skip_completed=true)", file=sys.stderr)
            return float("nan")
        print(f"error: {err}", file=sys.stderr)
        if not sweep:
            sys.exit(2)
        return float("nan")
    except interrupt.Interrupted as err:  # SIGTERM: this job stopped at a checkpoint, and a sweep starts no other
        _stop(hydra_cfg, sweep, err.signum, str(err))
    except Exception as err:  # noqa: BLE001  (one line for the user; in a sweep, the other jobs go on)
        print(f"error: {err}" if isinstance(err, ConfigError) else f"error: {type(err).__name__}: {err}",
              file=sys.stderr)
        if not sweep:
            if isinstance(err, ConfigError) and not cfg.get("resume"):
                rundir.remove_if_unused(run_dir)  # refused before anything was written: no empty dir stays
            elif isinstance(err, ConfigError) and hydra_cfg.output_subdir:  # a refused resume: its overrides are not the run's
                rundir.remove_refused_resume(run_dir / hydra_cfg.output_subdir)
            sys.exit(2 if isinstance(err, ConfigError) else 1)
        if not (run_dir / rundir.SUMMARY).is_file():  # failed before its run dir was written
            write_failure(run_dir, {"status": "failed", "error": f"{type(err).__name__}: {err}"})
        return float("nan")
    if interrupt.requested():  # it came during the last step or evaluation: the run completed
        _stop(hydra_cfg, sweep, interrupt.requested(), f"{run_dir} completed; {NEXT_JOBS}")
    return summary["eval"][summary["main_metric"]]


def _stop(hydra_cfg, sweep: bool, signum: int, what: str) -> None:
    """SIGTERM (training/interrupt.py): the sweep's summary as it stands, one line, exit 128 + signum."""
    if sweep:
        write_sweep_summary(Path(hydra_cfg.sweep.dir))
    print(f"interrupted: {what}", file=sys.stderr)
    sys.exit(128 + signum)


def _skip_or_continue(cfg: DictConfig, run_dir: Path) -> dict | None:
    """skip_completed=true: the summary of a run completed in ``run_dir`` before (the job is
    skipped), or None (it runs). A run cut off (killed, or failed) after a checkpoint is set to
    continue from it (``cfg.resume``), so a sweep cut off by a time limit loses no more than the
    steps since its last checkpoint."""
    try:
        done = rundir.read_summary(run_dir)
    except rundir.UnreadableSummary as err:
        print(f"skip_completed: {err}; not completed, so the job runs again", file=sys.stderr)
        done = None
    if done and done.get("status") == "completed":
        return done
    if not cfg.resume and any(p.is_file() for p in checkpoint.files(run_dir / rundir.CHECKPOINT)):
        print(f"skip_completed: {run_dir} was cut off; it continues from its last checkpoint", file=sys.stderr)
        cfg.resume = True
    return None


def _rank_zero() -> bool:
    """This process is torchrun's rank 0, or the only one: the one that owns and writes the run dir."""
    return int(os.environ.get("RANK", "0")) == 0


def torchrun_arguments(args: list[str]) -> list[str]:
    """Under ``torchrun`` all processes must share one run dir, and only rank 0 writes Hydra's files."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return args
    if not any(a.startswith("hydra.run.dir=") for a in args):
        raise ConfigError("hydra.run.dir is required under torchrun (every process must use the same run dir); "
                          "allowed: hydra.run.dir=<path>")
    if int(os.environ.get("RANK", "0")) > 0:
        return [*args, "hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    return args


def resume_arguments(args: list[str]) -> list[str]:
    """``resume=<run dir>`` becomes that run's own overrides (its latest resume's, which include
    the first run's), its dir, and ``resume=true``. Only plain config overrides are taken from the
    dir: a run dir received from someone else must not choose Hydra settings (callbacks,
    launchers, logging) and with them code to run. Every resume writes Hydra's files to a new
    ``.hydra/resumed_<n>/``, so the first run's overrides are kept, never overwritten."""
    resumed = [a for a in args if a.startswith("resume=") and a.split("=", 1)[1] not in ("true", "false", "True", "False")]
    if resumed:
        run_dir = Path(resumed[0].split("=", 1)[1])
        saved = _plain_overrides(run_dir, _latest_overrides(run_dir))
        rest = [a for a in args if a != resumed[0]]
        args = [*saved, *rest, f"hydra.run.dir={run_dir}", "resume=true"]
    elif not any(a.lstrip("+").lower() == "resume=true" for a in args):
        return args
    run_dirs = [a.split("=", 1)[1] for a in args if a.startswith("hydra.run.dir=")]
    if run_dirs and (Path(run_dirs[-1]) / ".hydra").is_dir() and _rank_zero():
        args = [*args, f"hydra.output_subdir={_next_output_subdir(Path(run_dirs[-1]))}"]
    return args


def _latest_overrides(run_dir: Path) -> Path:
    """The overrides the run last trained with: the latest resume's, else the first run's."""
    first = run_dir / rundir.HYDRA_OVERRIDES
    if not first.is_file():
        raise ConfigError(f"resume={str(run_dir)!r} is not a run dir (no .hydra/overrides.yaml); allowed: a run dir, true, false")
    readable = [d / "overrides.yaml" for _, d in sorted(_resumes(run_dir).items()) if (d / "overrides.yaml").is_file()]
    return readable[-1] if readable else first


def _resumes(run_dir: Path) -> dict[int, Path]:
    """``{n: .hydra/resumed_<n>}``: where each earlier resume of the run wrote Hydra's files (not
    one made after this process started: under torchrun, rank 0's Hydra makes this resume's)."""
    return {int(p.name.split("_", 1)[1]): p for p in run_dir.glob(".hydra/resumed_*")
            if p.name.split("_", 1)[1].isdigit() and p.stat().st_mtime < STARTED}


def _next_output_subdir(run_dir: Path) -> str:
    return f".hydra/resumed_{max(_resumes(run_dir), default=0) + 1}"


def _plain_overrides(run_dir: Path, path: Path) -> list[str]:
    """The config overrides in a run dir's ``overrides.yaml``, without ``resume=``, the run dir,
    and anything that is not a plain config override (``hydra.*``, ``hydra/...`` groups), which
    is dropped with a warning."""
    try:
        saved = yaml.safe_load(path.read_text()) or []
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path} is unreadable ({type(err).__name__}); allowed: a run dir written by run.py") from None
    if not isinstance(saved, list) or not all(isinstance(o, str) for o in saved):
        raise ConfigError(f"{path} is not a list of overrides; allowed: a run dir written by run.py")
    kept, dropped = [], []
    for override in saved:
        key = override.split("=", 1)[0].lstrip("+~")
        if key.startswith(("resume", "hydra.run.dir")):
            continue
        (dropped if key == "hydra" or key.startswith(("hydra.", "hydra/")) or override.startswith("-") else kept).append(override)
    if dropped:
        print(f"warning: resume ignores {len(dropped)} setting(s) of {path} that are not config overrides: "
              f"{' '.join(dropped)}", file=sys.stderr)
    return kept


if __name__ == "__main__":
    try:
        sys.argv[1:] = torchrun_arguments(resume_arguments(sys.argv[1:]))
        check_group_choices(sys.argv[1:], CONF_DIR)
        check_launcher(sys.argv[1:])
        check_overrides([a for a in sys.argv[1:] if "=" in a and not a.startswith("-")], CONF_DIR)
        for arg in sys.argv[1:]:  # before Hydra rewrites .hydra/ in a dir another process is running in
            if arg.startswith("hydra.run.dir=") and _rank_zero():
                rundir.check_free(Path(arg.split("=", 1)[1]))
    except (ConfigError, rundir.InUse) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    main()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
