"""OLoRA: Kerim Büyükakyüz 2024, "OLoRA: Orthonormal Low-Rank Adaptation of Large Language Models"
(arXiv 2406.01775).

PiSSA starts the adapter at W0's principal singular part; OLoRA starts it at the first r columns
of W0's QR decomposition, which is cheaper (one Householder QR, no SVD) and gives B orthonormal
columns (§3). With W0 = Q·R (reduced: Q ``(d_out, k)`` with orthonormal columns, R ``(k, d_in)``
upper triangular, k = min(d_out, d_in)):

    B₀ = Q[:, :r]   ``(d_out, r)``,    A₀ = R[:r, :]   ``(r, d_in)``,    W_res = W0 − s·B₀·A₀

B₀·A₀ is W0 projected onto the span of its first r columns' directions (Q_r·Q_rᵀ·W0), not its best
rank-r approximation. The factors are not divided by the scaling s (as PiSSA's are): peft's
implementation sets A and B to R_r and Q_r and subtracts s·B₀·A₀ from W0, so with s ≠ 1 the
frozen residual is not W0's part outside the first r directions. That is followed here (the same
start, residual and training as peft's ``init_lora_weights="olora"``).

The residual is not stored: ``OffsetLoRALinear`` computes W0·x + s·(B·A − B₀·A₀)·x, the same
model, exactly the base model at the start, and its saved A, B, A₀, B₀ rebuild the trained model
on a fresh, unmodified base (see ``variants/methods/offset.py``).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..base import register_variant
from .lora import LoRASettings
from .offset import OffsetLoRA, OffsetLoRALinear


def qr_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A₀ = R[:r] ``(r, d_in)``, B₀ = Q[:, :r] ``(d_out, r)``) from the reduced QR of ``weight``
    ``(d_out, d_in)``, in fp32 (LAPACK's Householder QR: deterministic, R's diagonal of either sign)."""
    q, r = torch.linalg.qr(weight.float())  # (d_out, k), (k, d_in)
    return r[:rank].contiguous(), q[:, :rank].contiguous()


@register_variant("olora")
class OLoRA(OffsetLoRA):
    """LoRA started at the first r columns of W0's QR: ``OffsetLoRALinear`` layers. Settings:
    LoRA's (``init`` has no effect: the QR replaces A)."""

    Settings = LoRASettings

    analysis_caveats: ClassVar[dict[str, str]] = {
        **OffsetLoRA.analysis_caveats,
        "subspace_overlap": (
            "OLoRA's subspaces are those of the update s*(B*A - B0*A0) (rank up to 2r), not of A, which starts at "
            "R's first rows; runs of different seeds share that start (the QR is deterministic), so part of their "
            "overlap can come from it."
        ),
    }

    def new_layer(self, base: nn.Linear) -> OffsetLoRALinear:
        layer = OffsetLoRALinear(base, self.rank, self.alpha, **self.layer_settings())
        down, up = qr_factors(layer.frozen_weight(), self.rank)
        layer.start_from(down.to(layer.lora_A.dtype), up.to(layer.lora_B.dtype))
        return layer

