"""QLoRA: Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs".

    Y = X·doubleDequant(c1, c2, W^NF4) + (α/r)·X·Aᵀ·Bᵀ                      (Eq. 5)

The frozen base weights are stored in 4-bit NormalFloat (NF4) in blocks of 64, each block with
its absmax constant; with double quantization those constants are themselves quantized to 8
bits in blocks of 256 (§3), about 0.5 + 8/64·(1/4)… ≈ 0.52 bytes per parameter in all. Every
linear layer of the model is quantized, not only the adapted ones; embeddings, norms and the
task head (what ``exclude`` names, and the modules outside a Hugging Face model's backbone,
e.g. ``classifier``, ``lm_head``) stay in their own precision. The LoRA factors train in fp32 (bf16 compute under the
trainer's autocast on GPUs). bitsandbytes does the quantization and the 4-bit matmul.

``init=loftq`` starts the adapted layers as LoftQ does (``variants/methods/loftq.py``): their base
holds the 4-bit codes of W0 − B·A instead of W0's, and A and B start at the SVD of what that
quantization lost, so the model starts at Q + s·B·A ≈ W0 rather than at q(W0).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from schema import ConfigError, knob, problems

from ..base import layers_of, register_variant
from ..targets import replace_module, task_head, within
from .loftq import LoftQStart, loftq_start
from .lora import A_INITS, LoRA, LoRALinear, LoRASettings, lora_scaling

QUANT_TYPES = ("nf4", "fp4", "int8")
BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)
COMPUTE_DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
INITS = (*A_INITS, "loftq")


@dataclass
class QLoRASettings(LoRASettings):
    """QLoRA's settings: LoRA's, and how the frozen base is quantized (§3), and LoftQ's start."""

    init: str = knob("kaiming", "how the adapter starts: kaiming | gaussian (LoRA's A; B = 0, so the model starts as "
                     "the quantized base) | loftq (LoftQ, Li et al. 2024: the adapted layers' base holds the codes of "
                     "W0 − B·A and A, B the SVD of what that quantization lost, so Q + B·A ≈ W0; 4-bit types only)",
                     choices=INITS)
    quant_type: str = knob("nf4", "the base's format: nf4 (4-bit NormalFloat, the paper's) | fp4 | int8 (bitsandbytes' "
                           "LLM.int8, outlier threshold 6; no blocksize)", choices=QUANT_TYPES)
    double_quant: bool = knob(True, "quantize the 4-bit blocks' absmax constants to 8 bits too (the paper's §3 Double "
                              "Quantization: 4.13 instead of 4.5 bits per weight)")
    blocksize: int = knob(64, "weights per 4-bit quantization block (the paper's: 64)", choices=BLOCKSIZES)
    compute_dtype: str = knob("auto", "dtype of the dequantized matmul: auto (bf16 on a GPU with bf16, else fp32) | "
                              "fp32 | bf16 | fp16", choices=tuple(COMPUTE_DTYPES))
    requantize_on_merge: bool = knob(False, "merge() writes W0 + ΔW re-quantized instead of in the compute dtype: "
                                     "4-bit memory, one more rounding of every weight")
    loftq_iter: int = knob(1, "init=loftq: T, the alternations of quantizing and SVD (LoftQ's Algorithm 1; peft's "
                           "LoftQConfig.loftq_iter default; the authors' example command uses 5)", within=">= 1")
    loftq_divide_scaling: bool = knob(False, "init=loftq: false: A and B are the SVD factors as they are (the authors' "
                                      "code and peft), so the start Q + (α/r)·B·A ≈ W0 only at α = r; true: each "
                                      "divided by √(α/r), so that it holds at any α")

    def rules(self, prefix: str) -> list[str]:
        """LoftQ fits a 4-bit base: it is not offered on bitsandbytes' int8 layers."""
        key = f"{prefix}." if prefix else ""
        if self.init == "loftq" and self.quant_type == "int8":
            return [f"{key}init='loftq' needs a 4-bit base: {key}quant_type must be nf4 or fp4, not 'int8'"]
        return []


def _bnb() -> Any:
    # Imported on first use: only QLoRA runs pay for bitsandbytes' import (and its CPU notices).
    import bitsandbytes

    return bitsandbytes


def is_quantized(layer: nn.Module) -> bool:
    return isinstance(layer, (_bnb().nn.Linear4bit, _bnb().nn.Linear8bitLt))


