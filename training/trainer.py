"""The training loop. Variant-specific behaviour reaches it only through the adapter hooks
(``variants.adapter_loss`` and ``variants.after_optimizer_step``)."""

from __future__ import annotations

import contextlib
import math
import resource
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

import variants
from variants import ConfigError

from .metrics import compute_metrics
from .tracking import Tracker

PRECISIONS = ("auto", "fp32", "bf16")
WARMUP_STEPS_EXCLUDED = 3  # first steps pay for lazy initialisation; kept out of step time


@dataclass
class TrainResult:
    steps: int
    train_time_s: float
    step_times_s: list[float] = field(default_factory=list)
    eval_metrics: dict[str, float] = field(default_factory=dict)

    @property
    def median_step_time_s(self) -> float:
        timed = self.step_times_s[WARMUP_STEPS_EXCLUDED:] or self.step_times_s
        return statistics.median(timed)


def pick_device(device: str, precision: str) -> tuple[torch.device, torch.dtype | None]:
    """The device, and the autocast dtype (None = plain fp32). ``auto`` prefers CUDA and bf16."""
    if precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision={precision!r} is not supported; allowed: {', '.join(PRECISIONS)}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"trainer.device={device!r} is not a torch device; allowed: auto, cpu, cuda, cuda:N") from None
    use_bf16 = precision == "bf16" or (
        precision == "auto" and dev.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    return dev, (torch.bfloat16 if use_bf16 else None)


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """Peak memory and what it measures: allocated CUDA memory, or the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_max_rss"


def total_steps(cfg: DictConfig, steps_per_epoch: int) -> int:
    """``trainer.epochs`` when set, else ``trainer.max_steps``."""
    if cfg.get("epochs"):
        return int(math.ceil(cfg.epochs * steps_per_epoch))
    if not isinstance(cfg.max_steps, int) or cfg.max_steps < 1:
        raise ConfigError(f"trainer.max_steps={cfg.max_steps!r} must be a positive integer (or set trainer.epochs)")
    return cfg.max_steps


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    metric_names: list[str],
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    was_training = model.training
    model.eval()
    predictions, labels, losses = [], [], []
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        with _autocast(device, autocast_dtype):
            out = model(**batch)
        logits = out.logits.float()
        predictions.append(logits.squeeze(-1) if logits.shape[-1] == 1 else logits.argmax(-1))
        labels.append(batch["labels"])
        losses.append(out.loss.float() * len(batch["labels"]))
    model.train(was_training)
    pred = torch.cat(predictions).cpu().numpy()
    gold = torch.cat(labels).cpu().numpy()
    result = {"loss": float(torch.stack(losses).sum() / len(gold))}
    result.update(compute_metrics(metric_names, pred, gold))
    return result


def train(
    model: nn.Module,
    train_loader: DataLoader,
    eval_loader: DataLoader,
    cfg: DictConfig,
    metric_names: list[str],
    tracker: Tracker,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
) -> TrainResult:
    """Train the parameters that require grad; ``cfg`` is the ``trainer`` config group."""
    steps = total_steps(cfg, len(train_loader))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(
        cfg.scheduler, optimizer, num_warmup_steps=int(cfg.warmup_ratio * steps), num_training_steps=steps
    )
    model.train()
    result = TrainResult(steps=steps, train_time_s=0.0)
    pending: dict[str, Any] = {}  # hook metrics wait for the next logged record
    loss_sum, loss_count = torch.zeros((), device=device), 0
    step = 0
    start = time.perf_counter()
    progress = tqdm(total=steps, desc="train", dynamic_ncols=True)
    while step < steps:
        for batch in train_loader:
            t0 = time.perf_counter()
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with _autocast(device, autocast_dtype):
                loss = model(**batch).loss
                extra = variants.adapter_loss(model)
            total = loss if extra is None else loss + extra
            total.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            pending.update(variants.after_optimizer_step(model, step, steps))
            optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach().float()
            loss_count += 1
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            result.step_times_s.append(time.perf_counter() - t0)
            progress.update()

            if step % cfg.log_every == 0 or step == steps:
                mean_loss = float(loss_sum) / loss_count
                progress.set_postfix(loss=f"{mean_loss:.4f}")
                tracker.log({
                    "step": step,
                    "train/loss": mean_loss,
                    "train/lr": scheduler.get_last_lr()[0],
                    "train/epoch": step / len(train_loader),
                    **pending,
                })
                pending.clear()
                loss_sum.zero_()
                loss_count = 0
            if step % cfg.eval_every == 0 or step == steps:
                metrics = evaluate(model, eval_loader, metric_names, device, autocast_dtype)
                tracker.log({"step": step, **{f"eval/{k}": v for k, v in metrics.items()}})
                result.eval_metrics = metrics
                progress.write(f"step {step}: " + ", ".join(f"eval {k}={v:.4f}" for k, v in metrics.items()))
            if step == steps:
                break
    progress.close()
    result.train_time_s = time.perf_counter() - start
    return result
