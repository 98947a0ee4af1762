"""The variant contract, and the registry that names variants.

A variant is a fine-tuning method. The trainer reaches it only through the class-level hooks of
``Variant``, which receive the model and the variant's adapter layers in it, so the trainer
never asks which variant it is running. There are two kinds:

* ``AdapterLayer`` wraps frozen base ``nn.Linear`` layers (weight W0: ``(d_out, d_in)``) and adds
  a learned update: LoRA and its kin. Per layer:

  - ``forward(x)``: ``(..., d_in) -> (..., d_out)``, the adapted layer.
  - ``delta_weight()``: ΔW, ``(d_out, d_in)``, scaling included, so that the adapted layer
    equals ``x @ (W0 + ΔW).T + bias``.
  - ``merge()`` / ``unmerge()``: fold ΔW into the base weight for inference and take it out.
  - ``adapter_parameters()``: the parameters the variant adds (the base's are not among them).
  - ``extra_loss()``: a term for the training loss (a regulariser).

* ``ParameterSubset`` adds nothing and trains some of the model's own parameters: the baselines
  (full fine-tuning, BitFit, the task head alone).

Model-wide hooks, on the class: ``inject`` (change the model), ``trainable_parameters`` (what
trains), ``check_total_steps``, ``on_train_begin``, ``adapter_loss``, ``after_optimizer_step`` and
``learning_rate`` (regularisers, rank allocation, schedules, phases), ``state_to_save`` (what a
saved run must carry besides the trainable parameters) and ``report`` (facts for the run's
summary). The training hooks default to nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from .errors import ConfigError
from .targets import Targets, find_target_modules, replace_module

CONFIG_ATTRIBUTE = "_adapter_config"  # set on the model by inject_adapters


def adapter_config(model: nn.Module) -> dict[str, Any]:
    """What ``inject_adapters`` recorded about the model's variant; {} before it ran."""
    return getattr(model, CONFIG_ATTRIBUTE, {})


