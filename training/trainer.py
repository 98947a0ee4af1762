"""The training loop. Variant-specific behaviour reaches it only through the hooks of the model's
variant (``variants.variant_of(model)``: ``initialize``, ``check_total_steps``, ``on_train_begin``,
``adapter_loss``, ``transform_gradients``, ``after_optimizer_step`` and, through the optimizer,
``learning_rate`` and ``learning_rate_scale``); the loop never asks which variant it runs (a
model without one has a ``NoVariant``, whose hooks do nothing).

Under ``torchrun`` the loop calls the data-parallel wrapper (``model``), which averages the
gradients in backward; ``raw_model`` is the unwrapped module, for the hooks, evaluation and
checkpoints. Under ``trainer.strategy=fsdp`` the two are one module, sharded in place after the
data-driven start and before the optimizer is built (``training/distributed.py``). Every process runs this same function; only rank 0 gets a real tracker and a
checkpoint path.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import variants

from . import checkpoint, distributed, interrupt, optim, selection
from .checkpoint import DataPosition, TrainState
from .device import Runtime
from .evaluation import ClassifierEvaluator, Evaluator
from .forgetting import Probe
from .selection import Selection
from .tracking import Tracker

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the run stops and is marked failed."""


class Diverged(RuntimeError):
    """The logged training loss stayed far above its running minimum (``trainer.divergence``)."""


def check_divergence(first: float, losses: list[float], factor: float | None, logs: int) -> str | None:
    """Why the run has diverged, or None: the last ``logs`` logged training losses each above
    ``factor`` times the lowest loss seen before them (the first step's, ``first``, included) and
    above ``first`` (a run that has learned and rises a little from a tiny minimum is not flagged;
    one that ends far worse than it began is, even if it blew up before its first log)."""
    if factor is None or len(losses) < logs:
        return None
    recent = losses[-logs:]
    floor = min([first, *losses[:-logs]])
    if all(loss > factor * floor and loss > first for loss in recent):
        return (f"the training loss has been above {factor:g}x its minimum ({floor:.4g}) and above its first "
                f"step's ({first:.4g}) for {logs} logs in a row (now {recent[-1]:.4g}): the run diverged; "
                "lower trainer.lr (trainer.divergence.factor=null turns this check off)")
    return None


@dataclass(frozen=True)
class Plan:
    """How long the run trains at most, when it evaluates, what it measures and how it picks
    its best evaluation and stops (``training/selection.py``), computed once."""

    steps: int
    steps_per_epoch: int
    eval_every: int
    evaluator: Evaluator = field(default_factory=ClassifierEvaluator)
    selection: Selection = field(default_factory=lambda: Selection("main", "accuracy"))
    eval_others: str = "always"  # or "when_best": the non-selection sets only at new bests and at the end
    forgetting: Probe | None = None  # measured at every evaluation (training/forgetting.py); None: off


def plan_run(cfg: DictConfig, steps_per_epoch: int, evaluator: Evaluator | None = None,
             eval_sets: Sequence[str] = ("main",), main_metric: str = "accuracy", forgetting: Probe | None = None
             ) -> Plan:
    """``trainer.epochs`` (when set) or ``trainer.max_steps``, and ``trainer.eval_every`` (steps,
    ``epoch`` or ``epoch/N``), for a loader of ``steps_per_epoch`` batches; ``evaluator``: the task's
    (``training/evaluation.py``; default: a classifier's accuracy); ``eval_sets`` and
    ``main_metric``: what ``trainer.select_on`` and early stopping compare; ``forgetting``: the
    probe measured at each evaluation (``training/forgetting.py``). ``cfg``'s values are
    the schema's (``schema.groups.Trainer``, checked by ``schema.door.typed``)."""
    steps = math.ceil(cfg.epochs * steps_per_epoch) if cfg.get("epochs") else cfg.max_steps
    if cfg.eval_every == "epoch":
        eval_every = steps_per_epoch
    elif str(cfg.eval_every).startswith("epoch/"):  # N evaluations an epoch
        eval_every = max(1, math.ceil(steps_per_epoch / int(cfg.eval_every.split("/")[1])))
    else:
        eval_every = cfg.eval_every
    return Plan(steps=steps, steps_per_epoch=steps_per_epoch, eval_every=eval_every,
                evaluator=evaluator or ClassifierEvaluator(),
                selection=selection.selection_for(cfg, list(eval_sets), main_metric, steps_per_epoch),
                eval_others=cfg.get("eval_others", "always"), forgetting=forgetting)


