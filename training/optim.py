"""The optimizer and learning-rate schedule of a run.

* AdamW over the parameters that train now, or bitsandbytes' paged AdamW on CUDA;
  ``trainer.optimizer=auto`` takes what the variant's paper used (QLoRA: paged AdamW, 32-bit).
* Weight decay on matrices only by default (``trainer.weight_decay_on=matrices``): biases,
  LayerNorm weights and 1-D adapter tensors (DoRA's magnitude m, AdaLoRA's singular values λ)
  are not decayed, as in the reference trainers (Hugging Face's ``Trainer`` excludes biases and
  LayerNorm weights); decaying m or λ would shrink the learned weights themselves.
* One warm-up/decay curve over the whole run: a variant that changes what trains (staged
  training) gets a new optimizer, and its schedule resumes the same curve at the step it starts.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.optim.lr_scheduler import LambdaLR

import variants

log = logging.getLogger(__name__)

@dataclass
class Optimization:
    """An optimizer over the parameters that train now, its schedule and its peak rate."""

    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: LambdaLR
    peak_lr: float
    optimizer_name: str

    def clip(self, grad_clip: float | None) -> None:
        """Scale the gradients so that their global norm is at most ``grad_clip`` (None, 0: no clipping)."""
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, grad_clip)

    def step(self) -> None:
        self.optimizer.step()
        self.scheduler.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def lr(self) -> float:
        """The rate now (peak × schedule), without a group's own factor."""
        return self.scheduler.get_last_lr()[0] / self.optimizer.param_groups[0].get("lr_scale", 1.0)

    def covers(self, model: nn.Module) -> bool:
        """Whether the parameters that train now are still exactly this optimizer's."""
        trainable = [p for p in model.parameters() if p.requires_grad]
        return len(trainable) == len(self.params) and all(a is b for a, b in zip(trainable, self.params))


def build(cfg, model: nn.Module, total_steps: int, device: torch.device, done_steps: int = 0) -> Optimization:
    """An optimizer over the parameters of ``model`` that train now, at the peak rate the
    variants ask for now (``cfg`` is the ``trainer`` config group), and the run's schedule from
    ``done_steps`` on. A fresh optimizer starts with empty state."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    fp32_masters([p for _, p in named])
    method = variants.variant_of(model)
    lr = method.learning_rate(cfg.lr)
    name = resolve_optimizer(cfg.get("optimizer", "auto"), model, device, sharded=any(
        isinstance(p, DTensor) for _, p in named))
    groups = param_groups(named, cfg.weight_decay, cfg.get("weight_decay_on", "matrices"),
                          method.learning_rate_scale)
    optimizer = make_optimizer(name, groups, lr)
    scheduler = continuous_schedule(cfg.scheduler, optimizer, int(cfg.warmup_ratio * total_steps), total_steps,
                                    done_steps)
    log.info("optimizer %s from step %d, peak lr %g: %s", name, done_steps, lr, "; ".join(
        f"{len(g['params'])} tensors at weight decay {g['weight_decay']:g}, rate x{g['lr_scale']:g}" for g in groups))
    return Optimization([p for _, p in named], optimizer, scheduler, lr, name)


@torch.no_grad()
def fp32_masters(params: Sequence[nn.Parameter]) -> None:
    """Give every bf16/fp16 parameter that trains fp32 storage, in place: its updates would be
    rounded away in 16 bits (a step of 1e-4 is below bf16's resolution for values above 0.03).
    A model with low-precision weights therefore trains under autocast (``device.for_weights``)."""
    for p in params:
        if p.dtype in (torch.float16, torch.bfloat16):
            if isinstance(p, DTensor):  # FSDP fixed its dtype when it sharded it: the trainer casts before
                raise RuntimeError("a 16-bit parameter that trains was sharded before its cast to fp32")
            p.data = p.data.float()


def param_groups(named: Sequence[tuple[str, nn.Parameter]], weight_decay: float, on: str,
                 lr_scale: Callable[[str, nn.Parameter], float] = lambda name, p: 1.0) -> list[dict]:
    """AdamW groups: one per (weight decay, rate factor) pair that occurs, ``param_names`` kept in
    each group for inspection; a group's ``lr`` is the peak rate times its factor (``lr_scale``:
    the variant's, e.g. LoRA+'s λ for B), and the schedule scales every group alike.
    ``on="matrices"``: decay only tensors with two or more dimensions; ``on="all"``: every
    trainable tensor."""
    groups: dict[tuple[float, float], dict] = {}
    for n, p in named:
        decay = weight_decay if on == "all" or p.ndim >= 2 else 0.0
        group = groups.setdefault((decay, float(lr_scale(n, p))), {"params": [], "param_names": []})
        group["params"].append(p)
        group["param_names"].append(n)
    return [{**group, "weight_decay": decay, "lr_scale": scale} for (decay, scale), group in groups.items()]


def resolve_optimizer(name: str, model: nn.Module, device: torch.device, sharded: bool = False) -> str:
    """``auto``: the variant's preferred optimizer on CUDA (QLoRA's paged AdamW), AdamW
    elsewhere and under FSDP (``sharded``: bitsandbytes' optimizers size their state from the
    whole tensor, not the shard). A paged optimizer needs CUDA: asked for by name elsewhere, the
    run says so and uses plain AdamW (under FSDP the schema refuses it)."""
    if name == "auto":
        return variants.variant_of(model).paper_optimizer if device.type == "cuda" and not sharded else "adamw"
    if name != "adamw" and device.type != "cuda":
        log.warning("trainer.optimizer=%s needs CUDA; using plain AdamW on %s", name, device)
        return "adamw"
    return name


def make_optimizer(name: str, groups: list[dict], lr: float) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' paged AdamW (32-bit or 8-bit states): paging moves optimizer
    state to CPU memory under GPU memory pressure (QLoRA §3). Each group trains at ``lr``
    times its ``lr_scale``."""
    groups = [{**group, "lr": lr * group.get("lr_scale", 1.0)} for group in groups]
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    import bitsandbytes as bnb

    paged = {"paged_adamw_32bit": bnb.optim.PagedAdamW32bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}[name]
    return paged(groups, lr=lr)


