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

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from schema import ConfigError, knob

from ..base import layers_of, register_variant
from .lora import LoRA, LoRASettings


@dataclass
class StagedSettings(LoRASettings):
    """Staged training's settings: LoRA's (those of the LoRA phase), and the full fine-tuning phase before it."""

    full_fraction: float = knob(0.2, "share of the steps that fine-tune every weight (0.1-0.3 is the useful range); "
                                "each phase must get at least one step", within="(0, 1)")
    full_lr: float | None = knob(5e-5, "peak learning rate of the full phase (full fine-tuning wants a much smaller "
                                 "one than LoRA); null: the configured rate for both phases", within="> 0")


@register_variant("staged")
class Staged(LoRA):
    """LoRA layers (A, B, dropout, init as in ``LoRALinear``) that stay off until the switch step.
    Settings: ``StagedSettings``."""

    Settings = StagedSettings

    analysis_caveats: ClassVar[dict[str, str]] = {
        "amplification": (
            "staged's dW is the LoRA phase's (alpha/r)*B*A over W1, the weights after the full fine-tuning phase: "
            "W and dW are W1 and the update to it, and the full phase's own change W1 - W0 is not part of dW, "
            "so the numbers are not comparable with LoRA's dW over the pretrained W0."
        ),
    }

    def __init__(self, rank: int, alpha: float, *, full_fraction: float, full_lr: float | None,
                 **lora_settings: Any) -> None:
        super().__init__(rank, alpha, **lora_settings)
        self.full_fraction = full_fraction
        self.full_lr = full_lr
        self.full_phase = False  # set by on_train_begin; a loaded or fresh model is plain LoRA
        self.switch_step: int | None = None
        self.lora_phase_trainable: list[str] = []  # parameter names that train after the switch

    def switch_step_for(self, total_steps: int) -> int:
        return round(self.full_fraction * total_steps)

    def check_total_steps(self, total_steps: int) -> None:
        switch = self.switch_step_for(total_steps)
        if not 1 <= switch < total_steps:
            raise ConfigError(
                f"variant.full_fraction={self.full_fraction} of {total_steps} steps gives a switch at step "
                f"{switch}; it must leave at least one step in each phase"
            )

    def on_train_begin(self, model: nn.Module, total_steps: int) -> None:
        """Remember what trains after the switch (as ``mark_trainable`` chose), then let every
        weight but the adapters' train, with the adapters off."""
        layers = layers_of(model).values()
        adapter_params = {id(p) for layer in layers for p in layer.adapter_parameters()}
        self.lora_phase_trainable = [name for name, p in model.named_parameters() if p.requires_grad]
        self.switch_step = self.switch_step_for(total_steps)
        self._set_phase(model, full=True)
        for p in model.parameters():
            p.requires_grad_(id(p) not in adapter_params)

    def after_optimizer_step(self, model: nn.Module, step: int, total_steps: int) -> dict[str, float]:
        if step != self.switch_step:
            return {}
        keep = set(self.lora_phase_trainable)
        for name, p in model.named_parameters():
            p.requires_grad_(name in keep)
        self._set_phase(model, full=False)
        return {"staged/switch_step": float(step)}

    def _set_phase(self, model: nn.Module, full: bool) -> None:
        """In the full phase every adapter layer is its base layer (B = 0 still, so the LoRA
        path would add exactly nothing; skipping it saves its cost)."""
        self.full_phase = full
        for layer in layers_of(model).values():
            layer.active = not full

    def learning_rate(self, lr: float) -> float:
        return self.full_lr if self.full_phase and self.full_lr is not None else lr

    def training_state(self) -> dict[str, Any]:
        return {"full_phase": self.full_phase, "switch_step": self.switch_step,
                "lora_phase_trainable": list(self.lora_phase_trainable)}

    def load_training_state(self, model: nn.Module, state: dict[str, Any]) -> None:
        self.switch_step = state["switch_step"]
        self.lora_phase_trainable = list(state["lora_phase_trainable"])
        self._set_phase(model, full=state["full_phase"])

    def state_to_save(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Every weight of the model: the full phase changed them all (the tensors themselves, so
        that a tied weight is recognised as one, also when FSDP has sharded it)."""
        return dict(model.state_dict(keep_vars=True))

    def report(self, model: nn.Module) -> dict[str, Any]:
        return {"switch_step": self.switch_step, "full_fraction": self.full_fraction, "full_lr": self.full_lr}