def train(
    model: nn.Module,
    train_loader: DataLoader,
    eval_loaders: Mapping[str, DataLoader],
    plan: Plan,
    cfg: DictConfig,
    tracker: Tracker,
    runtime: Runtime,
    checkpoint_path: Path | None = None,
    resume: dict[str, Any] | None = None,
    save_best: Callable[[nn.Module, int], None] | None = None,
    run_record: dict[str, Any] | None = None,
    knowledge: DataLoader | None = None,
) -> TrainState:
    """Train the parameters that require grad for ``plan.steps`` steps, or until early stopping
    (``plan.selection``); ``cfg`` is the ``trainer`` config group. ``eval_loaders`` is ``{name:
    loader}`` with ``main`` first (logged as ``eval/<metric>``, the others as
    ``eval_<name>/<metric>``). With ``checkpoint_path``, a checkpoint is written every
    ``cfg.checkpoint_every`` steps; ``resume`` (a loaded checkpoint) continues from it exactly.
    ``save_best(model, step)`` (rank 0, with ``trainer.keep_best``) is called at each new best
    evaluation. ``run_record`` (the resolved config, the resumes' changes) goes into every
    checkpoint, for the next resume to check against. ``knowledge``: the batches of the texts outside
    the task that the variant's initialisation reads (``Variant.knowledge_source``), or None. A
    non-finite loss raises ``NonFiniteLoss`` before its step."""
    raw_model = model
    initialization = _initialize(raw_model, train_loader, runtime, knowledge) if resume is None else None
    method = variants.variant_of(raw_model)
    method.check_total_steps(plan.steps)
    method.on_train_begin(raw_model, plan.steps)
    if cfg.get("gradient_checkpointing"):
        raw_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def new_optimization(done_steps: int) -> optim.Optimization:
        return optim.build(cfg, raw_model, plan.steps, runtime.device, done_steps)

    if resume is not None:
        checkpoint.load_model_state(raw_model, resume["model"])  # whole tensors: before any sharding
    optim.fp32_masters([p for p in raw_model.parameters() if p.requires_grad])  # before sharding fixes dtypes
    model = distributed.wrap(raw_model, runtime.context, cfg.get("strategy", "ddp"))  # under fsdp: raw_model, sharded
    if resume is None:
        state, opt = TrainState.start(runtime.device), new_optimization(0)
        state.initialization = initialization
        if plan.forgetting is not None:  # the model as it starts: what forgetting is measured against
            with _own_random_numbers(runtime):
                state.forgetting_reference = plan.forgetting.reference(raw_model, runtime)
            distributed.reshard(raw_model)
        state.begin_phase(opt.peak_lr, opt.optimizer_name)
    else:
        state, opt = checkpoint.restore(resume, raw_model, new_optimization, runtime.device, runtime.context.rank)
        if plan.forgetting is not None and not state.forgetting_reference:
            log.warning("trainer.forgetting: the checkpoint holds no reference from the start of the run (it was "
                        "trained without the probe); this run records no forgetting")
    raw_model.train()
    clock = time.perf_counter() - state.train_time_s
    main = runtime.context.is_main
    progress = tqdm(total=plan.steps, initial=state.step, desc="train", dynamic_ncols=True, disable=not main)
    try:
        if resume is None and cfg.get("eval_at_start"):  # step 0: the model before training (the base, for most variants)
            _evaluate_and_log(raw_model, eval_loaders, plan, runtime, state, tracker, progress, last=False)
        if _stop_requested(runtime):  # during the set-up
            raise interrupt.Interrupted(state.step, interrupt.requested() or signal.SIGTERM)  # (a resume's checkpoint stays)
        for batch in _batches(train_loader, state.data):
            started = time.perf_counter()
            loss, adapter_loss = _forward_backward(model, raw_model, runtime.to_device(batch), runtime, state.step)
            opt.clip(cfg.grad_clip)  # the gradients as backward averaged them, clipped as usual, then the variant's
            state.pending.update(method.transform_gradients(raw_model, opt.optimizer, opt.lr))
            opt.step()
            state.step += 1
            state.pending.update(method.after_optimizer_step(raw_model, state.step, plan.steps))  # grads still live
            opt.zero_grad()
            runtime.synchronize()
            state.record_step(loss, adapter_loss, time.perf_counter() - started)
            if state.step == 1:
                state.first_loss = float(loss.detach())  # the loss of the model as it started: divergence's reference
            progress.update()

            last = state.step == plan.steps
            if state.step % cfg.log_every == 0 or last:
                _log_training(tracker, state, opt.lr, plan, adapter_loss is not None, runtime, progress)
                divergence = cfg.get("divergence") or {}
                why = check_divergence(state.first_loss, state.logged_losses, divergence.get("factor"),
                                       divergence.get("logs", 3))
                if why:
                    raise Diverged(f"at step {state.step}, {why}")
            if state.step % plan.eval_every == 0 or last:
                _evaluate_and_log(raw_model, eval_loaders, plan, runtime, state, tracker, progress,
                                  last=last)
                if plan.selection.keep_best and save_best is not None and plan.selection.latest_is_best(state):
                    save_best(raw_model, state.step)
                if not last and plan.selection.should_stop(state):
                    last, state.stop_reason = True, "early_stopping"
                    if state.loss_count:  # the steps since the last train/* record
                        _log_training(tracker, state, opt.lr, plan, adapter_loss is not None, runtime, progress)
                    if main:
                        progress.write(f"step {state.step}: early stopping, {plan.selection.patience} evaluations "
                                       f"without a gain above {plan.selection.min_delta} in "
                                       f"{plan.selection.eval_set}/{plan.selection.metric}")
            if not last and not opt.covers(raw_model):  # a variant changed what trains (staged's switch)
                opt = new_optimization(state.step)
                model = distributed.wrap(raw_model, runtime.context, cfg.get("strategy", "ddp"))  # a new DDP (FSDP: as is)
                state.begin_phase(opt.peak_lr, opt.optimizer_name)
                if main:
                    progress.write(f"after step {state.step}: the trainable parameters changed, phase {state.phase} starts")
            stop = not last and _stop_requested(runtime)  # SIGTERM (training/interrupt.py): a checkpoint here, then the end
            if stop or (cfg.get("checkpoint_every") and not last and state.step % cfg.checkpoint_every == 0):
                state.train_time_s = time.perf_counter() - clock
                _save_checkpoint(checkpoint_path, raw_model, opt, state, tracker, runtime, run_record)
            if stop:
                raise interrupt.Interrupted(state.step, interrupt.requested() or signal.SIGTERM)
            if last:
                break
    finally:
        progress.close()  # before any error message, which must be the last line
    state.train_time_s = time.perf_counter() - clock
    state.memory_per_process = distributed.local_memory_mb(raw_model, opt.optimizer, runtime.context)
    return state


