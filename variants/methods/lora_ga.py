"""LoRA-GA: Wang, Yu and Li 2024, "LoRA-GA: Low Rank Adaptation with Gradient Approximation".

LoRA's first step moves W by s·(ΔB·A + B·ΔA) = −η·s²·(B·Bᵀ·G + G·Aᵀ·A) for a gradient G = ∂L/∂W
(s = α/r). LoRA-GA starts A and B so that this is the best rank-2r approximation of full
fine-tuning's step −η·G (§3). With G ≈ U·S·Vᵀ estimated on a few training
batches before training:

    A₀ = c·V[:, :r]ᵀ,   B₀ = c·U[:, r:2r],   c = d_out^{1/4} / √γ                (Algorithm 1, "ArB2r")

so B₀·B₀ᵀ·G + G·A₀ᵀ·A₀ = c²·(the top 2r singular components of G); c is the "stable scale"
(§3) that keeps the output's size independent of d_out and r. Since s·B₀·A₀ ≠ 0, the paper
subtracts it from the frozen weight, W_init = W0 − s·B₀·A₀, so the wrapped model starts
exactly as the base model.

Here W0 is not changed: the layer (``OffsetLoRALinear``) keeps A₀ and B₀ as buffers and
computes h = W0·x + s·(B·A − B₀·A₀)·x, the paper's model (W_init·x = W0·x − s·B₀·A₀·x), exactly
the base model at the start; a saved adapter (A, B, A₀, B₀) reproduces the trained model exactly
on a fresh, unmodified base, and a checkpoint resumes without repeating the initialisation.

Numerics follow the authors' code (github.com/Outsider565/LoRA-GA, ``reinit_lora_modules``):
the gradient is the mean over ``init_batches`` training batches; its SVD is randomized
(``torch.svd_lowrank`` with q = min(4r, d), 4 iterations; ``svd="exact"`` for the full SVD), and
the stable scale multiplies both factors. ``scale="peft_stable"`` is peft's reading of the same
option (B = U·S on its columns times c, A unscaled), offered for comparison with peft's LoRA-GA.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from schema import ConfigError, knob

from ..base import InitData, layers_of, register_variant, seeded
from .lora import LoRALinear, LoRASettings
from .offset import OffsetLoRA, OffsetLoRALinear

DIRECTIONS = ("ArB2r", "A2rBr", "ArBr")
SCALES = ("stable", "unit", "gd", "peft_stable")
SVDS = ("lowrank", "exact")


def gradient_factors(grad: torch.Tensor, rank: int, scaling: float, direction: str = "ArB2r",
                     scale: str = "stable", gamma: float = 16.0, svd: str = "lowrank",
                     seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(A₀ ``(r, d_in)``, B₀ ``(d_out, r)``) from a layer's weight gradient ``grad``
    ``(d_out, d_in)``. ``svd="lowrank"`` draws its random projections from ``seed``, so every
    process (and a rerun) gets the same factors."""
    grad = grad.float()
    if svd == "exact":
        u, s, vh = torch.linalg.svd(grad, full_matrices=False)
    else:
        with seeded(seed):
            u, s, v = torch.svd_lowrank(grad, q=min(4 * rank, min(grad.shape)), niter=4)
        vh = v.t()
    a_index, b_index = {"ArB2r": (slice(0, rank), slice(rank, 2 * rank)),
                        "A2rBr": (slice(rank, 2 * rank), slice(0, rank)),
                        "ArBr": (slice(1, 2 * rank, 2), slice(0, 2 * rank, 2))}[direction]
    down, up = vh[a_index], u[:, b_index]
    stable = grad.shape[0] ** 0.25 / gamma ** 0.5  # d_out^{1/4} / √γ
    if scale == "stable":
        down, up = down * stable, up * stable
    elif scale == "gd":
        down, up = down / scaling, up / scaling
    elif scale == "peft_stable":
        up = up * s[b_index] * stable
    return down.contiguous(), up.contiguous()


