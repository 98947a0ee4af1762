"""HiRA: Huang, Ko, Zhuang, Tang and Zhang 2025, "HiRA: Parameter-Efficient Hadamard High-Rank
Adaptation for Large Language Models" (ICLR 2025, openreview.net/forum?id=TwJrTz9cRS).

LoRA's update B·A has rank r at most. HiRA multiplies it element-wise (⊙, the Hadamard product)
with the frozen weight instead of adding it:

    h = W0·x + ΔW·x,    ΔW = s · W0 ⊙ (B·A)

A: ``(r, d_in)``, B: ``(d_out, r)``, as LoRA's, so it trains LoRA's r·(d_in + d_out) parameters;
but rank(X ⊙ Y) ≤ rank(X)·rank(Y), so ΔW's rank is bounded by r·rank(W0), not by r: with a
full-rank W0 the update is in general full rank (the paper's motivation). Each entry of W0 is
rescaled, W0 + ΔW = W0 ⊙ (1 + s·B·A), so the update is large where W0 is and 0 where W0 is 0.

The paper and the authors' code have no scaling (s = 1: their ``scale_ab`` knob is stored but
never applied), nor does peft's ``HiraConfig``; that is ``scaling="none"``, the default, where α
is ignored. ``scaling="standard"`` takes LoRA's s = α/r.

Start: A as LoRA's (Kaiming-uniform, as ``nn.Linear``; or ``init="gaussian"``, N(0, 1/r²) as
peft's ``init_weights="gaussian"``), B = 0, so ΔW = 0 and the model starts as the base model.

Dropout: the authors' code builds a dropout module and never applies it; peft applies it to the
adapter path's input, W0·x + ΔW·drop(x), and so does this layer (with ``dropout=0`` the two agree).

Cost: ΔW is a dense ``(d_out, d_in)`` matrix, formed once per forward pass (d_out·r·d_in
multiply-adds) and applied as one more GEMM over the tokens (d_out·d_in per token, where LoRA
needs r·(d_in + d_out)). Autograd keeps ΔW for the backward pass: one d_out × d_in tensor per
adapted layer and forward pass, whatever the batch size (0.6 MB for MiniLM's 384 × 384 in fp32,
67 MB for a 4096 × 4096 layer). The base output and ΔW·x are separate GEMMs rather than one with
W0 + ΔW (the authors' code multiplies x by W0 ⊙ (1 + B·A)): under bf16 autocast the sum would be
rounded to bf16 at W0's magnitude, where ΔW, a small fraction of W0, loses most of its bits.

Merging: W ← W0 + ΔW. ΔW depends on W0, so W0 must come back exactly on unmerge: the layer keeps a
copy of W0 while merged (peft keeps one too) and restores it, rather than dividing by 1 + s·B·A
(inexact, and unstable where an entry is near 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from schema import knob

from ..base import AdapterLayer, AdapterVariant, adapter_dtype, layers_of, register_variant

INITS = ("kaiming", "gaussian")
SCALINGS = ("none", "standard")


class HiRALinear(AdapterLayer):
    """HiRA around a frozen ``nn.Linear``: W0·x + s·(W0 ⊙ B·A)·drop(x).

    Args:
        base: the frozen layer, weight W0 ``(d_out, d_in)``.
        rank: r, the inner dimension of B·A (not the rank of ΔW, which is up to r·rank(W0)).
        alpha: α, used by ``scaling="standard"`` only.
        dropout: dropout on the adapter path's input, not on the base path (as peft).
        init: how A starts: ``kaiming`` or ``gaussian`` (N(0, 1/r²)); B starts at zero.
        scaling: ``none`` (s = 1: the paper, its code and peft) or ``standard`` (s = α/r).

    Adds ``hira_A`` ``(r, d_in)`` and ``hira_B`` ``(d_out, r)``.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, init: str = "kaiming",
                 scaling: str = "none") -> None:
        super().__init__(base)
        self.rank, self.alpha = rank, alpha
        self.scaling = 1.0 if scaling == "none" else alpha / rank
        dtype, device = adapter_dtype(base), base.weight.device
        self.hira_A = nn.Parameter(torch.empty(rank, self.in_features, dtype=dtype, device=device))
        self.hira_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=dtype, device=device))
        if init == "kaiming":
            nn.init.kaiming_uniform_(self.hira_A, a=math.sqrt(5))
        else:
            nn.init.normal_(self.hira_A, std=1.0 / rank)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # W0 while merged (the base layer then holds W0 + ΔW); not saved: a saved adapter is A and B.
        self.register_buffer("weight_before_merge", None, persistent=False)

    def original_weight(self) -> torch.Tensor:
        """W0 ``(d_out, d_in)``, in the base's dtype, also while merged."""
        return self.weight_before_merge if self.merged else self.base.weight

    def frozen_weight(self) -> torch.Tensor:
        return self.original_weight().detach().float()

    def delta_weight(self) -> torch.Tensor:
        """s·W0 ⊙ (B·A): ``(d_out, d_in)``, in the adapters' dtype (under autocast B·A is a bf16
        product, as in peft)."""
        return self.original_weight().to(self.hira_A.dtype) * (self.hira_B @ self.hira_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        if self.merged or not self.active:
            return result
        delta = self.delta_weight()  # once per pass, shared by every token
        return result + F.linear(self.dropout(x).to(self.hira_A.dtype), delta).to(result.dtype)

    def _merge(self) -> None:
        weight = self.base.weight
        delta = self.delta_weight().to(weight.dtype)  # from W0: not merged yet
        self.weight_before_merge = weight.detach().clone()
        weight.add_(delta)

    def _unmerge(self) -> None:
        self.base.weight.copy_(self.weight_before_merge)  # exactly W0, not W0 + ΔW − ΔW
        self.weight_before_merge = None

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}, {super().extra_repr()}"


