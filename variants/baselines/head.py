"""Head only: the pretrained model stays frozen and only the task head trains, a probe of
what the frozen features already separate. The floor every fine-tuning method must beat.
"""

from __future__ import annotations

from torch import nn

from schema import ConfigError

from ..base import ParameterSubset, register_variant
from ..targets import Targets, modules_named, show


@register_variant("head")
class HeadOnly(ParameterSubset):
    """Every parameter of the modules ``targets`` names (the task head, e.g. ``[classifier]``)."""

    def select(self, model: nn.Module, targets: Targets | None) -> list[nn.Parameter]:
        if not targets:
            raise ConfigError("variant=head needs variant.targets, the head's module names (e.g. [classifier])")
        if isinstance(targets, str):
            targets = [targets]
        chosen = [p for module in modules_named(model, targets) for p in module.parameters()]
        if not chosen:
            raise ConfigError(f"variant.targets={show(targets)} names no module with parameters")
        return chosen
