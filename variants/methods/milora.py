"""MiLoRA: Hanqing Wang, Yixia Li, Shuo Wang, Guanhua Chen and Yun Chen 2024, "MiLoRA: Harnessing
Minor Singular Components for Parameter-Efficient LLM Finetuning" (arXiv 2406.09044).

PiSSA with the other end of the spectrum: A and B start at W0's r *smallest* singular components,
so training adapts the directions pretraining used least and leaves the principal ones, which
hold most of the pretrained knowledge, in the frozen residual (§3):

    A₀ = √(S_m / s)·V_mᵀ,   B₀ = U_m·√(S_m / s),   m = the last r indices,   W_res = W0 − s·B₀·A₀

The same layer as PiSSA (``OffsetLoRALinear``: W0 untouched, the start kept as buffers) and the
exact SVD (a randomized SVD finds the largest components, not the smallest): a sibling of PiSSA
that differs in which singular components start it (``singular_start``), not a subclass of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from schema import knob

from ..base import register_variant
from .lora import LoRASettings
from .offset import OffsetLoRA, OffsetLoRALinear
from .pissa import PiSSA, singular_start


@dataclass
class MiLoRASettings(LoRASettings):
    """MiLoRA's settings: LoRA's (init has no effect: the SVD replaces A); PiSSA's niter must stay null."""

    niter: int | None = knob(None, "null only: PiSSA's randomized SVD finds the largest singular components, and "
                             "MiLoRA starts at the smallest (the exact SVD)", rule=lambda niter: niter is None,
                             allowed="null (niter is PiSSA's randomized SVD, which finds the largest singular "
                             "components; MiLoRA needs the smallest)")


@register_variant("milora")
class MiLoRA(OffsetLoRA):
    """LoRA started at W0's smallest r singular components. Settings: ``MiLoRASettings``."""

    Settings = MiLoRASettings

    analysis_caveats: ClassVar[dict[str, str]] = PiSSA.analysis_caveats  # its caveats name both methods

    def __init__(self, rank: int, alpha: float, *, niter: int | None, **lora_settings: Any) -> None:
        super().__init__(rank, alpha, **lora_settings)  # niter is null: the settings refuse any other

    def new_layer(self, base: nn.Linear) -> OffsetLoRALinear:
        return singular_start(self, base, "minor")
