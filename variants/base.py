"""The variant contract, and the registry that names variants.

A variant is a fine-tuning method, and one instance of it belongs to one model. It is built once
from the run's settings (``variant.*``), checks them once, and holds what is model-wide:
AdaLoRA's budget schedule, staged training's phases, QLoRA's quantization settings, LoRA+'s rate
ratio. Layers hold only per-layer math. The trainer reaches the method through the model's
variant, ``variant_of(model).on_train_begin(model, …)`` and the rest, so it never asks which
variant it runs; a model that carries none has a ``NoVariant``, whose hooks do nothing.

Two kinds:

* ``AdapterVariant`` wraps frozen base ``nn.Linear`` layers (weight W0: ``(d_out, d_in)``) in
  ``AdapterLayer``s that add a learned update: LoRA and its kin. Per layer:

  - ``forward(x)``: ``(..., d_in) -> (..., d_out)``, the adapted layer.
  - ``delta_weight()``: ΔW, ``(d_out, d_in)``, scaling included, so that the adapted layer
    equals ``x @ (W0 + ΔW).T + bias``.
  - ``merge()`` / ``unmerge()``: fold ΔW into the base weight for inference and take it out.
  - ``adapter_parameters()``: the parameters the layer adds (the base's are not among them).

* ``ParameterSubset`` adds nothing and trains some of the model's own parameters: the baselines
  (full fine-tuning, BitFit, the task head alone).

The hooks of a variant, in the order a run meets them (all but ``inject`` and
``trainable_parameters`` default to nothing):

    inject, trainable_parameters      apply the method; say what trains
    check_total_steps                 refuse settings that do not fit the run's length
    knowledge_source                  texts outside the task that initialize reads (CorDA's KPM)
    initialize                        data-driven initialisation, once, before the first step
    on_train_begin                    reset schedules
    learning_rate, learning_rate_scale   the peak rate of each optimizer, and per parameter
    adapter_loss                      a term for the training loss
    transform_gradients               after backward, before the optimizer step
    after_optimizer_step              schedules, rank allocation, phases
    training_state, load_training_state   what a checkpoint must carry to resume exactly
    state_to_save, report             what a saved run carries; facts for its summary
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from schema import ConfigError, add_variant, problems

from .targets import Targets, find_target_modules, replace_module

VARIANT_ATTRIBUTE = "_variant"  # the model's variant instance, set by inject_adapters


def variant_of(model: nn.Module) -> Variant:
    """The variant ``inject_adapters`` applied to ``model``; a ``NoVariant`` (hooks that do
    nothing) before it ran and after ``merge_and_unwrap``."""
    variant = getattr(model, VARIANT_ATTRIBUTE, None)
    return NoVariant() if variant is None else variant


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself, or, for a parameter or gradient sharded by FSDP (a DTensor), the whole
    tensor gathered from every process: a collective, which every process must reach in the
    same order. Hooks that need a whole matrix outside the forward pass go through it."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def shard_like(value: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """A whole ``value`` (the same on every process) laid out as ``reference``: ``value`` itself,
    or, where ``reference`` is FSDP's shard, this process's part of it (no communication)."""
    if isinstance(reference, DTensor):
        return distribute_tensor(value, reference.device_mesh, reference.placements, src_data_rank=None)
    return value


def adapter_config(model: nn.Module) -> dict[str, Any]:
    """What the model's variant was built with, as saved with an adapter; {} before it ran."""
    return variant_of(model).config()


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Random draws from ``seed`` inside; every random stream (the CPU's and each CUDA device's)
    is as it was afterwards, so a method's seeded start does not reseed the run."""
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []):
        torch.manual_seed(seed)
        yield


