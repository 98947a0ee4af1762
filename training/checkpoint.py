"""What a run carries across a stop: the training state, and the checkpoint file that holds it.

``TrainState`` is everything the training loop accumulates from step to step besides the model,
optimizer and scheduler: the step and phase, the data position, the running sums of the next
logged record, the hook metrics waiting for it, and the history of step times and evaluations.

A checkpoint (``checkpoint.pt`` in the run dir) holds, under named keys:

    step          the optimizer steps done (also inside train_state; read by tools that poll)
    train_state   TrainState.state_dict()
    model         the trained tensors (``variants.adapter_state_dict``), which parameters
                  train, and the variant's and its layers' training state (staged training's
                  phase, AdaLoRA's importance averages)
    optimizer     optimizer.state_dict(); under FSDP the shards' state gathered, keyed by
                  parameter name (``distributed.optimizer_state``)
    scheduler     scheduler.state_dict()
    rng           per process (rank order): torch CPU, the run's CUDA device, Python and NumPy
                  generator states (each process of a torchrun job draws its own dropout masks)
    wandb_run_id  so that a resumed run continues its W&B run
    strategy      fsdp, or None (one process, or DDP): a checkpoint resumes under the same one

It is written to a temporary file and renamed, so a kill during the write leaves the previous
checkpoint intact. Loading uses ``torch.load(weights_only=True)``: tensors and plain
containers only, no code.

A resumed run must train under the config its checkpoint was trained with (``run_record``): the
config composed again from the command line is compared key by key (``check_resume``); a key that
differs, other than the few that cannot change what trains (``RESUME_IGNORED``), refuses the
resume in one line naming the keys, unless the user lists it in ``resume_changes`` (a deliberate
change: a longer schedule, say). Every resume is recorded, with the step it took effect at and its
accepted changes, in the checkpoint and in summary.json (``resumes``), so the run dir keeps saying
what trained it.
"""

from __future__ import annotations

import io
import math
import os
import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import variants
from schema import ConfigError

from . import distributed, rundir

WARMUP_STEPS_EXCLUDED = 3  # first steps pay for lazy initialisation; kept out of the median step time


@dataclass
class DataPosition:
    """Where the training data stands: the shuffling generator's state at the start of the
    current epoch (which fixes the epoch's order) and how many of its batches were trained on."""

    epoch_start: torch.Tensor | None = None
    batches_done: int = 0


