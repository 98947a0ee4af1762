"""LoRA-Pro: Wang, Liang, He, Wang and Tan 2025 (ICLR), "LoRA-Pro: Are Low-Rank Adapters Properly Optimized?"

A LoRA step changes W = W0 + s·B·A along the paper's "equivalent gradient" g̃ = s·(B·g^A + g^B·A),
which for LoRA's own gradients g^A = s·Bᵀ·g, g^B = s·g·Aᵀ is s²·(B·Bᵀ·g + g·Aᵀ·A): not full
fine-tuning's g = ∂L/∂W (§2). LoRA-Pro replaces g^A and g^B by the ones whose g̃ is closest to g
(Theorem 2.1; B ``(m, r)`` and A ``(r, n)`` of full rank, X ``(r, r)`` free):

    g^A = (1/s²)·(BᵀB)⁻¹·g^A_lora + X·A
    g^B = (1/s²)·[I − B(BᵀB)⁻¹Bᵀ]·g^B_lora·(AAᵀ)⁻¹ − B·X

computed from LoRA's gradients alone, since Bᵀ·g = g^A_lora/s and g·Aᵀ = g^B_lora/s. Their g̃ is
P_B·g + (I − P_B)·g·P_A, the projection of g on the matrices LoRA can reach in one step (X
cancels in it). X is the one that changes LoRA's gradients least (Theorem 2.2), the solution of
the Sylvester equation

    BᵀB·X + X·AAᵀ = −(1/s²)·(BᵀB)⁻¹·g^A_lora·Aᵀ

(``x_mode="zero"`` takes X = 0). Inverses are of (·) + δI, δ = 1e-8, as in the authors' code.

With AdamW (§2, ``mode="full"``, the paper's algorithm and the default): the Adam moments are
kept for the full-size equivalent gradient g̃ (m×n per layer, stored in bf16 as the authors'
code does; ``moment_dtype="fp32"`` to keep them exact), the Adam direction d = m̂/(√v̂ + ε) is
projected back by the same closed form (with g := d), and A and B take the step −η·(g^A, g^B);
the trainer's optimizer leaves them alone. Decoupled weight decay shrinks the equivalent weight:
A and B by √(1 − ηλ) each and W0 by (1 − ηλ), as the authors' code does (the decayed W0 is then
saved with the adapter). ``mode="efficient"`` is the authors' memory-efficient optimizer:
the adjusted gradients go to the ordinary AdamW of A and B.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from schema import knob

from ..base import layers_of, register_variant, shard_like, whole
from .lora import LoRA, LoRALinear, LoRASettings

MODES = ("full", "efficient")
X_MODES = ("sylvester", "zero")
MOMENT_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
DELTA = 1e-8  # the authors' regulariser of the r×r inverses


def solve_sylvester_symmetric(left: torch.Tensor, right: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """X with left·X + X·right = rhs, for symmetric positive semi-definite ``left``, ``right``
    ``(r, r)``: with left = U·diag(λ)·Uᵀ and right = V·diag(μ)·Vᵀ, X = U·[(Uᵀ·rhs·V) / (λᵢ + μⱼ)]·Vᵀ."""
    lam, u = torch.linalg.eigh(left.double())
    mu, v = torch.linalg.eigh(right.double())
    core = (u.t() @ rhs.double() @ v) / (lam[:, None] + mu[None, :]).clamp_min(DELTA)
    return (u @ core @ v.t()).to(rhs.dtype)


def projected_gradients(down: torch.Tensor, up: torch.Tensor, grad_down: torch.Tensor, grad_up: torch.Tensor,
                        scaling: float, x_mode: str = "sylvester") -> tuple[torch.Tensor, torch.Tensor]:
    """(g^A, g^B) of Theorems 2.1–2.2 from LoRA's gradients ``grad_down`` = ∂L/∂A ``(r, n)`` and
    ``grad_up`` = ∂L/∂B ``(m, r)``, for A = ``down``, B = ``up``; fp32."""
    a, b = down.float(), up.float()
    g_a, g_b = grad_down.float(), grad_up.float()
    eye = torch.eye(a.shape[0], device=a.device)
    btb, aat = b.t() @ b, a @ a.t()
    btb_inv, aat_inv = torch.linalg.pinv(btb + DELTA * eye), torch.linalg.pinv(aat + DELTA * eye)
    inv_s2 = 1.0 / scaling ** 2
    if x_mode == "sylvester":
        x = solve_sylvester_symmetric(btb, aat, -inv_s2 * btb_inv @ g_a @ a.t())
    else:
        x = torch.zeros_like(btb)
    new_a = inv_s2 * btb_inv @ g_a + x @ a
    new_b = inv_s2 * (g_b - b @ (btb_inv @ (b.t() @ g_b))) @ aat_inv - b @ x
    return new_a, new_b


def equivalent_gradient(down: torch.Tensor, up: torch.Tensor, grad_down: torch.Tensor, grad_up: torch.Tensor,
                        scaling: float) -> torch.Tensor:
    """g̃ = s·(B·g^A + g^B·A): how W = W0 + s·B·A moves per unit step along (g^A, g^B) (Eq. 3)."""
    return scaling * (up.float() @ grad_down.float() + grad_up.float() @ down.float())


@dataclass
class LoRAProSettings(LoRASettings):
    """LoRA-Pro's settings: LoRA's (lr_ratio only with mode=efficient), and how the gradients are projected."""

    mode: str = knob("full", "full: AdamW moments of the full-size equivalent gradient, projected back, LoRA-Pro "
                     "stepping A and B itself (the paper's §2.4) | efficient: the projected gradients to the ordinary "
                     "AdamW (the authors' memory-efficient optimizer)", choices=MODES)
    x_mode: str = knob("sylvester", "sylvester: the X of Theorem 2.2, closest to LoRA's gradients | zero: X = 0 (the "
                       "same equivalent gradient, other A/B gradients)", choices=X_MODES)
    moment_dtype: str = knob("bf16", "full mode: the moments' dtype, bf16 (as the authors' code) | fp32 (exact)",
                             choices=tuple(MOMENT_DTYPES))

    def rules(self, prefix: str) -> list[str]:
        """LoRA+'s rate ratio needs the ordinary optimizer: in full mode LoRA-Pro steps A and B itself."""
        key = f"{prefix}." if prefix else ""
        found = []
        if self.mode == "full" and self.lr_ratio is not None:
            found.append(f"{key}lr_ratio (LoRA+) needs {key}mode=efficient: in full mode LoRA-Pro takes A's and B's "
                         "steps itself")
        if self.freeze_a:
            found.append(f"{key}freeze_a=true (LoRA-FA) cannot combine with LoRA-Pro, which replaces A's gradient "
                         "too; allowed: false")
        return found