def _stop_requested(runtime: Runtime) -> bool:
    """A process was sent SIGTERM: every process stops at this same point (a collective)."""
    return distributed.any_true(interrupt.requested() is not None, runtime.context)


def _save_checkpoint(path: Path | None, raw_model: nn.Module, opt: optim.Optimization, state: TrainState,
                     tracker: Tracker, runtime: Runtime, run_record: dict[str, Any] | None) -> None:
    """Write ``checkpoint.pt`` (rank 0, which has a ``path``). Every process joins in gathering
    the RNG states, and under FSDP the model's and optimizer's shards."""
    rng_states = distributed.gather_to_main(checkpoint.rng_state(runtime.device), runtime.context)
    sharded = distributed.is_sharded(raw_model)
    if path is None and not sharded:  # a DDP process other than rank 0: nothing more to join
        return
    model_state = checkpoint.model_state(raw_model)  # under FSDP both are gathers every process joins
    optimizer_state = distributed.optimizer_state(raw_model, opt.optimizer)
    if path is not None:
        wandb_id = tracker.wandb_run.id if tracker.wandb_run is not None else None
        checkpoint.save(path, model_state, optimizer_state, opt.scheduler.state_dict(), state, wandb_id, rng_states,
                        run_record, strategy="fsdp" if sharded else None)


def _initialize(raw_model: nn.Module, train_loader: DataLoader, runtime: Runtime,
                knowledge: DataLoader | None = None) -> dict[str, Any]:
    """The variant's data-driven initialisation (its ``initialize``) on training batches, drawn
    without disturbing the run: the shuffling and the random streams are as they were, so a run
    whose variant initialises from data sees the same batches and dropout masks as one whose
    variant does not. Nothing (an empty report) when the adapters were started from another run's
    (``init_adapters_from``): it would overwrite what was loaded. ``knowledge`` (one pass) becomes
    ``InitData.knowledge``."""
    shuffling = train_loader.generator.get_state()

    def task_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with runtime.autocast():
            return model(**batch).loss

    batches = (runtime.to_device(batch) for batch in _batches(train_loader, DataPosition()))
    knowledge_batches = None if knowledge is None else (runtime.to_device(batch) for batch in knowledge)
    data = variants.InitData(batches, task_loss, lambda t: distributed.mean_over_ranks(t, runtime.context),
                             knowledge_batches)
    with _own_random_numbers(runtime):
        method = variants.variant_of(raw_model)
        report = {} if method.started_from_file else method.initialize(raw_model, data)
    train_loader.generator.set_state(shuffling)
    if report:
        log.info("initialised from training data: %s", {k: v for k, v in report.items() if not isinstance(v, dict)})
    return report


