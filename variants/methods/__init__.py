"""The fine-tuning methods that add adapter layers: LoRA and its kin. Importing this package
imports every module here, which registers its method (``register_variant``)."""

from .adalora import AdaLoRA, AdaLoRALinear
from .corda import CorDA
from .dora import DoRA, DoRALinear
from .eva import EVA, EVALinear
from .gralora import GraLoRA, GraLoRALinear
from .hira import HiRA, HiRALinear
from .lora import LoRA, LoRALinear
from .lora_ga import LoRAGA
from .lora_pro import LoRAPro
from .milora import MiLoRA
from .offset import OffsetLoRA, OffsetLoRALinear
from .olora import OLoRA
from .pissa import PiSSA
from .qlora import QLoRA, QLoRALinear
from .staged import Staged
from .vera import VeRA, VeRALinear

__all__ = [
    "EVA",
    "AdaLoRA",
    "AdaLoRALinear",
    "CorDA",
    "DoRA",
    "DoRALinear",
    "EVALinear",
    "GraLoRA",
    "GraLoRALinear",
    "HiRA",
    "HiRALinear",
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
    "VeRA",
    "VeRALinear",
]
