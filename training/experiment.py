"""One run from a composed config: data, model, adapters, training, and the run directory.

The run directory holds everything needed to read or reproduce the run:
``config.yaml`` (resolved), ``metrics.jsonl``, ``summary.json``, ``adapter.safetensors`` (what
trained: the adapters, or a baseline's trained weights, with the metadata to rebuild the model)
and, when W&B is on, its files under ``wandb/``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import set_seed

import variants
from variants import ConfigError

from . import checkpoint, distributed
from .data import load_task, make_loader
from .metrics import check_metric_names
from .models import load_model
from .tracking import NullTracker, Tracker
from .trainer import (
    check_trainer_config, eval_interval, peak_memory_mb, pick_device, reset_peak_memory, total_steps, train,
)

log = logging.getLogger(__name__)

# Keys of the variant group that the runner consumes; all others go to the layer's constructor.
VARIANT_RUNNER_KEYS = ("name", "targets", "bias")


def variant_kwargs(variant_cfg: DictConfig) -> dict[str, Any]:
    return {k: v for k, v in OmegaConf.to_container(variant_cfg, resolve=True).items() if k not in VARIANT_RUNNER_KEYS}


def best_eval(history: list[tuple[int, dict[str, float]]], main_metric: str) -> dict[str, Any]:
    """The evaluation with the highest main metric (the LoRA paper reports the best epoch) and
    its step; ``eval`` in the summary stays the last one."""
    step, metrics = max(history, key=lambda item: item[1][main_metric])
    return {"step": step, **metrics}


def weights_mb(model) -> float:
    """Memory of the model's parameters and buffers as stored (a 4-bit weight at its packed size;
    quantization constants kept outside parameters are not included)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def _check_top_level(cfg: DictConfig) -> None:
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int):
        raise ConfigError(f"seed={cfg.seed!r} must be an integer")
    variants.get_variant(cfg.variant.name)
    check_trainer_config(cfg.trainer)
    check_metric_names(list(cfg.task.metrics))
    if cfg.task.main_metric not in cfg.task.metrics:
        raise ConfigError(f"task.main_metric={cfg.task.main_metric!r} must be one of task.metrics: {list(cfg.task.metrics)}")


