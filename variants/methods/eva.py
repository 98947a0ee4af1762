"""EVA: Paischer, Hauzenberger, Schmied, Alkin, Deisenroth and Hochreiter 2024, "One Initialization
to Rule them All: Fine-tuning via Explained Variance Adaptation" (arXiv 2410.07170, v1; later
versions are titled "Parameter Efficient Fine-tuning via Explained Variance Adaptation").

LoRA starts A at random. EVA starts it at the directions in which the layer's inputs vary most
on the task's data (§3): the top right singular vectors of the layer's input activations X
(tokens × d_in, centred), that is the principal components of its inputs, estimated on training
batches before the first step. B starts at zero, so the model starts as the base model.

The number of batches is not fixed: components are re-estimated after every batch and a layer
is done when each of the components it keeps has cosine similarity ≥ τ with its previous
estimate (the authors' stopping rule, τ = 0.99).

Rank redistribution (§3): every layer estimates ρ·r components; their explained-variance ratios,
all layers together, are ranked and the top n·r kept (n layers: the budget of rank r
everywhere). A layer's rank is the number of its components among them, from 0 to ρ·r; ρ = 1
keeps r everywhere. With ``adjust_scaling`` (the default, as the authors' code in peft) a layer's
α becomes α·r_l/r, so its factor α_l/r_l stays α/r (with ``scaling="rslora"`` the factor is then
α_l/√r_l = α·√r_l/r, as in peft: it still grows with the layer's rank). A layer at rank 0 keeps
no adapter weights and computes its base layer alone.

Estimation: the authors' code (peft's ``eva.py``) runs an incremental PCA per layer with a
randomized SVD; here each layer accumulates the token count, Σx and Σx·xᵀ (fp64) and takes the
exact eigendecomposition of the covariance after each batch: the PCA of all tokens seen so far,
which the incremental method approximates. The sums are averaged over the processes of a
data-parallel run, so every process reaches the same components. Padding tokens are left out
(positions where ``attention_mask`` is 0, when the layer's input is ``(batch, seq, d_in)``), and
so are tokens labelled −100 where labels are per token, as peft's default ``use_label_mask``:
in instruction tuning the components come from the response tokens only. Differences from
peft that change no result on the tests' data: each layer estimates its own components even where layers share an input (W_q and W_v;
peft computes those once), similarity is compared up to sign, and no batch is skipped for
having fewer tokens than components (the sums simply grow). Cost: each layer keeps a d_in × d_in
fp64 sum (1.2 MB at d_in = 384, 75 MB at 3072) and takes one eigendecomposition per batch until
it converges.
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
from .lora import LoRA, LoRALinear, LoRASettings, lora_scaling


class EVALinear(LoRALinear):
    """LoRA whose rank EVA sets once, from data (``resize``); otherwise plain ``LoRALinear``."""

    @torch.no_grad()
    def resize(self, rank: int, alpha: float) -> None:
        """A ``(rank, d_in)`` and B ``(d_out, rank)``, both zero, at the factor of ``alpha``/``rank``;
        whether they train is kept."""
        trains = self.lora_A.requires_grad
        like = self.lora_A
        self.lora_A = nn.Parameter(like.new_zeros(rank, self.in_features), requires_grad=trains)
        self.lora_B = nn.Parameter(like.new_zeros(self.out_features, rank), requires_grad=trains)
        self.rank, self.alpha = rank, alpha
        self.scaling = lora_scaling(alpha, rank, self.scaling_rule) if rank else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rank == 0:  # no components chosen here: the base layer alone (peft unwraps it)
            return self.base(x)
        return super().forward(x)


class InputCovariance:
    """Token count, Σx and Σx·xᵀ of one layer's inputs, and the principal components they give."""

    def __init__(self, dim: int, device: torch.device) -> None:
        self.count = torch.zeros((), dtype=torch.float64, device=device)
        self.total = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor) -> None:
        """``x``: ``(tokens, d_in)``."""
        x = x.detach().double()
        self.count += x.shape[0]
        self.total += x.sum(0)
        self.outer += x.t() @ x

    def components(self, k: int, mean_over_processes) -> tuple[torch.Tensor, torch.Tensor]:
        """(the top ``k`` principal directions ``(k, d_in)``, their explained-variance ratios ``(k,)``)."""
        count, total, outer = (mean_over_processes(t) for t in (self.count, self.total, self.outer))
        mean = total / count
        covariance = outer / count - torch.outer(mean, mean)
        variances, vectors = torch.linalg.eigh(covariance)  # ascending
        variances, vectors = variances.flip(0).clamp_min(0), vectors.flip(1)
        directions = vectors[:, :k].t()
        # one sign per direction, as sklearn's svd_flip: its largest |entry| positive
        signs = torch.sign(directions.gather(1, directions.abs().argmax(1, keepdim=True)))
        return directions * signs, variances[:k] / variances.sum()


