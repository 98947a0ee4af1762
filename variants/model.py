"""Model-level helpers: put adapters into a model, choose what trains, save and load adapters.

These work for every registered variant; nothing here knows one variant from another.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .base import AdapterLayer, ConfigError, get_variant

ALL_LINEAR = "all-linear"
BIAS_MODES = ("none", "all", "lora_only")
METADATA_KEY = "adapter_config"

Targets = str | Sequence[str]


def _matches_suffix(name: str, suffixes: Iterable[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in suffixes)


def within(name: str, roots: Iterable[str]) -> bool:
    """``name`` is a module named by ``roots`` (suffix match) or inside one, e.g.
    ``classifier.dense`` is within ``classifier`` (RoBERTa's two-layer head)."""
    return any(f".{r}." in f".{name}." for r in roots)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule called ``name`` is."""
    parent_name, _, child_name = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child_name, new)


def find_target_modules(model: nn.Module, targets: Targets, exclude: Sequence[str] = ()) -> list[str]:
    """Names of the ``nn.Linear`` modules that ``targets`` selects.

    ``targets`` is ``"all-linear"`` (every linear layer except those in or inside ``exclude``,
    normally the task head), a regular expression matched against the full module name, or a list of names,
    each matching a module whose qualified name equals it or ends with ``"." + name``.
    """
    linears = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not name.endswith(".base")
    ]
    if isinstance(targets, str):
        if targets == ALL_LINEAR:
            return [n for n in linears if not within(n, exclude)]
        try:
            pattern = re.compile(targets)
        except re.error as err:
            raise ConfigError(f"variant.targets={targets!r} is not a valid regex ({err})") from None
        found = [n for n in linears if pattern.fullmatch(n)]
    else:
        found = [n for n in linears if _matches_suffix(n, targets)]
    if not found:
        leaf_names = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise ConfigError(
            f"variant.targets={_show(targets)} matches no nn.Linear module; allowed: "
            f"'{ALL_LINEAR}', a list of names from [{', '.join(leaf_names)}], "
            f"or a regex over full names such as {linears[0]!r}"
        )
    return found


def inject_adapters(
    model: nn.Module,
    variant: str,
    targets: Targets,
    rank: int,
    alpha: float,
    exclude: Sequence[str] = (),
    **variant_kwargs: Any,
) -> list[str]:
    """Replace each targeted ``nn.Linear`` by ``variant``'s adapter layer wrapping it, in place.

    Validates everything before changing the model, so a bad argument leaves it untouched.
    Returns the names of the adapted modules.
    """
    layer_cls = get_variant(variant)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise ConfigError(f"alpha={alpha!r} must be a number > 0")
    names = find_target_modules(model, targets, exclude)
    modules = dict(model.named_modules())
    max_rank = min(min(modules[n].in_features, modules[n].out_features) for n in names)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= max_rank:
        raise ConfigError(
            f"rank={rank!r} must be an integer in [1, {max_rank}] "
            "(min(d_in, d_out) over the targeted layers)"
        )
    layer_cls(nn.Linear(rank, rank), rank=rank, alpha=alpha, **variant_kwargs)  # dry run: check the kwargs
    layer_cls.prepare_model(model, names, exclude, **variant_kwargs)
    for name in names:
        replace_module(model, name, layer_cls(model.get_submodule(name), rank=rank, alpha=alpha, **variant_kwargs))
    model._adapter_config = {  # read back by save_adapter, so a file can rebuild its model
        "variant": variant,
        "rank": rank,
        "alpha": alpha,
        "modules": names,
        "exclude": list(exclude),
        "variant_kwargs": variant_kwargs,
    }
    return names


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            yield name, module


def mark_trainable(model: nn.Module, bias: str = "none", train_modules: Sequence[str] = ()) -> None:
    """Freeze the model except adapter parameters, the chosen biases and ``train_modules``.

    ``bias``: ``none`` (no bias trains), ``all`` (every bias in the model), or ``lora_only``
    (the biases of the adapted layers). ``train_modules`` names modules that train in full, such
    as a freshly initialised classification head; same matching as a list of targets.
    """
    if bias not in BIAS_MODES:
        raise ConfigError(f"variant.bias={bias!r} is not supported; allowed: {', '.join(BIAS_MODES)}")
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in adapter_layers(model):
        for p in layer.adapter_parameters():
            p.requires_grad_(True)
        if bias == "lora_only" and layer.base.bias is not None:
            layer.base.bias.requires_grad_(True)
    if bias == "all":
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.requires_grad_(True)
    if train_modules:
        matched = [m for n, m in model.named_modules() if _matches_suffix(n, train_modules)]
        if not matched:
            raise ConfigError(f"model.train_modules={list(train_modules)} matches no module")
        for module in matched:
            for p in module.parameters():
                p.requires_grad_(True)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a 4-bit weight counts its logical elements."""
    trainable = sum(_numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(_numel(p) for p in model.parameters())
    return trainable, total


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


def adapter_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of every layer's ``extra_loss()``; None when no layer adds one."""
    terms = [t for _, layer in adapter_layers(model) if (t := layer.extra_loss()) is not None]
    return torch.stack(terms).sum() if terms else None


def _layers_by_class(model: nn.Module) -> dict[type[AdapterLayer], dict[str, AdapterLayer]]:
    by_class: dict[type[AdapterLayer], dict[str, AdapterLayer]] = defaultdict(dict)
    for name, layer in adapter_layers(model):
        by_class[type(layer)][name] = layer
    return by_class


def check_total_steps(model: nn.Module, total_steps: int) -> None:
    """Run each adapter class's ``check_total_steps`` over its layers."""
    for cls, layers in _layers_by_class(model).items():
        cls.check_total_steps(layers, total_steps)


def on_train_begin(model: nn.Module, total_steps: int) -> None:
    """Check the run length, then run each adapter class's ``on_train_begin`` over its layers."""
    check_total_steps(model, total_steps)
    for cls, layers in _layers_by_class(model).items():
        cls.on_train_begin(model, layers, total_steps)


def after_optimizer_step(model: nn.Module, step: int, total_steps: int) -> dict[str, float]:
    """Run each adapter class's ``after_optimizer_step`` over its layers; merged metrics."""
    metrics: dict[str, float] = {}
    for cls, layers in _layers_by_class(model).items():
        metrics.update(cls.after_optimizer_step(model, layers, step, total_steps))
    return metrics


def learning_rate(model: nn.Module, lr: float) -> float:
    """The peak learning rate the variants ask for now, given the configured ``lr``."""
    for cls, layers in _layers_by_class(model).items():
        lr = cls.learning_rate(layers, lr)
    return lr


def adapter_report(model: nn.Module) -> dict[str, Any]:
    """Every adapter class's ``report`` over its layers, merged."""
    report: dict[str, Any] = {}
    for cls, layers in _layers_by_class(model).items():
        report.update(cls.report(model, layers))
    return report


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What fine-tuning changed: every trainable parameter, what the variants' ``state_to_save``
    adds, and the adapter layers' own tensors (parameters and persistent buffers outside the
    wrapped base layer)."""
    state = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for cls, layers in _layers_by_class(model).items():
        state.update(cls.state_to_save(model, layers))
    state.update(_adapter_tensors(model))
    return {n: t.detach().contiguous().cpu() for n, t in state.items()}


def save_adapter(model: nn.Module, path: str | Path, extra_metadata: dict[str, Any] | None = None) -> None:
    """Write ``adapter_state_dict(model)`` as safetensors, with the adapter config as metadata."""
    if any(layer.merged for _, layer in adapter_layers(model)):
        raise RuntimeError("unmerge the adapters before saving them")
    config = {**getattr(model, "_adapter_config", {}), **(extra_metadata or {})}
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

    If the model has no adapters yet, they are injected first as the file's metadata describes.
    Every tensor in the file must exist in the model with the same shape, and every adapter
    tensor of the model must be in the file.
    """
    config = read_adapter_config(path)
    if not any(True for _ in adapter_layers(model)) and config.get("modules"):
        inject_adapters(
            model, config["variant"], config["modules"], config["rank"], config["alpha"],
            exclude=config.get("exclude", ()), **config.get("variant_kwargs", {}),
        )
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ConfigError(f"adapter file {str(path)!r} is not a readable safetensors file ({err})") from None
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


def _adapter_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Parameters and persistent buffers of the adapter layers, outside the wrapped base layer."""
    for layer_name, layer in adapter_layers(model):
        for name, tensor in layer.state_dict(keep_vars=True).items():
            if not name.startswith("base.") and isinstance(tensor, torch.Tensor):
                yield f"{layer_name}.{name}", tensor


def _show(targets: Targets) -> str:
    return repr(targets) if isinstance(targets, str) else repr(list(targets))
