#!/usr/bin/env python
"""Train one adapter configuration, or sweep many with ``-m``.

    python run.py                                  # the offline default: LoRA r=8 on MiniLM, smoke task
    python run.py variant=lora rank=8,16,64 -m     # a sweep, one run dir per job under runs/sweeps/
    python run.py --cfg job                        # print the composed config
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from training import run_experiment
from training.cli import check_group_choices
from variants import ConfigError

CONF_DIR = Path(__file__).resolve().parent / "conf"


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    sweep = hydra_cfg.mode == RunMode.MULTIRUN
    group = Path(hydra_cfg.sweep.dir).name if sweep else None
    name = f"{group}/{run_dir.name}" if sweep else run_dir.name
    try:
        summary = run_experiment(cfg, run_dir, group=group, run_name=name)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    return summary["eval"][summary["main_metric"]]


if __name__ == "__main__":
    try:
        check_group_choices(sys.argv[1:], CONF_DIR)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    main()