def _compute_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return COMPUTE_DTYPES[name]


def check_quant_args(quant_type: str, double_quant: bool, blocksize: int, compute_dtype: str) -> None:
    """``quantize_linear``'s arguments, checked as the variant's settings are (``QLoRASettings``)."""
    found = problems(QLoRASettings(quant_type=quant_type, double_quant=double_quant, blocksize=blocksize,
                                   compute_dtype=compute_dtype), "variant")
    if found:
        raise ConfigError("; ".join(found))


def quantize_linear(
    linear: nn.Linear, quant_type: str = "nf4", double_quant: bool = True, blocksize: int = 64,
    compute_dtype: str = "auto",
) -> nn.Linear:
    """A bitsandbytes copy of ``linear``: ``Linear4bit`` (nf4/fp4) or ``Linear8bitLt`` (int8,
    LLM.int8 with outlier threshold 6). The bias keeps its precision, also in training
    (``bnb_layers``: bitsandbytes' own layers would cast it to bf16 in place)."""
    check_quant_args(quant_type, double_quant, blocksize, compute_dtype)
    bnb = _bnb()
    from ..interop import bnb_layers

    device = linear.weight.device
    weight = linear.weight.detach().to("cpu", torch.float32)
    has_bias = linear.bias is not None
    if quant_type == "int8":
        layer = bnb_layers.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias,
                                    has_fp16_weights=False, threshold=6.0)
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb_layers.Linear4bit(linear.in_features, linear.out_features, bias=has_bias,
                                  compute_dtype=_compute_dtype(compute_dtype), compress_statistics=double_quant,
                                  quant_type=quant_type)
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=double_quant,
                                         quant_type=quant_type, blocksize=blocksize)
        # On AVX512-BF16 CPUs bitsandbytes repacks the weight in place at the first no-grad eval
        # forward and from then on computes in bf16: eval would no longer match training, and
        # the repacked codes no longer dequantize. Keep the one exact fp32 path.
        layer.support_avx512bf16_for_cpu = False
    if has_bias:
        layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
    layer = layer.to(device)  # bitsandbytes quantizes on the move to a device
    if quant_type != "int8":
        # Kept on the layer too: under FSDP the packed codes are sharded as a plain tensor, which
        # drops the state, and bitsandbytes' forward takes it back from here.
        layer.quant_state = layer.weight.quant_state
    return layer


def quantized_matrix(weight: torch.Tensor, **quant_args: Any) -> torch.Tensor:
    """``weight`` ``(d_out, d_in)`` as a layer quantized with ``quant_args`` holds it, dequantized
    (fp32): q(W), exactly as ``quantize_linear`` stores it."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    return dequantized_weight(quantize_linear(linear, **quant_args))


def dequantized_weight(layer: nn.Linear) -> torch.Tensor:
    """W as the quantized layer computes with it: ``(d_out, d_in)``, fp32."""
    bnb, weight = _bnb(), layer.weight
    if isinstance(layer, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    if isinstance(layer, bnb.nn.Linear8bitLt):
        return weight.data.float() * weight.SCB.float().unsqueeze(1) / 127
    return weight.detach().float()


@torch.no_grad()
def plain_linear(quantized: nn.Linear, weight: torch.Tensor, dtype: torch.dtype | None = None) -> nn.Linear:
    """A frozen ``nn.Linear`` with ``weight`` and the quantized layer's bias, in ``dtype``
    (default: the layer's compute dtype)."""
    dtype = dtype or getattr(quantized, "compute_dtype", None) or torch.float32
    plain = nn.Linear(quantized.in_features, quantized.out_features, bias=quantized.bias is not None,
                      device=weight.device, dtype=dtype)
    plain.weight.copy_(weight)
    if quantized.bias is not None:
        plain.bias.copy_(quantized.bias)
    return plain.requires_grad_(False)


@torch.no_grad()
def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> None:
    """Replace every quantized linear layer by a plain ``nn.Linear`` holding its dequantized
    weight, in ``dtype`` (default: the layer's compute dtype). With ``merge_adapters`` first,
    the result is the merged model in full precision, ready for ``save_pretrained``."""
    for name, module in list(model.named_modules()):
        if is_quantized(module):
            replace_module(model, name, plain_linear(module, dequantized_weight(module), dtype))


def quantized_bytes(layer: nn.Linear) -> int:
    """Bytes of a quantized layer's weight: packed codes plus every quantization constant."""
    bnb, weight = _bnb(), layer.weight
    size = weight.numel() * weight.element_size()  # (under FSDP: of the whole, not this process's shard)
    if isinstance(layer, bnb.nn.Linear4bit):
        state = (getattr(weight, "quant_state", None) or layer.quant_state).as_dict(packed=False)
        size += sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor))
    elif isinstance(layer, bnb.nn.Linear8bitLt):
        size += weight.SCB.numel() * weight.SCB.element_size()
    return size