def run_experiment(cfg: DictConfig, run_dir: Path, group: str | None = None, run_name: str | None = None) -> dict[str, Any]:
    """Validate, build, train, evaluate and save one run; returns the summary."""
    started = time.perf_counter()
    _check_top_level(cfg)
    context = distributed.context_from_env()
    device, autocast_dtype = pick_device(cfg.trainer.device, cfg.trainer.precision)
    device = distributed.device_for(context, device)
    reset_peak_memory(device)
    set_seed(cfg.seed)

    train_examples, eval_sets = load_task(cfg.task)
    model, tokenizer = load_model(cfg.model.name_or_path, cfg.task.num_labels)
    if cfg.model.get("dropout") is not None:
        set_dropout(model, cfg.model.dropout)
    head = list(cfg.model.train_modules)
    targets = cfg.variant.get("targets")  # baselines need none: full and bitfit select by kind
    if targets is not None and not isinstance(targets, str):
        targets = list(targets)
    adapted = variants.inject_adapters(
        model, cfg.variant.name, targets, rank=cfg.rank, alpha=cfg.alpha, exclude=head,
        **variant_kwargs(cfg.variant),
    )
    variants.mark_trainable(model, bias=cfg.variant.get("bias", "none"), train_modules=head)
    adapter_config = variants.adapter_config(model)
    peak_lr = variants.learning_rate(model, cfg.trainer.lr)  # a variant may ask for its own
    trainable, total = variants.count_parameters(model)
    model.to(device)

    fields = list(cfg.task.text_fields)
    max_length = cfg.model.max_length
    train_loader = make_loader(train_examples, tokenizer, fields, max_length, cfg.trainer.batch_size, shuffle=True,
                               seed=cfg.seed, shard=context)
    eval_loaders = {
        name: make_loader(examples, tokenizer, fields, max_length, cfg.trainer.eval_batch_size, shuffle=False)
        for name, examples in eval_sets.items()
    }

    # Settings that depend on the run length (a rank schedule longer than training) fail here,
    # before the run dir is written.
    variants.check_total_steps(model, total_steps(cfg.trainer, len(train_loader)))
    eval_interval(cfg.trainer, len(train_loader))

    checkpoint_path = run_dir / checkpoint.FILE_NAME
    resume = None
    if cfg.get("resume"):
        if not checkpoint_path.is_file():
            raise ConfigError(f"resume=true but {str(run_dir)!r} has no {checkpoint.FILE_NAME} to resume from")
        resume = checkpoint.load(checkpoint_path)
        if context.is_main:
            _truncate_metrics(run_dir / "metrics.jsonl", resume["step"])
        log.info("resuming %s from step %d", run_dir, resume["step"])
    if not context.is_main:  # rank 0 writes the run dir and logs; the others only train
        return _train_quietly(model, train_loader, eval_loaders, cfg, device, autocast_dtype, resume, context)

    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    log.info("run dir %s: %s on %d modules, %d / %d parameters trainable (%.3f%%), peak lr %g",
             run_dir, cfg.variant.name, len(adapted), trainable, total, 100 * trainable / total, peak_lr)

    tracking = cfg.tracking
    group = tracking.group or group
    tracker = Tracker(
        run_dir, resolved, mode=tracking.mode, project=tracking.project, entity=tracking.entity,
        group=group, name=run_name or run_dir.name, tags=list(tracking.tags),
        resume_id=resume.get("wandb_run_id") if resume else None,
    )
    try:
        result = train(model, train_loader, eval_loaders, cfg.trainer, list(cfg.task.metrics), tracker, device,
                       autocast_dtype, checkpoint_path=checkpoint_path, resume=resume, context=context)
        variants.save_adapter(model, run_dir / "adapter.safetensors", extra_metadata={"model": cfg.model.name_or_path, "task": cfg.task.name})
        memory_mb, memory_kind = peak_memory_mb(device)
        summary = {
            "status": "completed",
            "variant": cfg.variant.name,
            "rank": adapter_config["rank"],  # null for a baseline, which has none
            "alpha": adapter_config["alpha"],
            "seed": cfg.seed,
            "model": cfg.model.name_or_path,
            "task": cfg.task.name,
            "main_metric": cfg.task.main_metric,
            "eval": result.eval_metrics,
            "eval_extra": result.extra_eval_metrics,
            "eval_best": best_eval(result.eval_history, cfg.task.main_metric),
            "peak_lr": peak_lr,
            "trainable_params": trainable,
            "total_params": total,
            "trainable_percent": 100 * trainable / total,
            "adapted_modules": adapted,
            "steps": result.steps,
            "train_examples": len(train_examples),
            "eval_examples": len(eval_sets["main"]),
            "wall_time_s": time.perf_counter() - started,
            "train_time_s": result.train_time_s,
            "step_time_s": result.median_step_time_s,
            "peak_memory_mb": memory_mb,
            "peak_memory_kind": memory_kind,
            "weights_mb": weights_mb(model),
            "device": str(device),
            "processes": context.world_size,
            "precision": "bf16" if autocast_dtype is not None else "fp32",
            "wandb_run_id": tracker.wandb_run.id if tracker.wandb_run is not None else None,
            "wandb_group": group,
            "adapter_report": variants.adapter_report(model),
        }
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        tracker.summary({k: v for k, v in summary.items() if k != "adapted_modules"})
    except BaseException as err:
        failure = {"status": "failed", "variant": cfg.variant.name, "rank": cfg.rank, "seed": cfg.seed,
                   "task": cfg.task.name, "main_metric": cfg.task.main_metric,
                   "error": f"{type(err).__name__}: {err}"}
        write_failure(run_dir, failure)
        tracker.summary(failure)
        tracker.finish(exit_code=1)
        raise
    tracker.finish()
    checkpoint_path.unlink(missing_ok=True)  # the run is complete: adapter.safetensors is what remains
    return summary


def _train_quietly(model, train_loader, eval_loaders, cfg, device, autocast_dtype, resume, context) -> dict[str, Any]:
    """A non-zero rank of a ``torchrun`` job: the same training, nothing written."""
    result = train(model, train_loader, eval_loaders, cfg.trainer, list(cfg.task.metrics), NullTracker(), device,
                   autocast_dtype, resume=resume, context=context)
    return {"status": "completed", "main_metric": cfg.task.main_metric, "eval": result.eval_metrics}


def set_dropout(model, p: float) -> None:
    """Set the probability of every dropout in the base model (``model.dropout``)."""
    if not 0 <= p < 1:
        raise ConfigError(f"model.dropout={p!r} must be null or in [0, 1)")
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p


def write_failure(run_dir: Path, failure: dict[str, Any]) -> None:
    """Mark a run failed in its summary.json (the last checkpoint, if any, stays for resume=true)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "summary.json").write_text(json.dumps(failure, indent=2) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records written after the checkpoint: the resumed run writes them again."""
    if path.is_file():
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))
