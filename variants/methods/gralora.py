"""GraLoRA: Jung, Ahn, Kim, Kim and Park 2025, "GraLoRA: Granular Low-Rank Adaptation for
Parameter-Efficient Fine-Tuning" (arXiv 2505.20355).

LoRA's one rank-r adapter on a whole weight lets a few outlier input channels dominate the
gradient of every direction it learns (the paper's "gradient entanglement"). GraLoRA splits the
weight into a k × k grid of blocks, input features into k slices of d_in/k and output features
into k slices of d_out/k, and gives each block (i, j) (output slice i, input slice j) its own
adapter of rank r/k:

    ΔW = s · [ B_ij · A_ij ]  (i, j = 1..k),    A_ij: (r/k, d_in/k),   B_ij: (d_out/k, r/k)

    h_i = W0_i·x + s · Σ_j B_ij · A_ij · x_j         (x_j: input slice j, h_i: output slice i)

with s = α/r. The k² adapters train k²·(r/k)·(d_in/k + d_out/k) = r·(d_in + d_out) parameters,
LoRA's count at rank r, and cost LoRA's multiply-adds per token; but ΔW's rank is up to k·r
(each block up to r/k, k² blocks), where LoRA's is r. k = 1 is LoRA.

Hybrid GraLoRA: at small r the blocks' rank r/k gets small, so part of the rank, ``hybrid_r`` = h,
goes to a plain LoRA over the whole weight instead: r − h shared by the blocks (rank (r − h)/k
each) and h by a LoRA (A_h: (h, d_in), B_h: (d_out, h)), ΔW = s·([B_ij·A_ij] + B_h·A_h), the same
s = α/r and the same r·(d_in + d_out) parameters. The authors' scripts take k = 2 at r ≤ 32
(with h = 8 at r = 16) and k = 4 above, α = 2r.

Start: every A_ij uniform in ±1/√(d_in/k) (Kaiming-uniform with a = √5 of each input slice's
(r − h, d_in/k) down-projection, as the authors' code and peft), A_h Kaiming-uniform over d_in,
every B zero: ΔW = 0, the model starts as the base model.

The rank is the total r, as the authors' code reads it (r − h in the blocks, scaling α/r); peft
0.21's ``GraloraConfig`` calls the blocks' share r and adds h on top (r + h in all, scaling
α/(r + h)): the same model, written for peft as r − h and h (``peft_export``). Adapter dropout
acts on the adapter path's input, drawn separately for the hybrid LoRA's input, as both do.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from schema import ConfigError, knob

from ..base import AdapterLayer, AdapterVariant, adapter_dtype, layers_of, register_variant
from ..targets import Targets, find_target_modules


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def peft_layout(blocks_a: torch.Tensor, blocks_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The blocks' factors (``gralora_A`` ``(k, k, b, d_in/k)``, ``gralora_B`` ``(k, k, d_out/k, b)``,
    [i, j] for block (output slice i, input slice j), b = (r − h)/k) in peft's layout: A
    ``(k, d_in/k, r − h)``, [j] holding input slice j's down-projections to every output slice
    side by side, and B ``(k, r − h, d_out/k)``, [i] holding output slice i's up-projections from
    every input slice, stacked."""
    k = blocks_a.shape[0]
    down = blocks_a.transpose(0, 1).reshape(k, -1, blocks_a.shape[-1]).transpose(1, 2)
    up = blocks_b.transpose(-1, -2).reshape(k, -1, blocks_b.shape[2])
    return down, up


