"""Adapters written in peft's file format, so tools that read peft adapters can serve them.

peft's LoRA computes, per adapted module, h = W0·x + (lora_alpha/r)·B·A·x (DoRA: its Eq. 5 with
the magnitude ``lora_magnitude_vector``), with ``rank_pattern`` / ``alpha_pattern`` for the
modules whose r or α differ. Every layer that can say what it is as such a LoRA
(``AdapterLayer.as_lora``) is written that way, on the unmodified base weights:

* LoRA (also LoRA+, rsLoRA, LoRA-Pro, EVA): A, B and their scaling, as trained;
* PiSSA, MiLoRA, LoRA-GA: the rank-2r LoRA [A; A₀], [B, −B₀] of their update;
* AdaLoRA: A = Q, B = P·Λ at its rank r (pruned triplets are zero);
* DoRA: A, B and m.

The scaling goes into ``lora_alpha`` = scaling·r (``use_rslora`` stays false: α/√r is already in
it). A trained task head (the classifier) goes in ``modules_to_save``. QLoRA (trained on 4-bit
weights), the staged method and the baselines have no such adapter: ``ConfigError``.
The files are written here; peft itself is not needed (the tests load them with peft).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from schema import ConfigError

from ..base import adapter_config, layers_of, variant_of
from ..targets import task_head, within

PREFIX = "base_model.model."  # where peft's PeftModel keeps the model it wraps
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
TASK_TYPES = {"causal_lm": "CAUSAL_LM", "classification": "SEQ_CLS"}


def save_peft_adapter(model: nn.Module, folder: str | Path, task_type: str, base_model: str | None = None,
                      trained: list[str] | None = None) -> dict[str, Any]:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``folder`` for
    ``peft.PeftModel.from_pretrained(base, folder)``; returns the config. ``trained``: names of
    the parameters outside the adapter layers that training changed (default: those that
    require grad); they must lie in the task head. ``task_type``: ``causal_lm`` or
    ``classification``."""
    variant = adapter_config(model).get("variant")
    layers = layers_of(model)
    native = variant_of(model).peft_export(model)
    if native is not None:  # a method peft has under its own name (VeRA, HiRA, GraLoRA)
        config, tensors = native
        heads = _head_tensors(model, layers, trained)
        tensors = {**tensors, **heads}
        config = {**config, "task_type": _task_type(task_type), "base_model_name_or_path": base_model,
                  "modules_to_save": sorted({n.split(".")[0] for n in heads}) or None, "inference_mode": True}
        return _write(folder, config, {PREFIX + name: tensor for name, tensor in tensors.items()})
    if not layers:
        raise ConfigError(f"variant={variant!r} has no adapter layers; peft's LoRA format holds low-rank adapters")
    tensors, ranks, alphas, dora = {}, {}, {}, False
    for name, layer in layers.items():
        try:
            lora = layer.as_lora()
        except NotImplementedError as err:
            raise ConfigError(f"variant={variant!r}: {err}") from None
        if lora["lora_A"].shape[0] == 0:  # EVA gave this layer no rank: its update is 0, peft has no r = 0
            continue
        ranks[name], alphas[name] = lora["lora_A"].shape[0], float(lora["scaling"]) * lora["lora_A"].shape[0]
        tensors[f"{PREFIX}{name}.lora_A.weight"] = lora["lora_A"]
        tensors[f"{PREFIX}{name}.lora_B.weight"] = lora["lora_B"]
        if "lora_magnitude_vector" in lora:
            tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = lora["lora_magnitude_vector"]
            dora = True
    heads = _head_tensors(model, layers, trained)
    tensors.update({PREFIX + name: tensor for name, tensor in heads.items()})
    config = _config(model, ranks, alphas, dora, task_type, base_model, sorted({n.split(".")[0] for n in heads}))
    return _write(folder, config, tensors)


def _write(folder: str | Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: t.detach().float().contiguous().cpu() for k, t in tensors.items()}, str(folder / WEIGHTS_FILE))
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return config


def _task_type(task_type: str) -> str:
    if task_type not in TASK_TYPES:
        raise ConfigError(f"task_type={task_type!r}; allowed: {', '.join(TASK_TYPES)}")
    return TASK_TYPES[task_type]


def _head_tensors(model: nn.Module, layers: dict[str, nn.Module], trained: list[str] | None) -> dict[str, torch.Tensor]:
    """The trained parameters outside the adapter layers; each must be in the task head."""
    params = dict(model.named_parameters())
    if trained is None:
        trained = [n for n, p in params.items() if p.requires_grad and not within(n, layers)]
    heads = task_head(model)
    stray = [n for n in trained if not within(n, heads)]
    if stray:
        raise ConfigError(f"{stray[0]!r} trained outside the adapters and the task head {heads}; peft's format "
                          "here holds those two only (train with variant.bias=none)")
    return {n: params[n] for n in trained}


def _config(model: nn.Module, ranks: dict[str, int], alphas: dict[str, float], dora: bool, task_type: str,
            base_model: str | None, modules_to_save: list[str]) -> dict[str, Any]:
    """peft's ``LoraConfig`` fields: the commonest (r, α) as defaults, the other modules in the patterns."""
    (r, alpha), _ = Counter(zip(ranks.values(), alphas.values())).most_common(1)[0]
    dropout = next((m.dropout.p for m in layers_of(model).values() if isinstance(getattr(m, "dropout", None), nn.Dropout)), 0.0)
    return {
        "peft_type": "LORA",
        "task_type": _task_type(task_type),
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(ranks),
        "rank_pattern": {n: k for n, k in ranks.items() if k != r},
        "alpha_pattern": {n: a for n, a in alphas.items() if a != alpha},
        "use_dora": dora,
        "use_rslora": False,
        "lora_dropout": dropout,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": modules_to_save or None,
        "inference_mode": True,
    }