def redistribute(ratios: Mapping[str, torch.Tensor], budget: int) -> dict[str, int]:
    """A rank per layer: how many of its components are among the ``budget`` largest
    explained-variance ratios of all layers (ties to the earlier layer)."""
    names = [name for name, r in ratios.items() for _ in range(len(r))]
    values = torch.cat([r.float().cpu() for r in ratios.values()])
    chosen = torch.argsort(values, descending=True, stable=True)[:budget]
    ranks = dict.fromkeys(ratios, 0)
    for index in chosen.tolist():
        ranks[names[index]] += 1
    return ranks


def tokens_to_use(batch: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """``(batch, seq)``: the positions whose inputs EVA estimates from, or None for all. Padding
    (``attention_mask`` 0) is left out, and so are tokens labelled −100 where labels are per
    token (a causal LM's prompt and padding), as peft's ``use_label_mask`` (its default) does."""
    mask = batch["attention_mask"].bool() if "attention_mask" in batch else None
    labels = batch.get("labels")
    if labels is not None and labels.dim() == 2:
        mask = labels != -100 if mask is None else mask & (labels != -100)
    return mask


@contextmanager
def captured_inputs(layers: Mapping[str, nn.Module]) -> Iterator[tuple[dict[str, torch.Tensor], list]]:
    """While open: (each layer's input of the last forward pass, ``(tokens, d_in)``; a one-item
    list holding a ``(batch, seq)`` mask, set before each pass, of the positions to keep)."""
    seen: dict[str, torch.Tensor] = {}
    mask: list[torch.Tensor | None] = [None]

    def hook(name):
        def record(module, args):
            x = args[0]
            if mask[0] is not None and x.dim() == 3 and x.shape[:2] == mask[0].shape:
                x = x[mask[0]]
            seen[name] = x.reshape(-1, x.shape[-1])
        return record

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers.items()]
    try:
        yield seen, mask
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class EVASettings(LoRASettings):
    """EVA's settings: LoRA's, and how the input components are estimated and the ranks redistributed."""

    rho: float = knob(2.0, "ρ: components per layer, ρ·r, the largest rank a layer can get; 1: rank r everywhere, "
                      "no redistribution (the authors' default: 2)", within=">= 1")
    tau: float = knob(0.99, "τ: a component has converged when its cosine similarity with the previous estimate is "
                      ">= τ (the authors' default)", within="(0, 1]")
    max_batches: int = knob(100, "training batches at most for the estimate; the summary's "
                            "initialization.not_converged lists layers not converged by then", within=">= 1")
    adjust_scaling: bool = knob(True, "α_l = α·r_l/r, so each layer keeps the factor α/r (the authors' code in peft); "
                                "false: α everywhere, a layer's factor changes with its rank")


