"""What trained, saved and restored: adapter files (safetensors with the variant's config as
metadata) and what a checkpoint carries of the variant besides tensors.

These work for every registered variant; nothing here knows one variant from another.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.tensor import DTensor

from schema import ConfigError

from .base import adapter_config, layers_of, variant_of, whole
from .inject import inject_adapters

METADATA_KEY = "adapter_config"


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What fine-tuning changed: every trainable parameter, what the variants' ``state_to_save``
    adds, and the adapter layers' own tensors (parameters and persistent buffers outside the
    wrapped base layer). Under FSDP each is gathered from the processes' shards (``whole``): a
    collective, which every process must call."""
    state = {n: p for n, p in model.named_parameters() if p.requires_grad}
    state.update(variant_of(model).state_to_save(model))
    state.update(_adapter_tensors(model))
    return {n: whole(t.detach()).contiguous().cpu() for n, t in _without_aliases(state).items()}


def _without_aliases(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each tensor once: a weight tied to another (a causal LM's lm_head and input embeddings)
    is kept under its first name; loading it there loads both."""
    kept, seen = {}, set()
    for name, tensor in state.items():
        storage = id(tensor) if isinstance(tensor, DTensor) else tensor.data_ptr()  # (a shard: the object)
        key = (storage, tuple(tensor.shape), tensor.dtype)
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        kept[name] = tensor
    return kept


def save_adapter(model: nn.Module, path: str | Path, extra_metadata: dict[str, Any] | None = None,
                 tensors: dict[str, torch.Tensor] | None = None) -> None:
    """Write ``adapter_state_dict(model)`` (or ``tensors``, what it returned: under FSDP every
    process gathers them, and one writes) as safetensors, with the adapter config as metadata."""
    if any(layer.merged for layer in layers_of(model).values()):
        raise RuntimeError("unmerge the adapters before saving them")
    config = {**adapter_config(model), **(extra_metadata or {})}
    tensors = adapter_state_dict(model) if tensors is None else tensors
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(config)})


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
    variant_of(model).fit_to_saved(model, tensors)
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
    variant_of(model).fit_to_saved(model, saved)
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
    for layer_name, layer in layers_of(model).items():
        for name, tensor in layer.state_dict(keep_vars=True).items():
            if not name.startswith("base.") and isinstance(tensor, torch.Tensor):
                yield f"{layer_name}.{name}", tensor


def training_state(model: nn.Module) -> dict[str, Any]:
    """What a checkpoint carries besides tensors: the variant's and each adapter layer's state."""
    return {"variant": variant_of(model).training_state(),
            "layers": {name: layer.training_state() for name, layer in layers_of(model).items()}}


def load_training_state(model: nn.Module, state: dict[str, Any]) -> None:
    """Restore what ``training_state`` returned."""
    layers = layers_of(model)
    for name, layer_state in state["layers"].items():
        layers[name].load_training_state(layer_state)
    variant_of(model).load_training_state(model, state["variant"])
