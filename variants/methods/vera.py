"""VeRA: Kopiczko, Blankevoort and Asano 2024, "VeRA: Vector-based Random Matrix Adaptation"
(ICLR 2024, arXiv 2310.11454).

LoRA trains a pair of low-rank matrices per layer. VeRA freezes one pair of random matrices,
shared by every adapted layer, and trains two scaling vectors per layer instead (§3, Eq. 2):

    h = W0·x + Λ_b·B·Λ_d·A·x,       Λ_d = diag(d), Λ_b = diag(b)

A: ``(r, d_in)`` and B: ``(d_out, r)``, frozen and random, the same for all layers; d: ``(r,)`` and
b: ``(d_out,)``, trained, one pair per layer. ΔW = Λ_b·B·Λ_d·A has no α/r factor: b's scale is
learned (the run's ``alpha`` is unused). A layer trains r + d_out parameters, LoRA's r·(d_in +
d_out), so VeRA runs at far larger r: the paper's RoBERTa-base GLUE runs at r = 1024 (0.043M
parameters for W_q and W_v of 12 blocks: 24·(1024 + 768)), RoBERTa-large at r = 256; peft's
default is r = 256. r may exceed min(d_in, d_out) (ΔW's rank cannot, but every row of A still
adds a direction d can weigh).

Start (§3): A and B Kaiming-uniform (the paper names Kaiming initialisation; as peft, gain √2:
U(±√3·√2/√fan_in), fan_in the number of columns), drawn from a CPU generator seeded with
``projection_seed``, A first; b = 0, so the wrapped model starts as the base model; d =
``d_initial`` everywhere (the paper's ablation favours small values; 0.1 as in peft).

Layers of different shapes (SmolLM2's W_v is ``(192, 576)``, its W_q ``(576, 576)``): one pair of
the largest shape, A ``(r, max d_in)`` and B ``(max d_out, r)``, of which each layer takes its
first d_in columns of A and first d_out rows of B, as peft does, so the same seed gives peft's
matrices bit for bit.

Saving: A and B are buffers of one module every layer holds (one tensor in memory, moved with the
model), not saved: a fresh base regenerates them from the seed, which the adapter file keeps in
its metadata and in each layer's ``projection_seed`` tensor. The file holds d, b and that seed per
layer; loading it where the projections came from another seed is refused.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from schema import ConfigError, knob

from ..base import AdapterLayer, AdapterVariant, adapter_dtype, layers_of, register_variant

SEED_LIMIT = 2**63  # the seed is kept as an int64 tensor


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """U(−bound, bound) of ``shape`` (fp32, CPU), bound = √3·gain/√fan_in with gain = √2 and
    fan_in = ``shape[1]``: He et al.'s uniform initialisation for ReLU (``nn.init.kaiming_uniform_``
    with a = 0), from ``generator``."""
    gain = math.sqrt(2.0)
    bound = math.sqrt(3.0) * (gain / math.sqrt(shape[1]))
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def random_projections(rank: int, in_features: int, out_features: int, seed: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(A ``(rank, in_features)``, B ``(out_features, rank)``), fp32 on the CPU: Kaiming-uniform,
    A drawn first, from a CPU generator seeded with ``seed``, so every machine and process (and
    peft with ``projection_prng_key=seed``) gets the same matrices."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    down = kaiming_uniform((rank, in_features), generator)
    up = kaiming_uniform((out_features, rank), generator)
    return down, up


class SharedProjections(nn.Module):
    """The frozen random A ``(r, max d_in)`` and B ``(max d_out, r)`` of one model. Every VeRA layer
    holds this same module, so the matrices exist once and move with the model (``to``, FSDP's
    placement); its buffers are not persistent: the seed regenerates them."""

    def __init__(self, rank: int, in_features: int, out_features: int, seed: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        self.seed = seed
        down, up = random_projections(rank, in_features, out_features, seed)
        self.register_buffer("A", down.to(device=device, dtype=dtype), persistent=False)
        self.register_buffer("B", up.to(device=device, dtype=dtype), persistent=False)

    def sliced(self, in_features: int, out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A layer's share: A[:, :d_in] ``(r, d_in)`` and B[:d_out, :] ``(d_out, r)`` (views)."""
        return self.A[:, :in_features], self.B[:out_features, :]

    def extra_repr(self) -> str:
        return f"rank={self.A.shape[0]}, in_features={self.A.shape[1]}, out_features={self.B.shape[0]}, seed={self.seed}"


