"""Model-level helpers: apply a variant to a model, choose what trains, save and load what trained.

These work for every registered variant; nothing here knows one variant from another.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .base import (VARIANT_ATTRIBUTE, AdapterLayer, ConfigError, InitData, adapter_config, get_variant, layers_of,
                   variant_of)
from .targets import Targets, modules_named, replace_module

BIAS_MODES = ("none", "all", "lora_only")
METADATA_KEY = "adapter_config"


def inject_adapters(
    model: nn.Module,
    variant: str,
    targets: Targets | None = None,
    rank: int | None = None,
    alpha: float | None = None,
    exclude: Sequence[str] = (),
    **variant_kwargs: Any,
) -> list[str]:
    """Apply ``variant`` to ``model`` in place and freeze everything it does not train.

    An adapter variant wraps each ``nn.Linear`` that ``targets`` selects (never one in or
    inside ``exclude``, the task head) and needs ``rank`` and ``alpha``; a baseline selects which
    of the model's own parameters train. The variant is built and checked once, before the model
    changes, so a bad argument leaves it untouched; it stays with the model (``variant_of``).
    Returns the names of the adapted modules ([] for a baseline).
    """
    method = get_variant(variant).create(rank=rank, alpha=alpha, **variant_kwargs)
    names = method.inject(model, targets, exclude)
    method.targets, method.exclude, method.modules = targets, list(exclude), names
    setattr(model, VARIANT_ATTRIBUTE, method)
    mark_trainable(model)
    return names


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    """(name, layer) for every adapter layer in ``model``."""
    yield from layers_of(model).items()


def mark_trainable(model: nn.Module, bias: str = "none", train_modules: Sequence[str] = ()) -> None:
    """Freeze the model except what its variant trains, the chosen biases and ``train_modules``.

    ``bias``: ``none`` (no bias beyond the variant's), ``all`` (every bias in the model), or
    ``lora_only`` (the biases of the adapted layers). ``train_modules`` names modules that train
    in full, such as a freshly initialised classification head; same matching as a list of targets.
    """
    if bias not in BIAS_MODES:
        raise ConfigError(f"variant.bias={bias!r} is not supported; allowed: {', '.join(BIAS_MODES)}")
    for p in model.parameters():
        p.requires_grad_(False)
    if (method := variant_of(model)) is not None:
        for p in method.trainable_parameters(model):
            p.requires_grad_(True)
    if bias == "lora_only":
        for _, layer in adapter_layers(model):
            if layer.base.bias is not None:
                layer.base.bias.requires_grad_(True)
    if bias == "all":
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.requires_grad_(True)
    if train_modules:
        matched = modules_named(model, train_modules)
        if not matched:
            raise ConfigError(f"model.train_modules={list(train_modules)} matches no module")
        for module in matched:
            _check_full_precision(model, module, train_modules)
            for p in module.parameters():
                p.requires_grad_(True)


def _check_full_precision(model: nn.Module, module: nn.Module, train_modules: Sequence[str]) -> None:
    """A module that trains in full cannot have quantized (integer-coded) weights."""
    for name, p in module.named_parameters():
        if not p.is_floating_point():
            where = next(n for n, m in model.named_modules() if m is module)
            raise ConfigError(
                f"train_modules={list(train_modules)}: {where}.{name} is quantized, so it cannot train; pass "
                f"exclude={list(train_modules)} to inject_adapters so that the variant leaves it in full precision"
            )


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a 4-bit weight counts its logical elements."""
    trainable = sum(_numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(_numel(p) for p in model.parameters())
    return trainable, total


def count_trainable_in(model: nn.Module, names: Sequence[str]) -> int:
    """Trainable parameters inside the modules ``names`` selects (e.g. the task head), each
    counted once."""
    params = {id(p): p for m in modules_named(model, names) for p in m.parameters() if p.requires_grad}
    return sum(_numel(p) for p in params.values())


def _numel(p: torch.Tensor) -> int:
    # bitsandbytes packs two 4-bit values per byte; the original shape is in its quant_state.
    quant_state = getattr(p, "quant_state", None)
    return quant_state.shape.numel() if quant_state is not None else p.numel()


def merge_adapters(model: nn.Module) -> None:
    for _, layer in adapter_layers(model):
        layer.merge()


def unmerge_adapters(model: nn.Module) -> None:
    for _, layer in adapter_layers(model):
        layer.unmerge()


def merge_and_unwrap(model: nn.Module) -> None:
    """Merge every adapter and put its (merged) base layer back in its place: a plain model of
    the original architecture, for ``save_pretrained`` or deployment. Not reversible."""
    for name, layer in list(adapter_layers(model)):
        layer.merge()
        replace_module(model, name, layer.base)
    model.__dict__.pop(VARIANT_ATTRIBUTE, None)  # no variant is left to run hooks for


def adapter_loss(model: nn.Module) -> torch.Tensor | None:
    """The variant's term for the training loss; None when it adds none."""
    method = variant_of(model)
    return method.adapter_loss(model) if method is not None else None


def check_total_steps(model: nn.Module, total_steps: int) -> None:
    """The variant's ``check_total_steps``."""
    if (method := variant_of(model)) is not None:
        method.check_total_steps(total_steps)


def fit_to_saved(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """The variant's ``fit_to_saved``: shapes it chose from data, taken from saved tensors."""
    if (method := variant_of(model)) is not None:
        method.fit_to_saved(model, tensors)


def initialize(model: nn.Module, data: InitData) -> dict[str, Any]:
    """The variant's data-driven initialisation (before the first step of a fresh run); none
    when the adapters were started from another run's (``init_adapters_from``)."""
    method = variant_of(model)
    if method is None or method.started_from_file:
        return {}
    return method.initialize(model, data)


def on_train_begin(model: nn.Module, total_steps: int) -> None:
    """Check the run length, then the variant's ``on_train_begin``."""
    check_total_steps(model, total_steps)
    if (method := variant_of(model)) is not None:
        method.on_train_begin(model, total_steps)


def transform_gradients(model: nn.Module, optimizer: torch.optim.Optimizer, lr: float) -> dict[str, float]:
    """The variant's gradient transformation (after backward, before the optimizer step)."""
    method = variant_of(model)
    return method.transform_gradients(model, optimizer, lr) if method is not None else {}


def after_optimizer_step(model: nn.Module, step: int, total_steps: int) -> dict[str, float]:
    """The variant's ``after_optimizer_step``; metrics to log."""
    method = variant_of(model)
    return method.after_optimizer_step(model, step, total_steps) if method is not None else {}


def learning_rate(model: nn.Module, lr: float) -> float:
    """The peak learning rate the variant asks for now, given the configured ``lr``."""
    method = variant_of(model)
    return method.learning_rate(lr) if method is not None else lr


def learning_rate_scale(model: nn.Module, name: str, parameter: nn.Parameter) -> float:
    """The factor the variant puts on the peak rate for one trainable parameter."""
    method = variant_of(model)
    return method.learning_rate_scale(name, parameter) if method is not None else 1.0


def preferred_optimizer(model: nn.Module) -> str:
    """The optimizer the model's variant was published with (``paper_optimizer``)."""
    method = variant_of(model)
    return method.paper_optimizer if method is not None else "adamw"


def adapter_report(model: nn.Module) -> dict[str, Any]:
    """The variant's ``report``."""
    method = variant_of(model)
    return method.report(model) if method is not None else {}


def training_state(model: nn.Module) -> dict[str, Any]:
    """What a checkpoint carries besides tensors: the variant's and each adapter layer's state."""
    method = variant_of(model)
    return {"variant": method.training_state() if method is not None else {},
            "layers": {name: layer.training_state() for name, layer in adapter_layers(model)}}


def load_training_state(model: nn.Module, state: dict[str, Any]) -> None:
    """Restore what ``training_state`` returned."""
    layers = dict(adapter_layers(model))
    for name, layer_state in state["layers"].items():
        layers[name].load_training_state(layer_state)
    if (method := variant_of(model)) is not None:
        method.load_training_state(model, state["variant"])


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What fine-tuning changed: every trainable parameter, what the variants' ``state_to_save``
    adds, and the adapter layers' own tensors (parameters and persistent buffers outside the
    wrapped base layer)."""
    state = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if (method := variant_of(model)) is not None:
        state.update(method.state_to_save(model))
    state.update(_adapter_tensors(model))
    return {n: t.detach().contiguous().cpu() for n, t in _without_aliases(state).items()}


def _without_aliases(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each tensor once: a weight tied to another (a causal LM's lm_head and input embeddings)
    is kept under its first name; loading it there loads both."""
    kept, seen = {}, set()
    for name, tensor in state.items():
        key = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        kept[name] = tensor
    return kept


def save_adapter(model: nn.Module, path: str | Path, extra_metadata: dict[str, Any] | None = None) -> None:
    """Write ``adapter_state_dict(model)`` as safetensors, with the adapter config as metadata."""
    if any(layer.merged for _, layer in adapter_layers(model)):
        raise RuntimeError("unmerge the adapters before saving them")
    config = {**adapter_config(model), **(extra_metadata or {})}
    save_file(adapter_state_dict(model), str(path), metadata={METADATA_KEY: json.dumps(config)})


def read_adapter_config(path: str | Path) -> dict[str, Any]:
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise ConfigError(f"adapter file {str(path)!r} is not a readable safetensors file ({err})") from None
    return json.loads(metadata.get(METADATA_KEY, "{}"))


def load_adapter(model: nn.Module, path: str | Path) -> dict[str, Any]:
    """Load a file written by ``save_adapter`` into ``model``; returns the file's adapter config.

    If no variant was injected into the model yet, the file's is, as its metadata describes.
    Every tensor in the file must exist in the model with the same shape, and every adapter
    tensor of the model must be in the file.
    """
    config = read_adapter_config(path)
    if not adapter_config(model) and config.get("variant"):
        settings = dict(config.get("variant_kwargs", {}))
        settings.pop("lr", None)  # files from before 2026-11-23 kept a baseline's learning rate here
        inject_adapters(
            model, config["variant"], config["modules"] or config.get("targets"), config["rank"], config["alpha"],
            exclude=config.get("exclude", ()), **settings,
        )
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ConfigError(f"adapter file {str(path)!r} is not a readable safetensors file ({err})") from None
    fit_to_saved(model, tensors)
    own = dict(model.state_dict(keep_vars=True))
    for name, tensor in tensors.items():
        if name not in own:
            raise ConfigError(f"adapter file {str(path)!r} has {name!r}, which this model lacks")
        if own[name].shape != tensor.shape:
            raise ConfigError(
                f"adapter file {str(path)!r}: {name!r} has shape {tuple(tensor.shape)}, "
                f"the model expects {tuple(own[name].shape)}"
            )
    missing = [n for n, _ in _adapter_tensors(model) if n not in tensors]
    if missing:
        raise ConfigError(f"adapter file {str(path)!r} lacks {missing[0]!r} (and {len(missing) - 1} more)")
    with torch.no_grad():
        for name, tensor in tensors.items():
            own[name].copy_(tensor)
    return config


def init_adapters_from(model: nn.Module, path: str | Path) -> list[str]:
    """Start the model's adapters from another run's (the LoRA paper's warm start: its MRPC,
    RTE and STS-B adapters began as the MNLI one). Loads exactly the adapter layers' own tensors
    (A, B, DoRA's m, AdaLoRA's P, λ, Q and mask), never the task head or trained biases, which
    belong to the other task. Every adapter tensor of the model must be in the file with the
    same shape, and the file must come from the same variant. Returns the names loaded."""
    config = read_adapter_config(path)
    ours = adapter_config(model).get("variant")
    if config.get("variant") != ours:
        raise ConfigError(f"init_from={str(path)!r} holds a {config.get('variant')!r} adapter; this run's variant "
                          f"is {ours!r}")
    try:
        saved = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ConfigError(f"init_from={str(path)!r} is not a readable safetensors file ({err})") from None
    fit_to_saved(model, saved)
    own = dict(_adapter_tensors(model))
    if not own:
        raise ConfigError(f"init_from={str(path)!r}: variant {ours!r} has no adapter tensors to start from a file")
    for name, tensor in own.items():
        if name not in saved or saved[name].shape != tensor.shape:
            found = "missing" if name not in saved else f"of shape {tuple(saved[name].shape)}"
            raise ConfigError(f"init_from={str(path)!r}: {name!r} is {found}, this run needs shape "
                              f"{tuple(tensor.shape)} (same variant, rank and targets)")
    with torch.no_grad():
        for name, tensor in own.items():
            tensor.copy_(saved[name])
    variant_of(model).started_from_file = True  # a data-driven start would overwrite what was loaded
    return list(own)


def _adapter_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Parameters and persistent buffers of the adapter layers, outside the wrapped base layer."""
    for layer_name, layer in adapter_layers(model):
        for name, tensor in layer.state_dict(keep_vars=True).items():
            if not name.startswith("base.") and isinstance(tensor, torch.Tensor):
                yield f"{layer_name}.{name}", tensor

