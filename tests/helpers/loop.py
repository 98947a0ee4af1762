"""The trainer called in process, as run_experiment calls it, for tests of the loop itself."""

import torch
from omegaconf import DictConfig

from training.device import Runtime
from training.evaluation import ClassifierEvaluator
from training.tracking import Tracker
from training.trainer import plan_run, train


def train_in_process(model, loader, eval_loader, trainer_cfg: DictConfig, run_dir, metrics=("accuracy",),
                     tracking: str = "disabled"):
    """Train on CPU in fp32 with ``trainer_cfg``; metrics.jsonl goes to ``run_dir``. Returns the TrainState."""
    tracker = Tracker(run_dir, {}, mode=tracking)
    plan = plan_run(trainer_cfg, len(loader), ClassifierEvaluator(metrics))
    state = train(model, loader, {"main": eval_loader}, plan, trainer_cfg, tracker, Runtime(torch.device("cpu")))
    tracker.finish()
    return state
