#!/usr/bin/env python
"""Training-step and inference benchmarks: our variants against the `peft` package and full
fine-tuning, side by side in one process.

    python bench/bench.py                                   # MiniLM, batch 32 x 64 tokens, CPU
    python bench/bench.py --arch roberta-base --device cuda # random-weight RoBERTa-base from its config
    python bench/bench.py --arch llama-1b --device cuda --batch 8 --seq 512
    python bench/bench.py --only lora-qv,peft-lora-qv --rounds 9 --json out.json
    python bench/bench.py --arch smollm2 --batch 8 --seq 64  # the pretrained causal LM (model=smollm2)

Every configuration gets its own copy of the same base weights, optimizer (AdamW) and the same
synthetic batch (random token ids, all positions attended). Rounds alternate over the
configurations (the start rotates each round), so drift in machine speed hits all of them
alike; each round times ``--steps`` full training steps per configuration (forward, loss with
any regulariser, backward, gradient clipping, optimizer step, the variant's after-step hook)
after ``--warmup`` untimed ones. The step is the trainer's: the optimizer's parameter groups
come from the variant's ``learning_rate_scale`` (LoRA+), and the variant's
``transform_gradients`` runs between clipping and the step (LoRA-Pro); a start of the
variant's own (``initialize``: LoRA-GA's gradients and EVA's activations, on copies of the one
batch) is timed once, apart; PiSSA's and MiLoRA's SVD happen when the layers are built, untimed.
Reported: median step time, tokens/s, trainable parameters, memory, and the ratios the project
tracks. Memory (``memory_bytes``) is the bytes of weights + gradients + optimizer state + the
activations autograd saves for backward (counted with ``saved_tensors_hooks``: on CPU no
per-configuration peak exists inside one process); on CUDA the step's measured peak over what
was allocated before it replaces gradients and saved activations in the total.
Inference: median forward latency (eval, no grad) of the base model, our merged LoRA model
and our unmerged one, alternating likewise.

Speed does not depend on pretrained values, so ``--arch`` builds real architectures from their
configs with random weights when checkpoints cannot be downloaded.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import platform
import statistics
import sys
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

import variants
from training.optim import make_optimizer, param_groups

ARCHS = ("minilm", "roberta-base", "llama-1b", "smollm2")
HEADS = {"minilm": "classifier", "roberta-base": "classifier", "llama-1b": "score", "smollm2": None}  # None: a causal LM
LR = 1e-4  # every configuration's peak rate (speed does not depend on it)
VERA_RANK = 256  # VeRA's r in vera-qv: peft's default (its paper: 1024 on RoBERTa-base); the --rank is LoRA's
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
CLOCK = CLOCKS["wall"]  # --clock cpu: the process's CPU time, for a machine other jobs share


def build_base(arch: str, num_labels: int = 2) -> tuple[nn.Module, list[str], int]:
    """(model, attention q/v module names, vocab size), pretrained for minilm and smollm2 (a causal
    LM: the loss is next-token prediction at every position), random otherwise."""
    from transformers import AutoModelForSequenceClassification, LlamaConfig, RobertaConfig

    if arch == "smollm2":
        from training.models import load_model

        model, tokenizer = load_model("smollm2", model_type="causal_lm")
        return model, ["q_proj", "v_proj"], len(tokenizer)
    if arch == "minilm":
        from training.models import load_model

        model, tokenizer = load_model("minilm", num_labels)
        return model, ["query", "value"], tokenizer.vocab_size
    if arch == "roberta-base":
        config = RobertaConfig(num_labels=num_labels)  # defaults are roberta-base's shapes
        return AutoModelForSequenceClassification.from_config(config), ["query", "value"], config.vocab_size
    config = LlamaConfig(  # TinyLlama-1.1B's shapes
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
        num_key_value_heads=4, vocab_size=32000, num_labels=num_labels, pad_token_id=0,
    )
    return AutoModelForSequenceClassification.from_config(config), ["q_proj", "v_proj"], config.vocab_size


@dataclass
class Config:
    """One thing to time: a model ready to train and the calls around its optimizer step."""

    name: str
    model: nn.Module
    extra_loss: Callable[[nn.Module], torch.Tensor | None] = lambda model: None
    after_step: Callable[[nn.Module, int], None] = lambda model, step: None
    optimizer: torch.optim.Optimizer | None = None
    init_s: float | None = None  # the variant's own start (initialize), timed once
    times: list[float] = field(default_factory=list)
    step: int = 0


def copy_of(base: nn.Module, share_frozen: bool = False, head: str | None = None) -> nn.Module:
    """A copy of ``base`` to wrap; with ``share_frozen`` (``--share-base``) its parameters but the
    task head's (which trains) are ``base``'s own, so adapter configurations of a 1B model fit in
    memory together. Only for methods that never write the base weights (not full fine-tuning,
    staged, QLoRA's quantizing)."""
    if not share_frozen:
        return copy.deepcopy(base)
    own = {id(p) for name, p in base.named_parameters() if head and name.split(".")[0] == head}
    return copy.deepcopy(base, {id(p): p for p in base.parameters() if id(p) not in own})


def ours(base: nn.Module, variant: str, targets, rank: int, dropout: float, head: str | None,
         share_frozen: bool = False, **kw) -> nn.Module:
    model = copy_of(base, share_frozen, head)
    heads = [head] if head else []
    variants.inject_adapters(model, variant, targets, rank=rank, alpha=2 * rank, exclude=heads, dropout=dropout, **kw)
    variants.mark_trainable(model, train_modules=heads)
    return model


def theirs(base: nn.Module, variant: str, targets, rank: int, dropout: float, total_steps: int,
           share_frozen: bool = False, head: str | None = None) -> nn.Module:
    import peft

    model = copy_of(base, share_frozen, head)
    task_type = "CAUSAL_LM" if model.config.architectures and "CausalLM" in model.config.architectures[0] else "SEQ_CLS"
    if variant == "adalora":
        config = peft.AdaLoraConfig(init_r=rank, target_r=max(1, 2 * rank // 3), lora_alpha=2 * rank,
                                    lora_dropout=dropout, target_modules=targets, task_type=task_type,
                                    total_step=total_steps, tinit=0, tfinal=0, deltaT=10)
    else:
        config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=dropout, target_modules=targets,
                                 use_dora=variant == "dora", task_type=task_type)
    return peft.get_peft_model(model, config)


def configurations(base: nn.Module, qv: list[str], head: str, args, total_steps: int,
                   batch: dict[str, torch.Tensor]) -> dict[str, Callable[[], Config]]:
    """Builders, so only the selected configurations are built."""
    r, p, share = args.rank, args.dropout, args.share_base

    def hooked(name: str, model: nn.Module) -> Config:
        model.to(batch["input_ids"].device)
        start = CLOCK()
        method = variants.variant_of(model)
        done = method.initialize(model, variants.InitData(itertools.repeat(batch), lambda m, b: m(**b).loss))
        init_s = CLOCK() - start if done else None
        method.check_total_steps(total_steps)
        method.on_train_begin(model, total_steps)
        return Config(name, model, extra_loss=lambda m: variants.variant_of(m).adapter_loss(m), init_s=init_s,
                      after_step=lambda m, step: variants.variant_of(m).after_optimizer_step(m, step, total_steps))

    def quantized_peft() -> nn.Module:
        from variants.methods.qlora import quantize_model
        from variants.targets import task_head

        model = copy.deepcopy(base)
        quantize_model(model, keep=[*([head] if head else []), *task_head(model)])  # the same 4-bit base as ours
        return theirs(model, "lora", qv, r, p, total_steps)

    def full() -> Config:
        model = copy.deepcopy(base)
        variants.inject_adapters(model, "full")  # the same full fine-tuning as variant=full
        return hooked("full", model)

    return {
        "full": full,
        "lora-qv": lambda: hooked("lora-qv", ours(base, "lora", qv, r, p, head)),
        "peft-lora-qv": lambda: Config("peft-lora-qv", theirs(base, "lora", qv, r, p, total_steps)),
        "lora-all": lambda: hooked("lora-all", ours(base, "lora", "all-linear", r, p, head, share)),
        "peft-lora-all": lambda: Config("peft-lora-all", theirs(base, "lora", "all-linear", r, p, total_steps, share, head)),
        "dora-qv": lambda: hooked("dora-qv", ours(base, "dora", qv, r, p, head)),
        "peft-dora-qv": lambda: Config("peft-dora-qv", theirs(base, "dora", qv, r, p, total_steps)),
        "dora-all": lambda: hooked("dora-all", ours(base, "dora", "all-linear", r, p, head, share)),
        "peft-dora-all": lambda: Config("peft-dora-all", theirs(base, "dora", "all-linear", r, p, total_steps, share, head)),
        # The paths before issue 35, for before/after in one run: dropout's plain backward, V formed.
        "lora-all-plain": lambda: hooked("lora-all-plain", ours(base, "lora", "all-linear", r, p, head, share,
                                                                lean_backward=False)),
        "dora-all-plain": lambda: hooked("dora-all-plain", ours(base, "dora", "all-linear", r, p, head, share,
                                                                lean_backward=False, column_norm="direct")),
        "adalora-qv": lambda: hooked("adalora-qv", ours(base, "adalora", qv, r, p, head, t_init=0, t_final=0)),
        "peft-adalora-qv": lambda: Config(
            "peft-adalora-qv", theirs(base, "adalora", qv, r, p, total_steps),
            after_step=lambda model, step: model.base_model.update_and_allocate(step)),
        "qlora-qv": lambda: hooked("qlora-qv", ours(base, "qlora", qv, r, p, head)),
        "peft-qlora-qv": lambda: Config("peft-qlora-qv", quantized_peft()),
        "loraplus-qv": lambda: hooked("loraplus-qv", ours(base, "lora", qv, r, p, head, lr_ratio=16)),
        "lora_ga-qv": lambda: hooked("lora_ga-qv", ours(base, "lora_ga", qv, r, p, head)),
        "lora_pro-qv": lambda: hooked("lora_pro-qv", ours(base, "lora_pro", qv, r, p, head)),
        "lora_pro_efficient-qv": lambda: hooked("lora_pro_efficient-qv",
                                                ours(base, "lora_pro", qv, r, p, head, mode="efficient")),
        "rslora-qv": lambda: hooked("rslora-qv", ours(base, "lora", qv, r, p, head, scaling="rslora")),
        "pissa-qv": lambda: hooked("pissa-qv", ours(base, "pissa", qv, r, p, head)),
        "milora-qv": lambda: hooked("milora-qv", ours(base, "milora", qv, r, p, head)),
        "eva-qv": lambda: hooked("eva-qv", ours(base, "eva", qv, r, p, head)),
        "olora-qv": lambda: hooked("olora-qv", ours(base, "olora", qv, r, p, head)),
        "lora_fa-qv": lambda: hooked("lora_fa-qv", ours(base, "lora", qv, r, p, head, freeze_a=True)),
        "lora_fa-all": lambda: hooked("lora_fa-all", ours(base, "lora", "all-linear", r, p, head, share, freeze_a=True)),
        "corda-qv": lambda: hooked("corda-qv", ours(base, "corda", qv, r, p, head)),
        "loftq-qv": lambda: hooked("loftq-qv", ours(base, "qlora", qv, r, p, head, init="loftq")),
        "vera-qv": lambda: hooked("vera-qv", ours(base, "vera", qv, VERA_RANK, p, head)),
        "hira-qv": lambda: hooked("hira-qv", ours(base, "hira", qv, r, p, head)),
        "gralora-qv": lambda: hooked("gralora-qv", ours(base, "gralora", qv, r, p, head)),
    }


def train_step(config: Config, batch: dict[str, torch.Tensor], sync: Callable[[], None]) -> float:
    model = config.model
    start = CLOCK()
    loss = model(**batch).loss
    extra = config.extra_loss(model)
    (loss if extra is None else loss + extra).backward()
    params = [p for p in model.parameters() if p.requires_grad]
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    variants.variant_of(model).transform_gradients(model, config.optimizer, LR)
    config.optimizer.step()
    config.step += 1
    config.after_step(model, config.step)
    config.optimizer.zero_grad(set_to_none=True)
    sync()
    return CLOCK() - start


def memory_bytes(config: Config, batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, int]:
    """What one step holds: ``weights``, ``grads``, ``optimizer`` state and ``saved`` (the bytes
    autograd saves for backward, each storage once, parameters left out), ``total`` their sum. On
    CUDA ``step_peak`` is also measured: ``torch.cuda.max_memory_allocated`` over one step less
    what was allocated before it (every configuration's weights stay on the device, so the raw
    peak would count the others'), and ``total`` is weights + optimizer state + that peak."""
    parts = memory_parts(config, batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        train_step(config, batch, lambda: torch.cuda.synchronize(device))
        parts["step_peak"] = torch.cuda.max_memory_allocated(device) - before
        parts["total"] = parts["weights"] + parts["optimizer"] + parts["step_peak"]
    return parts


def memory_parts(config: Config, batch: dict[str, torch.Tensor], backward: bool = True) -> dict[str, int]:
    model = config.model
    saved: list[weakref.ref] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        # A detached view, weakly referenced: returning the tensor itself would tie a saved output
        # to its own graph in a cycle, so a graph dropped unused (a detached norm's) would stay alive
        # and count; this way only what the finished forward pass still holds counts.
        tensor = tensor.detach()
        if tensor.numel():
            saved.append(weakref.ref(tensor))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(**batch).loss
        extra = config.extra_loss(model)
    held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for ref in saved if (t := ref()) is not None}
    grads = 0
    if backward:
        (loss if extra is None else loss + extra).backward()
        grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
        config.optimizer.zero_grad(set_to_none=True)
    del loss, extra
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    state = sum(v.numel() * v.element_size() for s in config.optimizer.state.values() for v in s.values()
                if isinstance(v, torch.Tensor))
    state += tensor_bytes(variants.training_state(model))  # what the variant carries itself (LoRA-Pro's moments)
    weight_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    activations = sum(n for ptr, n in held.items() if ptr not in weight_ptrs)
    parts = {"weights": weights, "grads": grads, "optimizer": state, "saved": activations}
    return {**parts, "total": sum(parts.values())}


def tensor_bytes(tree) -> int:
    """Bytes of the tensors in a nest of dicts and lists."""
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(tensor_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(tensor_bytes(v) for v in tree)
    return 0


def inference_latency(base: nn.Module, qv: list[str], head: str | None, args, batch, device, sync) -> dict[str, float]:
    models = {"base": copy.deepcopy(base)}
    unmerged = ours(base, "lora", qv, args.rank, 0.0, head)
    with torch.no_grad():
        for layer in variants.layers_of(unmerged).values():
            layer.lora_B.normal_(std=0.02)
    merged = copy.deepcopy(unmerged)
    variants.merge_adapters(merged)
    models.update({"lora-unmerged": unmerged, "lora-merged": merged})
    times: dict[str, list[float]] = {name: [] for name in models}
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    for model in models.values():
        model.to(device).eval()
    with torch.no_grad():
        for round_ in range(args.rounds + 1):
            names = list(models)
            names = names[round_ % len(names):] + names[: round_ % len(names)]
            for name in names:
                for _ in range(args.steps):
                    start = CLOCK()
                    models[name](**inputs)
                    sync()
                    if round_:  # round 0 warms up
                        times[name].append(CLOCK() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def run(args) -> dict:
    torch.manual_seed(0)
    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    base, qv, vocab = build_base(args.arch)
    head = HEADS[args.arch]
    ids = torch.randint(5, vocab, (args.batch, args.seq))
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones(args.batch, args.seq, dtype=torch.long),
        "labels": ids.clone() if head is None else torch.randint(0, 2, (args.batch,)),
    }
    batch = {k: v.to(device) for k, v in batch.items()}
    total_steps = args.warmup + args.rounds * args.steps + 1
    builders = configurations(base, qv, head, args, total_steps, batch)
    names = args.only.split(",") if args.only else list(builders)
    unknown = [n for n in names if n not in builders]
    if unknown:
        raise SystemExit(f"error: --only has {unknown}; allowed: {', '.join(builders)}")
    configs = []
    for name in names:
        config = builders[name]()
        config.model.to(device).train()
        named = [(n, p) for n, p in config.model.named_parameters() if p.requires_grad]
        groups = param_groups(named, 0.0, "matrices", variants.variant_of(config.model).learning_rate_scale)
        config.optimizer = make_optimizer("adamw", groups, LR)
        configs.append(config)
    for config in configs:
        for _ in range(args.warmup):
            train_step(config, batch, sync)
    for round_ in range(args.rounds):
        order = configs[round_ % len(configs):] + configs[: round_ % len(configs)]
        for config in order:
            config.times += [train_step(config, batch, sync) for _ in range(args.steps)]
    tokens = args.batch * args.seq
    results = {}
    for config in configs:
        step = statistics.median(config.times)
        trainable, total = variants.count_parameters(config.model)
        memory = memory_bytes(config, batch, device)
        results[config.name] = {
            "step_s": step, "tokens_per_s": tokens / step, "trainable_params": trainable, "total_params": total,
            "memory_mb": memory["total"] / 2**20, "saved_mb": memory["saved"] / 2**20,
            "memory_parts_mb": {k: v / 2**20 for k, v in memory.items()}, "timed_steps": len(config.times),
            "step_times_s": config.times,
        }
        if config.init_s is not None:
            results[config.name]["init_s"] = config.init_s
    report = {
        "command": "python bench/bench.py " + " ".join(sys.argv[1:]),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"},
        "settings": {k: getattr(args, k) for k in ("arch", "batch", "seq", "rank", "dropout", "rounds", "steps", "warmup",
                                                   "clock", "share_base")},
        "train": results,
        "ratios": ratios(results),
    }
    if not args.skip_inference:
        report["inference_s"] = inference_latency(base, qv, head, args, batch, device, sync)
        latency = report["inference_s"]
        report["ratios"]["merged / base inference"] = latency["lora-merged"] / latency["base"]
        report["ratios"]["unmerged / base inference"] = latency["lora-unmerged"] / latency["base"]
    return report


RATIOS = {
    "lora-qv / peft-lora-qv": ("lora-qv", "peft-lora-qv"),
    "lora-all / full": ("lora-all", "full"),
    "peft-lora-all / full": ("peft-lora-all", "full"),
    "lora-all / peft-lora-all": ("lora-all", "peft-lora-all"),
    "dora-qv / lora-qv": ("dora-qv", "lora-qv"),
    "peft-dora-qv / peft-lora-qv": ("peft-dora-qv", "peft-lora-qv"),
    "dora-qv / peft-dora-qv": ("dora-qv", "peft-dora-qv"),
    "adalora-qv / peft-adalora-qv": ("adalora-qv", "peft-adalora-qv"),
    "qlora-qv / lora-qv": ("qlora-qv", "lora-qv"),
    "qlora-qv / peft-qlora-qv": ("qlora-qv", "peft-qlora-qv"),
    "loraplus-qv / lora-qv": ("loraplus-qv", "lora-qv"),
    "lora_ga-qv / lora-qv": ("lora_ga-qv", "lora-qv"),
    "lora_pro-qv / lora-qv": ("lora_pro-qv", "lora-qv"),
    "lora_pro_efficient-qv / lora-qv": ("lora_pro_efficient-qv", "lora-qv"),
    "rslora-qv / lora-qv": ("rslora-qv", "lora-qv"),
    "pissa-qv / lora-qv": ("pissa-qv", "lora-qv"),
    "milora-qv / lora-qv": ("milora-qv", "lora-qv"),
    "eva-qv / lora-qv": ("eva-qv", "lora-qv"),
    "olora-qv / lora-qv": ("olora-qv", "lora-qv"),
    "lora_fa-qv / lora-qv": ("lora_fa-qv", "lora-qv"),
    "lora_fa-all / lora-all": ("lora_fa-all", "lora-all"),
    "corda-qv / lora-qv": ("corda-qv", "lora-qv"),
    "loftq-qv / lora-qv": ("loftq-qv", "lora-qv"),
    "loftq-qv / qlora-qv": ("loftq-qv", "qlora-qv"),
    "vera-qv / lora-qv": ("vera-qv", "lora-qv"),
    "hira-qv / lora-qv": ("hira-qv", "lora-qv"),
    "gralora-qv / lora-qv": ("gralora-qv", "lora-qv"),
    "dora-all / lora-all": ("dora-all", "lora-all"),
    "dora-all / peft-dora-all": ("dora-all", "peft-dora-all"),
    "peft-dora-all / peft-lora-all": ("peft-dora-all", "peft-lora-all"),
    "dora-all / dora-all-plain": ("dora-all", "dora-all-plain"),
    "lora-all / lora-all-plain": ("lora-all", "lora-all-plain"),
}
# The same pairs' memory (CPU: weights + grads + optimizer state + saved) and saved activations.
MEMORY_RATIOS = {
    "memory: dora-all / lora-all": ("memory_mb", "dora-all", "lora-all"),
    "memory: dora-all / peft-dora-all": ("memory_mb", "dora-all", "peft-dora-all"),
    "memory: dora-all-plain / lora-all-plain": ("memory_mb", "dora-all-plain", "lora-all-plain"),
    "saved: lora-all / peft-lora-all": ("saved_mb", "lora-all", "peft-lora-all"),
    "saved: lora-all-plain / peft-lora-all": ("saved_mb", "lora-all-plain", "peft-lora-all"),
    "saved: dora-all / peft-dora-all": ("saved_mb", "dora-all", "peft-dora-all"),
    "saved: dora-all / lora-all": ("saved_mb", "dora-all", "lora-all"),
    "saved: lora_fa-qv / lora-qv": ("saved_mb", "lora_fa-qv", "lora-qv"),
    "saved: lora_fa-all / lora-all": ("saved_mb", "lora_fa-all", "lora-all"),
    "memory: lora_fa-all / lora-all": ("memory_mb", "lora_fa-all", "lora-all"),
    "memory: vera-qv / lora-qv": ("memory_mb", "vera-qv", "lora-qv"),
    "memory: hira-qv / lora-qv": ("memory_mb", "hira-qv", "lora-qv"),
    "memory: gralora-qv / lora-qv": ("memory_mb", "gralora-qv", "lora-qv"),
    "memory: corda-qv / lora-qv": ("memory_mb", "corda-qv", "lora-qv"),
    "memory: olora-qv / lora-qv": ("memory_mb", "olora-qv", "lora-qv"),
    "memory: loftq-qv / qlora-qv": ("memory_mb", "loftq-qv", "qlora-qv"),
}


def ratios(results: dict[str, dict]) -> dict[str, float]:
    """Step-time ratios, then memory ratios, for the pairs that were both measured."""
    steps = {label: results[a]["step_s"] / results[b]["step_s"]
             for label, (a, b) in RATIOS.items() if a in results and b in results}
    return steps | {label: results[a][key] / results[b][key]
                    for label, (key, a, b) in MEMORY_RATIOS.items() if a in results and b in results}


def markdown(report: dict) -> str:
    lines = ["| configuration | step (ms) | tokens/s | trainable params | memory (MB) | saved for backward (MB) |",
             "|---|---|---|---|---|---|"]
    for name, r in report["train"].items():
        lines.append(f"| {name} | {1000 * r['step_s']:.1f} | {r['tokens_per_s']:.0f} | {r['trainable_params']:,} | "
                     f"{r['memory_mb']:.0f} | {r['saved_mb']:.0f} |")
    inits = {name: r["init_s"] for name, r in report["train"].items() if "init_s" in r}
    if inits:
        lines += ["", "| data-driven start (once, before step 1) | s |", "|---|---|"]
        lines += [f"| {name} | {t:.2f} |" for name, t in inits.items()]
    lines += ["", "| ratio (step time unless named; latency) | value |", "|---|---|"]
    lines += [f"| {label} | {value:.3f} |" for label, value in report["ratios"].items()]
    if "inference_s" in report:
        lines += ["", "| inference (batch forward) | ms |", "|---|---|"]
        lines += [f"| {name} | {1000 * t:.1f} |" for name, t in report["inference_s"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=ARCHS, default="minilm")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--dropout", type=float, default=0.1, help="adapter dropout, the same for ours and peft's")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per configuration per round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--only", help="comma-separated configurations (default: all)")
    parser.add_argument("--skip-inference", action="store_true")
    parser.add_argument("--json", help="also write the report as JSON here")
    parser.add_argument("--clock", choices=CLOCKS, default="wall",
                        help="wall: elapsed time; cpu: this process's CPU time (on a machine other jobs share, "
                             "with --threads 1, what the step itself costs)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--share-base", action="store_true",
                        help="the all-linear LoRA and DoRA configurations (ours and peft's) wrap one shared copy "
                             "of the frozen base instead of one each (memory counts it in each): how a 1B "
                             "model's configurations fit in one process")
    args = parser.parse_args(argv)
    global CLOCK
    CLOCK = CLOCKS[args.clock]
    if args.threads:
        torch.set_num_threads(args.threads)
    report = run(args)
    print(markdown(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
