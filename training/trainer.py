"""The training loop. Variant-specific behaviour reaches it only through the adapter hooks
(``variants.on_train_begin``, ``variants.adapter_loss`` and ``variants.after_optimizer_step``)."""

from __future__ import annotations

import contextlib
import logging
import math
import resource
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

import variants
from variants import ConfigError

from . import checkpoint, distributed
from .metrics import compute_metrics
from .tracking import Tracker

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16")
OPTIMIZERS = ("adamw", "paged_adamw_32bit", "paged_adamw_8bit")
WARMUP_STEPS_EXCLUDED = 3  # first steps pay for lazy initialisation; kept out of step time


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the run stops and is marked failed."""


@dataclass
class TrainResult:
    steps: int
    train_time_s: float
    step_times_s: list[float] = field(default_factory=list)
    eval_metrics: dict[str, float] = field(default_factory=dict)  # the main eval set, last evaluation
    extra_eval_metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # other eval sets, last
    eval_history: list[tuple[int, dict[str, float]]] = field(default_factory=list)  # (step, main metrics)

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


_PROC_STATUS, _PROC_CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def reset_peak_memory(device: torch.device) -> bool:
    """Start measuring peak memory afresh; False where the process's peak RSS cannot be reset.
    The jobs of a sweep share one process, and without this each would report the highest peak
    of the jobs before it."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        _PROC_CLEAR_REFS.write_text("5")  # Linux: resets VmHWM, the peak resident set size
        return True
    except OSError:
        return False


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """Peak memory since ``reset_peak_memory`` and what it measures: allocated CUDA memory, or
    the process's peak RSS (over the process's life where it cannot be reset)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    try:
        for line in _PROC_STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024, "process_max_rss"
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_max_rss"


def total_steps(cfg: DictConfig, steps_per_epoch: int) -> int:
    """``trainer.epochs`` when set, else ``trainer.max_steps``."""
    if cfg.get("epochs"):
        return int(math.ceil(cfg.epochs * steps_per_epoch))
    if not isinstance(cfg.max_steps, int) or cfg.max_steps < 1:
        raise ConfigError(f"trainer.max_steps={cfg.max_steps!r} must be a positive integer (or set trainer.epochs)")
    return cfg.max_steps


def _data_parallel(model: nn.Module, context: distributed.Context) -> nn.Module:
    if not context.enabled:
        return model
    return torch.nn.parallel.DistributedDataParallel(model)


def _same_parameters(params: list[nn.Parameter], model: nn.Module) -> bool:
    trainable = [p for p in model.parameters() if p.requires_grad]
    return len(trainable) == len(params) and all(a is b for a, b in zip(trainable, params))


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# Schedules that need no arguments beyond warm-up and length.
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_trainer_config(cfg: DictConfig) -> None:
    """Every ``trainer`` value, before anything runs: one ``ConfigError`` naming the key."""
    def fail(key: str, allowed: str) -> None:
        raise ConfigError(f"trainer.{key}={cfg.get(key)!r} must be {allowed}")

    for key in ("batch_size", "eval_batch_size", "log_every"):
        if not isinstance(cfg.get(key), int) or isinstance(cfg.get(key), bool) or cfg.get(key) < 1:
            fail(key, "a positive integer")
    if not _number(cfg.lr) or cfg.lr <= 0:
        fail("lr", "a number > 0")
    if not _number(cfg.weight_decay) or cfg.weight_decay < 0:
        fail("weight_decay", "a number >= 0")
    if not _number(cfg.warmup_ratio) or not 0 <= cfg.warmup_ratio < 1:
        fail("warmup_ratio", "a number in [0, 1)")
    if cfg.grad_clip is not None and (not _number(cfg.grad_clip) or cfg.grad_clip < 0):
        fail("grad_clip", "null or a number >= 0")
    if cfg.get("epochs") is not None and (not _number(cfg.epochs) or cfg.epochs <= 0):
        fail("epochs", "null or a number > 0")
    every = cfg.get("checkpoint_every")
    if every is not None and (not isinstance(every, int) or isinstance(every, bool) or every < 1):
        fail("checkpoint_every", "null or a positive integer")
    if cfg.scheduler not in SCHEDULERS:
        fail("scheduler", f"one of {', '.join(SCHEDULERS)}")
    if cfg.get("optimizer", "adamw") not in OPTIMIZERS:
        fail("optimizer", f"one of {', '.join(OPTIMIZERS)}")


def eval_interval(cfg: DictConfig, steps_per_epoch: int) -> int:
    """``trainer.eval_every``: a number of steps, or ``epoch``."""
    if cfg.eval_every == "epoch":
        return steps_per_epoch
    if isinstance(cfg.eval_every, bool) or not isinstance(cfg.eval_every, int) or cfg.eval_every < 1:
        raise ConfigError(f"trainer.eval_every={cfg.eval_every!r} must be a positive integer or 'epoch'")
    return cfg.eval_every


def make_optimizer(
    name: str, params: list[nn.Parameter], lr: float, weight_decay: float, device: torch.device
) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' paged AdamW (32-bit or 8-bit states) on CUDA. Paging moves
    optimizer state to CPU memory under GPU memory pressure (QLoRA §3); it needs CUDA, so on
    other devices the run says so and uses plain AdamW."""
    if name not in OPTIMIZERS:
        raise ConfigError(f"trainer.optimizer={name!r} is not supported; allowed: {', '.join(OPTIMIZERS)}")
    if name != "adamw" and device.type != "cuda":
        log.warning("trainer.optimizer=%s needs CUDA; using plain AdamW on %s", name, device)
        name = "adamw"
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    import bitsandbytes as bnb

    paged = bnb.optim.PagedAdamW32bit if name == "paged_adamw_32bit" else bnb.optim.PagedAdamW8bit
    return paged(params, lr=lr, weight_decay=weight_decay)