class VeRALinear(AdapterLayer):
    """VeRA around a frozen ``nn.Linear``: h = W0·x + Λ_b·B·Λ_d·A·drop(x).

    Args:
        base: the frozen layer, weight ``(d_out, d_in)``.
        projections: the model's shared A and B (this layer uses its top-left block).
        d_initial: the value every entry of d starts at.
        dropout: dropout on the adapter path's input, not on the base path.

    Trains ``lambda_d`` ``(r,)`` and ``lambda_b`` ``(d_out,)``; keeps ``projection_seed`` (an int64
    scalar) so that a saved layer says which projections its vectors scale.
    """

    def __init__(self, base: nn.Linear, projections: SharedProjections, d_initial: float = 0.1,
                 dropout: float = 0.0) -> None:
        super().__init__(base)
        self.projections = projections
        self.rank = projections.A.shape[0]
        dtype, device = adapter_dtype(base), base.weight.device
        self.lambda_d = nn.Parameter(torch.full((self.rank,), d_initial, dtype=dtype, device=device))
        self.lambda_b = nn.Parameter(torch.zeros(self.out_features, dtype=dtype, device=device))
        self.register_buffer("projection_seed", torch.tensor(projections.seed, dtype=torch.int64, device=device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        if self.merged or not self.active:
            return result
        down, up = self.projections.sliced(self.in_features, self.out_features)
        dropped = self.dropout(x.to(self.lambda_d.dtype))
        inner = self.lambda_d * F.linear(dropped, down)  # Λ_d·A·x: (..., r)
        # Λ_b·B·(…): (..., d_out); added in the wider dtype and cast back (under autocast the base's
        # output is bf16, the vectors' products fp32), as peft does
        return (result + self.lambda_b * F.linear(inner, up)).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """Λ_b·B·Λ_d·A: ``(d_out, d_in)``."""
        down, up = self.projections.sliced(self.in_features, self.out_features)
        return (self.lambda_b[:, None] * up) @ (self.lambda_d[:, None] * down)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, {super().extra_repr()}"


def _seed_allowed(seed: int) -> bool:
    return 0 <= seed < SEED_LIMIT


@dataclass
class VeRASettings:
    """VeRA's settings; r is the run's ``rank`` (the paper's: 1024 on RoBERTa-base, 256 on
    RoBERTa-large; peft's default 256), and the run's ``alpha`` is unused."""

    dropout: float = knob(0.0, "dropout on the adapter path's input, not on the base path (conf: adapter_dropout; "
                          "peft's vera_dropout)", within="[0, 1)")
    d_initial: float = knob(0.1, "the value every entry of d starts at (b starts at 0); the paper's ablation favours "
                            "small values, peft's default 0.1", within="> 0")
    projection_seed: int = knob(0, "seeds the CPU generator that draws the shared frozen A and B (peft's "
                                "projection_prng_key, default 0); kept in the adapter file, which regenerates them",
                                rule=_seed_allowed, allowed="an integer in [0, 2^63)")


@register_variant("vera")
class VeRA(AdapterVariant):
    """VeRA on the targeted layers: one ``SharedProjections`` for the model, a ``VeRALinear`` per
    layer. Settings: ``VeRASettings``."""

    Settings = VeRASettings

    def __init__(self, rank: int, alpha: float, *, dropout: float, d_initial: float, projection_seed: int) -> None:
        super().__init__(rank, alpha)
        self.dropout, self.d_initial, self.projection_seed = dropout, d_initial, projection_seed
        self.projections: SharedProjections | None = None

    @classmethod
    def largest_rank(cls, shapes: Sequence[tuple[int, int]]) -> int | None:
        """None: r is the inner size of the frozen A and B and has no bound (the paper's r = 1024
        exceeds RoBERTa-base's 768)."""
        return None

    @classmethod
    def parameters_at_rank(cls, in_features: int, out_features: int, rank: int) -> int:
        """d ``(r,)`` and b ``(d_out,)``: r + d_out (A and B are frozen and shared)."""
        return rank + out_features

    def prepare_model(self, model: nn.Module, targets: Sequence[str], exclude: Sequence[str]) -> None:
        """Draw the shared A and B at the largest d_in and d_out of the targeted layers."""
        layers = [model.get_submodule(name) for name in targets]
        first = layers[0]
        self.projections = SharedProjections(self.rank, max(layer.in_features for layer in layers),
                                             max(layer.out_features for layer in layers), self.projection_seed,
                                             adapter_dtype(first), first.weight.device)

    def new_layer(self, base: nn.Linear) -> VeRALinear:
        return VeRALinear(base, self.projections, self.d_initial, self.dropout)

    def config(self) -> dict[str, Any]:
        """As every variant's, with the projection seed always written (also when it is the
        default), so that the file regenerates its projections whatever the default becomes."""
        config = super().config()
        config["variant_kwargs"] = {**config["variant_kwargs"], "projection_seed": self.projection_seed}
        return config

    def fit_to_saved(self, model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
        """Refuse vectors that scale another seed's projections: they would load without error
        and compute something else."""
        for name in layers_of(model):
            saved = tensors.get(f"{name}.projection_seed")
            if saved is not None and int(saved) != self.projection_seed:
                raise ConfigError(f"the adapter's {name}.projection_seed is {int(saved)}, this model's "
                                  f"variant.projection_seed={self.projection_seed}; allowed: {int(saved)} (VeRA's "
                                  "vectors scale the projections of the seed they were trained with)")

    def peft_export(self, model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """peft's ``VeraConfig`` with ``save_projection=False``: peft regenerates A and B from
        ``projection_prng_key``, as a fresh base does here; b and d as ``vera_lambda_b`` / ``_d``."""
        layers = layers_of(model)
        tensors = {}
        for name, layer in layers.items():
            tensors[f"{name}.vera_lambda_b"] = layer.lambda_b
            tensors[f"{name}.vera_lambda_d"] = layer.lambda_d
        config = {"peft_type": "VERA", "r": self.rank, "target_modules": sorted(layers),
                  "projection_prng_key": self.projection_seed, "save_projection": False,
                  "vera_dropout": self.dropout, "d_initial": self.d_initial, "fan_in_fan_out": False,
                  "bias": "none", "init_weights": True}
        return config, tensors