def continuous_schedule(name: str, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                        done_steps: int = 0) -> LambdaLR:
    """``name``'s warm-up/decay multiplier over ``total_steps`` (``MULTIPLIERS``), from ``done_steps`` on:
    a phase switch continues the curve where it is instead of warming up again."""
    multiplier = partial(MULTIPLIERS[name], warmup=warmup_steps, total=total_steps,
                         lr_init=optimizer.defaults["lr"])
    for group in optimizer.param_groups:  # what LambdaLR scales (it sets it itself only at step 0)
        group.setdefault("initial_lr", group["lr"])
    return LambdaLR(optimizer, multiplier, last_epoch=done_steps - 1)


# transformers' schedules (``schema.groups.SCHEDULERS``) at get_scheduler's defaults, step for step
# (tests/test_trainer.py compares them): written here because ``from transformers import
# get_scheduler`` imports its Trainer's modules and, through them, peft and bitsandbytes when
# installed, which cost seconds per run (BENCHMARKS.md). Each maps a step to the peak-rate factor.
def _warmup(step: int, warmup: int) -> float:
    return step / max(1, warmup)


def _constant(step: int, **_) -> float:
    return 1.0


def _constant_with_warmup(step: int, warmup: int, **_) -> float:
    return _warmup(step, warmup) if step < warmup else 1.0


def _linear(step: int, warmup: int, total: int, **_) -> float:
    if step < warmup:
        return _warmup(step, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def _progress(step: int, warmup: int, total: int) -> float:
    """The fraction of the decay done after warm-up."""
    return (step - warmup) / max(1, total - warmup)


def _cosine(step: int, warmup: int, total: int, **_) -> float:
    """Half a cosine from 1 to 0 (num_cycles=0.5)."""
    if step < warmup:
        return _warmup(step, warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * _progress(step, warmup, total))))


def _cosine_with_restarts(step: int, warmup: int, total: int, **_) -> float:
    """One hard-restart cycle (num_cycles=1): the cosine from 1 to 0, then 0."""
    if step < warmup:
        return _warmup(step, warmup)
    progress = _progress(step, warmup, total)
    return 0.0 if progress >= 1.0 else max(0.0, 0.5 * (1.0 + math.cos(math.pi * (progress % 1.0))))


def _polynomial(step: int, warmup: int, total: int, lr_init: float, lr_end: float = 1e-7,
                power: float = 1.0) -> float:
    """From the peak rate down to ``lr_end`` (an absolute rate) as ``power``, then ``lr_end``."""
    if step < warmup:
        return _warmup(step, warmup)
    if step > total:
        return lr_end / lr_init
    remaining = 1 - (step - warmup) / max(1, total - warmup)
    return ((lr_init - lr_end) * remaining ** power + lr_end) / lr_init


def _inverse_sqrt(step: int, warmup: int, **_) -> float:
    """1/sqrt(step / timescale) after warm-up, the timescale being the warm-up (10,000 without one)."""
    if step < warmup:
        return _warmup(step, warmup)
    timescale = warmup or 10_000
    return 1.0 / math.sqrt((step + timescale - warmup) / timescale)


MULTIPLIERS: dict[str, Callable[..., float]] = {
    "linear": _linear, "cosine": _cosine, "cosine_with_restarts": _cosine_with_restarts,
    "polynomial": _polynomial, "constant": _constant, "constant_with_warmup": _constant_with_warmup,
    "inverse_sqrt": _inverse_sqrt,
}
