"""LoRA from a non-zero start, for the methods that start A and B from something (LoRA-GA from
the first gradients, PiSSA and MiLoRA from W0's singular vectors).

Their papers subtract the start from the frozen weight, W_res = W0 − s·B₀·A₀, so that the
wrapped model starts as the base model. This layer leaves W0 alone and keeps A₀ and B₀ instead:

    h = W0·x + s·B·A·drop(x) − s·B₀·A₀·x

the same model term by term (adapter dropout acts on the trained path alone, as on W_res·x +
s·B·A·drop(x)). At the start the update is exactly 0 (not W_res + s·B₀·A₀ ≈ W0 up to
rounding), so the model is the base model bit for bit; a saved adapter (A, B, A₀, B₀) rebuilds the
trained model exactly on a fresh, unmodified base; and ΔW = s·(B·A − B₀·A₀) = [B, B₀]·[A; −A₀]·s
is the rank-2r LoRA delta that PiSSA's and peft's conversion produces.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from .lora import LoRA, LoRALinear


class OffsetLoRALinear(LoRALinear):
    """LoRA started at A₀ ``(r, d_in)``, B₀ ``(d_out, r)`` (buffers; zero until ``start_from``),
    whose update is measured from there: h = W0·x + s·(B·A − B₀·A₀)·x, ΔW = s·(B·A − B₀·A₀)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, **lora_settings: Any) -> None:
        super().__init__(base, rank, alpha, **lora_settings)
        self.register_buffer("lora_A0", torch.zeros_like(self.lora_A, requires_grad=False))
        self.register_buffer("lora_B0", torch.zeros_like(self.lora_B, requires_grad=False))

    @torch.no_grad()
    def start_from(self, down: torch.Tensor, up: torch.Tensor) -> None:
        """A = A₀ = ``down`` ``(r, d_in)``, B = B₀ = ``up`` ``(d_out, r)``."""
        for param, start, value in ((self.lora_A, self.lora_A0, down), (self.lora_B, self.lora_B0, up)):
            param.copy_(value)
            start.copy_(value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        if self.merged or not self.active:
            return result
        # s·(B·d − B₀·d₀) = s·[d − d₀, d₀]·[B, B − B₀]ᵀ with d = A·drop(x), d₀ = A₀·x: one GEMM over
        # 2r into the base output (as LoRA's), exactly 0 while A = A₀ and B = B₀ (without dropout).
        # The start term takes x undropped: in the papers it is part of the frozen weight W_res.
        if not self.dropout_active():  # one projection on [A; A₀]
            down, down0 = (x.to(self.lora_A.dtype) @ torch.cat([self.lora_A, self.lora_A0]).t()).split(self.rank, -1)
        else:
            down = self.dropped_down_projection(x, scaled=False)[1]
            down0 = x.to(self.lora_A.dtype) @ self.lora_A0.t()
        inner = torch.cat([down - down0, down0], dim=-1) * self.scaling
        return self.add_up_projection(result, inner, torch.cat([self.lora_B, self.lora_B - self.lora_B0], dim=1))

    def delta_weight(self) -> torch.Tensor:
        """s·(B·A − B₀·A₀): ``(d_out, d_in)``, the change from the pretrained W0."""
        return (self.lora_B @ self.lora_A - self.lora_B0 @ self.lora_A0) * self.scaling

    def as_lora(self) -> dict[str, torch.Tensor | float]:
        """The rank-2r LoRA of the update on the unmodified W0: [A; A₀] and [B, −B₀]."""
        return {"lora_A": torch.cat([self.lora_A, self.lora_A0]), "lora_B": torch.cat([self.lora_B, -self.lora_B0], 1),
                "scaling": self.scaling}

    def initial_weight(self) -> torch.Tensor:
        """W_res = W0 − s·B₀·A₀ (fp32): what the papers' code leaves in the base layer."""
        return self.frozen_weight() - (self.lora_B0 @ self.lora_A0) * self.scaling


class OffsetLoRA(LoRA):
    """What the started-LoRA variants share at the model level: the factors the analyses read."""

    analysis_caveats: ClassVar[dict[str, str]] = {
        "amplification": (
            "the update s*(B*A - B0*A0) has rank up to 2r; the factor is taken over all its directions "
            "(LoRA's: its r), so at one r it projects W on up to twice as many."
        ),
    }

    @classmethod
    def low_rank_factors(cls, state: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Factors of the update B·A − B₀·A₀ (ΔW up to s), not of A and B: A starts at directions
        the method chose before training (PiSSA: W0's top singular vectors, the same for every
        seed), so A's row space would show the start rather than what was learned. With the
        update's SVD U·S·Vᵀ (rank up to 2r), down = √S·Vᵀ ``(k, d_in)`` and up = U·√S
        ``(d_out, k)``, k the nonzero singular values: both spaces ordered by how much of the
        update they carry, as A's singular values order LoRA's (ΔW = B·A from B = 0)."""
        update = (state["lora_B"].double() @ state["lora_A"].double()
                  - state["lora_B0"].double() @ state["lora_A0"].double())
        u, s, vh = torch.linalg.svd(update, full_matrices=False)
        k = int((s > s[0] * torch.finfo(torch.float32).eps * max(update.shape)).sum()) if s[0] > 0 else 0
        root = s[:k].sqrt()
        return (root[:, None] * vh[:k]).to(state["lora_A"].dtype), (u[:, :k] * root).to(state["lora_B"].dtype)
