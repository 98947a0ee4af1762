"""One run from a composed config: data, model, variant, training, and the run directory.

``run_experiment`` reads top to bottom as its steps: check the config (completed with the
schema's defaults), set up the runtime, the model and the data (``_setup_*``), plan the run, open
the run dir and tracker (rank 0), train, and write the results. Every process of a ``torchrun`` job runs the same steps; only rank 0 writes.
The run directory's files are listed in ``training/rundir.py``.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

import variants
from schema import ConfigError
from schema.door import typed

from . import checkpoint, distributed, rundir
from .checkpoint import TrainState
from .data import load_task, make_loader, sft
from .device import Runtime, cpu_bf16_note, for_weights, peak_memory_mb, reset_peak_memory, runtime_for
from .evaluation import ClassifierEvaluator, Evaluator, GenerationEvaluator
from .forgetting import Probe, build_probe, summarize
from .interrupt import Interrupted
from .knowledge import knowledge_loader
from .models import load_model, weights_mb
from .selection import at_best_val, best_eval
from .tracking import NullTracker, Tracker
from .trainer import Plan, plan_run, train

log = logging.getLogger(__name__)

# Keys of the variant group that the runner consumes; all others go to the variant.
VARIANT_RUNNER_KEYS = ("name", "targets", "bias", "lr")


class Data(NamedTuple):
    """What ``_setup_data`` builds: this process's training batches, the eval sets' loaders, what
    evaluates on them, the example counts (training, ``main``) the summary records, and the
    forgetting probe (None: ``trainer.forgetting.measure=false``)."""

    train_loader: DataLoader
    eval_loaders: dict[str, DataLoader]
    evaluator: Evaluator
    examples: tuple[int, int]
    forgetting: Probe | None


def run_experiment(cfg: DictConfig, run_dir: Path, group: str | None = None, run_name: str | None = None) -> dict[str, Any]:
    """Validate, build, train, evaluate and save one run; returns the summary (on every rank;
    only rank 0's is written)."""
    started = time.perf_counter()
    cfg = completed(cfg)
    runtime = _setup_runtime(cfg)
    model, tokenizer, adapted, runtime, budget = _setup_model(cfg, runtime)
    train_loader, eval_loaders, evaluator, examples, probe = _setup_data(cfg, tokenizer, runtime)
    knowledge = _knowledge(cfg, model, tokenizer, runtime)
    plan = plan_run(cfg.trainer, len(train_loader), evaluator, list(eval_loaders), cfg.task.main_metric, probe)
    variants.variant_of(model).check_total_steps(plan.steps)  # a schedule longer than the run fails here, before writing
    resume, run_record = _load_checkpoint(cfg, run_dir, runtime)

    main = runtime.context.is_main
    tracker = _open_run_dir(cfg, run_dir, group, run_name, resume) if main else NullTracker()
    try:
        state = train(model, train_loader, eval_loaders, plan, cfg.trainer, tracker, runtime,
                      checkpoint_path=run_dir / rundir.CHECKPOINT if main else None, resume=resume,
                      save_best=_best_state_writer(cfg, run_dir, main), run_record=run_record, knowledge=knowledge)
        replica_difference = distributed.max_replica_difference(model, runtime.context)
        earlier_s = run_record["resumes"][-1]["earlier_train_time_s"] if resume else 0.0  # the processes before this one
        summary = _summary(cfg, model, adapted, state, plan, runtime, tracker, group,
                           examples=examples, wall_time_s=earlier_s + time.perf_counter() - started,
                           replica_difference=replica_difference)
        summary["budget"] = budget
        summary["resumes"] = run_record["resumes"]
        tensors = _adapter_tensors(model, main)
        if main:
            with rundir.atomic(run_dir / rundir.ADAPTER) as tmp:
                variants.save_adapter(model, tmp, extra_metadata=base_model_metadata(cfg), tensors=tensors)
            summary["adapter_mb"] = (run_dir / rundir.ADAPTER).stat().st_size / 2**20  # on disk, with metadata
            rundir.write_summary(run_dir, summary)
        tracker.summary({k: v for k, v in summary.items() if k != "adapted_modules"})
    except BaseException as err:
        if main:
            stopped = isinstance(err, Interrupted)  # not a failure: its checkpoint continues it
            failure = {"status": "interrupted" if stopped else "failed", "variant": cfg.variant.name,
                       "rank": cfg.rank, "seed": cfg.seed, "task": cfg.task.name, "main_metric": cfg.task.main_metric,
                       "error": f"{type(err).__name__}: {err}", **({"step": err.step} if stopped else {})}
            write_failure(run_dir, failure)
            tracker.summary(failure)
            tracker.finish(exit_code=128 + err.signum if stopped else 1)
        raise
    tracker.finish()
    if main:
        for path in checkpoint.files(run_dir / rundir.CHECKPOINT):
            path.unlink(missing_ok=True)  # complete: adapter.safetensors is what remains
    return summary


def base_model_metadata(cfg: DictConfig) -> dict[str, Any]:
    """What the adapter file records of its base model, so that ``load_trained`` can rebuild it."""
    return {"model": cfg.model.name_or_path, "task": cfg.task.name, "model_type": cfg.task.type,
            "gguf_file": cfg.model.gguf_file, "model_dtype": cfg.model.dtype,
            "num_labels": cfg.task.get("num_labels"), "keep_layers": cfg.model.keep_layers}  # (a causal LM has no labels)


def completed(cfg: DictConfig) -> DictConfig:
    """Every value against the schema (``schema.door.typed``: one ``ConfigError`` listing what it
    refuses), on every process alike (under torchrun each fails the same way) and before anything
    is written; the config completed with the schema's defaults (every key present from here on),
    with the run's peak rate resolved (``with_variant_lr``)."""
    variants.get_variant(cfg.variant.name)  # a name the schema has no node for: the known variants, in one line
    complete = OmegaConf.create(OmegaConf.to_container(OmegaConf.structured(typed(cfg))))
    return with_variant_lr(complete)


def _setup_runtime(cfg: DictConfig) -> Runtime:
    """The device, precision and process group (``trainer.device``, ``trainer.precision``), with
    peak-memory counting started and every generator seeded."""
    runtime = runtime_for(cfg.trainer.device, cfg.trainer.precision)
    if note := cpu_bf16_note(runtime):
        log.warning(note)
    reset_peak_memory(runtime.device)
    # transformers.set_seed does the same, but importing it imports peft (and bitsandbytes) when
    # they are installed: seconds per run, and bitsandbytes' CPU notice on every run.
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # every CUDA device too
    return runtime


def with_variant_lr(cfg: DictConfig) -> DictConfig:
    """The config with ``trainer.lr`` set to the run's peak rate: ``trainer.lr`` when given (the
    user's override), else the variant's own (``variant.lr``, from its YAML: each method's rate
    differs by orders of magnitude). The resolved rate is what config.yaml records. The schema
    checks either rate's value; here only that one is set."""
    lr, own = cfg.trainer.lr, cfg.variant.lr
    if lr is not None:
        if own is not None and own != lr:
            log.info("trainer.lr=%s overrides variant.lr=%s", lr, own)
        return cfg
    if own is None:
        raise ConfigError(f"trainer.lr=None and variant.lr=None for variant={cfg.variant.name!r}: set one, a number > 0")
    cfg = cfg.copy()
    cfg.trainer.lr = float(own)
    return cfg


def variant_kwargs(variant_cfg: DictConfig) -> dict[str, Any]:
    return {k: v for k, v in OmegaConf.to_container(variant_cfg, resolve=True).items() if k not in VARIANT_RUNNER_KEYS}


def _setup_model(cfg: DictConfig, runtime: Runtime
                 ) -> tuple[nn.Module, PreTrainedTokenizerBase, list[str], Runtime, dict[str, Any] | None]:
    """The pretrained model with the variant applied and its trainable set chosen, on the
    device; the tokenizer; the adapted module names; the runtime its weights' dtype asks for;
    what ``budget`` chose (None without one)."""
    model, tokenizer = load_model(cfg.model.name_or_path, cfg.task.get("num_labels"), cfg.model.dtype, cfg.task.type,
                                  cfg.model.gguf_file, cfg.model.keep_layers)
    runtime = for_weights(runtime, next(model.parameters()).dtype, cfg.trainer.precision)
    if cfg.model.dropout is not None:
        set_dropout(model, cfg.model.dropout)
    head = list(cfg.model.train_modules)
    targets = cfg.variant.targets  # baselines need none: full and bitfit select by kind
    if targets is not None and not isinstance(targets, str):
        targets = list(targets)
    settings = {"rank": cfg.rank, **variant_kwargs(cfg.variant)}
    budget = None
    if cfg.budget is not None:
        choice = variants.rank_for_budget(model, cfg.variant.name, targets, cfg.budget, head)
        settings.update(choice.settings if choice else {})
        budget = {"requested": cfg.budget, "rank": choice.rank if choice else None,
                  "method_params": choice.method_params if choice else None}  # AdaLoRA: at its final rank
        log.info("budget=%d: %s", cfg.budget, f"rank {choice.rank}, {choice.method_params} parameters" if choice
                 else f"{cfg.variant.name} has no rank to choose; it trains what it trains")
    adapted = variants.inject_adapters(model, cfg.variant.name, targets, alpha=cfg.alpha, exclude=head, **settings)
    variants.mark_trainable(model, bias=cfg.variant.bias, train_modules=head)
    if cfg.init_from:
        loaded = variants.init_adapters_from(model, adapter_file(cfg.init_from))
        log.info("init_from %s: %d adapter tensors", cfg.init_from, len(loaded))
    trainable, total = variants.count_parameters(model)
    log.info("%s on %d modules: %d / %d parameters trainable (%.3f%%)", cfg.variant.name, len(adapted), trainable,
             total, 100 * trainable / total)
    return model.to(runtime.device), tokenizer, adapted, runtime, budget


def _setup_data(cfg: DictConfig, tokenizer: PreTrainedTokenizerBase, runtime: Runtime) -> Data:
    """The task's examples (``training/data``; ``val`` held out of the training set with
    ``task.val_fraction``), batched: the training loader (this process's slice of each global
    batch), the eval loaders, and what evaluates on them."""
    train_examples, eval_sets = load_task(cfg.task, cfg.seed)
    examples = (len(train_examples), len(eval_sets["main"]))
    probe = build_probe(cfg, tokenizer, eval_sets)
    if cfg.task.type == "causal_lm":
        return Data(*_causal_lm_loaders(cfg, tokenizer, train_examples, eval_sets, runtime), examples, probe)
    fields, max_length = list(cfg.task.text_fields), cfg.model.max_length
    train_loader = make_loader(train_examples, tokenizer, fields, max_length, cfg.trainer.batch_size, shuffle=True,
                               seed=cfg.seed, shard=runtime.context, group_by_length=cfg.trainer.group_by_length)
    eval_loaders = {
        name: make_loader(examples, tokenizer, fields, max_length, cfg.trainer.eval_batch_size, shuffle=False)
        for name, examples in eval_sets.items()
    }
    return Data(train_loader, eval_loaders, ClassifierEvaluator(list(cfg.task.metrics)), examples, probe)


def _knowledge(cfg: DictConfig, model: nn.Module, tokenizer: PreTrainedTokenizerBase, runtime: Runtime
               ) -> DataLoader | None:
    """The batches of the texts outside the task that the variant's initialisation reads
    (``Variant.knowledge_source``, ``training/knowledge.py``); None when it reads none, or will not
    run (a resume: the checkpoint holds its result; ``init_from``: the adapters start from a file)."""
    source = variants.variant_of(model).knowledge_source()
    if source is None or cfg.resume or cfg.init_from:
        return None
    return knowledge_loader(source, cfg, tokenizer, runtime.context)


def _causal_lm_loaders(cfg: DictConfig, tokenizer: PreTrainedTokenizerBase, train_examples: list, eval_sets: dict,
                          runtime: Runtime) -> tuple[DataLoader, dict[str, DataLoader], Evaluator]:
    """Instruction/response pairs (``training/data/sft.py``), scored by loss and generation."""
    fmt, max_length = sft.prompt_format(tokenizer, cfg.task), cfg.model.max_length
    train_loader = sft.make_train_loader(train_examples, fmt, max_length, cfg.trainer.batch_size, cfg.seed,
                                         packing=cfg.task.packing, shard=runtime.context,
                                         group_by_length=cfg.trainer.group_by_length)
    eval_loaders = {name: sft.make_eval_loader(examples, fmt, max_length, cfg.trainer.eval_batch_size)
                    for name, examples in eval_sets.items()}
    return train_loader, eval_loaders, GenerationEvaluator(list(cfg.task.metrics), tokenizer, cfg.task.max_new_tokens)


def adapter_file(path: str) -> Path:
    """``init_from``: a run dir (its adapter.safetensors) or an adapter file."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / rundir.ADAPTER
    if not path.is_file():
        raise ConfigError(f"init_from={str(path)!r} does not exist; allowed: a finished run dir or its {rundir.ADAPTER}")
    return path


def _load_checkpoint(cfg: DictConfig, run_dir: Path, runtime: Runtime) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """With ``resume=true``, the run dir's checkpoint (its metrics.jsonl is cut back to it), once
    the config is checked against the checkpoint's (``checkpoint.check_resume``); and the run record
    the next checkpoints carry: the resolved config and every resume's accepted changes."""
    config = OmegaConf.to_container(cfg, resolve=True)
    if not cfg.resume:
        return None, {"config": config, "resumes": []}
    saved, warnings = checkpoint.load_latest(run_dir / rundir.CHECKPOINT)
    for warning in warnings:
        log.warning(warning)
    checkpoint.check_format(saved, runtime.context.world_size,
                            "fsdp" if runtime.context.enabled and cfg.trainer.strategy == "fsdp" else None)
    trained = saved.get("run") or {"config": _config_yaml(run_dir), "resumes": []}  # older checkpoints: config.yaml
    accepted = checkpoint.check_resume(_with_defaults(trained["config"]), config, list(cfg.resume_changes or []),
                                       saved["step"])
    if runtime.context.is_main:
        for warning in rundir.truncate_metrics(run_dir, saved["step"]):
            log.warning(warning)
        rundir.truncate_predictions(run_dir, saved["step"])
    log.info("resuming %s from step %d", run_dir, saved["step"])
    # every resume is recorded, with its accepted changes ({} for none) and the training seconds of
    # the processes before it (up to the checkpoint), which the run's wall_time_s counts too
    resumed = {"step": saved["step"], "changed": accepted["changed"] if accepted else {},
               "earlier_train_time_s": saved["train_state"]["train_time_s"]}
    return saved, {"config": config, "resumes": [*trained["resumes"], resumed]}


def _with_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's config with the keys added since it was written at their defaults (a run
    from before a knob existed ran at its default), so that they do not count as changes; as
    written where it no longer validates (the comparison then names what differs)."""
    try:
        return OmegaConf.to_container(completed(OmegaConf.create(config)), resolve=True)
    except Exception:  # noqa: BLE001  (an old config the schema refuses now: compared as it is)
        return config


def _config_yaml(run_dir: Path) -> dict[str, Any]:
    path = run_dir / rundir.CONFIG
    return yaml.safe_load(path.read_text()) if path.is_file() else {}


def _open_run_dir(cfg: DictConfig, run_dir: Path, group: str | None, run_name: str | None,
                  resume: dict[str, Any] | None) -> Tracker:
    """Write the resolved config and start tracking (metrics.jsonl, W&B)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    rundir.write_text(run_dir / rundir.CONFIG, OmegaConf.to_yaml(cfg, resolve=True))
    tracking = cfg.tracking
    return Tracker(
        run_dir, OmegaConf.to_container(cfg, resolve=True), mode=tracking.mode, project=tracking.project,
        entity=tracking.entity, group=tracking.group or group, name=run_name or run_dir.name, tags=list(tracking.tags),
        resume_id=resume.get("wandb_run_id") if resume else None, resumed=resume is not None,
    )


