"""AdaLoRA: Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning".

    h = W0·x + (α/r)·P·Λ·Q·x                                              (Eq. 3)
    L = C(P, Λ, Q) + γ·Σ_k R(P_k, Q_k),   R = ‖PᵀP − I‖²_F + ‖QQᵀ − I‖²_F    (Eq. 4, printed)

The official code (and peft) regularise differently, and γ = 0.1 was tuned with their form:
the mean over all 2n matrices of the unsquared Frobenius norms,

    L = C + γ · (1/2n) · Σ_k (‖P_kᵀP_k − I‖_F + ‖Q_kQ_kᵀ − I‖_F)          (``mean_norm``, default)

At initialisation (P, Q ~ N(0, 0.02²): PᵀP ≈ 0.3·I) the printed form is about 0.5·r per
matrix, summed over all of them: on RoBERTa-base's 24 W_q/W_v at r = 8, γ·R = 18.4, larger than
the task loss and its gradient above the usual clip, against 0.196 for the reference form
(94×). ``orth_reg_form="sum_squared"`` gives Eq. 4 as printed.

P: ``(d_out, r)``, Λ = diag(λ): ``(r,)``, Q: ``(r, d_in)``. Λ starts at zero, so the wrapped
model starts as the base model. During training the budget of kept singular values shrinks
from r per module to ``target_rank`` per module on average, and which λᵢ survive is decided
*globally* over all adapted modules by an importance score S of each triplet (Pᵢ, λᵢ, Qᵢ):

    I(w)  = |w·∂L/∂w|                                     sensitivity          (Eq. 6)
    Ī(w) ← β1·Ī(w) + (1 − β1)·I(w)                         smoothed             (Eq. 8)
    Ū(w) ← β2·Ū(w) + (1 − β2)·|I(w) − Ī(w)|                uncertainty          (Eq. 9)
    s(w)  = Ī(w)·Ū(w)                                                            (Eq. 10)
    S_i   = s(λᵢ) + mean_j s(P_ji) + mean_j s(Q_ij)         triplet score        (Eq. 7)

The total budget follows the cubic schedule of Eq. 12: b(0) for the first ``t_init`` steps,
then b(t) = b(T) + (b(0) − b(T))·(1 − (t − t_init)/(T − t_init − t_final))³, and b(T) for
the last ``t_final`` steps, in which the allocation is frozen. Every ``delta_t`` steps the
λᵢ outside the top-b(t) scores are set to zero; between pruning steps they keep training and
may earn their place back, as the paper intends. ``importance="magnitude"`` replaces S with
the squared norm of the rank-1 component, λᵢ²·‖Pᵢ‖²·‖Qᵢ‖², for comparison.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from schema import ConfigError, knob

from ..base import AdapterLayer, AdapterVariant, adapter_dtype, layers_of, register_variant, shard_like, whole

IMPORTANCES = ("sensitivity", "magnitude")
ORTH_REG_FORMS = ("mean_norm", "sum_squared")


def _steps(value: float, total_steps: int) -> int:
    """A schedule length given as a fraction of training (float < 1) or as steps (1 or more)."""
    if isinstance(value, float) and value < 1:
        return round(value * total_steps)
    return int(value)


def budget_at(step: int, initial: int, target: int, t_init: int, t_final: int, total_steps: int) -> int:
    """b(t) of Eq. 12 (steps counted from 1)."""
    if step >= total_steps - t_final:
        return target
    if step <= t_init:
        return initial
    progress = (step - t_init) / (total_steps - t_final - t_init)
    return target + round((initial - target) * (1 - progress) ** 3)


class AdaLoRALinear(AdapterLayer):
    """AdaLoRA's layer around a frozen ``nn.Linear``: the triplets and their importance.

    Args:
        base: the frozen layer, weight ``(d_out, d_in)``.
        rank: r, the initial rank of P·Λ·Q.
        alpha: α; the update is scaled by α/r as in LoRA.
        dropout: dropout on the adapter path's input.
        init_std: standard deviation of the Gaussian initialisation of P and Q.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, init_std: float = 0.02) -> None:
        super().__init__(base)
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        dtype = adapter_dtype(base)
        device = base.weight.device
        self.lora_P = nn.Parameter(torch.randn(self.out_features, rank, dtype=dtype, device=device) * init_std)
        self.lora_E = nn.Parameter(torch.zeros(rank, dtype=dtype, device=device))  # λ, the diagonal of Λ
        self.lora_Q = nn.Parameter(torch.randn(rank, self.in_features, dtype=dtype, device=device) * init_std)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # Which λᵢ are kept; saved with the adapter so a loaded model knows its allocation.
        self.register_buffer("rank_mask", torch.ones(rank, dtype=torch.bool, device=device))
        # Ī and Ū of Eq. 8–9 per parameter; training state, not part of the saved adapter.
        for name in ("P", "E", "Q"):
            param = getattr(self, f"lora_{name}")
            self.register_buffer(f"_ipt_{name}", torch.zeros_like(param, dtype=torch.float32), persistent=False)
            self.register_buffer(f"_unc_{name}", torch.zeros_like(param, dtype=torch.float32), persistent=False)
        self.rank_history: list[tuple[int, int]] = []  # (step, kept rank) at every pruning decision

    def training_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"rank_history": [list(item) for item in self.rank_history]}
        for name in ("P", "E", "Q"):
            state[f"ipt_{name}"] = getattr(self, f"_ipt_{name}").clone()
            state[f"unc_{name}"] = getattr(self, f"_unc_{name}").clone()
        return state

    def load_training_state(self, state: dict[str, Any]) -> None:
        self.rank_history = [tuple(item) for item in state["rank_history"]]
        for name in ("P", "E", "Q"):
            getattr(self, f"_ipt_{name}").copy_(state[f"ipt_{name}"])
            getattr(self, f"_unc_{name}").copy_(state[f"unc_{name}"])

    @property
    def kept_rank(self) -> int:
        return int(self.rank_mask.sum())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        if self.merged or not self.active:
            return result
        x = self.dropout(x).to(self.lora_Q.dtype)
        update = ((x @ self.lora_Q.t()) * self.lora_E) @ self.lora_P.t()
        return result + (update * self.scaling).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """(α/r)·P·Λ·Q: ``(d_out, d_in)``."""
        return (self.lora_P * self.lora_E) @ self.lora_Q * self.scaling

    def as_lora(self) -> dict[str, torch.Tensor | float]:
        """A = Q, B = P·Λ (pruned triplets have λ = 0): the same ΔW at rank r."""
        return {"lora_A": self.lora_Q, "lora_B": self.lora_P * self.lora_E, "scaling": self.scaling}

    def orthogonality_residuals(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(‖PᵀP − I‖_F, ‖QQᵀ − I‖_F), unsquared, in the factors' fp32 also under autocast (a
        bf16 Gram matrix would be rounded by ~4e-3 near 1 before I is subtracted)."""
        p, q = whole(self.lora_P), whole(self.lora_Q)  # (under FSDP, gathered: the gradient flows back to the shards)
        eye = torch.eye(self.rank, dtype=p.dtype, device=p.device)
        with torch.autocast(p.device.type, enabled=False):
            return torch.linalg.matrix_norm(p.t() @ p - eye), torch.linalg.matrix_norm(q @ q.t() - eye)

    @torch.no_grad()
    def reset_importance(self) -> None:
        """Every triplet kept, the averages of Eq. 8–9 at zero, the rank history restarted."""
        self.rank_mask.fill_(True)
        self.rank_history = [(0, self.rank)]
        for buffer in (self._ipt_P, self._ipt_E, self._ipt_Q, self._unc_P, self._unc_E, self._unc_Q):
            buffer.zero_()

    @torch.no_grad()
    def update_importance(self, beta1: float, beta2: float) -> None:
        """One step of Eq. 6, 8 and 9 from the live gradients."""
        for name in ("P", "E", "Q"):
            param = getattr(self, f"lora_{name}")
            if param.grad is None:
                continue
            sensitivity = (whole(param).float() * whole(param.grad).float()).abs()
            smoothed, uncertainty = getattr(self, f"_ipt_{name}"), getattr(self, f"_unc_{name}")
            smoothed.mul_(beta1).add_(sensitivity, alpha=1 - beta1)
            uncertainty.mul_(beta2).add_((sensitivity - smoothed).abs(), alpha=1 - beta2)

    @torch.no_grad()
    def triplet_scores(self, importance: str) -> torch.Tensor:
        """S_i for every triplet (Pᵢ, λᵢ, Qᵢ): ``(r,)``, by ``sensitivity`` or ``magnitude``."""
        if importance == "magnitude":
            p_norm = whole(self.lora_P).float().pow(2).sum(0)
            q_norm = whole(self.lora_Q).float().pow(2).sum(1)
            return whole(self.lora_E).float().pow(2) * p_norm * q_norm
        score_p = self._ipt_P * self._unc_P
        score_e = self._ipt_E * self._unc_E
        score_q = self._ipt_Q * self._unc_Q
        return score_e + score_p.mean(0) + score_q.mean(1)

    @torch.no_grad()
    def apply_mask(self) -> None:
        self.lora_E.mul_(shard_like(self.rank_mask.to(self.lora_E.dtype), self.lora_E))

    def extra_repr(self) -> str:
        return f"rank={self.rank}, kept={self.kept_rank}, alpha={self.alpha}, {super().extra_repr()}"


@dataclass
class AdaLoRASettings:
    """AdaLoRA's settings: the start, the orthogonality term (Eq. 4), importance (Eq. 6-10), the schedule (Eq. 12)."""

    dropout: float = knob(0.0, "dropout on the adapter path's input, not on the base path (conf: adapter_dropout)",
                          within="[0, 1)")
    target_rank: float | None = knob(None, "average rank per module left at the end, b(T) = target_rank × modules "
                                     "(at most rank); null: round(2r/3), the paper's b(0) = 1.5 b(T)", within="> 0")
    orth_reg_weight: float = knob(0.1, "γ of Eq. 4, the orthogonality term's weight (the paper's GLUE setting, tuned "
                                  "with the official code's mean_norm form); logged as train/adapter_loss",
                                  within=">= 0")
    orth_reg_form: str = knob("mean_norm", "mean_norm: γ × the mean over every P and Q of ‖PᵀP − I‖_F, ‖QQᵀ − I‖_F, "
                              "unsquared (the official code, peft) | sum_squared: Eq. 4 as printed (94× larger at "
                              "init on RoBERTa-base at r = 8)", choices=ORTH_REG_FORMS)
    importance: str = knob("sensitivity", "sensitivity: EMA-smoothed |w·∇w| times its uncertainty, summed over the "
                           "triplet (Eq. 6-10, the paper's) | magnitude: λᵢ²‖Pᵢ‖²‖Qᵢ‖²", choices=IMPORTANCES)
    beta1: float = knob(0.85, "β1, the EMA factor of the sensitivity (Eq. 8; the paper's default)", within="[0, 1)")
    beta2: float = knob(0.85, "β2, the EMA factor of its uncertainty (Eq. 9; the paper's default)", within="[0, 1)")
    t_init: float = knob(0.1, "steps at the full budget before pruning starts: below 1 a fraction of training, else "
                         "steps (the paper's GLUE settings: ~10%)", within=">= 0")
    t_final: float = knob(0.4, "last steps with the final allocation frozen (pruned λ held at 0): below 1 a fraction "
                          "of training, else steps (the paper's GLUE settings: ~40-55%)", within=">= 0")
    delta_t: int = knob(10, "steps between pruning decisions; pruned λ keep training in between (the paper: 10 on "
                        "small tasks, 100 on large)", within=">= 1")
    init_std: float = knob(0.02, "P and Q ~ N(0, init_std²); λ starts at 0, so the model starts as the base model",
                           within="> 0")