@dataclass
class TrainState:
    step: int = 0
    phase: int = 1  # counts the trainable sets: a variant that switches what trains starts phase 2
    phases: list[dict[str, Any]] = field(default_factory=list)  # {"phase", "start_step", "peak_lr", "optimizer"}
    data: DataPosition = field(default_factory=DataPosition)
    # Since the last logged record; device tensors, so that a step does not wait for the GPU.
    loss_sum: torch.Tensor = field(default_factory=lambda: torch.zeros(()))
    adapter_loss_sum: torch.Tensor = field(default_factory=lambda: torch.zeros(()))
    loss_count: int = 0
    pending: dict[str, Any] = field(default_factory=dict)  # hook metrics waiting for the next record
    step_times_s: list[float] = field(default_factory=list)
    eval_metrics: dict[str, float] = field(default_factory=dict)  # the main eval set, last evaluation
    extra_eval_metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # other eval sets, last
    eval_history: list[tuple[int, dict[str, float]]] = field(default_factory=list)  # (step, main metrics)
    extra_eval_history: dict[str, list[tuple[int, dict[str, float]]]] = field(default_factory=dict)  # same, per set
    train_time_s: float = 0.0  # up to the last checkpoint or the end
    initialization: dict[str, Any] = field(default_factory=dict)  # what the variant's data-driven init reported
    stop_reason: str = "schedule_end"  # or "early_stopping" (training/selection.py)
    logged_losses: list[float] = field(default_factory=list)  # every train/loss record, for trainer.divergence
    first_loss: float = math.inf  # the first step's loss (the model as it started), for trainer.divergence
    forgetting_reference: dict[str, Any] = field(default_factory=dict)  # the probe's start (training/forgetting.py)
    forgetting_history: list[tuple[int, dict[str, float]]] = field(default_factory=list)  # (step, forget metrics)
    memory_per_process: list[dict[str, float]] | None = None  # at the end (distributed.local_memory_mb); not saved

    @classmethod
    def start(cls, device: torch.device) -> TrainState:
        return cls(loss_sum=torch.zeros((), device=device), adapter_loss_sum=torch.zeros((), device=device))

    def record_step(self, loss: torch.Tensor, adapter_loss: torch.Tensor | None, seconds: float) -> None:
        self.loss_sum += loss.detach().float()
        if adapter_loss is not None:
            self.adapter_loss_sum += adapter_loss.detach().float()
        self.loss_count += 1
        self.step_times_s.append(seconds)

    def clear_running(self) -> None:
        """After a logged record: the next one averages the steps from here."""
        self.loss_sum.zero_()
        self.adapter_loss_sum.zero_()
        self.loss_count = 0
        self.pending.clear()

    def record_eval(self, name: str, metrics: dict[str, float]) -> None:
        if name == "main":
            self.eval_metrics = metrics
            self.eval_history.append((self.step, metrics))
        else:
            self.extra_eval_metrics[name] = metrics
            self.extra_eval_history.setdefault(name, []).append((self.step, metrics))

    def begin_phase(self, peak_lr: float, optimizer: str) -> None:
        """A new optimizer over a new trainable set (phase 1 at the start)."""
        if self.phases:
            self.phase += 1
        self.phases.append({"phase": self.phase, "start_step": self.step, "peak_lr": peak_lr, "optimizer": optimizer})

    @property
    def median_step_time_s(self) -> float:
        timed = self.step_times_s[WARMUP_STEPS_EXCLUDED:] or self.step_times_s
        return statistics.median(timed)

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step, "phase": self.phase, "phases": [dict(p) for p in self.phases],
            "data": {"epoch_start": self.data.epoch_start, "batches_done": self.data.batches_done},
            "loss_sum": self.loss_sum.cpu(), "adapter_loss_sum": self.adapter_loss_sum.cpu(),
            "loss_count": self.loss_count, "pending": dict(self.pending),
            "step_times_s": list(self.step_times_s), "eval_metrics": self.eval_metrics,
            "extra_eval_metrics": self.extra_eval_metrics,
            "eval_history": [[step, metrics] for step, metrics in self.eval_history],
            "extra_eval_history": {name: [[step, metrics] for step, metrics in history]
                                   for name, history in self.extra_eval_history.items()},
            "train_time_s": self.train_time_s, "initialization": self.initialization,
            "logged_losses": list(self.logged_losses), "first_loss": self.first_loss,
            "forgetting_reference": self.forgetting_reference,
            "forgetting_history": [[step, metrics] for step, metrics in self.forgetting_history],
        }

    @classmethod
    def from_state_dict(cls, saved: dict[str, Any], device: torch.device) -> TrainState:
        return cls(
            step=saved["step"], phase=saved["phase"], phases=[dict(p) for p in saved["phases"]],
            data=DataPosition(saved["data"]["epoch_start"], saved["data"]["batches_done"]),
            loss_sum=saved["loss_sum"].to(device), adapter_loss_sum=saved["adapter_loss_sum"].to(device),
            loss_count=saved["loss_count"], pending=dict(saved["pending"]),
            step_times_s=list(saved["step_times_s"]), eval_metrics=saved["eval_metrics"],
            extra_eval_metrics=saved["extra_eval_metrics"],
            eval_history=[(step, metrics) for step, metrics in saved["eval_history"]],
            extra_eval_history={name: [(step, metrics) for step, metrics in history]
                                for name, history in saved["extra_eval_history"].items()},
            train_time_s=saved["train_time_s"], initialization=saved["initialization"],
            logged_losses=list(saved.get("logged_losses", [])), first_loss=saved.get("first_loss", math.inf),
            forgetting_reference=saved.get("forgetting_reference", {}),
            forgetting_history=[(step, metrics) for step, metrics in saved.get("forgetting_history", [])],
        )


