"""The LoRA family's down-projection of a dropped-out input, saving less for backward.

A's gradient needs the adapter's input after dropout, x' = x·keep/(1 − p). Written as
``dropout(x) @ Aᵀ``, autograd keeps two tensors of x's size per adapted layer: x' itself (for the
matmul) and the float mask (for dropout's backward), 8 bytes per element in fp32, and layers that
read the same x (W_q, W_k, W_v; gate and up) each keep their own pair. ``DroppedDownProjection``
keeps x (one storage, shared with every other layer that reads it) and a bool mask, 1 byte per
element of its own; backward rebuilds x' from them and re-runs the small product (r·d_in per
token) under autograd, so its gradients are the plain formulation's, bit for bit.

The mask is drawn as ``nn.Dropout`` draws it on the CPU (``bernoulli_`` on an empty tensor, then
scaled by 1/(1 − p)), so on the CPU the forward pass is the plain one's too, and a run keeps its
random stream. On CUDA ``nn.Dropout`` uses a fused kernel with a stream of its own, so there the
masks differ from the plain path's (the same distribution).
"""

from __future__ import annotations

import torch


def down_projection(x: torch.Tensor, weight: torch.Tensor, scaling: float) -> torch.Tensor:
    """(α/r)·A·x: ``(..., d_in) -> (..., r)``, in A's dtype (autocast may run it in bf16); the
    scaling goes on the r features, the cheapest place for it."""
    return (x.to(weight.dtype) @ weight.t()) * scaling


def _kept_value(p: float, like: torch.Tensor) -> torch.Tensor:
    """1/(1 − p) as the dropout mask holds it: 1 divided in ``like``'s dtype, as ``nn.Dropout`` does."""
    return torch.ones((), dtype=like.dtype, device=like.device).div_(1 - p)


class DroppedDownProjection(torch.autograd.Function):
    """``(dropout(x), (α/r)·A·dropout(x))`` from x ``(..., d_in)`` and A ``(r, d_in)``, saving x and
    a bool mask instead of dropout(x) and a float mask. The first output feeds DoRA's W0·x' term;
    its gradient joins x's like any other."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, p: float, scaling: float):
        ctx.set_materialize_grads(False)  # an output no one used gets None, not zeros, in backward
        noise = torch.empty_like(x).bernoulli_(1 - p).div_(1 - p)  # nn.Dropout's draw on the CPU
        dropped = x * noise
        keep = noise != 0
        ctx.save_for_backward(x, keep, weight)
        ctx.p, ctx.scaling = p, scaling
        device = x.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        return dropped, down_projection(dropped, weight, scaling)

    @staticmethod
    def backward(ctx, grad_dropped: torch.Tensor | None, grad_down: torch.Tensor | None):
        x, keep, weight = ctx.saved_tensors
        needs_x, needs_weight = ctx.needs_input_grad[:2]
        device, autocast, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=autocast):
            x_ = x.detach().requires_grad_(needs_x)
            weight_ = weight.detach().requires_grad_(needs_weight)
            dropped = x_ * (keep.to(x.dtype) * _kept_value(ctx.p, x))  # the forward's x', bit for bit
            down = down_projection(dropped, weight_, ctx.scaling)
        outputs, grads = [], []
        for output, grad in ((down, grad_down), (dropped, grad_dropped)):
            if grad is not None and output.requires_grad:
                outputs.append(output)
                grads.append(grad)
        inputs = [t for t, needed in ((x_, needs_x), (weight_, needs_weight)) if needed]
        found = iter(torch.autograd.grad(outputs, inputs, grads, allow_unused=True) if outputs and inputs else ())
        return (next(found) if needs_x else None), (next(found) if needs_weight else None), None, None