@register_variant("adalora")
class AdaLoRA(AdapterVariant):
    """AdaLoRA on the targeted layers: ``AdaLoRALinear`` each, one global budget over them all.
    Settings: ``AdaLoRASettings``."""

    Settings = AdaLoRASettings

    analysis_caveats: ClassVar[dict[str, str]] = {
        "subspace_overlap": (
            "AdaLoRA keeps Q's rows near-orthonormal (the orthogonality term), so Q's singular values are "
            "nearly equal and the order of its singular directions is arbitrary: phi(i, j) for small i, j is "
            "not comparable with LoRA's A, whose singular values fall off. --side up compares P*Lambda, whose "
            "directions are ordered by |lambda|; phi(r1, r2) of the whole kept subspaces is comparable."
        ),
    }

    def __init__(self, rank: int, alpha: float, *, dropout: float, target_rank: float | None, orth_reg_weight: float,
                 orth_reg_form: str, importance: str, beta1: float, beta2: float, t_init: float, t_final: float,
                 delta_t: int, init_std: float) -> None:
        super().__init__(rank, alpha)
        target_rank = round(2 * rank / 3) if target_rank is None else target_rank
        if not 0 < target_rank <= rank:  # the rank is the run's: checked here, not by the settings
            raise ConfigError(f"variant.target_rank={target_rank!r} must be a number in (0, rank={rank}]")
        self.dropout, self.init_std = dropout, init_std
        self.target_rank = target_rank
        self.orth_reg_weight, self.orth_reg_form = orth_reg_weight, orth_reg_form
        self.importance = importance
        self.beta1, self.beta2 = beta1, beta2
        self.t_init, self.t_final, self.delta_t = t_init, t_final, delta_t

    def new_layer(self, base: nn.Linear) -> AdaLoRALinear:
        return AdaLoRALinear(base, self.rank, self.alpha, dropout=self.dropout, init_std=self.init_std)

    @classmethod
    def parameters_at_rank(cls, in_features: int, out_features: int, rank: int) -> int:
        """What ``rank`` kept triplets cost: P's column, Q's row and λ each (an equal budget
        counts AdaLoRA at its final rank; it starts from 1.5x that, the paper's b(0) = 1.5 b(T))."""
        return rank * (in_features + out_features + 1)

    @classmethod
    def settings_for_rank(cls, rank: int, max_rank: int) -> dict[str, Any]:
        return {"rank": min(max_rank, math.ceil(1.5 * rank)), "target_rank": rank}

    @classmethod
    def low_rank_factors(cls, state: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q, P·Λ) restricted to the kept triplets: the pruned ones are not part of ΔW."""
        kept = state["rank_mask"].bool()
        return state["lora_Q"][kept], (state["lora_P"] * state["lora_E"])[:, kept]

    def adapter_loss(self, model: nn.Module) -> torch.Tensor | None:
        """γ times the orthogonality regulariser over all modules: the mean of the norms
        (``mean_norm``) or the sum of their squares (``sum_squared``, Eq. 4)."""
        if self.orth_reg_weight == 0:
            return None
        norms = torch.stack([norm for layer in layers_of(model).values() for norm in layer.orthogonality_residuals()])
        regulariser = norms.mean() if self.orth_reg_form == "mean_norm" else norms.pow(2).sum()
        return self.orth_reg_weight * regulariser

    def _schedule(self, total_steps: int) -> tuple[int, int]:
        return _steps(self.t_init, total_steps), _steps(self.t_final, total_steps)

    def check_total_steps(self, total_steps: int) -> None:
        t_init, t_final = self._schedule(total_steps)
        if t_init + t_final > total_steps:
            raise ConfigError(
                f"variant.t_init + variant.t_final = {t_init} + {t_final} steps exceeds the {total_steps} training steps"
            )

    def on_train_begin(self, model: nn.Module, total_steps: int) -> None:
        for layer in layers_of(model).values():
            layer.reset_importance()

    @torch.no_grad()
    def after_optimizer_step(self, model: nn.Module, step: int, total_steps: int) -> dict[str, float]:
        layers = layers_of(model)
        t_init, t_final = self._schedule(total_steps)
        final_phase_start = total_steps - t_final
        if step > final_phase_start:  # allocation frozen: keep the pruned λ at zero
            for layer in layers.values():
                layer.apply_mask()
            return {}
        for layer in layers.values():
            layer.update_importance(self.beta1, self.beta2)
        if step != final_phase_start and (step <= t_init or step % self.delta_t != 0):
            return {}
        return self._prune(layers, budget_at(step, sum(layer.rank for layer in layers.values()),
                                             round(self.target_rank * len(layers)), t_init, t_final, total_steps), step)

    def _prune(self, layers: Mapping[str, AdaLoRALinear], budget: int, step: int) -> dict[str, float]:
        """Keep the ``budget`` triplets with the highest scores over all layers; zero the others' λ."""
        scores = torch.cat([layer.triplet_scores(self.importance) for layer in layers.values()])
        keep = torch.zeros_like(scores, dtype=torch.bool)
        keep[torch.topk(scores, budget).indices] = True
        metrics = {"adalora/budget": float(budget)}
        for (name, layer), layer_keep in zip(layers.items(), keep.split([layer.rank for layer in layers.values()])):
            layer.rank_mask.copy_(layer_keep)
            layer.apply_mask()
            layer.rank_history.append((step, layer.kept_rank))
            metrics[f"adalora/rank/{name}"] = float(layer.kept_rank)
        return metrics

    def report(self, model: nn.Module) -> dict[str, Any]:
        """The final rank of every module and the trace of its rank at each pruning step."""
        layers = layers_of(model)
        return {
            "rank_allocation": {name: layer.kept_rank for name, layer in layers.items()},
            "total_rank": sum(layer.kept_rank for layer in layers.values()),
            "initial_total_rank": sum(layer.rank for layer in layers.values()),
            "rank_trace": {name: layer.rank_history for name, layer in layers.items()},
        }
