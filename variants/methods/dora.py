"""DoRA: Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation".

    W' = m · V / ‖V‖_c,   V = W0 + (α/r)·B·A                                   (Eq. 5)

The direction V is LoRA-updated, the magnitude m (one per output feature) trains freely, and
‖·‖_c is the L2 norm of each output feature's weights, taken over the input dimension. With
m = ‖W0‖_c and B = 0 at the start, W' = W0 and the wrapped model is exactly the base model.

By default ‖V‖_c is treated as a constant in the backward pass (§4.3): the gradient then does
not flow through the norm, which saves the memory of its graph at a small cost in accuracy.

The norm is computed without forming V (``column_norm="factored"``, the default). With s = α/r,

    ‖V‖²_c = ‖W0‖²_c + 2s·rowsum(B ∘ (W0·Aᵀ)) + s²·rowsum((B·(A·Aᵀ)) ∘ B)

Its products are W0·Aᵀ (d_out × r) and A·Aᵀ (r × r): over an fp32 base no d_out × d_in tensor
is written in the forward pass (a bf16 or fp16 base is copied to fp32 for W0·Aᵀ, as the direct
way copies it for V), and with ``detach_norm`` nothing for the norm is saved for backward. It is
exact algebra; in fp32 the two ways agree to rounding (tests/test_dora.py).
``column_norm="direct"`` forms V in every forward and takes its norm (the paper's code and peft;
kept for one release). Merging forms V once either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from schema import knob

from ..base import register_variant
from .lora import LoRA, LoRALinear, LoRASettings

COLUMN_NORMS = ("factored", "direct")


class DoRALinear(LoRALinear):
    """DoRA around a frozen ``nn.Linear``; A, B, dropout and init as in ``LoRALinear``.

    Extra args:
        detach_norm: treat ‖V‖_c as a constant in backward (the paper's §4.3 choice).
        column_norm: ``factored`` (‖V‖_c from W0·Aᵀ and A·Aᵀ, V never formed) or ``direct``.

    Adds ``magnitude``: ``(d_out,)``.
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        alpha: float,
        detach_norm: bool = True,
        column_norm: str = "factored",
        **lora_settings: Any,
    ) -> None:
        super().__init__(base, rank, alpha, **lora_settings)
        self.detach_norm = detach_norm
        self.column_norm = column_norm
        self.magnitude = nn.Parameter(self.base.weight.detach().to(self.lora_A.dtype).norm(dim=1))
        # ‖V‖_c at merge time: what unmerge needs to recover W0 from the merged weight.
        self.register_buffer("_merged_norm", None, persistent=False)

    def frozen_weight(self) -> torch.Tensor:
        """W0, also while merged (then recovered as W'·‖V‖_c/m − (α/r)·B·A). Not detached: the
        direction's gradient flows through it to A and B."""
        weight = self.base.weight.to(self.lora_A.dtype)
        if not self.merged:
            return weight
        return weight * (self._merged_norm / self.magnitude).unsqueeze(1) - self.low_rank_weight()

    def direction(self) -> torch.Tensor:
        """V = W0 + (α/r)·B·A: ``(d_out, d_in)``, in the adapter's dtype (fp32) also under autocast."""
        with torch.autocast(self.lora_A.device.type, enabled=False):
            return self.frozen_weight() + self.low_rank_weight()

    def direction_norm(self) -> torch.Tensor:
        """‖V‖_c, one norm per output feature: ``(d_out,)``; detached if ``detach_norm``."""
        if self.column_norm == "direct" or self.merged:
            norm = self.direction().norm(dim=1)
            return norm.detach() if self.detach_norm else norm
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.detach_norm):
            return self.factored_norm()

    def factored_norm(self) -> torch.Tensor:
        """‖W0 + s·B·A‖_c without forming it: ``(d_out,)``, fp32 also under autocast (module docstring)."""
        a, b, s = self.lora_A, self.lora_B, self.scaling
        weight = self.base.weight
        with torch.autocast(a.device.type, enabled=False):
            frozen = torch.linalg.vector_norm(weight.detach(), dim=1, dtype=a.dtype).square()  # ‖W0‖²_c: (d_out,)
            frozen_a = F.linear(weight.to(a.dtype), a)  # W0·Aᵀ: (d_out, r)
            cross = (b * frozen_a).sum(dim=1)  # (d_out,)
            quadratic = ((b @ (a @ a.t())) * b).sum(dim=1)  # ‖s·B·A‖²_c / s²: (d_out,)
            squared = frozen + (2 * s) * cross + (s * s) * quadratic
        return squared.clamp_min(0).sqrt()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        if self.merged or not self.active:
            return result
        # W'x + b = result + (s − 1)·W0·x' + s·(α/r)·B·A·x', s = m/‖V‖ and x' the adapter input.
        # s stays fp32, and so does every sum with it: a learned change of m is ~0.1%, while bf16's
        # step near 1 is 0.4–0.8%, so rounding s, (s − 1)·W0·x or the sum to bf16 would lose it
        # (peft keeps s in fp32 too). Under autocast the layer therefore returns fp32 (the next
        # matmul casts it as autocast does); without autocast, the base layer's dtype.
        scale = self.magnitude.float() / self.direction_norm().float()
        adapter_input, down = self.dropped_down_projection(x)
        if self.dropout_active():
            # Dropout on both adapter terms (as the paper's code): W0·x' needs its own GEMM.
            rescaled = torch.addcmul(result.float(), F.linear(adapter_input, self.base.weight).float(), scale - 1)
        else:
            # x' = x: reuse W0·x from the base output, s·(W0·x) + b = s·result + (1 − s)·b.
            bias = self.base.bias
            rescaled = result.float() * scale if bias is None else torch.addcmul((1 - scale) * bias.float(),
                                                                                  result.float(), scale)
        if torch.is_autocast_enabled(x.device.type):  # s stays out of the bf16 GEMM's operands
            return torch.addcmul(rescaled, down @ self.lora_B.t(), scale)
        # Folding s into B (d_out × r) lets the last term accumulate into the rest in one GEMM.
        return self.add_up_projection(rescaled, down, self.lora_B * scale.unsqueeze(1)).to(result.dtype)

    def merged_weight(self) -> torch.Tensor:
        """W' = m·V/‖V‖_c, exactly, with the norm not detached."""
        direction = self.direction()
        return self.magnitude.unsqueeze(1) * direction / direction.norm(dim=1, keepdim=True)

    def as_lora(self) -> dict[str, torch.Tensor | float]:
        """peft's DoRA: LoRA's A, B and scaling, and m as ``lora_magnitude_vector``."""
        return {**super().as_lora(), "lora_magnitude_vector": self.magnitude}

    def delta_weight(self) -> torch.Tensor:
        """W' − W0."""
        return self.merged_weight() - self.frozen_weight()

    def _merge(self) -> None:
        self._merged_norm = self.direction().norm(dim=1)
        self.base.weight.copy_(self.merged_weight())

    def _unmerge(self) -> None:
        self.base.weight.copy_(self.frozen_weight())  # still merged: W0 recovered from W'
        self._merged_norm = None

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, detach_norm={self.detach_norm}, column_norm={self.column_norm}"


