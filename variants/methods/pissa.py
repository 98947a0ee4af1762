"""PiSSA: Meng, Wang and Zhang 2024, "PiSSA: Principal Singular Values and Singular Vectors
Adaptation of Large Language Models" (NeurIPS 2024).

LoRA starts its update at zero and trains it from noise; PiSSA starts it at W0's principal part
and trains that, freezing the rest (§3). With W0 = U·S·Vᵀ (singular values in decreasing order):

    A₀ = √(S[:r] / s)·V[:, :r]ᵀ   ``(r, d_in)``,    B₀ = U[:, :r]·√(S[:r] / s)   ``(d_out, r)``

so s·B₀·A₀ = U[:, :r]·S[:r]·V[:, :r]ᵀ, the best rank-r approximation of W0, and the frozen residual
is W_res = W0 − s·B₀·A₀. (The paper names the factors the other way round, W = W_res + A·B with
A of size d_out × r, and takes s = 1; dividing S by s, as the authors' code in peft does, makes
the start the same for any α.) The residual is not stored: ``OffsetLoRALinear`` computes
W0·x + s·(B·A − B₀·A₀)·x, the same model, exactly the base model at the start, and its saved
A, B, A₀, B₀ rebuild the trained model on a fresh, unmodified base (ΔW = s·(B·A − B₀·A₀) is the
rank-2r LoRA delta the paper converts to).

``niter``: the paper's fast SVD initialisation: ``torch.svd_lowrank`` with q = r and ``niter``
power iterations instead of the full SVD (peft's ``init_lora_weights="pissa_niter_<n>"``); its
random projections are seeded, so every process and every rerun gets the same start.

Adapter dropout acts on the trained path only (W_res·x + s·B·A·drop(x), as the authors' code in
peft), see ``variants/methods/offset.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from schema import knob

from ..base import register_variant, seeded
from .lora import LoRASettings
from .offset import OffsetLoRA, OffsetLoRALinear

COMPONENTS = ("principal", "minor")


def singular_factors(weight: torch.Tensor, rank: int, scaling: float, components: str = "principal",
                     niter: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A₀ ``(r, d_in)``, B₀ ``(d_out, r)``) with s·B₀·A₀ = U_r·S_r·V_rᵀ, the r ``principal``
    (largest) or ``minor`` (smallest) singular components of ``weight`` ``(d_out, d_in)``; fp32.
    ``niter``: randomized SVD (principal components only), else the exact one."""
    if niter is not None and components != "principal":
        raise ValueError("the randomized SVD finds the principal components only")  # MiLoRA's config refuses niter
    weight = weight.float()
    if niter is None:
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    else:
        with seeded(0):
            u, s, v = torch.svd_lowrank(weight, q=rank, niter=niter)
        vh = v.t()
    index = slice(0, rank) if components == "principal" else slice(len(s) - rank, len(s))
    root = (s[index] / scaling).sqrt()
    return (root[:, None] * vh[index]).contiguous(), (u[:, index] * root[None, :]).contiguous()


def singular_start(variant: OffsetLoRA, base: nn.Linear, components: str, niter: int | None = None
                   ) -> OffsetLoRALinear:
    """``variant``'s layer around ``base``, started at W0's r ``components`` (``singular_factors``):
    PiSSA's and MiLoRA's ``new_layer``."""
    layer = OffsetLoRALinear(base, variant.rank, variant.alpha, **variant.layer_settings())
    down, up = singular_factors(layer.frozen_weight(), variant.rank, layer.scaling, components, niter)
    layer.start_from(down.to(layer.lora_A.dtype), up.to(layer.lora_B.dtype))
    return layer


@dataclass
class PiSSASettings(LoRASettings):
    """PiSSA's settings: LoRA's (init has no effect: the SVD replaces A), and which SVD starts A and B."""

    niter: int | None = knob(None, "null: the exact SVD | n: torch.svd_lowrank with q = r and n power iterations, "
                             "seeded (the paper's fast initialisation; peft's pissa_niter_<n>)", within=">= 0")


@register_variant("pissa")
class PiSSA(OffsetLoRA):
    """LoRA started at W0's top-r singular components: ``OffsetLoRALinear`` layers. Settings:
    ``PiSSASettings``."""

    Settings = PiSSASettings

    analysis_caveats: ClassVar[dict[str, str]] = {
        **OffsetLoRA.analysis_caveats,
        "subspace_overlap": (
            "PiSSA's and MiLoRA's subspaces are those of the update s*(B*A - B0*A0) (rank up to 2r), not of A, "
            "which starts at W0's singular vectors; runs of different seeds still share that start (the SVD is "
            "deterministic), so part of their overlap can come from it."
        ),
    }

    def __init__(self, rank: int, alpha: float, *, niter: int | None, **lora_settings: Any) -> None:
        super().__init__(rank, alpha, **lora_settings)
        self.niter = niter

    def new_layer(self, base: nn.Linear) -> OffsetLoRALinear:
        return singular_start(self, base, "principal", self.niter)
