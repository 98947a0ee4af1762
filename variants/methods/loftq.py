"""LoftQ: Li, Yu, Liang, He, Karampatziakis, Chen and Zhao 2024, "LoftQ: LoRA-Fine-Tuning-Aware
Quantization for Large Language Models" (ICLR 2024, arXiv 2310.08659).

QLoRA quantizes W0 and starts the adapter at zero, so fine-tuning starts from q_N(W0) and first
has to undo the quantization error. LoftQ chooses the quantized weight Q and the adapter's start
together, so that Q + B·A is as close to W0 as N-bit Q and rank-r B·A allow (§3):

    min_{Q, A, B} ‖W0 − Q − B·A‖_F                                               (Eq. 6)

by alternating, from B₀·A₀ = 0, for t = 1 … T (Algorithm 1):

    Q_t = q_N(W0 − B_{t−1}·A_{t−1})                                           (Eq. 7)
    B_t·A_t = SVD_r(W0 − Q_t):  B_t = U_r·√S_r,  A_t = √S_r·V_rᵀ               (Eq. 8)

The frozen base holds Q_T (the codes of W0 − B_{T−1}·A_{T−1}, not of W0) and the adapter starts at
A_T ``(r, d_in)``, B_T ``(d_out, r)``. T = 1 is QLoRA's NF4(W0) and the SVD of its error. Training
then runs as QLoRA (``variants/methods/qlora.py``, ``variant.init=loftq``), which builds the
layers and quantizes with its own settings: q_N here is exactly the format the base is stored in.

The LoRA factor s = α/r: the paper's equations have none, and the authors' code (in peft since
0.7, ``init_lora_weights="loftq"``) puts the SVD factors into A and B as they are, so the model
starts at Q + s·B·A, which is ≈ W0 only at s = 1 (their examples take α = r, or α = 16 at r = 16).
``divide_scaling`` divides each factor by √s, so that s·B·A = SVD_r(W0 − Q_T) for any α (as PiSSA's
start does).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .pissa import singular_factors


@dataclass
class LoftQStart:
    """What Algorithm 1 leaves: ``to_quantize`` = W0 − B_{T−1}·A_{T−1} ``(d_out, d_in)``, whose
    quantization Q_T is the frozen base; the start ``down`` = A ``(r, d_in)`` and ``up`` = B
    ``(d_out, r)``; and the relative errors ‖W0 − Ŵ‖_F / ‖W0‖_F of the quantized base alone
    (``quantized``: Q_1 = q_N(W0), QLoRA's start), of the model's start (``start``: Ŵ = Q_T + s·B·A)
    and of the paper's objective (``fit``: Ŵ = Q_T + SVD_r(W0 − Q_T), Eq. 6)."""

    to_quantize: torch.Tensor
    down: torch.Tensor
    up: torch.Tensor
    errors: dict[str, float]


@torch.no_grad()
def loftq_start(weight: torch.Tensor, rank: int, quantize: Callable[[torch.Tensor], torch.Tensor],
                iterations: int, scaling: float, divide_scaling: bool = False) -> LoftQStart:
    """Algorithm 1 on ``weight`` = W0 ``(d_out, d_in)``, in fp32. ``quantize`` maps a matrix to
    its quantization, dequantized (q_N, as the base will hold it); ``scaling`` is s, the factor
    the layer puts on B·A; ``divide_scaling``: A and B divided by √s (s·B·A = SVD_r, not B·A)."""
    weight = weight.float()
    to_quantize, norm, errors = weight, weight.norm(), {}
    for step in range(iterations):
        quantized = quantize(to_quantize)  # Eq. 7
        if step == 0:
            errors["quantized"] = ((weight - quantized).norm() / norm).item()
        down, up = singular_factors(weight - quantized, rank, 1.0)  # Eq. 8
        if step + 1 < iterations:
            to_quantize = weight - up @ down
    fit = up @ down
    if divide_scaling:
        root = scaling ** 0.5
        down, up = down / root, up / root
    errors["fit"] = ((weight - quantized - fit).norm() / norm).item()
    errors["start"] = ((weight - quantized - scaling * (up @ down)).norm() / norm).item()
    return LoftQStart(to_quantize, down.contiguous(), up.contiguous(), errors)