@dataclass
class DoRASettings(LoRASettings):
    """DoRA's settings: LoRA's (B starts at zero, the magnitude m at ‖W0‖_c), and how the norm's gradient flows."""

    detach_norm: bool = knob(True, "treat ‖V‖_c as a constant in backward (the paper's §4.3: saves the norm's graph "
                             "memory at a small cost in accuracy); false: the exact gradient")
    column_norm: str = knob("factored", "how ‖V‖_c is computed: factored (from ‖W0‖_c, W0·Aᵀ and A·Aᵀ, "
                            "V = W0 + (α/r)·B·A never formed) | direct (V formed, as the paper's code and peft; "
                            "kept for one release)", choices=COLUMN_NORMS)

    def rules(self, prefix: str) -> list[str]:
        """LoRA-FA's projected gradient assumes ΔW = s·B·A; DoRA's normalisation breaks that."""
        key = f"{prefix}." if prefix else ""
        if self.freeze_a and self.fa_gradient == "projected":
            return [(f"{key}fa_gradient=projected assumes ΔW = s·B·A, which DoRA's normalisation breaks: with "
                     f"{key}freeze_a=true DoRA takes {key}fa_gradient=plain")]
        return []


@register_variant("dora")
class DoRA(LoRA):
    """DoRA on the targeted layers: ``DoRALinear`` each. Settings: ``DoRASettings``."""

    Settings = DoRASettings

    analysis_caveats: ClassVar[dict[str, str]] = {
        "amplification": (
            "DoRA's dW = W' - W0 includes the magnitude rescaling (m/||V||_c - 1)*W0, which is full rank and "
            "lies along W0's own directions, so its top-r directions, ||dW|| and the amplification factor "
            "are not comparable with LoRA's rank-r dW; the direction update's A and B are compared by "
            "subspace_overlap."
        ),
        "spectrum": (
            "DoRA's dW includes the magnitude rescaling (m/||V||_c - 1)*W0, which is full rank, so its effective "
            "and 90%-energy ranks are not bounded by r as a LoRA's are."
        ),
    }

    def __init__(self, rank: int, alpha: float, *, detach_norm: bool, column_norm: str, **lora_settings: Any) -> None:
        super().__init__(rank, alpha, **lora_settings)
        self.detach_norm, self.column_norm = detach_norm, column_norm

    def new_layer(self, base: nn.Linear) -> DoRALinear:
        return DoRALinear(base, self.rank, self.alpha, detach_norm=self.detach_norm, column_norm=self.column_norm,
                          **self.layer_settings())

    @classmethod
    def parameters_at_rank(cls, in_features: int, out_features: int, rank: int) -> int:
        """LoRA's A and B, plus the magnitude m ``(d_out,)``."""
        return rank * (in_features + out_features) + out_features