@dataclass
class HiRASettings:
    """HiRA's settings."""

    dropout: float = knob(0.0, "dropout on the adapter path's input, not on the base path, as peft (the authors' code "
                          "applies none) (conf: adapter_dropout)", within="[0, 1)")
    init: str = knob("kaiming", "how A starts: kaiming (uniform, as nn.Linear's default, the paper's code and peft) | "
                     "gaussian (N(0, 1/r²), peft's init_weights=gaussian); B starts at zero", choices=INITS)
    scaling: str = knob("none", "the factor s in ΔW = s·W0 ⊙ (B·A): none (s = 1, the paper, its code and peft; α is "
                        "unused) | standard (LoRA's α/r)", choices=SCALINGS)


@register_variant("hira")
class HiRA(AdapterVariant):
    """HiRA on the targeted layers: ``HiRALinear`` each. Settings: ``HiRASettings``. Its update is
    not low-rank, so it has no ``low_rank_factors`` (the subspace analyses refuse it) and no LoRA
    form; peft's format holds it as peft's own HiRA (``peft_export``)."""

    Settings = HiRASettings

    analysis_caveats: ClassVar[dict[str, str]] = {
        "spectrum": "HiRA's dW = W0 * (B A) (element-wise) has rank up to r * rank(W0): its effective and "
                    "90%-energy ranks are not bounded by r as a LoRA's are.",
    }

    def __init__(self, rank: int, alpha: float, *, dropout: float, init: str, scaling: str) -> None:
        super().__init__(rank, alpha)
        self.dropout, self.init, self.scaling_rule = dropout, init, scaling

    def new_layer(self, base: nn.Linear) -> HiRALinear:
        return HiRALinear(base, self.rank, self.alpha, dropout=self.dropout, init=self.init, scaling=self.scaling_rule)

    def peft_export(self, model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """peft's ``HiraConfig`` (no scaling: s is folded into B) and its ``hira_A`` / ``hira_B``."""
        layers = layers_of(model)
        tensors = {}
        for name, layer in layers.items():
            tensors[f"{name}.hira_A"] = layer.hira_A
            tensors[f"{name}.hira_B"] = layer.hira_B * layer.scaling
        config = {"peft_type": "HIRA", "r": self.rank, "target_modules": sorted(layers), "hira_dropout": self.dropout,
                  "fan_in_fan_out": False, "init_weights": True, "rank_pattern": {}}
        return config, tensors
