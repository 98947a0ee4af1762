"""Staged full fine-tuning → LoRA.

    steps 1 … k:      every weight trains (full fine-tuning), W0 → W1; the adapters are off
    steps k+1 … T:    W1 is frozen and h = W1·x + (α/r)·B·A·x trains, as in LoRA

with k = round(full_fraction · T). Full fine-tuning for a short first stretch moves the weights
to where the task needs them, which a rank-r update cannot reach alone; the LoRA stage then
refines cheaply. The switch is a change of the trainable set, so the trainer builds a new
optimizer there (with ``full_lr`` before it and the configured rate after it) while the
warm-up/decay multiplier of the schedule runs on unbroken over the whole run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .base import AdapterLayer, ConfigError, register_variant
from .lora import LoRALinear


@register_variant("staged")
class StagedLoRALinear(LoRALinear):
    """LoRA (A, B, dropout, init as in ``LoRALinear``) that stays off until the switch step.

    Extra args:
        full_fraction: the fraction of training steps that fine-tune every weight (0.1–0.3
            is the useful range).
        full_lr: peak learning rate of the full phase; None uses the configured one for both.
    """

    analysis_caveats = {
        "amplification": (
            "staged's dW is the LoRA phase's (alpha/r)*B*A over W1, the weights after the full fine-tuning phase: "
            "W and dW are W1 and the update to it, and the full phase's own change W1 - W0 is not part of dW, "
            "so the numbers are not comparable with LoRA's dW over the pretrained W0."
        ),
    }

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        init: str = "kaiming",
        full_fraction: float = 0.2,
        full_lr: float | None = None,
    ) -> None:
        super().__init__(base, rank, alpha, dropout=dropout, init=init)
        if isinstance(full_fraction, bool) or not isinstance(full_fraction, (int, float)) or not 0 < full_fraction < 1:
            raise ConfigError(f"variant.full_fraction={full_fraction!r} must be in (0, 1)")
        if full_lr is not None and (isinstance(full_lr, bool) or not isinstance(full_lr, (int, float)) or full_lr <= 0):
            raise ConfigError(f"variant.full_lr={full_lr!r} must be a number > 0 or null")
        self.full_fraction = full_fraction
        self.full_lr = full_lr
        self.full_phase = False  # set by on_train_begin; a loaded or fresh layer is plain LoRA
        self.switch_step: int | None = None
        self.lora_phase_trainable: list[str] = []  # parameter names that train after the switch

    def training_state(self) -> dict[str, Any]:
        return {"full_phase": self.full_phase, "switch_step": self.switch_step,
                "lora_phase_trainable": list(self.lora_phase_trainable)}

    def load_training_state(self, state: dict[str, Any]) -> None:
        self.full_phase = state["full_phase"]
        self.switch_step = state["switch_step"]
        self.lora_phase_trainable = list(state["lora_phase_trainable"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.full_phase:  # B = 0 still, so the LoRA path would add exactly nothing
            return self.base(x)
        return super().forward(x)

    @staticmethod
    def switch_step_for(full_fraction: float, total_steps: int) -> int:
        return round(full_fraction * total_steps)

    @classmethod
    def check_total_steps(cls, layers: Mapping[str, AdapterLayer], total_steps: int) -> None:
        first = next(iter(layers.values()))
        switch = cls.switch_step_for(first.full_fraction, total_steps)
        if not 1 <= switch < total_steps:
            raise ConfigError(
                f"variant.full_fraction={first.full_fraction} of {total_steps} steps gives a switch at step "
                f"{switch}; it must leave at least one step in each phase"
            )

    @classmethod
    def on_train_begin(cls, model: nn.Module, layers: Mapping[str, AdapterLayer], total_steps: int) -> None:
        """Remember what trains after the switch (as ``mark_trainable`` chose), then let every
        weight but the adapters' train."""
        adapter_params = {id(p) for layer in layers.values() for p in layer.adapter_parameters()}
        lora_trainable = [name for name, p in model.named_parameters() if p.requires_grad]
        switch = cls.switch_step_for(next(iter(layers.values())).full_fraction, total_steps)
        for layer in layers.values():
            layer.full_phase, layer.switch_step, layer.lora_phase_trainable = True, switch, lora_trainable
        for p in model.parameters():
            p.requires_grad_(id(p) not in adapter_params)

    @classmethod
    def after_optimizer_step(
        cls, model: nn.Module, layers: Mapping[str, AdapterLayer], step: int, total_steps: int
    ) -> dict[str, float]:
        first = next(iter(layers.values()))
        if step != first.switch_step:
            return {}
        keep = set(first.lora_phase_trainable)
        for name, p in model.named_parameters():
            p.requires_grad_(name in keep)
        for layer in layers.values():
            layer.full_phase = False
        return {"staged/switch_step": float(step)}

    @classmethod
    def learning_rate(cls, model: nn.Module, layers: Mapping[str, AdapterLayer], lr: float) -> float:
        first = next(iter(layers.values()))
        return first.full_lr if first.full_phase and first.full_lr is not None else lr

    @classmethod
    def state_to_save(cls, model: nn.Module, layers: Mapping[str, AdapterLayer]) -> dict[str, torch.Tensor]:
        """Every weight of the model: the full phase changed them all."""
        return dict(model.state_dict())

    @classmethod
    def report(cls, model: nn.Module, layers: Mapping[str, AdapterLayer]) -> dict[str, Any]:
        first = next(iter(layers.values()))
        return {"switch_step": first.switch_step, "full_fraction": first.full_fraction, "full_lr": first.full_lr}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, full_fraction={self.full_fraction}, full_phase={self.full_phase}"