class Variant:
    """A fine-tuning method seen from the whole model. ``layers`` in the hooks is every
    adapter layer of this class in the model, by module name (empty for a ``ParameterSubset``),
    so a variant can make model-wide decisions such as a global rank budget."""

    variant_name: ClassVar[str] = ""
    # The optimizer the method's paper trained with; the trainer takes it on CUDA when
    # trainer.optimizer=auto (QLoRA: bitsandbytes' paged AdamW).
    paper_optimizer: ClassVar[str] = "adamw"
    # Where an analysis's number for this variant does not mean what it means for LoRA:
    # {analysis script name: why}; the script prints it beside its results.
    analysis_caveats: ClassVar[dict[str, str]] = {}

    @classmethod
    def inject(
        cls, model: nn.Module, targets: Targets | None, rank: int | None, alpha: float | None,
        exclude: Sequence[str], **settings: Any,
    ) -> list[str]:
        """Apply the method to ``model`` in place; returns the names of the modules it adapted.
        Validates everything first, so a bad argument leaves the model untouched."""
        raise NotImplementedError

    @classmethod
    def trainable_parameters(cls, model: nn.Module, layers: Mapping[str, AdapterLayer]) -> list[nn.Parameter]:
        """What the method trains; ``mark_trainable`` adds the task head and chosen biases."""
        raise NotImplementedError

    @classmethod
    def low_rank_factors(cls, state: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(down ``(r, d_in)``, up ``(d_out, r)``) from one layer's saved tensors (keys without the
        module prefix): the factors whose row / column spaces the subspace analyses compare."""
        raise NotImplementedError(f"variant {cls.variant_name!r} has no low-rank factors")

    @classmethod
    def check_total_steps(cls, layers: Mapping[str, AdapterLayer], total_steps: int) -> None:
        """Raise ``ConfigError`` for settings that do not fit a run of ``total_steps`` (a schedule
        longer than training). Runners call it before writing anything."""

    @classmethod
    def on_train_begin(cls, model: nn.Module, layers: Mapping[str, AdapterLayer], total_steps: int) -> None:
        """Called once before the first step (after ``check_total_steps``): reset schedules."""

    @classmethod
    def after_optimizer_step(
        cls, model: nn.Module, layers: Mapping[str, AdapterLayer], step: int, total_steps: int
    ) -> dict[str, float]:
        """Called once per optimizer step (``step`` counts from 1). Gradients of this step are
        still populated (the trainer zeroes them afterwards), so gradient-based statistics can
        be accumulated here. Returns metrics to log."""
        return {}

    @classmethod
    def adapter_loss(cls, model: nn.Module, layers: Mapping[str, AdapterLayer]) -> torch.Tensor | None:
        """A term added to the training loss, or None: by default the sum of the layers'
        ``extra_loss()`` (a variant whose term is not a sum over layers overrides this)."""
        terms = [t for layer in layers.values() if (t := layer.extra_loss()) is not None]
        return torch.stack(terms).sum() if terms else None

    @classmethod
    def learning_rate(cls, model: nn.Module, layers: Mapping[str, AdapterLayer], lr: float) -> float:
        """The peak learning rate for the optimizer the trainer is about to build, given the
        configured ``lr``. The trainer builds a new optimizer whenever the set of trainable
        parameters changes (staged training's switch), and asks again then."""
        return lr

    @classmethod
    def state_to_save(cls, model: nn.Module, layers: Mapping[str, AdapterLayer]) -> dict[str, torch.Tensor]:
        """Tensors beyond the adapter layers' own and the trainable parameters that a saved
        run must carry to reproduce the model (staged training: the fully fine-tuned weights)."""
        return {}

    @classmethod
    def report(cls, model: nn.Module, layers: Mapping[str, AdapterLayer]) -> dict[str, Any]:
        """JSON-serialisable facts about the trained model worth keeping with the run."""
        return {}


def adapter_dtype(base: nn.Linear) -> torch.dtype:
    """The dtype adapter parameters train in: fp32 over a bf16, fp16 or quantized base (low-
    precision master weights would round away small updates; peft casts its adapters the same
    way), else the base's own (fp32, fp64)."""
    dtype = base.weight.dtype
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


class AdapterLayer(Variant, nn.Module):
    """Base class for adapter variants wrapping a frozen ``nn.Linear``.

    Subclasses define ``forward`` and ``delta_weight``. The default ``merge``/``unmerge`` add and
    subtract ``delta_weight()``, which is right whenever ΔW does not depend on W0; a variant whose
    ΔW does (DoRA's normalisation) overrides them.
    """

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"{type(self).__name__} wraps nn.Linear, got {type(base).__name__}")
        self.base = base
        self.base.weight.requires_grad_(False)
        self.merged = False

    @classmethod
    def inject(
        cls, model: nn.Module, targets: Targets | None, rank: int | None, alpha: float | None,
        exclude: Sequence[str], **settings: Any,
    ) -> list[str]:
        """Wrap each linear layer that ``targets`` selects (never one in ``exclude``, the task
        head) in this class, after ``prepare_model``."""
        if targets is None:
            raise ConfigError(f"variant={cls.variant_name!r} needs variant.targets (the layers to adapt)")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
            raise ConfigError(f"alpha={alpha!r} must be a number > 0")
        names = find_target_modules(model, targets, exclude)
        modules = dict(model.named_modules())
        max_rank = min(min(modules[n].in_features, modules[n].out_features) for n in names)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= max_rank:
            raise ConfigError(
                f"rank={rank!r} must be an integer in [1, {max_rank}] "
                "(min(d_in, d_out) over the targeted layers)"
            )
        cls(nn.Linear(rank, rank), rank=rank, alpha=alpha, **settings)  # dry run: check the settings
        cls.prepare_model(model, names, exclude, **settings)
        for name in names:
            replace_module(model, name, cls(model.get_submodule(name), rank=rank, alpha=alpha, **settings))
        return names

    @classmethod
    def prepare_model(
        cls, model: nn.Module, targets: Sequence[str], exclude: Sequence[str], **settings: Any
    ) -> None:
        """Called by ``inject`` before the ``targets`` are wrapped, with the layer constructor's
        keyword arguments: what the variant changes in the rest of the model (QLoRA quantizes
        every other linear layer except ``exclude``, the task head)."""

    @classmethod
    def trainable_parameters(cls, model: nn.Module, layers: Mapping[str, AdapterLayer]) -> list[nn.Parameter]:
        return [p for layer in layers.values() for p in layer.adapter_parameters()]

    @classmethod
    def parameters_at_rank(cls, in_features: int, out_features: int, rank: int) -> int:
        """Parameters one adapted (d_in, d_out) layer trains at ``rank``: A (r, d_in) and B (d_out, r)."""
        return rank * (in_features + out_features)

    @classmethod
    def settings_for_rank(cls, rank: int, max_rank: int) -> dict[str, Any]:
        """The ``inject`` settings that give ``rank`` (the equal-budget resolver's choice)."""
        return {"rank": rank}

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def frozen_weight(self) -> torch.Tensor:
        """W0 as the layer computes with it, fp32 ``(d_out, d_in)``, also while merged."""
        if self.merged:
            return (self.base.weight - self.delta_weight()).detach().float()
        return self.base.weight.detach().float()

    @torch.no_grad()
    def merge(self) -> None:
        """W0 ← W0 + ΔW. Afterwards ``forward`` is the plain base layer. Idempotent."""
        if self.merged:
            return
        weight = self.base.weight
        weight.add_(self.delta_weight().to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge``: W0 ← W0 − ΔW. Idempotent."""
        if not self.merged:
            return
        weight = self.base.weight
        weight.sub_(self.delta_weight().to(weight.dtype))
        self.merged = False

    def training_state(self) -> dict[str, Any]:
        """What training carries from step to step beyond parameters and persistent buffers
        (AdaLoRA's importance averages); checkpoints keep it so a resumed run continues exactly."""
        return {}

    def load_training_state(self, state: dict[str, Any]) -> None:
        """Restore what ``training_state`` returned."""

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if not name.startswith("base.")]

    def extra_loss(self) -> torch.Tensor | None:
        """A term added to the training loss (e.g. a regulariser), or None."""
        return None

    def extra_repr(self) -> str:
        return f"merged={self.merged}"


class ParameterSubset(Variant):
    """A baseline that adds no modules: it fine-tunes the parameters ``select`` returns."""

    @classmethod
    def select(cls, model: nn.Module, targets: Targets | None, **settings: Any) -> list[nn.Parameter]:
        """The parameters that train."""
        raise NotImplementedError

    @classmethod
    def inject(
        cls, model: nn.Module, targets: Targets | None, rank: int | None, alpha: float | None,
        exclude: Sequence[str], **settings: Any,
    ) -> list[str]:
        """Check the settings and that they select something; the model is not changed
        (``inject_adapters`` records them, ``mark_trainable`` applies them)."""
        if not cls.select(model, targets, **settings):
            raise ConfigError(f"variant={cls.variant_name!r} selects no parameter of this model")
        return []

    @classmethod
    def trainable_parameters(cls, model: nn.Module, layers: Mapping[str, AdapterLayer]) -> list[nn.Parameter]:
        config = adapter_config(model)
        return cls.select(model, config["targets"], **config["variant_kwargs"])


VARIANTS: dict[str, type[Variant]] = {}


def register_variant(name: str) -> Callable[[type[Variant]], type[Variant]]:
    """Class decorator: make a variant selectable as ``variant=<name>``."""

    def add(cls: type[Variant]) -> type[Variant]:
        if name in VARIANTS:
            raise ValueError(f"variant {name!r} is registered twice")
        cls.variant_name = name
        VARIANTS[name] = cls
        return cls

    return add


def get_variant(name: str) -> type[Variant]:
    try:
        return VARIANTS[name]
    except KeyError:
        raise ConfigError(
            f"variant={name!r} is not a known variant; allowed: {', '.join(sorted(VARIANTS))}"
        ) from None
