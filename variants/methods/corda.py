"""CorDA: Yang, Li, Zhou, Song, Wu, Nie and Ghanem 2024, "CorDA: Context-Oriented Decomposition
Adaptation of Large Language Models for Task-Aware Parameter-Efficient Fine-tuning" (NeurIPS 2024,
arXiv 2406.05223).

PiSSA starts the adapter at W0's principal singular components, whatever the layer is used for.
CorDA decomposes W0 as it acts on a context: the inputs X ``(d_in, tokens)`` the layer receives on
some data, through their covariance (§3; numbered here, not as in the paper)

    C = X·Xᵀ                                ``(d_in, d_in)``                           (1)
    SVD(W0·C) = U·S·Vᵀ                                                                 (2)
    Ŵ = SVD(W0·C)·C⁻¹ = U·S·(Vᵀ·C⁻¹) = W0                                              (3)

so each component σᵢ·uᵢ·v̂ᵢᵀ (v̂ᵢᵀ the i-th row of Vᵀ·C⁻¹) is ordered by how much output it makes on
that context: ‖σᵢ·uᵢ·v̂ᵢᵀ·C‖ = σᵢ. Two modes take the adapter from the two ends:

* IPM, instruction-previewed (``mode=ipm``): C from the task's own training data; the adapter
  starts at the r largest components (what the task uses most), the rest is frozen.
* KPM, knowledge-preserved (``mode=kpm``): C from a separate knowledge set (the paper: questions
  of TriviaQA or NQ-open); the adapter starts at the r smallest components, and the principal
  ones, which carry what the model does on that knowledge, stay frozen: less forgetting.

As PiSSA (peft's convention, which divides S by the LoRA factor s so the start is the same for
any α): with m the chosen r indices,

    A₀ = √(S_m / s)·(Vᵀ·C⁻¹)_m   ``(r, d_in)``,    B₀ = U_m·√(S_m / s)   ``(d_out, r)``,
    W_res = W0 − s·B₀·A₀.

The residual is not stored: ``OffsetLoRALinear`` computes W0·x + s·(B·A − B₀·A₀)·x, exactly the base
model at the start, and its saved A, B, A₀, B₀ rebuild the trained model on a fresh base.

Numerics, as the authors' code (``cordalib``) and peft's ``preprocess_corda`` (the paper gives (1)-(3)
and no more):

* Each sample's inputs X_i ``(tokens, d_in)`` are divided by |max X_i| (the largest entry, signed,
  then its absolute value) before X_iᵀ·X_i, and C is the mean over samples of those sums over tokens.
  The scale of C cancels in (3), not in A₀ and B₀ apart (S grows with it, Vᵀ·C⁻¹ shrinks), so the
  mean matters. (The authors' code divides by its fixed 256 samples; peft by the count, as here.)
* The authors feed one unpadded sample per forward pass; here a batch's samples are its rows and
  padding (``attention_mask`` 0) is left out, so a padded batch gives the sums of its samples fed
  alone. Packed rows (no mask) are one sample each, their padding included. All of a sample's
  tokens count: IPM's samples are the instruction and the response (the authors' code feeds both),
  not only the tokens the loss falls on.
* C is made invertible by damping: C' = C + λ·mean(diag C)·I with λ = 0.01, doubled until
  ‖C'·C'⁻¹ − I‖_F < 0.05; (2) and (3) then use C' (W0·C', Vᵀ·C'⁻¹), so U·S·Vᵀ·C'⁻¹ = W0 up to the
  inverse's error. Everything in float32 (``precision=float64`` for the more exact inverse: the
  damping then rarely rises, so it differs from peft where it would).
* The covariance comes from the model in eval mode (no dropout), without autocast, from the inputs
  of each adapted layer before any adapter moved (the base model's).

Data: IPM reads ``batches`` training batches (``InitData.batches``); KPM ``batches`` batches of
the knowledge set that ``variant.knowledge`` names (``InitData.knowledge``, built by
``training/knowledge.py``: the forgetting probe's texts, a GLUE task folder, a JSONL or a text file).
The authors' default is 256 samples: 8 batches at the trainer's default batch size of 32. In a
data-parallel run the sums and counts are averaged over the processes (each reads its share of every
global batch), so every process gets the same start; under FSDP ``initialize`` runs before sharding.
Adapter dropout acts on the trained path only, as PiSSA's (``variants/methods/offset.py``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from schema import knob

from ..base import InitData, layers_of, register_variant
from .lora import LoRASettings
from .offset import OffsetLoRA, OffsetLoRALinear

MODES = ("ipm", "kpm")
PRECISIONS = ("float32", "float64")
DAMPING, INVERSE_ERROR = 0.01, 0.05  # the authors' first λ and the inverse's tolerance (peft's too)
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def damped_inverse(covariance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(C' = C + λ·mean(diag C)·I, C'⁻¹, λ): λ from 0.01, doubled until ‖C'·C'⁻¹ − I‖_F < 0.05."""
    eye = torch.eye(covariance.shape[0], dtype=covariance.dtype, device=covariance.device)
    level = torch.diag(covariance).mean()  # a contiguous copy: summed as the authors' code sums it, to the last bit
    if not (torch.isfinite(level) and level > 0):
        raise ValueError(f"CorDA: the input covariance has mean diagonal {float(level)}; the layer saw no input")
    damp = DAMPING
    while True:
        damped = covariance + eye * (level * damp)
        inverse = torch.linalg.inv(damped)
        if torch.dist(damped @ inverse, eye) < INVERSE_ERROR:
            return damped, inverse, damp
        if damp > 1e6:  # C' ≈ λ·I long before: C is not finite
            raise ValueError(f"CorDA: no damping up to {damp} makes the input covariance invertible")
        damp *= 2


