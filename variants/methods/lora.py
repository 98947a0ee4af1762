"""LoRA: Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models".

    h = W0·x + (α/r)·B·A·x                                   (Eq. 3, with the §4.1 scaling)

A: ``(r, d_in)``, random; B: ``(d_out, r)``, zero, so ΔW = (α/r)·B·A = 0 at the start and the
wrapped model is exactly the base model.

LoRA+ (Hayou, Ghosh and Yu 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models"): with
``lr_ratio`` = λ, B trains at λ times A's rate, η_B = λ·η_A with λ ≫ 1 (the paper's guidance:
λ = 2⁴ = 16). A knob of every variant of the LoRA family. The paper's
own code (``loraplus.py``, which peft's ``create_loraplus_optimizer`` follows) also gives every
other trainable vector the B rate: biases, LayerNorm shifts, DoRA's magnitude, the head's bias;
matrices (A, the head's weight) keep η. That is the default (``lr_ratio_on="b_and_vectors"``);
``"b_only"`` scales B alone, as the paper's text reads.

rsLoRA (Kalajdzievski 2023, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA"):
``scaling="rslora"`` scales the update by α/√r instead of α/r. With α/r the update's size and
its factors' gradients shrink as r grows, so a rank-64 adapter learns like a rank-8 one; the
paper's §3 shows the adapters stay rank-stabilized (activations and gradients Θ(1) in r) if and
only if the factor is Θ(1/√r). A knob of every variant of the LoRA family.

LoRA-FA (Zhang et al. 2023, "LoRA-FA: Memory-efficient Low-rank Adaptation for Large Language
Models Fine-tuning", arXiv 2308.03303): ``freeze_a`` keeps A at its start and trains B alone, so
ΔW = s·B·A stays in the row space A spans. A's gradient is the only one that needs the layer's
input x ``(..., d_in)``; without it backward keeps A·x ``(..., r)`` instead (the paper's saving
in activation memory). With A frozen, B's gradient s·G·Aᵀ (G = ∂L/∂W) moves ΔW by s·ΔB·A, which
is not full fine-tuning's step in that space; the optimizer in peft, ``create_lorafa_optimizer``
(which cites the paper), rescales it to the least-squares best one:

    g_B ← g_B·(A·Aᵀ)⁻¹ / s²,    so that s·ΔB·A = −η·G·Aᵀ·(A·Aᵀ)⁻¹·A, G projected on A's rows.

That is the default (``fa_gradient="projected"``, before the AdamW step, as there); ``"plain"``
keeps B's own gradient, plain AdamW on B as the paper's 2023 text describes. A knob of every
variant of the LoRA family whose ΔW is s·B·A up to a constant (DoRA's normalisation is not:
it takes ``plain`` only; LoRA-Pro replaces A's gradient and refuses ``freeze_a``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from schema import knob

from ..base import AdapterLayer, AdapterVariant, adapter_dtype, layers_of, register_variant, shard_like, whole
from . import lean_dropout

A_INITS = ("kaiming", "gaussian")
LR_RATIO_ON = ("b_and_vectors", "b_only")
SCALINGS = ("standard", "rslora")
FA_GRADIENTS = ("projected", "plain")


def lora_scaling(alpha: float, rank: int, rule: str = "standard") -> float:
    """The factor on B·A: α/r (LoRA §4.1) or α/√r (rsLoRA)."""
    return alpha / math.sqrt(rank) if rule == "rslora" else alpha / rank


class LoRALinear(AdapterLayer):
    """LoRA around a frozen ``nn.Linear``.

    Args:
        base: the frozen layer, weight ``(d_out, d_in)``.
        rank: r, the inner dimension of B·A.
        alpha: α; the update is scaled by α/r so that changing r needs no re-tuning of the
            learning rate (paper §4.1), or by α/√r with ``scaling="rslora"``.
        dropout: dropout on the adapter path's input, not on the base path.
        init: how A starts: ``kaiming`` (uniform, as ``nn.Linear``'s default and loralib) or
            ``gaussian`` (N(0, 1/r²), the paper's "random Gaussian").
        scaling: ``standard`` (α/r) or ``rslora`` (α/√r).
        lean_backward: with dropout, save x and a bool mask for backward instead of dropout(x)
            and a float mask (``lean_dropout``); the same gradients.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, init: str = "kaiming",
                 scaling: str = "standard", lean_backward: bool = True) -> None:
        super().__init__(base)
        self.rank = rank
        self.alpha = alpha
        self.scaling = lora_scaling(alpha, rank, scaling)
        self.scaling_rule = scaling
        dtype = adapter_dtype(base)
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=dtype, device=device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lean_backward = lean_backward
        if init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        else:
            nn.init.normal_(self.lora_A, std=1.0 / rank)

    def dropout_active(self) -> bool:
        """Whether the adapter's dropout changes its input now (training, p > 0)."""
        return self.training and isinstance(self.dropout, nn.Dropout) and self.dropout.p > 0

    def dropped_down_projection(self, x: torch.Tensor, scaled: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(x', (α/r)·A·x') with x' = dropout(x), the adapter path's input: ``(..., d_in)`` and
        ``(..., r)`` (A·x' alone if not ``scaled``). While dropout is active, through
        ``DroppedDownProjection`` unless ``lean_backward`` is off: it saves x and a bool mask, not
        x' and a float mask."""
        scaling = self.scaling if scaled else 1.0
        if self.lean_backward and self.dropout_active():
            return lean_dropout.DroppedDownProjection.apply(x, self.lora_A, self.dropout.p, scaling)
        dropped = self.dropout(x)
        return dropped, lean_dropout.down_projection(dropped, self.lora_A, scaling)

    @staticmethod
    def add_up_projection(result: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """result + down·upᵀ: ``(..., d_out) + (..., r)·(d_out, r)ᵀ`` as one GEMM accumulating
        into ``result``, instead of a GEMM and a pass over the output to add it."""
        flat = torch.addmm(result.reshape(-1, result.shape[-1]), down.reshape(-1, down.shape[-1]).to(result.dtype),
                           up.t().to(result.dtype))
        return flat.view(result.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        if self.merged or not self.active:
            return result
        return self.add_up_projection(result, self.dropped_down_projection(x)[1], self.lora_B)

    def low_rank_weight(self) -> torch.Tensor:
        """(α/r)·B·A: ``(d_out, d_in)``."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        return self.low_rank_weight()

    def as_lora(self) -> dict[str, torch.Tensor | float]:
        return {"lora_A": self.lora_A, "lora_B": self.lora_B, "scaling": self.scaling}

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, {super().extra_repr()}"


@dataclass
class LoRASettings:
    """LoRA's own settings, and LoRA+'s and rsLoRA's (every variant of the LoRA family has them)."""

    dropout: float = knob(0.0, "dropout on the adapter path's input, not on the base path (conf: adapter_dropout)",
                          within="[0, 1)")
    init: str = knob("kaiming", "how A starts: kaiming (uniform, as nn.Linear's default and loralib) | gaussian "
                     "(N(0, 1/r²), the paper's \"random Gaussian\"); B starts at zero", choices=A_INITS)
    lr_ratio: float | None = knob(None, "LoRA+: λ, B's rate over A's (its paper: 16); null: one rate, plain LoRA",
                                  within="> 0")
    lr_ratio_on: str = knob("b_and_vectors", "what takes λ besides B: b_and_vectors (LoRA+'s code and peft: every "
                            "trainable vector too) | b_only (the paper's text)", choices=LR_RATIO_ON)
    scaling: str = knob("standard", "the factor on B·A: standard (α/r) | rslora (α/√r, rank-stable)",
                        choices=SCALINGS)
    lean_backward: bool = knob(True, "with adapter dropout, keep for backward the layer's input (shared by the layers "
                               "that read it) and a bool mask instead of the dropped copy and a float mask (the same "
                               "gradients); false: the plain formulation, as peft (kept for one release)")
    freeze_a: bool = knob(False, "LoRA-FA: A stays at its start and B alone trains; backward keeps A·x (r per token) "
                          "instead of the layer's input x")
    fa_gradient: str = knob("projected", "with freeze_a, B's gradient: projected (g_B·(A·Aᵀ)⁻¹/s², the least-squares "
                            "match of full fine-tuning's step, as peft's create_lorafa_optimizer) | plain (B's own "
                            "gradient, the paper's 2023 text)", choices=FA_GRADIENTS)


@register_variant("lora")
class LoRA(AdapterVariant):
    """LoRA on the targeted layers: ``LoRALinear`` each, and LoRA+'s rate ratio. Settings:
    ``LoRASettings``; subclasses build their layers with ``layer_settings()``."""

    Settings = LoRASettings

    def __init__(self, rank: int, alpha: float, *, dropout: float, init: str, lr_ratio: float | None,
                 lr_ratio_on: str, scaling: str, lean_backward: bool, freeze_a: bool, fa_gradient: str) -> None:
        super().__init__(rank, alpha)
        self.dropout, self.init, self.lr_ratio, self.lr_ratio_on = dropout, init, lr_ratio, lr_ratio_on
        self.scaling_rule, self.lean_backward = scaling, lean_backward
        self.freeze_a, self.fa_gradient = freeze_a, fa_gradient

    def layer_settings(self) -> dict[str, Any]:
        """The keyword arguments every layer of the LoRA family takes."""
        return {"dropout": self.dropout, "init": self.init, "scaling": self.scaling_rule,
                "lean_backward": self.lean_backward}

    def new_layer(self, base: nn.Linear) -> LoRALinear:
        return LoRALinear(base, self.rank, self.alpha, **self.layer_settings())

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """The adapter layers' parameters; with ``freeze_a`` (LoRA-FA) all but A."""
        return [p for layer in layers_of(model).values() for p in layer.adapter_parameters()
                if not (self.freeze_a and p is layer.lora_A)]

    def transform_gradients(self, model: nn.Module, optimizer: torch.optim.Optimizer, lr: float) -> dict[str, float]:
        """LoRA-FA's projected gradient: g_B ← g_B·(A·Aᵀ + δI)⁻¹ / s² (δ = 1e-8, as peft's, for an A
        whose rows are dependent); nothing unless ``freeze_a`` with ``fa_gradient="projected"``."""
        if not (self.freeze_a and self.fa_gradient == "projected"):
            return {}
        for layer in layers_of(model).values():
            grad = layer.lora_B.grad
            if grad is None:
                continue
            down = whole(layer.lora_A).detach().float()  # (r, d_in); frozen, whole under FSDP
            gram = down @ down.t() + 1e-8 * torch.eye(down.shape[0], device=down.device)  # (r, r)
            projected = whole(grad).float() @ torch.linalg.pinv(gram) / layer.scaling ** 2  # (d_out, r)
            grad.copy_(shard_like(projected.to(grad.dtype), grad))
        return {}

    def learning_rate_scale(self, name: str, parameter: nn.Parameter) -> float:
        """LoRA+: λ for B (and, by default, for every trainable vector); 1 for the rest."""
        if self.lr_ratio is None:
            return 1.0
        vector = self.lr_ratio_on == "b_and_vectors" and parameter.ndim == 1
        return self.lr_ratio if name.endswith(".lora_B") or vector else 1.0

    @classmethod
    def low_rank_factors(cls, state: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B); also DoRA's, QLoRA's and staged's, which share them."""
        return state["lora_A"], state["lora_B"]
