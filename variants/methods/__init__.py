"""The fine-tuning methods that add adapter layers: LoRA and its kin. Importing this package
imports every module here, which registers its method (``register_variant``)."""

from .adalora import AdaLoRA, AdaLoRALinear
from .dora import DoRA, DoRALinear
from .eva import EVA, EVALinear
from .lora import LoRA, LoRALinear
from .lora_ga import LoRAGA
from .lora_pro import LoRAPro
from .milora import MiLoRA
from .offset import OffsetLoRA, OffsetLoRALinear
from .olora import OLoRA
from .pissa import PiSSA
from .qlora import QLoRA, QLoRALinear
from .staged import Staged

__all__ = [
    "EVA",
    "AdaLoRA",
    "AdaLoRALinear",
    "DoRA",
    "DoRALinear",
    "EVALinear",
    "LoRA",
    "LoRAGA",
    "LoRALinear",
    "LoRAPro",
    "MiLoRA",
    "OLoRA",
    "OffsetLoRA",
    "OffsetLoRALinear",
    "PiSSA",
    "QLoRA",
    "QLoRALinear",
    "Staged",
]
