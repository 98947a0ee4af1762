"""BitFit: Ben Zaken, Ravfogel and Goldberg 2021, "BitFit: Simple Parameter-efficient
Fine-tuning for Transformer-based Masked Language-models".

Only the bias terms train (§2): every b in h = W·x + b (query, key, value, attention output,
both feed-forward layers) and every LayerNorm shift β in γ ⊙ x̂ + β, with all W and γ frozen;
the task head trains as well. ``targets`` restricts the biases to those of the named modules:
the paper's §3.4 finds that b_q and b_m2 alone, ``[query, intermediate.dense]`` in BERT's
names, come close. A model without biases (LLaMA, SmolLM2) has nothing for it to train: refused.
"""

from __future__ import annotations

from torch import nn

from schema import ConfigError

from ..base import ParameterSubset, register_variant
from ..targets import Targets, matches, show


@register_variant("bitfit")
class BitFit(ParameterSubset):
    """The bias of every module, or of the modules ``targets`` names (None: all)."""

    def select(self, model: nn.Module, targets: Targets | None) -> list[nn.Parameter]:
        biases = {name: p for name, p in model.named_parameters() if name.rsplit(".", 1)[-1] == "bias"}
        if not biases:
            raise ConfigError(f"variant=bitfit: {type(model).__name__} has no bias terms to train (LLaMA's linear layers "
                              "and RMSNorms have none); allowed: a model with biases (BERT, RoBERTa, GPT-2, Qwen2)")
        if targets is None:
            return list(biases.values())
        if isinstance(targets, str):
            targets = [targets]
        chosen = [p for name, p in biases.items() if matches(name.rsplit(".", 1)[0], targets)]
        if not chosen:
            raise ConfigError(f"variant.targets={show(targets)} names no module with a bias; use null for every bias")
        return chosen