def context_factors(weight: torch.Tensor, covariance: torch.Tensor, rank: int, scaling: float, mode: str
                    ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A₀ ``(r, d_in)``, B₀ ``(d_out, r)``, λ) for ``weight`` W0 ``(d_out, d_in)`` and its input
    covariance C ``(d_in, d_in)``, in C's dtype: s·B₀·A₀ = U_m·S_m·(Vᵀ·C'⁻¹)_m with U·S·Vᵀ = SVD(W0·C'),
    m the r largest components (``ipm``) or the r smallest (``kpm``). Returned in float32."""
    damped, inverse, damp = damped_inverse(covariance)
    u, s, vh = torch.linalg.svd(weight.to(covariance.dtype) @ damped, full_matrices=False)  # (2)
    rows = vh @ inverse                                                                    # Vᵀ·C'⁻¹, (3)
    index = slice(0, rank) if mode == "ipm" else slice(len(s) - rank, len(s))
    root = (s[index] / scaling).sqrt()
    down, up = root[:, None] * rows[index], u[:, index] * root[None, :]
    return down.float().contiguous(), up.float().contiguous(), damp


class SampleCovariance:
    """Σ over samples of X̂ᵢᵀ·X̂ᵢ, X̂ᵢ = Xᵢ / |max Xᵢ| (a sample's inputs ``(tokens, d_in)``), and the count."""

    def __init__(self, dim: int, dtype: torch.dtype, device: torch.device) -> None:
        self.total = torch.zeros(dim, dim, dtype=dtype, device=device)
        self.count = torch.zeros((), dtype=dtype, device=device)

    def add(self, x: torch.Tensor, keep: torch.Tensor | None) -> None:
        """``x``: a layer's input, ``(samples, tokens, d_in)`` (or ``(samples, d_in)``: one token each);
        ``keep``: ``(samples, tokens)``, the tokens to count (None: all)."""
        x = x.detach().to(self.total.dtype)
        x = x[:, None] if x.dim() == 2 else x.reshape(x.shape[0], -1, x.shape[-1])
        if keep is None or keep.shape != x.shape[:2]:
            keep = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        peak = x.masked_fill(~keep[..., None], -torch.inf).amax(dim=(1, 2))  # each sample's largest input
        present = keep.any(1)
        tokens = (x / peak.abs()[:, None, None].where(present[:, None, None], 1.0))[keep]
        outer = tokens.t() @ tokens
        if not torch.isfinite(outer).all():
            raise ValueError("CorDA: a sample's inputs are all 0 or not finite (its |max| divides them)")
        self.total += outer
        self.count += present.sum()

    def covariance(self, mean_over_processes) -> torch.Tensor:
        """C: the mean over the samples of every process."""
        return mean_over_processes(self.total) / mean_over_processes(self.count)


def kept_tokens(batch: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """``(batch, seq)``: the positions that are not padding, or None (no ``attention_mask``: all)."""
    mask = batch.get("attention_mask")
    return None if mask is None else mask.bool()


@contextmanager
def accumulating(layers: Mapping[str, nn.Module], sums: Mapping[str, SampleCovariance]
                 ) -> Iterator[tuple[list[torch.Tensor | None], dict]]:
    """While open, each forward pass adds each layer's input to its sums. Yields (a one-item list
    holding the ``(batch, seq)`` mask of the tokens to keep, set before each pass; the sums of the
    inputs seen in this pass, to clear after it): layers that read the same tensor (W_q, W_v)
    compute its sums once."""
    keep: list[torch.Tensor | None] = [None]
    shared: dict[int, tuple[torch.Tensor, SampleCovariance]] = {}  # the input is held, so its id stays its own

    def hook(name):
        def record(module, args):
            x = args[0]
            if id(x) not in shared:
                alone = SampleCovariance(x.shape[-1], sums[name].total.dtype, x.device)
                alone.add(x, keep[0])
                shared[id(x)] = (x, alone)
            sums[name].total += shared[id(x)][1].total
            sums[name].count += shared[id(x)][1].count
        return record

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers.items()]
    try:
        yield keep, shared
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class CorDASettings(LoRASettings):
    """CorDA's settings: LoRA's, the mode, and where and how the input covariance is estimated.

    LoRA's ``init`` has no effect: the decomposition replaces A."""

    mode: str = knob("ipm", "ipm: instruction-previewed, the covariance from training batches, the adapter at the r "
                     "largest components (peft's default) | kpm: knowledge-preserved, the covariance from "
                     "variant.knowledge, the adapter at the r smallest, the principal ones frozen", choices=MODES)
    knowledge: str | None = knob(None, "mode=kpm: the knowledge texts: probe (the forgetting probe's: "
                                 "trainer.forgetting.file, or a causal LM's generic prompts) | a GLUE task folder "
                                 "(its train.tsv) | a .jsonl file (causal LMs: its prompts) | a text file (one "
                                 "text per line); null with mode=ipm")
    batches: int = knob(8, "batches whose inputs make the covariance (training batches, or the knowledge set's at "
                        "trainer.batch_size, fewer if it ends first); the authors: 256 samples, 8 batches of 32",
                        within=">= 1")
    precision: str = knob("float32", "the covariance, its damped inverse and the SVD in float32 (the authors' code "
                          "and peft) | float64", choices=PRECISIONS)

    def rules(self, prefix: str) -> list[str]:
        if self.mode == "kpm" and self.knowledge is None:
            return [(f"{prefix}.knowledge=None must name the knowledge texts with {prefix}.mode=kpm; allowed: probe, "
                     "a GLUE task folder, a .jsonl file or a text file")]
        if self.mode == "ipm" and self.knowledge is not None:
            return [(f"{prefix}.knowledge={self.knowledge!r} is read only with {prefix}.mode=kpm (ipm's covariance "
                     "comes from the training batches); allowed: null")]
        return []


@register_variant("corda")
class CorDA(OffsetLoRA):
    """LoRA started at the r largest (IPM) or smallest (KPM) components of W0 decomposed on its
    inputs' covariance: ``OffsetLoRALinear`` layers. Settings: ``CorDASettings``."""

    Settings = CorDASettings

    analysis_caveats: ClassVar[dict[str, str]] = {
        **OffsetLoRA.analysis_caveats,
        "subspace_overlap": (
            "CorDA's subspaces are those of the update s*(B*A - B0*A0) (rank up to 2r), not of A, which starts at "
            "W0's components on the covariance of its inputs; runs of different seeds that estimate it on similar "
            "batches share much of that start, so part of their overlap can come from it."
        ),
    }

    def __init__(self, rank: int, alpha: float, *, mode: str, knowledge: str | None, batches: int, precision: str,
                 **lora_settings: Any) -> None:
        super().__init__(rank, alpha, **lora_settings)
        self.mode, self.knowledge, self.batches, self.precision = mode, knowledge, batches, precision

    def new_layer(self, base: nn.Linear) -> OffsetLoRALinear:
        return OffsetLoRALinear(base, self.rank, self.alpha, **self.layer_settings())

    def knowledge_source(self) -> str | None:
        return self.knowledge if self.mode == "kpm" else None

    def initialize(self, model: nn.Module, data: InitData) -> dict[str, Any]:
        """Estimate each adapted layer's input covariance, decompose W0 on it, and start A and B at
        the mode's r components."""
        if self.mode == "kpm" and data.knowledge is None:
            raise ValueError("CorDA's knowledge-preserved mode needs InitData.knowledge, the batches of "
                             f"variant.knowledge={self.knowledge!r}")
        layers = layers_of(model)
        sums, batches = self._estimate(model, layers, data.knowledge if self.mode == "kpm" else data.batches)
        raised = {}
        for name, layer in layers.items():
            down, up, damp = context_factors(layer.frozen_weight(), sums[name].covariance(data.mean_over_processes),
                                             self.rank, layer.scaling, self.mode)
            layer.start_from(down.to(layer.lora_A.dtype), up.to(layer.lora_B.dtype))
            if damp != DAMPING:
                raised[name] = damp
        samples = float(data.mean_over_processes(next(iter(sums.values())).count)) if sums else 0.0
        return {"mode": self.mode, "knowledge": self.knowledge_source(), "batches": batches,
                "samples_per_process": samples, "damping_raised": raised}

    @torch.no_grad()
    def _estimate(self, model: nn.Module, layers: Mapping[str, OffsetLoRALinear],
                  batches: Iterator[dict[str, torch.Tensor]]) -> tuple[dict[str, SampleCovariance], int]:
        """The sums of every layer over up to ``self.batches`` batches (fewer where ``batches`` ends)."""
        dtype = DTYPES[self.precision]
        sums = {name: SampleCovariance(layer.in_features, dtype, layer.lora_A.device) for name, layer in layers.items()}
        was_training = model.training
        model.eval()
        seen = 0
        try:
            with accumulating(layers, sums) as (keep, shared):
                for batch in batches:
                    keep[0] = kept_tokens(batch)
                    model(**{k: v for k, v in batch.items() if k != "labels"})
                    shared.clear()
                    seen += 1
                    if seen == self.batches:
                        break
        finally:
            model.train(was_training)
        if not seen:
            raise ValueError(f"CorDA: no {'knowledge' if self.mode == 'kpm' else 'training'} batch to estimate from")
        return sums, seen
