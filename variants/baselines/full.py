"""Full fine-tuning (FT): every parameter trains, W ← W − η·∇_W L for all W. The first row of
the LoRA paper's Table 2 and the reference every parameter-efficient method is measured against.

With ``train_embeddings=False`` the embedding tables (every ``nn.Embedding``) stay frozen: on a
small model they are a large share of the parameters (MiniLM-L6: 11.9M of 22.7M), and freezing
them is a common variant of FT that keeps the vocabulary's pretrained geometry.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from schema import knob

from ..base import ParameterSubset, register_variant
from ..targets import Targets


@dataclass
class FullFineTuningSettings:
    """Full fine-tuning's one setting: whether the embedding tables train too."""

    train_embeddings: bool = knob(True, "false: every nn.Embedding stays frozen (MiniLM-L6: 11.9M of its 22.7M "
                                  "parameters), keeping the vocabulary's pretrained geometry")


@register_variant("full")
class FullFineTuning(ParameterSubset):
    """Every parameter of the model, optionally without the embedding tables. Settings: ``FullFineTuningSettings``."""

    Settings = FullFineTuningSettings

    def __init__(self, *, train_embeddings: bool) -> None:
        self.train_embeddings = train_embeddings

    def select(self, model: nn.Module, targets: Targets | None) -> list[nn.Parameter]:
        frozen = set()
        if not self.train_embeddings:
            frozen = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
        return [p for p in model.parameters() if id(p) not in frozen]