def save(path: Path, model: dict[str, Any], optimizer: dict[str, Any], scheduler: dict[str, Any],
         state: TrainState, wandb_run_id: str | None, rng_states: list[dict[str, Any]],
         run_record: dict[str, Any] | None = None, strategy: str | None = None) -> None:
    """Write a checkpoint: ``model``, what ``model_state`` returned; ``optimizer`` and
    ``scheduler``, their states (``distributed.optimizer_state``: under FSDP the shards gathered);
    ``rng_states``: every process's ``rng_state``, in rank order; ``run_record``: the resolved
    config and the resumes' accepted changes (``check_resume``); ``strategy``: ``fsdp`` when the
    optimizer state is keyed by parameter name (FSDP's gathered form), else None."""
    write(path, {
        "step": state.step,
        "train_state": state.state_dict(),
        "model": model,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "rng": rng_states,
        "wandb_run_id": wandb_run_id,
        "run": run_record,
        "strategy": strategy,
    })


def check_format(saved: dict[str, Any], processes: int, strategy: str | None = None) -> None:
    """A checkpoint this version can continue, written by as many processes as resume it, and
    under the same sharding (``strategy``: ``fsdp``, or None for a process that holds the whole
    model)."""
    if "train_state" not in saved or "training_state" not in saved["model"]:
        raise ConfigError("resume=true: this checkpoint.pt was written by an older version of the trainer and cannot "
                          "be continued; start the run again")
    if len(saved["rng"]) != processes:
        raise ConfigError(f"resume=true: the checkpoint was written by {len(saved['rng'])} process(es); resume it "
                          f"with the same number (now {processes})")
    if saved.get("strategy") != strategy:
        raise ConfigError(f"resume=true: the checkpoint was written with trainer.strategy="
                          f"{saved.get('strategy') or 'ddp'}; resume it with the same (now {strategy or 'ddp'})")


def restore(saved: dict[str, Any], model: nn.Module, build_optimization: Callable[[int], Any],
            device: torch.device, rank: int = 0) -> tuple[TrainState, Any]:
    """Put back the rest of a loaded checkpoint once its model state is (``load_model_state``,
    before any sharding): a new optimization (``build_optimization(done_steps)``) with the saved
    optimizer and scheduler states, this process's RNG states; returns the training state and
    the optimization."""
    state = TrainState.from_state_dict(saved["train_state"], device)
    optimization = build_optimization(state.step)
    distributed.load_optimizer_state(model, optimization.optimizer, saved["optimizer"])
    optimization.scheduler.load_state_dict(saved["scheduler"])
    set_rng_state(saved["rng"][rank], device)
    return state, optimization


def rng_state(device: torch.device) -> dict[str, Any]:
    numpy_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "python": random.getstate(),
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].copy()), *numpy_state[2:]],
    }


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    version, *rest = state["python"]
    random.setstate((version, tuple(rest[0]), rest[1]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))


def model_state(model: nn.Module) -> dict[str, Any]:
    """The model's part of a checkpoint (under FSDP a collective: ``adapter_state_dict`` gathers)."""
    return {
        "tensors": variants.adapter_state_dict(model),
        "trainable": [name for name, p in model.named_parameters() if p.requires_grad],
        "training_state": variants.training_state(model),
    }


@torch.no_grad()
def load_model_state(model: nn.Module, state: dict[str, Any]) -> None:
    variants.variant_of(model).fit_to_saved(model, state["tensors"])
    own = model.state_dict(keep_vars=True)
    for name, tensor in state["tensors"].items():
        own[name].copy_(tensor)
    trainable = set(state["trainable"])
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)
    variants.load_training_state(model, state["training_state"])


