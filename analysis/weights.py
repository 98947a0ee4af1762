"""What a run changed in the pretrained weights: per linear layer of the backbone, the weight
before training (W0, from the base checkpoint) and after (W, the run's model with its adapter
merged in). Shared by intruders.py, spectrum.py and alignment.py.

Every run dir holds what its method trained (adapters: their factors; full, staged, BitFit: the
weights they changed), so W = W0 + ΔW for any variant, with ΔW the whole change from the
pretrained weight: staged's full phase and LoRA phase together; PiSSA's offset form, its
s·(B·A − B₀·A₀); DoRA's, its magnitude rescaling. The task head is new (no W0) and left out, as
are layers the run did not change. A quantized base (QLoRA) is compared with its dequantized
weight, the W0 it trained on, so the 4-bit rounding does not count as learned; its layers without
an adapter stay quantized and unchanged.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

import variants
from schema import ConfigError
from training import rundir

WHICH = {"last": rundir.ADAPTER, "best": rundir.ADAPTER_BEST}


def adapter_file(run_dir: Path, which: str = "last") -> Path:
    """The run's adapter file: ``last`` (the end of training) or ``best`` (the best validation
    evaluation, ``trainer.keep_best``)."""
    path = run_dir / WHICH[which]
    if not path.is_file():
        raise ConfigError(f"{run_dir} has no {path.name} (is it a finished run dir{', with trainer.keep_best' if which == 'best' else ''}?)")
    return path


def backbone_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` layers of the model outside its task head (``variants.task_head``)."""
    head = variants.task_head(model)
    return {name: module for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and not variants.within(name, head)}


_BASES: dict[str, dict[str, torch.Tensor]] = {}  # W0 per base model, loaded once per process


def _base_weights(model_key: str, adapter_path: str) -> dict[str, torch.Tensor]:
    """W0 of every backbone linear layer, fp64, once per base model (``model_key``: the file's
    model, type, dtype, GGUF file and kept layers; runs of one model share it)."""
    from training.models import load_base

    if model_key not in _BASES:
        model, _ = load_base(adapter_path)
        _BASES[model_key] = {name: layer.weight.detach().double() for name, layer in backbone_linears(model).items()}
    return _BASES[model_key]


def weight_changes(run_dir: Path, modules: str | None = None, which: str = "last"
                   ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{layer name: (W0, W)}, fp64 ``(d_out, d_in)`` each, for every backbone linear layer the
    run changed whose name matches the regular expression ``modules`` (all if None)."""
    from training.models import load_trained

    path = adapter_file(run_dir, which)
    config = variants.read_adapter_config(path)
    model_key = repr([config.get(k) for k in ("model", "model_type", "model_dtype", "gguf_file", "keep_layers")])
    before = _base_weights(model_key, str(path))
    model, _ = load_trained(path)
    rounded = {name: layer.frozen_weight().double() for name, layer in variants.layers_of(model).items()
               if _quantized(layer.base)}  # the dequantized 4-bit base: what the adapter trained on
    variants.merge_and_unwrap(model)
    changes = {}
    for name, layer in backbone_linears(model).items():
        if (modules and not re.search(modules, name)) or _quantized(layer) or name not in before:
            continue
        start, after = rounded.get(name, before[name]), layer.weight.detach().double()
        if not torch.equal(after, start):
            changes[name] = (start, after)
    return changes


def _quantized(layer: nn.Module) -> bool:
    """A bitsandbytes layer (its weight is packed), told without importing bitsandbytes."""
    return any(cls.__module__.startswith("bitsandbytes") for cls in type(layer).__mro__)


def run_labels(run_dirs: list[Path]) -> list[str]:
    """Each run's dir name, or parent/name where two runs share a name (r8_s0 of two sweeps)."""
    names = [run_dir.name for run_dir in run_dirs]
    return [f"{run_dir.parent.name}/{name}" if names.count(name) > 1 else name
            for run_dir, name in zip(run_dirs, names)]