@dataclass
class InitData:
    """What a data-driven initialisation may use: the run's training batches (on the model's
    device, each one the process's share of a global batch), the task loss of a batch as
    training computes it (autocast included), and a mean over the processes of a data-parallel
    run (the identity in one process), so that every process reaches the same initialisation.
    Where the variant names texts outside the task (``Variant.knowledge_source``: CorDA's
    knowledge-preserved mode), ``knowledge`` is one pass over their batches, batched and placed as
    the training batches; else None."""

    batches: Iterator[dict[str, torch.Tensor]]
    loss: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]
    mean_over_processes: Callable[[torch.Tensor], torch.Tensor] = lambda tensor: tensor
    knowledge: Iterator[dict[str, torch.Tensor]] | None = None


@dataclasses.dataclass
class NoSettings:
    """No settings of its own."""


class Variant:
    """A fine-tuning method applied to one model. Its settings are a dataclass of ``knob``
    fields (``Settings``: each one's type, default, doc and allowed values, checked by ``create``);
    ``__init__`` takes them as keyword arguments, already checked."""

    name: ClassVar[str] = ""
    Settings: ClassVar[type] = NoSettings
    # The optimizer the method's paper trained with; the trainer takes it on CUDA when
    # trainer.optimizer=auto (QLoRA: bitsandbytes' paged AdamW).
    paper_optimizer: ClassVar[str] = "adamw"
    # Where an analysis's number for this variant does not mean what it means for LoRA:
    # {analysis script name: why}; the script prints it beside its results.
    analysis_caveats: ClassVar[dict[str, str]] = {}

    rank: int | None = None
    alpha: float | None = None
    started_from_file = False  # init_adapters_from loaded the adapters: no data-driven start

    @classmethod
    def create(cls, rank: int | None = None, alpha: float | None = None, **settings: Any) -> Variant:
        """The variant for ``settings`` (the ``variant.*`` keys of a run, without the runner's),
        checked against its ``Settings``: an unknown key or a refused value is a ``ConfigError``
        in one line; what is not given takes the ``Settings`` default."""
        allowed = cls.setting_names()
        unknown = sorted(set(settings) - set(allowed))
        if unknown:
            raise ConfigError(f"variant.{unknown[0]} is not a setting of variant={cls.name!r}; allowed: "
                              f"{', '.join(allowed) or 'none'}")
        chosen = cls.Settings(**settings)
        if found := problems(chosen, "variant"):
            raise ConfigError("; ".join(found))
        variant = cls._construct(rank, alpha, dataclasses.asdict(chosen))
        variant.settings = dict(settings)
        variant.targets, variant.exclude, variant.modules = None, [], []
        return variant

    @classmethod
    def _construct(cls, rank: int | None, alpha: float | None, settings: dict[str, Any]) -> Variant:
        return cls(**settings)

    @classmethod
    def setting_names(cls) -> list[str]:
        """The method's own settings (``rank`` and ``alpha`` are the run's)."""
        return [f.name for f in dataclasses.fields(cls.Settings)]

    @classmethod
    def setting_defaults(cls) -> dict[str, Any]:
        """The default of every setting."""
        return dataclasses.asdict(cls.Settings())

    def config(self) -> dict[str, Any]:
        """What rebuilds this variant on a fresh model: saved as an adapter file's metadata."""
        targets = self.targets
        return {
            "variant": self.name,
            "rank": self.rank if self.modules else None,  # a method that adapts no module has no rank
            "alpha": self.alpha if self.modules else None,
            "targets": targets if isinstance(targets, str) or targets is None else list(targets),
            "modules": list(self.modules),
            "exclude": list(self.exclude),
            "variant_kwargs": dict(self.settings),
        }

    # ---------------------------------------------------------------- applying the method

    def inject(self, model: nn.Module, targets: Targets | None, exclude: Sequence[str]) -> list[str]:
        """Apply the method to ``model`` in place; returns the names of the modules it adapted.
        Checks everything first, so a bad argument leaves the model untouched."""
        raise NotImplementedError

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """What the method trains; ``mark_trainable`` adds the task head and chosen biases."""
        raise NotImplementedError

    @classmethod
    def low_rank_factors(cls, state: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(down ``(r, d_in)``, up ``(d_out, r)``) from one layer's saved tensors (keys without the
        module prefix): the factors whose row / column spaces the subspace analyses compare."""
        raise NotImplementedError(f"variant {cls.name!r} has no low-rank factors")

    # ---------------------------------------------------------------- training hooks

    def check_total_steps(self, total_steps: int) -> None:
        """Raise ``ConfigError`` for settings that do not fit a run of ``total_steps`` (a schedule
        longer than training). Runners call it before writing anything."""

    def initialize(self, model: nn.Module, data: InitData) -> dict[str, Any]:
        """Data-driven initialisation before the first step of a fresh run (never on resume: the
        checkpoint holds its result; nor when ``started_from_file``: it would overwrite what was
        loaded). May run forward and backward passes over ``data.batches``;
        must leave every ``.grad`` as it found it. Returns facts for the run's summary."""
        return {}

    def knowledge_source(self) -> str | None:
        """Where the texts outside the task come from that ``initialize`` reads as ``InitData.knowledge``
        (a source ``training/knowledge.py`` reads); None, the default: the method reads none."""
        return None

    def on_train_begin(self, model: nn.Module, total_steps: int) -> None:
        """Called once before the first step of a fresh run (after ``initialize``, and after
        ``check_total_steps``, which the caller runs first): reset schedules."""

    def learning_rate(self, lr: float) -> float:
        """The peak rate of the optimizer the trainer is about to build, given the configured
        ``lr``. The trainer builds a new optimizer whenever the set of trainable parameters
        changes (staged training's switch), and asks again then."""
        return lr

    def learning_rate_scale(self, name: str, parameter: nn.Parameter) -> float:
        """The factor on the peak rate for one trainable parameter (full name): parameters with
        different factors go to different optimizer groups (LoRA+: B trains λ times faster)."""
        return 1.0

    def adapter_loss(self, model: nn.Module) -> torch.Tensor | None:
        """A term added to the training loss, or None."""
        return None

    def transform_gradients(self, model: nn.Module, optimizer: torch.optim.Optimizer, lr: float) -> dict[str, float]:
        """After backward and clipping (the gradients averaged over processes), before the
        optimizer step: rewrite the gradients of what trains. ``optimizer`` is the one about to step (its
        state may be read, or rewritten where the method says so); ``lr`` its current rate.
        Returns metrics to log."""
        return {}

    def after_optimizer_step(self, model: nn.Module, step: int, total_steps: int) -> dict[str, float]:
        """Called once per optimizer step (``step`` counts from 1). Gradients of this step are
        still populated (the trainer zeroes them afterwards), so gradient-based statistics can
        be accumulated here. Returns metrics to log."""
        return {}

    def fit_to_saved(self, model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
        """Before saved adapter tensors (an adapter file, a checkpoint) are loaded into ``model``:
        reshape what the method shaped from data (EVA's per-layer ranks) to fit them."""

    def training_state(self) -> dict[str, Any]:
        """What the method carries from step to step beyond tensors of the model (staged
        training's phase); checkpoints keep it so a resumed run continues exactly."""
        return {}

    def load_training_state(self, model: nn.Module, state: dict[str, Any]) -> None:
        """Restore what ``training_state`` returned."""

    def state_to_save(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Tensors beyond the adapter layers' own and the trainable parameters that a saved
        run must carry to reproduce the model (staged training: the fully fine-tuned weights)."""
        return {}

    def report(self, model: nn.Module) -> dict[str, Any]:
        """JSON-serialisable facts about the trained model worth keeping with the run."""
        return {}

    def peft_export(self, model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
        """The method in peft's file format under its own peft type, where peft has one besides
        LoRA: (the config's method fields, ``peft_type`` included; the adapter tensors by name in
        ``model``, as peft's state dict names them). None: written as a LoRA (``as_lora``), or refused."""
        return None


class NoVariant(Variant):
    """The variant of a model that carries none: every hook is ``Variant``'s default, which does
    nothing, it trains nothing itself and has no config. ``variant_of`` returns one, so that a
    caller runs a model's hooks without asking whether it has a variant."""

    def __init__(self) -> None:
        self.settings, self.targets, self.exclude, self.modules = {}, None, [], []

    def config(self) -> dict[str, Any]:
        return {}

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return []


def adapter_dtype(base: nn.Linear) -> torch.dtype:
    """The dtype adapter parameters train in: fp32 over a bf16, fp16 or quantized base (low-
    precision master weights would round away small updates; peft casts its adapters the same
    way), else the base's own (fp32, fp64)."""
    dtype = base.weight.dtype
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


class AdapterLayer(nn.Module):
    """A frozen ``nn.Linear`` and a learned update to it: per-layer math only.

    Subclasses define ``forward`` and ``delta_weight``. The default merge adds ``delta_weight()``
    to the base weight and unmerge subtracts it, which is right whenever ΔW does not depend on
    W0; a layer whose ΔW does (DoRA's normalisation) or whose base is not a plain weight
    (QLoRA) overrides ``_merge`` / ``_unmerge``. ``merge`` and ``unmerge`` are idempotent.
    """

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"{type(self).__name__} wraps nn.Linear, got {type(base).__name__}")
        self.base = base
        self.base.weight.requires_grad_(False)
        self.merged = False
        self.active = True  # False: the layer is its base layer (staged training's full phase)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def as_lora(self) -> dict[str, torch.Tensor | float]:
        """The layer as a LoRA in peft's terms, on an unmodified frozen layer: ``lora_A`` ``(k, d_in)``,
        ``lora_B`` ``(d_out, k)`` and ``scaling`` with ΔW = scaling·B·A (DoRA adds its magnitude).
        A method whose update is no LoRA (or whose base is not the original weight) raises."""
        raise NotImplementedError(f"{type(self).__name__} has no equivalent LoRA in peft's format")

    def frozen_weight(self) -> torch.Tensor:
        """W0 as the layer computes with it, fp32 ``(d_out, d_in)``, also while merged."""
        if self.merged:
            return (self.base.weight - self.delta_weight()).detach().float()
        return self.base.weight.detach().float()

    @torch.no_grad()
    def merge(self) -> None:
        """W0 ← W0 + ΔW. Afterwards ``forward`` is the plain base layer."""
        if not self.merged:
            self._merge()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge``: W0 ← W0 − ΔW."""
        if self.merged:
            self._unmerge()
            self.merged = False

    def _merge(self) -> None:
        self.base.weight.add_(self.delta_weight().to(self.base.weight.dtype))

    def _unmerge(self) -> None:
        self.base.weight.sub_(self.delta_weight().to(self.base.weight.dtype))

    def training_state(self) -> dict[str, Any]:
        """What training carries from step to step beyond parameters and persistent buffers
        (AdaLoRA's importance averages); checkpoints keep it so a resumed run continues exactly."""
        return {}

    def load_training_state(self, state: dict[str, Any]) -> None:
        """Restore what ``training_state`` returned."""

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if not name.startswith("base.")]

    def extra_repr(self) -> str:
        return f"merged={self.merged}" + ("" if self.active else ", active=False")


def layers_of(model: nn.Module) -> dict[str, AdapterLayer]:
    """Every adapter layer in ``model``, by module name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, AdapterLayer)}


class AdapterVariant(Variant):
    """A method that wraps the targeted linear layers in adapter layers of rank ``rank``,
    scaled by ``alpha``. Subclasses check their settings in ``__init__`` (after calling this
    one) and build one layer in ``new_layer``."""

    def __init__(self, rank: int, alpha: float) -> None:
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
            raise ConfigError(f"alpha={alpha!r} must be a number > 0")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ConfigError(f"rank={rank!r} must be an integer in [1, min(d_in, d_out)] of the targeted layers")
        self.rank, self.alpha = rank, alpha

    @classmethod
    def _construct(cls, rank: int | None, alpha: float | None, settings: dict[str, Any]) -> Variant:
        return cls(rank=rank, alpha=alpha, **settings)

    def new_layer(self, base: nn.Linear) -> AdapterLayer:
        """The adapter layer around one frozen ``base`` layer."""
        raise NotImplementedError

    def inject(self, model: nn.Module, targets: Targets | None, exclude: Sequence[str]) -> list[str]:
        """Wrap each linear layer that ``targets`` selects (never one in ``exclude``, the task
        head) with ``new_layer``, after ``prepare_model``."""
        if targets is None:
            raise ConfigError(f"variant={self.name!r} needs variant.targets (the layers to adapt)")
        names = find_target_modules(model, targets, exclude)
        modules = dict(model.named_modules())
        max_rank = self.largest_rank([(modules[n].in_features, modules[n].out_features) for n in names])
        if max_rank is not None and self.rank > max_rank:
            raise ConfigError(f"rank={self.rank!r} must be an integer in [1, {max_rank}] "
                              "(min(d_in, d_out) over the targeted layers)")
        self.prepare_model(model, names, exclude)
        for name in names:
            replace_module(model, name, self.new_layer(model.get_submodule(name)))
        return names

    def prepare_model(self, model: nn.Module, targets: Sequence[str], exclude: Sequence[str]) -> None:
        """Called by ``inject`` before the ``targets`` are wrapped: what the method changes in
        the rest of the model (QLoRA quantizes every other linear layer except ``exclude``)."""

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return [p for layer in layers_of(model).values() for p in layer.adapter_parameters()]

    @classmethod
    def largest_rank(cls, shapes: Sequence[tuple[int, int]]) -> int | None:
        """The largest rank the method takes on layers of these ``(d_in, d_out)`` shapes: min(d_in,
        d_out) over them (past it B·A has no more directions); None: no bound (VeRA's r)."""
        return min(min(shape) for shape in shapes)

    @classmethod
    def parameters_at_rank(cls, in_features: int, out_features: int, rank: int) -> int:
        """Parameters one adapted (d_in, d_out) layer trains at ``rank``: A (r, d_in) and B (d_out, r)."""
        return rank * (in_features + out_features)

    @classmethod
    def settings_for_rank(cls, rank: int, max_rank: int | None) -> dict[str, Any]:
        """The settings that give ``rank`` (the equal-budget resolver's choice); ``max_rank``:
        ``largest_rank`` of the targeted layers."""
        return {"rank": rank}


class ParameterSubset(Variant):
    """A baseline that adds no modules: it fine-tunes the parameters ``select`` returns."""

    def select(self, model: nn.Module, targets: Targets | None) -> list[nn.Parameter]:
        """The parameters that train."""
        raise NotImplementedError

    def inject(self, model: nn.Module, targets: Targets | None, exclude: Sequence[str]) -> list[str]:
        """Check that the settings select something; the model is not changed
        (``mark_trainable`` applies the selection)."""
        if not self.select(model, targets):
            raise ConfigError(f"variant={self.name!r} selects no parameter of this model")
        return []

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return self.select(model, self.targets)


VARIANTS: dict[str, type[Variant]] = {}


def register_variant(name: str) -> Callable[[type[Variant]], type[Variant]]:
    """Class decorator: make a variant selectable as ``variant=<name>``."""

    def add(cls: type[Variant]) -> type[Variant]:
        if name in VARIANTS:
            raise ValueError(f"variant {name!r} is registered twice")
        cls.name = name
        VARIANTS[name] = cls
        add_variant(name, cls.Settings)  # conf/variant/<name>.yaml builds on it
        return cls

    return add


def get_variant(name: str) -> type[Variant]:
    try:
        return VARIANTS[name]
    except KeyError:
        raise ConfigError(
            f"variant={name!r} is not a known variant; allowed: {', '.join(sorted(VARIANTS))}"
        ) from None