def _best_state_writer(cfg: DictConfig, run_dir: Path, main: bool) -> Callable[[nn.Module, int], None]:
    """``train``'s ``save_best``: the model's adapter file, with the step in its metadata, written
    (by rank 0) to a temporary file and renamed, so a kill leaves the previous best intact."""
    def save(model: nn.Module, step: int) -> None:
        tensors = _adapter_tensors(model, main)
        if main:
            with rundir.atomic(run_dir / rundir.ADAPTER_BEST) as tmp:
                variants.save_adapter(model, tmp, extra_metadata={**base_model_metadata(cfg), "step": step},
                                      tensors=tensors)
    return save


def _adapter_tensors(model: nn.Module, main: bool) -> dict[str, torch.Tensor] | None:
    """What an adapter file holds (``variants.adapter_state_dict``), on the process that writes
    it; under FSDP every process must join in gathering the shards."""
    if main or distributed.is_sharded(model):
        return variants.adapter_state_dict(model)
    return None


def _summary(cfg: DictConfig, model: nn.Module, adapted: list[str], state: TrainState, plan: Plan,
             runtime: Runtime, tracker: Tracker, group: str | None, examples: tuple[int, int], wall_time_s: float,
             replica_difference: float | None) -> dict[str, Any]:
    """What ``summary.json`` records about a completed run."""
    adapter_config = variants.adapter_config(model)
    trainable, total = variants.count_parameters(model)
    head_params = variants.count_trainable_in(model, list(cfg.model.train_modules))
    memory_mb, memory_kind = peak_memory_mb(runtime.device)
    summary = {
        "status": "completed",
        "variant": cfg.variant.name,
        "rank": adapter_config["rank"],  # null for a baseline, which has none
        "alpha": adapter_config["alpha"],
        "seed": cfg.seed,
        "model": cfg.model.name_or_path,
        "task": cfg.task.name,
        "main_metric": cfg.task.main_metric,
        "eval": state.eval_metrics,
        "eval_extra": state.extra_eval_metrics,
        "eval_best": best_eval(state.eval_history, cfg.task.main_metric),  # the paper's best dev epoch: peeks at main
        "eval_at_start": dict(state.eval_history).get(0),  # trainer.eval_at_start: the model before training, or null
        "eval_extra_best": {},  # the other sets at eval_best's step (MNLI mismatched, as the paper's best epoch)
        "peak_lr": state.phases[0]["peak_lr"],
        "optimizer": state.phases[0]["optimizer"],
        "phases": state.phases,
        "trainable_params": trainable,
        "head_params": head_params,  # the task head's share (model.train_modules)
        "method_params": trainable - head_params,  # what the method itself trains: the paper tables' column
        "total_params": total,
        "trainable_percent": 100 * trainable / total,
        "adapted_modules": adapted,
        "steps": state.step,
        "train_examples": examples[0],
        "eval_examples": examples[1],
        "wall_time_s": wall_time_s,
        "train_time_s": state.train_time_s,
        "step_time_s": state.median_step_time_s,
        "peak_memory_mb": memory_mb,
        "peak_memory_kind": memory_kind,
        "weights_mb": weights_mb(model),
        "device": str(runtime.device),
        "processes": runtime.context.world_size,
        "strategy": cfg.trainer.strategy if runtime.context.enabled else None,
        "memory_per_process": state.memory_per_process,  # what each holds of parameters and optimizer state
        "precision": runtime.precision,
        "wandb_run_id": tracker.wandb_run.id if tracker.wandb_run is not None else None,
        "wandb_group": cfg.tracking.group or group,
        "adapter_report": variants.adapter_report(model),
        "initialization": state.initialization,  # the variant's data-driven init, if any (LoRA-GA, EVA)
        "init_from": cfg.init_from,
    }
    summary["stopped"] = {"reason": state.stop_reason, "step": state.step, "planned_steps": plan.steps,
                          "epochs": state.step / plan.steps_per_epoch, "patience": plan.selection.patience,
                          "min_delta": plan.selection.min_delta, "min_steps": plan.selection.min_steps}
    summary["best"] = {**plan.selection.best(state),
                       "adapter": rundir.ADAPTER_BEST if plan.selection.keep_best else None}
    summary["val_fraction"] = cfg.task.val_fraction
    if "val" in state.extra_eval_history:  # model selection on the held-out split, main reported as test
        summary["eval_at_best_val"] = at_best_val(state.extra_eval_history["val"], state.eval_history,
                                                  cfg.task.main_metric)
    best_step = summary["eval_best"]["step"]
    summary["eval_extra_best"] = {name: dict(history)[best_step] for name, history in state.extra_eval_history.items()}
    summary["forgetting"] = summarize(plan.forgetting, state.forgetting_history,
                                      {"best": best_step, "best_val": (summary.get("eval_at_best_val") or {}).get("step")})
    if replica_difference is not None:
        summary["replica_max_abs_diff"] = replica_difference  # 0.0: every process holds rank 0's weights
    return summary


def set_dropout(model: nn.Module, p: float) -> None:
    """Set the probability of every dropout in the base model (``model.dropout``, in [0, 1))."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p


def write_failure(run_dir: Path, failure: dict[str, Any]) -> None:
    """Mark a run failed (or interrupted) in its summary.json (the last checkpoint, if any, stays for resume=true).
    Where that write fails too (a read-only or full dir), a warning says so and the error that
    stopped the run is the one reported, not this one."""
    try:
        rundir.write_summary(run_dir, failure)
    except OSError as unrecorded:
        log.warning("the failure could not be recorded in summary.json: %s", unrecorded)
