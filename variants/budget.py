"""Equal-budget comparisons: the rank at which an adapter trains a given number of parameters.

``budget=<N>`` asks every adapter variant for the rank whose trainable count (the method's own
parameters, without the task head) is closest to N. The count per adapted layer is the
variant's ``parameters_at_rank`` (LoRA: r(d_in + d_out); DoRA adds its magnitude, d_out;
AdaLoRA counts its *final* rank, r(d_in + d_out + 1), since its budget shrinks during
training). Baselines have no rank; their count is what it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from schema import ConfigError

from .base import AdapterVariant, get_variant
from .targets import Targets, find_target_modules


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
    max_rank = min(min(shape) for shape in shapes)
    if budget < fixed + per_rank:
        raise ConfigError(f"budget={budget} is below one rank of {variant} on the targeted layers; "
                          f"allowed: >= {fixed + per_rank} ({len(shapes)} layers)")
    rank = round((budget - fixed) / per_rank)
    if rank > max_rank:
        raise ConfigError(f"budget={budget} needs rank {rank} of {variant}, above the largest possible "
                          f"({max_rank}); allowed: <= {fixed + per_rank * max_rank}")
    return BudgetChoice(budget, rank, cls.settings_for_rank(rank, max_rank), fixed + per_rank * rank)
