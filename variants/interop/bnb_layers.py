"""bitsandbytes' quantized linear layers, except that they never cast their bias in place.

bitsandbytes' ``Linear4bit`` and ``Linear8bitLt`` replace their bias parameter's data by a copy
in the input's (or compute) dtype at every forward (``bias.data = bias.data.to(x.dtype)``):
under bf16 compute, a bias that trains (``variant.bias=all`` or ``lora_only``) would lose its
fp32 master weights after the first step. Here the quantized matmul runs without the bias and
the bias is added to its output, cast out of place, so the parameter keeps its dtype.

Imported on first use by ``variants/methods/qlora.py``: only QLoRA runs pay for bitsandbytes' import.
"""

from __future__ import annotations

import bitsandbytes as bnb
import torch


class _BiasOutOfPlace:
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self._parameters.get("bias")
        if bias is None:
            return super().forward(x)
        self._parameters["bias"] = None  # bitsandbytes' forward sees no bias to cast
        try:
            out = super().forward(x)
        finally:
            self._parameters["bias"] = bias
        return out + bias.to(out.dtype)


class Linear4bit(_BiasOutOfPlace, bnb.nn.Linear4bit):
    """``bnb.nn.Linear4bit`` (NF4/FP4) whose bias keeps its dtype."""


class Linear8bitLt(_BiasOutOfPlace, bnb.nn.Linear8bitLt):
    """``bnb.nn.Linear8bitLt`` (LLM.int8) whose bias keeps its dtype."""