def _own_random_numbers(runtime: Runtime) -> Any:
    """Generators forked for the block and restored after it: what runs inside (a data-driven
    init, the forgetting probe) leaves the run's dropout masks and shuffling as they were."""
    return torch.random.fork_rng(devices=[runtime.device] if runtime.device.type == "cuda" else [])


def _batches(loader: DataLoader, position: DataPosition) -> Iterator[dict[str, torch.Tensor]]:
    """The loader's batches, epoch after epoch, from ``position`` on (the batches a resumed
    run already trained on in its epoch are drawn and skipped, so the shuffling continues
    exactly); ``position`` follows along."""
    shuffling = loader.generator  # its state at an epoch's start fixes the epoch's order
    skip = 0
    if position.epoch_start is not None:  # resuming
        shuffling.set_state(position.epoch_start)
        skip = position.batches_done
    while True:
        position.epoch_start, position.batches_done = shuffling.get_state(), 0
        for batch in loader:
            position.batches_done += 1
            if position.batches_done > skip:
                yield batch
        skip = 0


def _forward_backward(
    model: nn.Module, raw_model: nn.Module, batch: dict[str, torch.Tensor], runtime: Runtime, step: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Task loss through ``model`` (the data-parallel wrapper, if any), plus the variants'
    regulariser; backward. Returns (task loss, regulariser or None)."""
    with runtime.autocast():
        loss = model(**batch).loss
        adapter_loss = variants.variant_of(raw_model).adapter_loss(raw_model)
    total = loss if adapter_loss is None else loss + adapter_loss
    finite = bool(torch.isfinite(total.detach()))
    if not distributed.all_true(finite, runtime.context):  # every process stops, so rank 0 records why
        value = float(total) if not finite else "not finite in another process"
        raise NonFiniteLoss(
            f"the training loss is {value} at step {step + 1}; the run stops "
            "(the last checkpoint, if any, is kept): lower trainer.lr or turn on trainer.grad_clip"
        )
    total.backward()
    return loss, adapter_loss


def _log_training(tracker: Tracker, state: TrainState, lr: float, plan: Plan, has_adapter_loss: bool,
                  runtime: Runtime, progress: tqdm) -> None:
    """One ``train/*`` record: the losses averaged over the steps since the last one (and over
    the processes), the learning rate, and the hook metrics gathered meanwhile."""
    mean_loss = float(distributed.mean_over_ranks(state.loss_sum, runtime.context)) / state.loss_count
    state.logged_losses.append(mean_loss)
    if has_adapter_loss:
        state.pending["train/adapter_loss"] = float(state.adapter_loss_sum) / state.loss_count
    progress.set_postfix(loss=f"{mean_loss:.4f}")
    tracker.log({
        "step": state.step,
        "phase": state.phase,
        "train/loss": mean_loss,
        "train/lr": lr,
        "train/epoch": state.step / plan.steps_per_epoch,
        **state.pending,
    })
    state.clear_running()


def _evaluate_and_log(raw_model: nn.Module, eval_loaders: Mapping[str, DataLoader], plan: Plan,
                      runtime: Runtime, state: TrainState, tracker: Tracker, progress: tqdm, last: bool) -> None:
    """Evaluate the selection set, then the others (all of them, or with ``trainer.eval_others=
    when_best`` only where the selection set reached a new best, and at the end), and log one record."""
    record: dict[str, Any] = {"step": state.step, "phase": state.phase}
    select = plan.selection.eval_set
    order = [select, *(name for name in eval_loaders if name != select)]
    for name in order:
        if name != select and not (plan.eval_others == "always" or last or plan.selection.latest_is_best(state)
                                   or plan.selection.should_stop(state)):  # the run's last evaluation
            continue
        metrics, predictions = plan.evaluator(raw_model, eval_loaders[name], runtime)
        tracker.log_predictions(state.step, name, predictions)
        prefix = "eval" if name == "main" else f"eval_{name}"
        record.update({f"{prefix}/{k}": v for k, v in metrics.items()})
        state.record_eval(name, metrics)
    if plan.forgetting is not None and state.forgetting_reference:
        with _own_random_numbers(runtime):
            forgetting = plan.forgetting.measure(raw_model, runtime, state.forgetting_reference)
        record.update({f"forget/{k}": v for k, v in forgetting.items()})
        state.forgetting_history.append((state.step, forgetting))
    distributed.reshard(raw_model)  # (FSDP) the root's parameters, gathered by the forward passes, back to shards
    tracker.log(record)
    if runtime.context.is_main:  # tqdm.write prints whatever the bar's disable says
        progress.write(f"step {state.step}: " + ", ".join(
            f"{k}={v:.4f}" for k, v in record.items() if k not in ("step", "phase")))
