"""Applying a variant to a model: inject it, choose what trains, count it, merge it into the base,
and find the rank at which it trains a given number of parameters.

These work for every registered variant; nothing here knows one variant from another. The
variant's training hooks are called on it directly (``variant_of(model).adapter_loss(model)``);
saving and loading what trained is ``variants/adapter_file.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from schema import ConfigError

from .base import VARIANT_ATTRIBUTE, AdapterVariant, get_variant, layers_of, variant_of
from .targets import Targets, find_target_modules, modules_named, replace_module

BIAS_MODES = ("none", "all", "lora_only")


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
    for p in variant_of(model).trainable_parameters(model):
        p.requires_grad_(True)
    if bias == "lora_only":
        for layer in layers_of(model).values():
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
    logical = _logical_sizes(model)
    trainable = sum(logical.get(id(p), p.numel()) for p in model.parameters() if p.requires_grad)
    total = sum(logical.get(id(p), p.numel()) for p in model.parameters())
    return trainable, total


def count_trainable_in(model: nn.Module, names: Sequence[str]) -> int:
    """Trainable parameters inside the modules ``names`` selects (e.g. the task head), each
    counted once."""
    logical = _logical_sizes(model)
    params = {id(p): p for m in modules_named(model, names) for p in m.parameters() if p.requires_grad}
    return sum(logical.get(i, p.numel()) for i, p in params.items())


def _logical_sizes(model: nn.Module) -> dict[int, int]:
    """``{id(weight): elements}`` of the 4-bit weights: bitsandbytes packs two values per byte, and
    the original shape is in the quantization state (the weight's own, or, once FSDP has sharded
    the weight, the one the layer keeps)."""
    sizes = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None) or getattr(module, "quant_state", None)
        if weight is not None and state is not None:
            sizes[id(weight)] = state.shape.numel()
    return sizes


def adapter_report(model: nn.Module) -> dict[str, Any]:
    """Facts about the trained model worth keeping with the run: its variant's ``report`` ({}
    for a model without one)."""
    return variant_of(model).report(model)


def merge_adapters(model: nn.Module) -> None:
    for layer in layers_of(model).values():
        layer.merge()


def unmerge_adapters(model: nn.Module) -> None:
    for layer in layers_of(model).values():
        layer.unmerge()


def merge_and_unwrap(model: nn.Module) -> None:
    """Merge every adapter and put its (merged) base layer back in its place: a plain model of
    the original architecture, for ``save_pretrained`` or deployment. Not reversible."""
    for name, layer in layers_of(model).items():
        layer.merge()
        replace_module(model, name, layer.base)
    model.__dict__.pop(VARIANT_ATTRIBUTE, None)  # no variant is left to run hooks for: variant_of gives NoVariant


# ---- equal budgets: the rank at which an adapter trains a given number of parameters ----
#
# ``budget=<N>`` asks every adapter variant for the rank whose trainable count (the method's own
# parameters, without the task head) is closest to N. The count per adapted layer is the
# variant's ``parameters_at_rank`` (LoRA: r(d_in + d_out); DoRA adds its magnitude, d_out;
# AdaLoRA counts its *final* rank, r(d_in + d_out + 1), since its budget shrinks during
# training; VeRA trains r + d_out, and its r has no bound). Baselines have no rank; their count is
# what it is.

@dataclass(frozen=True)
class BudgetChoice:
    """The rank a budget picked, the constructor settings that give it, and the count they train."""

    budget: int
    rank: int
    settings: dict[str, Any]
    method_params: int


def rank_for_budget(model: nn.Module, variant: str, targets: Targets, budget: Any, exclude: list[str]
                    ) -> BudgetChoice | None:
    """The rank of ``variant`` on ``targets`` whose count is closest to ``budget`` (None for a
    baseline, which has no rank to choose)."""
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ConfigError(f"budget={budget!r} must be null or a positive integer (trainable parameters without the head)")
    cls = get_variant(variant)
    if not issubclass(cls, AdapterVariant):
        return None
    modules = dict(model.named_modules())
    shapes = [(modules[n].in_features, modules[n].out_features) for n in find_target_modules(model, targets, exclude)]
    fixed = sum(cls.parameters_at_rank(i, o, 0) for i, o in shapes)
    per_rank = sum(cls.parameters_at_rank(i, o, 1) for i, o in shapes) - fixed
    max_rank = cls.largest_rank(shapes)
    if budget < fixed + per_rank:
        raise ConfigError(f"budget={budget} is below one rank of {variant} on the targeted layers; "
                          f"allowed: >= {fixed + per_rank} ({len(shapes)} layers)")
    rank = round((budget - fixed) / per_rank)
    if max_rank is not None and rank > max_rank:
        raise ConfigError(f"budget={budget} needs rank {rank} of {variant}, above the largest possible "
                          f"({max_rank}); allowed: <= {fixed + per_rank * max_rank}")
    return BudgetChoice(budget, rank, cls.settings_for_rank(rank, max_rank), fixed + per_rank * rank)