def make_schedule(
    cfg: DictConfig, model: nn.Module, steps: int, device: torch.device, done_steps: int = 0
) -> tuple[list[nn.Parameter], torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """An optimizer over the parameters that train now, and its learning-rate schedule.

    After a switch of the trainable set (``done_steps`` > 0), the fresh optimizer starts with
    empty state, and the schedule resumes at ``done_steps``: the warm-up/decay multiplier is
    continuous over the whole run, applied to the peak rate the variants ask for now.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    lr = variants.learning_rate(model, cfg.lr)
    optimizer = make_optimizer(cfg.get("optimizer", "adamw"), params, lr, cfg.weight_decay, device)
    for group in optimizer.param_groups:
        group["initial_lr"] = lr
    scheduler = get_scheduler(
        cfg.scheduler, optimizer, num_warmup_steps=int(cfg.warmup_ratio * steps), num_training_steps=steps,
        scheduler_specific_kwargs={"last_epoch": done_steps - 1},
    )
    return params, optimizer, scheduler


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
    eval_loaders: DataLoader | Mapping[str, DataLoader],
    cfg: DictConfig,
    metric_names: list[str],
    tracker: Tracker,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    checkpoint_path: Path | None = None,
    resume: dict[str, Any] | None = None,
    context: distributed.Context = distributed.Context(),
) -> TrainResult:
    """Train the parameters that require grad; ``cfg`` is the ``trainer`` config group.

    ``eval_loaders``: one loader, or ``{name: loader}`` with ``main`` first; ``main`` is logged
    as ``eval/<metric>``, the others as ``eval_<name>/<metric>`` (MNLI's mismatched set).
    With ``checkpoint_path``, a checkpoint is written there every ``cfg.checkpoint_every``
    steps; ``resume`` (a loaded checkpoint) continues from it exactly.
    A non-finite loss raises ``NonFiniteLoss`` before the step is applied. Under ``torchrun``
    (``context``), the model is wrapped in DDP and only rank 0 writes checkpoints.
    """
    if not isinstance(eval_loaders, Mapping):
        eval_loaders = {"main": eval_loaders}
    steps = total_steps(cfg, len(train_loader))
    eval_every = eval_interval(cfg, len(train_loader))
    variants.on_train_begin(model, steps)
    params, optimizer, scheduler = make_schedule(cfg, model, steps, device)
    phase = 1  # counts the trainable sets: a variant that switches what trains starts phase 2
    if cfg.get("gradient_checkpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    result = TrainResult(steps=steps, train_time_s=0.0)
    pending: dict[str, Any] = {}  # hook metrics wait for the next logged record
    loss_sum, extra_sum, loss_count = torch.zeros((), device=device), torch.zeros((), device=device), 0
    step, skip_batches = 0, 0
    shuffling = train_loader.generator  # its state at an epoch's start fixes the epoch's order
    if resume is not None:
        checkpoint.load_model_state(model, resume["model"])
        phase, step = resume["phase"], resume["step"]
        params, optimizer, scheduler = make_schedule(cfg, model, steps, device, done_steps=step)
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        trainer_state = resume["trainer"]
        loss_sum += trainer_state["loss_sum"]
        extra_sum += trainer_state["extra_sum"]
        loss_count, pending = trainer_state["loss_count"], trainer_state["pending"]
        result.step_times_s = trainer_state["step_times_s"]
        result.eval_metrics, result.extra_eval_metrics = trainer_state["eval_metrics"], trainer_state["extra_eval_metrics"]
        result.eval_history = [(s, m) for s, m in trainer_state["eval_history"]]
        shuffling.set_state(resume["data"]["epoch_generator_state"])
        skip_batches = resume["data"]["batch_in_epoch"]
        checkpoint.set_rng_state(resume["rng"])
    start = time.perf_counter() - (resume["trainer"]["train_time_s"] if resume else 0.0)
    progress = tqdm(total=steps, initial=step, desc="train", dynamic_ncols=True, disable=not context.is_main)
    forward_model = _data_parallel(model, context)
    try:
        while step < steps:
            epoch_generator_state = shuffling.get_state()
            for batch_in_epoch, batch in enumerate(train_loader):
                if skip_batches:  # resuming mid-epoch: these batches were trained on before the stop
                    skip_batches -= 1
                    continue
                t0 = time.perf_counter()
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                with _autocast(device, autocast_dtype):
                    loss = model(**batch).loss
                    extra = variants.adapter_loss(model)
                total = loss if extra is None else loss + extra
                if not torch.isfinite(total.detach()):
                    raise NonFiniteLoss(
                        f"the training loss is {float(total)} at step {step + 1}; the run stops "
                        "(the last checkpoint, if any, is kept): lower trainer.lr or turn on trainer.grad_clip"
                    )
                total.backward()
                if extra is not None:
                    extra_sum += extra.detach().float()
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
                    mean_loss = float(distributed.mean_over_ranks(loss_sum, context)) / loss_count
                    progress.set_postfix(loss=f"{mean_loss:.4f}")
                    if extra is not None:
                        pending["train/adapter_loss"] = float(extra_sum) / loss_count
                    tracker.log({
                        "step": step,
                        "phase": phase,
                        "train/loss": mean_loss,
                        "train/lr": scheduler.get_last_lr()[0],
                        "train/epoch": step / len(train_loader),
                        **pending,
                    })
                    pending.clear()
                    loss_sum.zero_()
                    extra_sum.zero_()
                    loss_count = 0
                if step % eval_every == 0 or step == steps:
                    record: dict[str, Any] = {"step": step, "phase": phase}
                    for name, loader in eval_loaders.items():
                        metrics = evaluate(model, loader, metric_names, device, autocast_dtype)
                        prefix = "eval" if name == "main" else f"eval_{name}"
                        record.update({f"{prefix}/{k}": v for k, v in metrics.items()})
                        if name == "main":
                            result.eval_metrics = metrics
                            result.eval_history.append((step, metrics))
                        else:
                            result.extra_eval_metrics[name] = metrics
                    tracker.log(record)
                    progress.write(f"step {step}: " + ", ".join(
                        f"{k}={v:.4f}" for k, v in record.items() if k not in ("step", "phase")))
                if step < steps and not _same_parameters(params, model):
                    params, optimizer, scheduler = make_schedule(cfg, model, steps, device, done_steps=step)
                    phase += 1
                    progress.write(f"after step {step}: the trainable parameters changed, phase {phase} starts")
                if checkpoint_path is not None and context.is_main and cfg.get("checkpoint_every") and (
                    step % cfg.checkpoint_every == 0 and step < steps
                ):
                    checkpoint.save(checkpoint_path, {
                        "step": step, "phase": phase, "model": checkpoint.model_state(model),
                        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "rng": checkpoint.rng_state(),
                        "data": {"epoch_generator_state": epoch_generator_state, "batch_in_epoch": batch_in_epoch + 1},
                        "trainer": {
                            "loss_sum": loss_sum.cpu(), "extra_sum": extra_sum.cpu(), "loss_count": loss_count,
                            "pending": pending, "step_times_s": result.step_times_s,
                            "eval_metrics": result.eval_metrics, "extra_eval_metrics": result.extra_eval_metrics,
                            "eval_history": [[s, m] for s, m in result.eval_history],
                            "train_time_s": time.perf_counter() - start,
                        },
                        "wandb_run_id": tracker.wandb_run.id if tracker.wandb_run is not None else None,
                    })
                if step == steps:
                    break
    finally:
        progress.close()  # before any error message, which must be the last line
    result.train_time_s = time.perf_counter() - start
    return result