@dataclass
class LoRAGASettings(LoRASettings):
    """LoRA-GA's settings: LoRA's, and how the gradient is estimated and decomposed (Algorithm 1)."""

    init_batches: int = knob(8, "training batches (of trainer.batch_size examples) whose mean gradient is decomposed "
                             "(the authors' scripts: 64 batches of 2)", within=">= 1")
    direction: str = knob("ArB2r", "which singular vectors start A and B: ArB2r (A the top r right ones, B the next "
                          "r left ones: the paper's) | A2rBr (the reverse) | ArBr (alternating)", choices=DIRECTIONS)
    scale: str = knob("stable", "stable: c = d_out^(1/4)/√γ on both factors (the paper's §3.3 and code) | unit | gd "
                      "(both divided by s) | peft_stable (peft's reading: B = U·S times c, A unscaled)",
                      choices=SCALES)
    stable_gamma: float = knob(16.0, "γ of the stable scale (the authors' default: 16)", within="> 0")
    svd: str = knob("lowrank", "lowrank: torch.svd_lowrank(q=4r, niter=4), seeded, as the authors' code | exact",
                    choices=SVDS)


@register_variant("lora_ga")
class LoRAGA(OffsetLoRA):
    """LoRA-GA on the targeted layers: ``OffsetLoRALinear`` each, started from the gradient.
    Settings: ``LoRAGASettings``."""

    Settings = LoRAGASettings

    analysis_caveats: ClassVar[dict[str, str]] = {
        **OffsetLoRA.analysis_caveats,
        "subspace_overlap": (
            "LoRA-GA's subspaces are those of the update s*(B*A - B0*A0) (rank up to 2r), not of A, which starts "
            "at the first gradients' singular vectors; those are much alike across seeds, so part of the "
            "overlap of two runs can come from that start."
        ),
    }

    def __init__(self, rank: int, alpha: float, *, init_batches: int, direction: str, scale: str,
                 stable_gamma: float, svd: str, **lora_settings: Any) -> None:
        super().__init__(rank, alpha, **lora_settings)
        self.init_batches, self.direction, self.scale = init_batches, direction, scale
        self.stable_gamma, self.svd = stable_gamma, svd

    def new_layer(self, base: nn.Linear) -> OffsetLoRALinear:
        return OffsetLoRALinear(base, self.rank, self.alpha, **self.layer_settings())

    def prepare_model(self, model: nn.Module, targets: Sequence[str], exclude: Sequence[str]) -> None:
        """Before anything changes: every target must have the 2r singular vectors A and B take."""
        for name in targets:
            smallest = min(model.get_submodule(name).weight.shape)
            if 2 * self.rank > smallest:
                raise ConfigError(f"rank={self.rank} needs 2r singular vectors, more than {name} has; "
                                  f"allowed: rank <= {smallest // 2}")

    def initialize(self, model: nn.Module, data: InitData) -> dict[str, Any]:
        """Estimate each adapted layer's weight gradient on ``init_batches`` batches, then start
        its A and B from it (Algorithm 1)."""
        layers = layers_of(model)
        grads = estimate_weight_gradients(model, layers, data, self.init_batches)
        for index, (name, layer) in enumerate(layers.items()):
            down, up = gradient_factors(grads[name], self.rank, layer.scaling, self.direction, self.scale,
                                        self.stable_gamma, self.svd, seed=index)
            layer.start_from(down, up)
        return {"init_batches": self.init_batches,
                "gradient_norm": {name: float(grad.norm()) for name, grad in grads.items()}}


def estimate_weight_gradients(model: nn.Module, layers: Mapping[str, LoRALinear], data: InitData,
                              batches: int) -> dict[str, torch.Tensor]:
    """∂L/∂W0 of every adapted layer, the mean over ``batches`` training batches (and over the
    processes of a data-parallel run), in train mode; no other gradient is kept, and every
    ``requires_grad`` and ``.grad`` of the model is as it was afterwards."""
    params = list(model.parameters())
    saved = [(p.requires_grad, p.grad) for p in params]
    was_training = model.training
    weights = {name: layer.base.weight for name, layer in layers.items()}
    sums = {name: torch.zeros_like(w, dtype=torch.float32) for name, w in weights.items()}
    try:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        for w in weights.values():
            w.requires_grad_(True)
        model.train()
        for _ in range(batches):
            data.loss(model, next(data.batches)).backward()
            for name, w in weights.items():
                sums[name] += w.grad.float()
                w.grad = None
    finally:
        model.train(was_training)
        for p, (requires_grad, grad) in zip(params, saved):
            p.requires_grad_(requires_grad)
            p.grad = grad
    return {name: data.mean_over_processes(total / batches) for name, total in sums.items()}
