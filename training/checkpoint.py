"""Training checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint holds the trained tensors (``variants.adapter_state_dict``: adapters, trainable
weights, what a variant must save), which parameters train, each adapter layer's training
state (AdaLoRA's importance averages), optimizer and scheduler state, the RNG states, the data
position (the shuffling generator's state at the start of the epoch and the batch index in it)
and the trainer's running sums and history. It is written to a temporary file and renamed,
so a kill during the write leaves the previous checkpoint intact. Loading uses
``torch.load(weights_only=True)``: tensors and plain containers only, no code.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import variants

FILE_NAME = "checkpoint.pt"


def rng_state() -> dict[str, Any]:
    numpy_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].copy()), *numpy_state[2:]],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    version, *rest = state["python"]
    random.setstate((version, tuple(rest[0]), rest[1]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))


def model_state(model: nn.Module) -> dict[str, Any]:
    return {
        "tensors": variants.adapter_state_dict(model),
        "trainable": [name for name, p in model.named_parameters() if p.requires_grad],
        "layers": {name: layer.training_state() for name, layer in variants.adapter_layers(model)},
    }


@torch.no_grad()
def load_model_state(model: nn.Module, state: dict[str, Any]) -> None:
    own = model.state_dict(keep_vars=True)
    for name, tensor in state["tensors"].items():
        own[name].copy_(tensor)
    trainable = set(state["trainable"])
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)
    layers = dict(variants.adapter_layers(model))
    for name, layer_state in state["layers"].items():
        layers[name].load_training_state(layer_state)


def save(path: Path, state: dict[str, Any]) -> None:
    """Write then rename: the file at ``path`` is always a complete checkpoint."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)