@register_variant("eva")
class EVA(LoRA):
    """LoRA with A started at the principal components of each layer's inputs, ranks
    redistributed by explained variance: ``EVALinear`` layers. Settings: ``EVASettings``."""

    Settings = EVASettings

    analysis_caveats: ClassVar[dict[str, str]] = {
        "subspace_overlap": (
            "EVA's layers have ranks of their own (0 to rho*r, redistributed by explained variance), and A starts at "
            "the principal components of the layer's inputs, which the subspace of A keeps."
        ),
    }

    def __init__(self, rank: int, alpha: float, *, rho: float, tau: float, max_batches: int, adjust_scaling: bool,
                 **lora_settings: Any) -> None:
        super().__init__(rank, alpha, **lora_settings)
        self.rho, self.tau, self.max_batches, self.adjust_scaling = rho, tau, max_batches, adjust_scaling

    def new_layer(self, base: nn.Linear) -> EVALinear:
        return EVALinear(base, self.rank, self.alpha, **self.layer_settings())

    def initialize(self, model: nn.Module, data: InitData) -> dict[str, Any]:
        """Estimate each layer's input components on training batches until they converge,
        redistribute the ranks, and start every A there (B stays 0)."""
        layers = layers_of(model)
        wanted = {name: min(round(self.rho * self.rank), layer.in_features) for name, layer in layers.items()}
        components, ratios, batches, unconverged = self._estimate(model, layers, data, wanted)
        ranks = redistribute(ratios, self.rank * len(layers))
        for name, layer in layers.items():
            layer.resize(ranks[name], self._layer_alpha(ranks[name]))
            with torch.no_grad():
                layer.lora_A.copy_(components[name][:ranks[name]])
        parameters = sum(layer.lora_A.numel() + layer.lora_B.numel() for layer in layers.values())
        return {"batches": batches, "ranks": ranks, "not_converged": unconverged, "adapter_parameters": parameters}

    @torch.no_grad()
    def _estimate(self, model: nn.Module, layers: Mapping[str, EVALinear], data: InitData,
                  wanted: Mapping[str, int]) -> tuple[dict, dict, int, list[str]]:
        """Batches until every layer's kept components stop moving (or ``max_batches``)."""
        sums = {name: InputCovariance(layer.in_features, layer.lora_A.device) for name, layer in layers.items()}
        components: dict[str, torch.Tensor] = {}
        ratios: dict[str, torch.Tensor] = {}
        similar: dict[str, torch.Tensor] = {}
        ranks = dict(wanted)  # until the first redistribution: every component counts
        was_training = model.training
        model.eval()
        batches = 0
        try:
            with captured_inputs(layers) as (seen, mask):
                while batches < self.max_batches:
                    pending = [n for n in layers if not self._converged(similar.get(n), ranks[n])]
                    if not pending:
                        break
                    batch = next(data.batches)
                    mask[0] = tokens_to_use(batch)
                    model(**{k: v for k, v in batch.items() if k != "labels"})
                    batches += 1
                    for name in pending:
                        sums[name].add(seen[name])
                        new, ratios[name] = sums[name].components(wanted[name], data.mean_over_processes)
                        if name in components:
                            similar[name] = nn.functional.cosine_similarity(new, components[name], dim=1).abs()
                        components[name] = new
                    ranks = redistribute(ratios, self.rank * len(layers))
        finally:
            model.train(was_training)
        unconverged = [n for n in layers if not self._converged(similar.get(n), ranks[n])]
        return components, ratios, batches, unconverged

    def _layer_alpha(self, rank: int) -> float:
        """α for a layer at ``rank``: α·r_l/r with ``adjust_scaling`` (its factor stays α/r), else α."""
        return self.alpha * rank / self.rank if self.adjust_scaling else self.alpha

    def _converged(self, similarity: torch.Tensor | None, rank: int) -> bool:
        return rank == 0 or (similarity is not None and bool((similarity[:rank] >= self.tau).all()))

    def fit_to_saved(self, model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
        """Give each layer the rank its saved A has (EVA's ranks come from data, not the config)."""
        for name, layer in layers_of(model).items():
            saved = tensors.get(f"{name}.lora_A")
            if saved is not None and saved.shape[0] != layer.rank:
                layer.resize(saved.shape[0], self._layer_alpha(saved.shape[0]))
