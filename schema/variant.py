"""The keys every variant's config group has beside the method's own settings.

A variant's settings are a dataclass of ``knob`` fields in its own file (``Settings``, read like
the paper's hyperparameters); ``node`` adds the keys the runner consumes, which make the node of
``conf/variant/<name>.yaml``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .fields import knob

BIAS_MODES = ("none", "all", "lora_only")


@dataclasses.dataclass
class VariantKeys:
    name: str = knob("lora", "the variant (conf/variant/<name>.yaml)")
    targets: Any = knob(None, "the layers to adapt: a list of module names, a regex over full names, or all-linear "
                        "(every linear layer but the head)")
    bias: str = knob("none", "biases that train too: none | all | lora_only (those of the adapted layers)",
                     choices=BIAS_MODES)
    lr: float | None = knob(None, "the variant's own peak learning rate (trainer.lr overrides it)", within="> 0")


def node(name: str, settings: type) -> type:
    """The config node of variant ``name``: the runner's keys and the method's ``settings``."""
    return dataclasses.make_dataclass(
        f"{settings.__name__}Node", [("name", str, knob(name, "the variant (conf/variant/<name>.yaml)"))],
        bases=(settings, VariantKeys))