class GraLoRALinear(AdapterLayer):
    """GraLoRA around a frozen ``nn.Linear``.

    Args:
        base: the frozen layer, weight ``(d_out, d_in)``; k must divide d_in and d_out.
        rank: r, the total rank (the blocks' r − h and the hybrid LoRA's h).
        alpha: α; the update is scaled by s = α/r.
        k: the grid is k × k blocks; each block's adapter has rank (r − h)/k.
        hybrid_rank: h, the rank of the plain LoRA over the whole weight (0: none).
        dropout: dropout on the adapter path's input, not on the base path.

    Adds ``gralora_A`` ``(k, k, (r − h)/k, d_in/k)`` and ``gralora_B`` ``(k, k, d_out/k, (r − h)/k)``,
    indexed [i, j] for block (output slice i, input slice j); with h > 0 ``hybrid_A`` ``(h, d_in)``
    and ``hybrid_B`` ``(d_out, h)``.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, k: int = 2, hybrid_rank: int = 0,
                 dropout: float = 0.0) -> None:
        super().__init__(base)
        self.rank, self.alpha, self.k, self.hybrid_rank = rank, alpha, k, hybrid_rank
        self.block_rank = (rank - hybrid_rank) // k
        self.scaling = alpha / rank
        dtype, device = adapter_dtype(base), base.weight.device
        slice_in, slice_out = self.in_features // k, self.out_features // k
        self.gralora_A = nn.Parameter(torch.empty(k, k, self.block_rank, slice_in, dtype=dtype, device=device))
        self.gralora_B = nn.Parameter(torch.zeros(k, k, slice_out, self.block_rank, dtype=dtype, device=device))
        # nn.Linear's Kaiming-uniform (a = √5) bound, 1/√fan_in, with fan_in = d_in/k: an input slice
        bound = 1.0 / math.sqrt(slice_in)
        nn.init.uniform_(self.gralora_A, -bound, bound)
        if hybrid_rank:
            self.hybrid_A = nn.Parameter(torch.empty(hybrid_rank, self.in_features, dtype=dtype, device=device))
            self.hybrid_B = nn.Parameter(torch.zeros(self.out_features, hybrid_rank, dtype=dtype, device=device))
            nn.init.kaiming_uniform_(self.hybrid_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def block_update(self, x: torch.Tensor) -> torch.Tensor:
        """[B_ij·A_ij]·x without the scaling: ``(..., d_in) -> (..., d_out)``, two batched GEMMs
        through the ``(..., k, k, (r − h)/k)`` block projections (LoRA's cost)."""
        slices = x.unflatten(-1, (self.k, -1))  # (..., k, d_in/k): x_j
        down = torch.einsum("...jd,ijrd->...ijr", slices, self.gralora_A)  # A_ij·x_j
        up = torch.einsum("...ijr,ijor->...io", down, self.gralora_B)  # Σ_j B_ij·(A_ij·x_j)
        return up.flatten(-2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        if self.merged or not self.active:
            return result
        dtype = self.gralora_A.dtype
        # the blocks' and the hybrid LoRA's terms added one after the other, as peft: under bf16
        # autocast each sum rounds as there
        result = result + (self.block_update(self.dropout(x).to(dtype)) * self.scaling).to(result.dtype)
        if self.hybrid_rank:  # a dropout mask of its own, as the authors' code and peft draw
            hybrid = F.linear(F.linear(self.dropout(x).to(dtype), self.hybrid_A), self.hybrid_B)
            result = result + (hybrid * self.scaling).to(result.dtype)
        return result

    def block_weight(self) -> torch.Tensor:
        """[B_ij·A_ij] as one ``(d_out, d_in)`` matrix, unscaled."""
        blocks = self.gralora_B @ self.gralora_A  # (k, k, d_out/k, d_in/k)
        return blocks.permute(0, 2, 1, 3).reshape(self.out_features, self.in_features)

    def delta_weight(self) -> torch.Tensor:
        """s·([B_ij·A_ij] + B_h·A_h): ``(d_out, d_in)``."""
        weight = self.block_weight()
        if self.hybrid_rank:
            weight = weight + self.hybrid_B @ self.hybrid_A
        return weight * self.scaling

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        """The adapter under peft's names, in its layout (``peft_layout``); the hybrid LoRA as
        the weights of its ``gralora_A_general`` / ``gralora_B_general`` ``nn.Linear``s."""
        down, up = peft_layout(self.gralora_A, self.gralora_B)
        tensors = {"gralora_A": down, "gralora_B": up}
        if self.hybrid_rank:
            tensors.update({"gralora_A_general.weight": self.hybrid_A, "gralora_B_general.weight": self.hybrid_B})
        return tensors

    def extra_repr(self) -> str:
        return (f"rank={self.rank}, k={self.k}, hybrid_r={self.hybrid_rank}, alpha={self.alpha}, "
                f"{super().extra_repr()}")


@dataclass
class GraLoRASettings:
    """GraLoRA's settings."""

    dropout: float = knob(0.0, "dropout on the adapter path's input, not on the base path (conf: adapter_dropout)",
                          within="[0, 1)")
    k: int = knob(2, "the weight is split into k × k blocks, each with a rank-(r − hybrid_r)/k adapter; k must divide "
                  "r − hybrid_r, d_in and d_out (peft's gralora_k; the paper: 2 at r ≤ 32, 4 above; 1 is LoRA)",
                  within=">= 1")
    hybrid_r: int = knob(0, "Hybrid GraLoRA: the part of r given to a plain LoRA over the whole weight (the authors' "
                         "scripts: 8 at r = 16); r − hybrid_r goes to the blocks", within=">= 0")


@register_variant("gralora")
class GraLoRA(AdapterVariant):
    """GraLoRA on the targeted layers: ``GraLoRALinear`` each. Settings: ``GraLoRASettings``.
    It trains LoRA's count at rank r (``parameters_at_rank`` is LoRA's), but its update is no
    rank-r LoRA: it has no ``low_rank_factors`` (the subspace analyses refuse it) and no LoRA
    form; peft's format holds it as peft's own GraLoRA (``peft_export``)."""

    Settings = GraLoRASettings

    analysis_caveats: ClassVar[dict[str, str]] = {
        "spectrum": "GraLoRA's dW is a k x k grid of rank-r/k blocks: its rank is up to k*r, so its effective and "
                    "90%-energy ranks are not bounded by r as a LoRA's are.",
    }

    def __init__(self, rank: int, alpha: float, *, dropout: float, k: int, hybrid_r: int) -> None:
        super().__init__(rank, alpha)
        if hybrid_r >= rank:
            raise ConfigError(f"variant.hybrid_r={hybrid_r} must be an integer in [0, rank) (rank={rank}: the blocks "
                              "need part of it)")
        if (rank - hybrid_r) % k:
            raise ConfigError(f"variant.k={k} must divide rank - hybrid_r = {rank - hybrid_r}, the rank the blocks "
                              f"share; allowed: {', '.join(map(str, divisors(rank - hybrid_r)))}")
        self.dropout, self.k, self.hybrid_r = dropout, k, hybrid_r

    def inject(self, model: nn.Module, targets: Targets | None, exclude: Sequence[str]) -> list[str]:
        """LoRA's, after checking that k divides every targeted layer's d_in and d_out."""
        if targets is not None:
            modules = dict(model.named_modules())
            shapes = {n: (modules[n].in_features, modules[n].out_features)
                      for n in find_target_modules(model, targets, exclude)}
            bad = next((n for n, dims in shapes.items() if any(d % self.k for d in dims)), None)
            if bad is not None:
                common = math.gcd(self.rank - self.hybrid_r, *(d for dims in shapes.values() for d in dims))
                d_in, d_out = shapes[bad]
                raise ConfigError(f"variant.k={self.k} must divide d_in and d_out of every targeted layer ({bad}: "
                                  f"d_in={d_in}, d_out={d_out}); allowed: {', '.join(map(str, divisors(common)))}")
        return super().inject(model, targets, exclude)

    def new_layer(self, base: nn.Linear) -> GraLoRALinear:
        return GraLoRALinear(base, self.rank, self.alpha, k=self.k, hybrid_rank=self.hybrid_r, dropout=self.dropout)

    def peft_export(self, model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """peft's ``GraloraConfig`` (its r is the blocks' share, r − h; α/(r + h) is our α/r) and tensors."""
        layers = layers_of(model)
        tensors = {f"{name}.{key}": tensor for name, layer in layers.items()
                   for key, tensor in layer.peft_tensors().items()}
        config = {"peft_type": "GRALORA", "r": self.rank - self.hybrid_r, "hybrid_r": self.hybrid_r,
                  "alpha": self.alpha, "gralora_k": self.k, "gralora_dropout": self.dropout,
                  "target_modules": sorted(layers), "fan_in_fan_out": False, "bias": "none", "init_weights": True}
        return config, tensors