def write(path: Path, checkpoint: dict[str, Any]) -> None:
    """Write then rename: the file at ``path`` is always a complete checkpoint, and a failed write
    (a full disk) leaves no partial file behind."""
    buffer = io.BytesIO()  # serialised in memory first, so a failed write is an OSError that says why
    torch.save(checkpoint, buffer)
    with rundir.atomic(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())
        if path.exists():  # the last two are kept: one damaged file never costs the whole run
            os.replace(path, previous(path))


def previous(path: Path) -> Path:
    """Where the checkpoint before the one at ``path`` is kept (``checkpoint.previous.pt``)."""
    return path.with_name(f"{path.stem}.previous{path.suffix}")


def files(path: Path) -> tuple[Path, Path]:
    """The checkpoint at ``path`` and the one kept before it, newest first."""
    return path, previous(path)


def load_latest(path: Path) -> tuple[dict[str, Any], list[str]]:
    """The checkpoint at ``path`` or, if that one is unreadable (empty, cut short, overwritten),
    the one before it; with a warning per unreadable file. ``ConfigError`` when neither loads."""
    problems = []
    for candidate in files(path):
        if not candidate.is_file():
            continue
        try:
            saved = load(candidate)
            if not isinstance(saved, dict) or "step" not in saved:
                raise ValueError("not a checkpoint")
            return saved, [f"{p}; resuming from {candidate.name} instead" for p in problems]
        except Exception as err:  # noqa: BLE001  (torch raises many types for a damaged file; its advice is not passed on)
            problems.append(f"{candidate} is unreadable ({type(err).__name__})")
    if not problems:
        raise ConfigError(f"resume=true but {str(path.parent)!r} has no {path.name} to resume from")
    raise ConfigError("; ".join(problems) + " and no earlier checkpoint loads: the run cannot be continued; "
                      "start it again without resume (or put back a copy of the file)")


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


# ---- what a resume may change ----

# Keys that never change what trains: how the run was started and where it is tracked.
RESUME_IGNORED = ("resume", "resume_changes", "skip_completed", "tracking")


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """``{"trainer.lr": 1e-4, ...}``: every leaf of a nested dict under its dotted key (lists and
    empty dicts are leaves)."""
    if not isinstance(config, dict) or not config:
        return {prefix: config} if prefix else {}
    flat: dict[str, Any] = {}
    for key, value in config.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, list[Any]]:
    """``{key: [old value, new value]}`` for every leaf that differs (a missing leaf is None)."""
    before, after = flatten(old), flatten(new)
    keys = sorted(set(before) | set(after))
    return {k: [before.get(k), after.get(k)] for k in keys
            if before.get(k) != after.get(k) and k.split(".")[0] not in RESUME_IGNORED}


def check_resume(old: dict[str, Any], new: dict[str, Any], allowed: list[str], step: int) -> dict[str, Any] | None:
    """The record of an accepted resume's changes (None when nothing changed); ``ConfigError``
    naming every key that changed without being listed in ``allowed`` (``resume_changes``)."""
    changed = config_changes(old, new)
    refused = [k for k in changed if not any(k == a or k.startswith(f"{a}.") for a in allowed)]
    if refused:
        shown = ", ".join(f"{k} ({changed[k][0]!r} -> {changed[k][1]!r})" for k in refused[:6])
        more = f" and {len(refused) - 6} more" if len(refused) > 6 else ""
        raise ConfigError(
            f"resume: the config differs from the one the checkpoint was trained with in {shown}{more}; "
            f"resume with the run's own settings (python run.py resume=<run dir>), or allow the change "
            f"deliberately with resume_changes=[{','.join(refused)}]")
    return {"step": step, "changed": changed} if changed else None
