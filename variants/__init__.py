"""Fine-tuning variants behind one interface, and the helpers to use them in any training loop.

    import variants
    names = variants.inject_adapters(model, "lora", ["query", "value"], rank=8, alpha=16)
    # or a baseline, which selects what trains: variants.inject_adapters(model, "bitfit")
    variants.mark_trainable(model, train_modules=["classifier"])
    variants.on_train_begin(model, total_steps)
    ...  # your loop: loss = task_loss + (variants.adapter_loss(model) or 0)
    ...  #            optimizer.step(); variants.after_optimizer_step(model, step, total_steps)
    variants.save_adapter(model, "adapter.safetensors")   # what trained, and how to rebuild it
"""

from . import adalora, bitfit, dora, full, head, lora, qlora, staged  # noqa: F401  (importing a variant registers it)
from .base import (
    VARIANTS,
    AdapterLayer,
    ConfigError,
    ParameterSubset,
    Variant,
    adapter_config,
    get_variant,
    register_variant,
)
from .adalora import AdaLoRALinear
from .bitfit import BitFit
from .dora import DoRALinear
from .full import FullFineTuning
from .head import HeadOnly
from .lora import LoRALinear
from .qlora import QLoRALinear
from .staged import StagedLoRALinear
from .targets import ALL_LINEAR, find_target_modules
from .model import (
    BIAS_MODES,
    adapter_layers,
    adapter_loss,
    adapter_report,
    adapter_state_dict,
    after_optimizer_step,
    check_total_steps,
    count_parameters,
    count_trainable_in,
    init_adapters_from,
    inject_adapters,
    learning_rate,
    load_adapter,
    mark_trainable,
    merge_adapters,
    merge_and_unwrap,
    on_train_begin,
    preferred_optimizer,
    read_adapter_config,
    save_adapter,
    unmerge_adapters,
)

__all__ = [
    "ALL_LINEAR",
    "BIAS_MODES",
    "VARIANTS",
    "AdaLoRALinear",
    "AdapterLayer",
    "BitFit",
    "ConfigError",
    "DoRALinear",
    "FullFineTuning",
    "HeadOnly",
    "LoRALinear",
    "ParameterSubset",
    "QLoRALinear",
    "StagedLoRALinear",
    "Variant",
    "adapter_config",
    "adapter_layers",
    "adapter_loss",
    "adapter_report",
    "adapter_state_dict",
    "after_optimizer_step",
    "check_total_steps",
    "count_parameters",
    "count_trainable_in",
    "find_target_modules",
    "get_variant",
    "init_adapters_from",
    "inject_adapters",
    "learning_rate",
    "load_adapter",
    "mark_trainable",
    "merge_adapters",
    "merge_and_unwrap",
    "on_train_begin",
    "preferred_optimizer",
    "read_adapter_config",
    "register_variant",
    "save_adapter",
    "unmerge_adapters",
]
