"""Fine-tuning variants behind one interface, and the helpers to use them in any training loop.

    import variants
    names = variants.inject_adapters(model, "lora", ["query", "value"], rank=8, alpha=16)
    # or a baseline, which selects what trains: variants.inject_adapters(model, "bitfit")
    variants.mark_trainable(model, train_modules=["classifier"])
    variants.on_train_begin(model, total_steps)
    ...  # your loop: loss = task_loss + (variants.adapter_loss(model) or 0); loss.backward()
    ...  #            variants.transform_gradients(model, optimizer, lr)
    ...  #            optimizer.step(); variants.after_optimizer_step(model, step, total_steps)
    variants.save_adapter(model, "adapter.safetensors")   # what trained, and how to rebuild it
"""

# importing a variant's module registers it
from . import adalora, bitfit, dora, eva, full, head, lora, lora_ga, lora_pro, milora, pissa, qlora, staged  # noqa: F401
from .base import (
    VARIANTS,
    AdapterLayer,
    AdapterVariant,
    ConfigError,
    InitData,
    ParameterSubset,
    Variant,
    adapter_config,
    get_variant,
    layers_of,
    register_variant,
    variant_of,
)
from .adalora import AdaLoRA, AdaLoRALinear
from .bitfit import BitFit
from .dora import DoRA, DoRALinear
from .eva import EVA, EVALinear
from .full import FullFineTuning
from .head import HeadOnly
from .lora import LoRA, LoRALinear
from .lora_ga import LoRAGA
from .offset import OffsetLoRALinear
from .lora_pro import LoRAPro
from .milora import MiLoRA
from .pissa import PiSSA
from .qlora import QLoRA, QLoRALinear
from .staged import Staged
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
    fit_to_saved,
    init_adapters_from,
    initialize,
    inject_adapters,
    learning_rate,
    learning_rate_scale,
    load_adapter,
    load_training_state,
    mark_trainable,
    merge_adapters,
    merge_and_unwrap,
    on_train_begin,
    preferred_optimizer,
    read_adapter_config,
    save_adapter,
    training_state,
    transform_gradients,
    unmerge_adapters,
)

__all__ = [
    "AdapterLayer",
    "AdapterVariant",
    "BIAS_MODES",
    "ConfigError",
    "InitData",
    "ParameterSubset",
    "VARIANTS",
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
    "fit_to_saved",
    "get_variant",
    "init_adapters_from",
    "initialize",
    "inject_adapters",
    "layers_of",
    "learning_rate",
    "learning_rate_scale",
    "load_adapter",
    "load_training_state",
    "mark_trainable",
    "merge_adapters",
    "merge_and_unwrap",
    "on_train_begin",
    "preferred_optimizer",
    "read_adapter_config",
    "register_variant",
    "save_adapter",
    "training_state",
    "transform_gradients",
    "unmerge_adapters",
    "variant_of",
]
