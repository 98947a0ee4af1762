"""DoRA: Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation".

    W' = m · V / ‖V‖_c,   V = W0 + (α/r)·B·A                                   (Eq. 5)

The direction V is LoRA-updated, the magnitude m (one per output feature) trains freely, and
‖·‖_c is the L2 norm of each output feature's weights, taken over the input dimension. With
m = ‖W0‖_c and B = 0 at the start, W' = W0 and the wrapped model is exactly the base model.

By default ‖V‖_c is treated as a constant in the backward pass (§4.3): the gradient then does
not flow through the norm, which saves the memory of its graph at a small cost in accuracy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import register_variant
from .lora import LoRALinear


@register_variant("dora")
class DoRALinear(LoRALinear):
    """DoRA around a frozen ``nn.Linear``; A, B, dropout and init as in ``LoRALinear``.

    Extra args:
        detach_norm: treat ‖V‖_c as a constant in backward (the paper's §4.3 choice).

    Adds ``magnitude``: ``(d_out,)``.
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        init: str = "kaiming",
        detach_norm: bool = True,
    ) -> None:
        super().__init__(base, rank, alpha, dropout=dropout, init=init)
        self.detach_norm = detach_norm
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
        """V = W0 + (α/r)·B·A: ``(d_out, d_in)``."""
        return self.frozen_weight() + self.low_rank_weight()

    def direction_norm(self) -> torch.Tensor:
        """‖V‖_c, one norm per output feature: ``(d_out,)``; detached if ``detach_norm``."""
        norm = self.direction().norm(dim=1)
        return norm.detach() if self.detach_norm else norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        if self.merged:
            return result
        # W'x = (m/‖V‖)·(W0·x + (α/r)·B·A·x); W0·x is reused from the base output when the adapter
        # path sees the same input (no dropout active), else recomputed on the dropped-out input.
        if self.training and isinstance(self.dropout, nn.Dropout):
            adapter_input = self.dropout(x)
            frozen_out = F.linear(adapter_input, self.base.weight)
        else:
            adapter_input = x
            frozen_out = result if self.base.bias is None else result - self.base.bias
        scale = self.magnitude / self.direction_norm()
        update = (scale - 1) * frozen_out + scale * self.lora_output(adapter_input)
        return result + update.to(result.dtype)

    def merged_weight(self) -> torch.Tensor:
        """W' = m·V/‖V‖_c, exactly, with the norm not detached."""
        direction = self.direction()
        return self.magnitude.unsqueeze(1) * direction / direction.norm(dim=1, keepdim=True)

    def delta_weight(self) -> torch.Tensor:
        """W' − W0."""
        return self.merged_weight() - self.frozen_weight()

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        self._merged_norm = self.direction().norm(dim=1)
        self.base.weight.copy_(self.merged_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self.base.weight.copy_(self.frozen_weight())
        self.merged = False
        self._merged_norm = None

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, detach_norm={self.detach_norm}"
