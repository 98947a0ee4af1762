"""Fine-tuning variants behind one interface, and the helpers to use them in any training loop.

    import variants
    names = variants.inject_adapters(model, "lora", ["query", "value"], rank=8, alpha=16)
    # or a baseline, which selects what trains: variants.inject_adapters(model, "bitfit")
    variants.mark_trainable(model, train_modules=["classifier"])
    method = variants.variant_of(model)   # a NoVariant, whose hooks do nothing, on a model without one
    method.check_total_steps(total_steps); method.on_train_begin(model, total_steps)
    ...  # your loop: loss = task_loss + (method.adapter_loss(model) or 0); loss.backward()
    ...  #            method.transform_gradients(model, optimizer, lr)
    ...  #            optimizer.step(); method.after_optimizer_step(model, step, total_steps)
    variants.save_adapter(model, "adapter.safetensors")   # what trained, and how to rebuild it

The layers: ``base`` (the contract: ``Variant``, ``AdapterVariant``, ``ParameterSubset``,
``AdapterLayer``, the registry), ``targets`` (which layers),
``inject`` (apply a variant at a rank or a parameter budget, choose what trains, merge), ``adapter_file`` (save and load what
trained), ``methods/`` (LoRA and its kin), ``baselines/`` (full, head, BitFit) and ``interop/``
(peft's file format, bitsandbytes' layers).
"""

from schema import ConfigError

from .adapter_file import (
    adapter_state_dict,
    init_adapters_from,
    load_adapter,
    load_training_state,
    read_adapter_config,
    save_adapter,
    training_state,
)
from .base import (
    VARIANTS,
    AdapterLayer,
    AdapterVariant,
    InitData,
    NoVariant,
    ParameterSubset,
    Variant,
    adapter_config,
    get_variant,
    layers_of,
    register_variant,
    shard_like,
    variant_of,
    whole,
)

# importing a variant's module registers it
from .baselines import BitFit, FullFineTuning, HeadOnly
from .inject import (
    BIAS_MODES,
    adapter_report,
    count_parameters,
    count_trainable_in,
    inject_adapters,
    mark_trainable,
    merge_adapters,
    merge_and_unwrap,
    rank_for_budget,
    unmerge_adapters,
)
from .methods import (
    EVA,
    AdaLoRA,
    AdaLoRALinear,
    DoRA,
    DoRALinear,
    EVALinear,
    LoRA,
    LoRAGA,
    LoRALinear,
    LoRAPro,
    MiLoRA,
    OffsetLoRALinear,
    PiSSA,
    QLoRA,
    QLoRALinear,
    Staged,
)
from .targets import ALL_LINEAR, find_target_modules, task_head, within

__all__ = [
    "ALL_LINEAR",
    "BIAS_MODES",
    "EVA",
    "VARIANTS",
    "AdaLoRA",
    "AdaLoRALinear",
    "AdapterLayer",
    "AdapterVariant",
    "BitFit",
    "ConfigError",
    "DoRA",
    "DoRALinear",
    "EVALinear",
    "FullFineTuning",
    "HeadOnly",
    "InitData",
    "LoRA",
    "LoRAGA",
    "LoRALinear",
    "LoRAPro",
    "MiLoRA",
    "NoVariant",
    "OffsetLoRALinear",
    "ParameterSubset",
    "PiSSA",
    "QLoRA",
    "QLoRALinear",
    "Staged",
    "Variant",
    "adapter_config",
    "adapter_report",
    "adapter_state_dict",
    "count_parameters",
    "count_trainable_in",
    "find_target_modules",
    "get_variant",
    "init_adapters_from",
    "inject_adapters",
    "layers_of",
    "load_adapter",
    "load_training_state",
    "mark_trainable",
    "merge_adapters",
    "merge_and_unwrap",
    "rank_for_budget",
    "read_adapter_config",
    "register_variant",
    "save_adapter",
    "shard_like",
    "task_head",
    "training_state",
    "unmerge_adapters",
    "variant_of",
    "whole",
    "within",
]
