"""The adapter contract every variant implements, and the registry that names them.

An adapter layer wraps one frozen base ``nn.Linear`` (weight W0: ``(d_out, d_in)``) and adds a
learned update. Everything the trainer needs goes through this class, so the trainer never asks
which variant it is running:

* ``forward(x)``: ``(..., d_in) -> (..., d_out)``, the adapted layer.
* ``delta_weight()``: ΔW, ``(d_out, d_in)``, scaling included, so that the adapted layer equals
  ``x @ (W0 + ΔW).T + bias``.
* ``merge()`` / ``unmerge()``: fold ΔW into the base weight for inference and take it out again.
* ``adapter_parameters()``: the parameters the variant adds (the base's are not among them).
* ``prepare_model(...)``: changes to the rest of the model (QLoRA quantizes it).
* ``extra_loss()``, ``check_total_steps(...)``, ``on_train_begin(...)``,
  ``after_optimizer_step(...)`` and ``learning_rate(...)``: training hooks (regularisers, rank
  allocation, schedules, phases); ``state_to_save(...)``: what a saved adapter must carry
  besides the adapter; ``report(...)``: facts for the run's summary (a rank allocation, the
  storage of a quantized base). All default to nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn


class ConfigError(ValueError):
    """A user's configuration mistake; the message names the key and the allowed values."""


class AdapterLayer(nn.Module):
    """Base class for adapter variants wrapping a frozen ``nn.Linear``.

    Subclasses define ``forward`` and ``delta_weight``. The default ``merge``/``unmerge`` add and
    subtract ``delta_weight()``, which is right whenever ΔW does not depend on W0; a variant whose
    ΔW does (DoRA's normalisation) overrides them.
    """

    variant_name: ClassVar[str] = ""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"{type(self).__name__} wraps nn.Linear, got {type(base).__name__}")
        self.base = base
        self.base.weight.requires_grad_(False)
        self.merged = False

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

    @classmethod
    def low_rank_factors(cls, state: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(down ``(r, d_in)``, up ``(d_out, r)``) from one layer's saved tensors (keys without the
        module prefix): the factors whose row / column spaces the subspace analyses compare."""
        raise NotImplementedError(f"variant {cls.variant_name!r} has no low-rank factors")

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

    @classmethod
    def prepare_model(
        cls, model: nn.Module, targets: Sequence[str], exclude: Sequence[str], **variant_kwargs: Any
    ) -> None:
        """Called by ``inject_adapters`` before the ``targets`` are wrapped, with the layer
        constructor's keyword arguments: what the variant changes in the rest of the model
        (QLoRA quantizes every other linear layer except ``exclude``, the task head)."""

    # The class-level hooks receive the model and every layer of their class in it, by module name,
    # so a variant can make model-wide decisions such as a global rank budget.

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
    def learning_rate(cls, layers: Mapping[str, AdapterLayer], lr: float) -> float:
        """The peak learning rate for the optimizer the trainer is about to build, given the
        configured ``lr``. The trainer builds a new optimizer whenever the set of trainable
        parameters changes (staged training's switch), and asks again then."""
        return lr

    @classmethod
    def state_to_save(cls, model: nn.Module, layers: Mapping[str, AdapterLayer]) -> dict[str, torch.Tensor]:
        """Tensors beyond the adapter layers' own and the trainable parameters that a saved
        adapter must carry to reproduce the model (staged training: the fully fine-tuned weights)."""
        return {}

    @classmethod
    def report(cls, model: nn.Module, layers: Mapping[str, AdapterLayer]) -> dict[str, Any]:
        """JSON-serialisable facts about the trained model worth keeping with the run."""
        return {}

    def extra_repr(self) -> str:
        return f"merged={self.merged}"


VARIANTS: dict[str, type[AdapterLayer]] = {}


def register_variant(name: str) -> Callable[[type[AdapterLayer]], type[AdapterLayer]]:
    """Class decorator: make a variant selectable as ``variant=<name>``."""

    def add(cls: type[AdapterLayer]) -> type[AdapterLayer]:
        if name in VARIANTS:
            raise ValueError(f"variant {name!r} is registered twice")
        cls.variant_name = name
        VARIANTS[name] = cls
        return cls

    return add


def get_variant(name: str) -> type[AdapterLayer]:
    try:
        return VARIANTS[name]
    except KeyError:
        raise ConfigError(
            f"variant={name!r} is not a known variant; allowed: {', '.join(sorted(VARIANTS))}"
        ) from None