@register_variant("lora_pro")
class LoRAPro(LoRA):
    """LoRA (``LoRALinear`` layers) whose gradients are projected as LoRA-Pro says before each step.
    Settings: ``LoRAProSettings``."""

    Settings = LoRAProSettings

    def __init__(self, rank: int, alpha: float, *, mode: str, x_mode: str, moment_dtype: str,
                 **lora_settings: Any) -> None:
        super().__init__(rank, alpha, **lora_settings)
        self.mode, self.x_mode, self.moment_dtype = mode, x_mode, moment_dtype
        self.adam_step = 0
        self.moments: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # full mode: (m, v) of g̃ per layer
        self.decayed_base = False

    @torch.no_grad()
    def transform_gradients(self, model: nn.Module, optimizer: torch.optim.Optimizer, lr: float) -> dict[str, float]:
        layers = layers_of(model)
        if self.mode == "efficient":
            for layer in (l for l in layers.values() if l.lora_A.grad is not None and l.lora_B.grad is not None):
                a, b, g_a, g_b = (whole(t) for t in (layer.lora_A, layer.lora_B, layer.lora_A.grad, layer.lora_B.grad))
                layer.lora_A.grad, layer.lora_B.grad = (shard_like(g.to(p.dtype), p) for g, p in zip(
                    projected_gradients(a, b, g_a, g_b, layer.scaling, self.x_mode), (layer.lora_A, layer.lora_B)))
            return {}
        return self._full_adamw_step(layers, optimizer, lr)

    def _full_adamw_step(self, layers: dict[str, LoRALinear], optimizer: torch.optim.Optimizer,
                         lr: float) -> dict[str, float]:
        """§2, with AdamW: the moments of the equivalent gradient, its Adam direction projected back
        to A and B, which step here (with the betas, eps and weight decay of A's optimizer group)."""
        self.adam_step += 1
        group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        for name, layer in layers.items():
            group = group_of[id(layer.lora_A)]
            (beta1, beta2), eps, decay = group["betas"], group["eps"], group["weight_decay"]
            s = layer.scaling
            # a layer this step did not reach takes no step, as in the authors' code
            if layer.lora_A.grad is None or layer.lora_B.grad is None:
                continue
            # under FSDP every process gathers the whole factors and gradients, computes the same
            # step, and takes its own shard of it
            a, b, grad_a, grad_b = (whole(t) for t in (layer.lora_A, layer.lora_B, layer.lora_A.grad,
                                                       layer.lora_B.grad))
            g_a, g_b = projected_gradients(a, b, grad_a, grad_b, s, "zero")  # X cancels in g̃
            full = equivalent_gradient(a, b, g_a, g_b, s)
            dtype = MOMENT_DTYPES[self.moment_dtype]
            exp_avg, exp_avg_sq = self.moments.setdefault(name, (torch.zeros_like(full, dtype=dtype),
                                                                 torch.zeros_like(full, dtype=dtype)))
            exp_avg.lerp_(full.to(dtype), 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(full.to(dtype), full.to(dtype), value=1 - beta2)
            direction = ((exp_avg.float() / (1 - beta1 ** self.adam_step))
                         / ((exp_avg_sq.float() / (1 - beta2 ** self.adam_step)).sqrt() + eps))
            step_a, step_b = projected_gradients(a, b, s * b.float().t() @ direction, s * direction @ a.float().t(),
                                                 s, self.x_mode)
            a, b = layer.lora_A, layer.lora_B  # (FSDP: this process's shards)
            if decay:
                a.mul_(math.sqrt(1 - decay * lr))
                b.mul_(math.sqrt(1 - decay * lr))
                layer.base.weight.mul_(1 - decay * lr)
                self.decayed_base = True
            a.sub_(shard_like(lr * step_a.to(a.dtype), a))
            b.sub_(shard_like(lr * step_b.to(b.dtype), b))
            a.grad, b.grad = None, None  # stepped here: the optimizer skips a parameter without a gradient
        return {}

    def training_state(self) -> dict[str, Any]:
        return {"adam_step": self.adam_step, "decayed_base": self.decayed_base,
                "moments": {name: [m.clone(), v.clone()] for name, (m, v) in self.moments.items()}}

    def load_training_state(self, model: nn.Module, state: dict[str, Any]) -> None:
        self.adam_step, self.decayed_base = state["adam_step"], state["decayed_base"]
        self.moments = {name: (m.clone(), v.clone()) for name, (m, v) in state["moments"].items()}

    def state_to_save(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """With weight decay in full mode the frozen W0 shrank too: save it with the adapter."""
        if not self.decayed_base:
            return {}
        return {f"{name}.base.weight": layer.base.weight for name, layer in layers_of(model).items()}