def quantization_storage(model: nn.Module) -> dict[str, Any]:
    """How much the quantized linear weights of ``model`` take, constants included."""
    layers = [m for m in model.modules() if is_quantized(m)]
    params = sum(m.in_features * m.out_features for m in layers)
    size = sum(quantized_bytes(m) for m in layers)
    return {
        "quantized_linears": len(layers),
        "quantized_params": params,
        "quantized_bytes": size,
        "bytes_per_param": size / params if params else None,
        "bits_per_param": 8 * size / params if params else None,
    }


class QLoRALinear(LoRALinear):
    """LoRA on a quantized frozen base. A plain ``nn.Linear`` given as ``base`` is quantized here
    with ``quant_args`` (``quantize_linear``'s keywords).

    Extra args:
        quant_args: how the base is (re-)quantized: ``quant_type``, ``double_quant``,
            ``blocksize``, ``compute_dtype``.
        requantize_on_merge: ``merge()`` writes W0 + ΔW back in the quantized format instead of
            the compute dtype; saves memory, costs one more rounding of every weight.
        init: LoRA's (``kaiming``, ``gaussian``), or ``loftq``: ``base`` (full precision) is
            quantized from W0 − B·A and A, B start at LoftQ's factors (``loftq_start``), after
            ``loftq_iter`` alternations, divided by √s if ``loftq_divide_scaling``. Deterministic
            given W0, so the same base on a fresh model (``load_adapter``) is the same Q.

    ``loftq_errors`` (LoftQ only, else None): the relative Frobenius errors of the start,
    ``LoftQStart.errors``.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, quant_args: Mapping[str, Any] | None = None,
                 requantize_on_merge: bool = False, loftq_iter: int = 1, loftq_divide_scaling: bool = False,
                 **lora_settings: Any) -> None:
        self.quant_args = dict(quant_args or {})
        start = None
        if lora_settings.get("init") == "loftq":
            start, base = self._loftq(base, rank, alpha, lora_settings.get("scaling", "standard"), loftq_iter,
                                      loftq_divide_scaling)
            lora_settings["init"] = "kaiming"  # drawn, then overwritten by LoftQ's factors
        if not is_quantized(base):
            base = quantize_linear(base, **self.quant_args)
        super().__init__(base, rank, alpha, **lora_settings)
        self.requantize_on_merge = requantize_on_merge
        self._quantized_base: nn.Linear | None = None
        self.loftq_errors = None if start is None else start.errors
        if start is not None:
            with torch.no_grad():
                self.lora_A.copy_(start.down)
                self.lora_B.copy_(start.up)

    def _loftq(self, base: nn.Linear, rank: int, alpha: float, scaling: str, iterations: int,
               divide_scaling: bool) -> tuple[LoftQStart, nn.Linear]:
        """LoftQ's start for ``base``, and a full-precision copy of it holding W0 − B·A (with its
        bias) for ``quantize_linear``: its codes are Q_T, as in the last alternation."""
        if is_quantized(base):
            raise ValueError("init='loftq' starts from the full-precision W0; got an already quantized layer")
        if self.quant_args.get("quant_type", "nf4") == "int8":
            raise ConfigError("variant.init='loftq' needs a 4-bit base: variant.quant_type must be nf4 or fp4, "
                              "not 'int8'")
        quantize = partial(quantized_matrix, **self.quant_args)
        start = loftq_start(base.weight.detach(), rank, quantize, iterations, lora_scaling(alpha, rank, scaling),
                            divide_scaling)
        shifted = nn.Linear(base.in_features, base.out_features, bias=False, device="meta")
        shifted.weight = nn.Parameter(start.to_quantize, requires_grad=False)
        shifted.bias = base.bias
        return start, shifted

    def frozen_weight(self) -> torch.Tensor:
        """W0 as the quantized layer computes with it (dequantized), also while merged."""
        return dequantized_weight(self._quantized_base if self.merged else self.base)

    def _merge(self) -> None:
        """Replace the quantized base by W0 + ΔW in the compute dtype (or re-quantized); W0 is
        the dequantized weight. The quantized base is kept, so ``unmerge`` restores it exactly."""
        quantized = self.base
        merged = plain_linear(quantized, dequantized_weight(quantized) + self.delta_weight())
        self.base = quantize_linear(merged, **self.quant_args) if self.requantize_on_merge else merged
        self._quantized_base = quantized

    def _unmerge(self) -> None:
        self.base = self._quantized_base
        self._quantized_base = None

    def as_lora(self) -> dict[str, torch.Tensor | float]:
        raise NotImplementedError("QLoRA's A and B were trained on the 4-bit base, so on the original weights they "
                                  "would not give the trained model; export the merged model instead (--merged)")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, quant_type={self.quant_args.get('quant_type', 'nf4')}"


@register_variant("qlora")
class QLoRA(LoRA):
    """LoRA on a quantized model: every linear layer but the task head is quantized, the
    targets inside ``QLoRALinear``. Settings: ``QLoRASettings``."""

    Settings = QLoRASettings
    paper_optimizer = "paged_adamw_32bit"  # QLoRA §3, Paged Optimizers

    def __init__(self, rank: int, alpha: float, *, quant_type: str, double_quant: bool, blocksize: int,
                 compute_dtype: str, requantize_on_merge: bool, loftq_iter: int, loftq_divide_scaling: bool,
                 **lora_settings: Any) -> None:
        super().__init__(rank, alpha, **lora_settings)
        self.quant_args = {"quant_type": quant_type, "double_quant": double_quant, "blocksize": blocksize,
                           "compute_dtype": compute_dtype}
        self.requantize_on_merge = requantize_on_merge
        self.loftq_iter, self.loftq_divide_scaling = loftq_iter, loftq_divide_scaling

    def new_layer(self, base: nn.Linear) -> QLoRALinear:
        return QLoRALinear(base, self.rank, self.alpha, quant_args=self.quant_args,
                           requantize_on_merge=self.requantize_on_merge, loftq_iter=self.loftq_iter,
                           loftq_divide_scaling=self.loftq_divide_scaling, **self.layer_settings())

    def prepare_model(self, model: nn.Module, targets: Sequence[str], exclude: Sequence[str]) -> None:
        """Quantize every ``nn.Linear`` that is neither a target (the layers quantize their own
        base), nor in ``exclude``, nor in the model's task head (``targets.task_head``: the new
        head trains in full, so it must keep its precision)."""
        quantize_model(model, skip=targets, keep=[*exclude, *task_head(model)], **self.quant_args)

    def report(self, model: nn.Module) -> dict[str, Any]:
        report = {"quantization": {**self.quant_args, **quantization_storage(model)}}
        if self.init == "loftq":
            report["loftq"] = loftq_report(model, self.loftq_iter, self.loftq_divide_scaling)
        return report


def loftq_report(model: nn.Module, iterations: int, divide_scaling: bool) -> dict[str, Any]:
    """How close LoftQ's start came to W0, relative Frobenius errors ‖W0 − Ŵ‖ / ‖W0‖ of each
    adapted layer and their mean: ``quantized`` (Ŵ = q(W0), QLoRA's start), ``start`` (Ŵ = Q_T +
    s·B₀·A₀, the model's start) and ``fit`` (Ŵ = Q_T + SVD_r(W0 − Q_T), the paper's objective)."""
    layers = {name: layer for name, layer in layers_of(model).items() if getattr(layer, "loftq_errors", None)}
    errors = {name: layer.loftq_errors for name, layer in layers.items()}
    mean = {key: sum(e[key] for e in errors.values()) / len(errors) for key in next(iter(errors.values()), {})}
    return {"iterations": iterations, "divide_scaling": divide_scaling,
            "scaling": next((layer.scaling for layer in layers.values()), None),
            "relative_error": mean, "relative_error_per_layer": errors}


def quantize_model(model: nn.Module, skip: Sequence[str] = (), keep: Sequence[str] = (), **quant_args: Any) -> None:
    """Quantize every ``nn.Linear`` of ``model`` in place, except the modules named in ``skip``
    and those in or inside ``keep``."""
    skip = set(skip)
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or name in skip or within(name, keep):
            continue
        replace_module(model, name, quantize_linear(module, **quant_args))
