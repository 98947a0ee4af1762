"""The LoRA family's down-projection of a dropped-out input, saving less for backward.

A's gradient needs the adapter's input after dropout, x' = x·keep/(1 − p). Written as
``dropout(x) @ Aᵀ``, autograd keeps two tensors of x's size per adapted layer: x' itself (for the
matmul) and the float mask (for dropout's backward), 8 bytes per element in fp32, and layers that
read the same x (W_q, W_k, W_v; gate and up) each keep their own pair. ``DroppedDownProjection``
keeps x (one storage, shared with every other layer that reads it) and a bool mask, 1 byte per
element of its own; backward rebuilds x' from them and re-runs the small product (r·d_in per
token) under autograd, so its gradients are the plain formulation's.

The mask is drawn as ``nn.Dropout`` draws it. On the CPU that is ``bernoulli_`` on an empty
tensor scaled by 1/(1 − p), and x' is rebuilt with the scaled value the mask held, so outputs,
gradients and the random stream are the plain path's bit for bit (tests/test_lean_dropout.py). On
CUDA it is ``torch.native_dropout``, the fused kernel ``nn.Dropout`` runs, and x' is rebuilt with
its backward, ``native_dropout_backward``: not checked on a GPU here.

With A frozen (LoRA-FA's ``freeze_a``) it keeps the bool mask alone: x's gradient needs A and the
mask, not x.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


def down_projection(x: torch.Tensor, weight: torch.Tensor, scaling: float) -> torch.Tensor:
    """scaling·A·x: ``(..., d_in) -> (..., r)``, in A's dtype (autocast may run it in bf16); the
    scaling goes on the r features, the cheapest place for it."""
    return (x.to(weight.dtype) @ weight.t()) * scaling


def dropout_with_mask(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(x', keep, kept): x' as ``nn.Dropout`` computes it, the bool mask, and on the CPU the value
    kept elements were multiplied by (1/(1 − p) as the dtype's division rounds it; None on CUDA)."""
    if x.device.type != "cpu":
        dropped, keep = torch.native_dropout(x, p, True)
        return dropped, keep, None
    noise = torch.empty_like(x).bernoulli_(1 - p).div_(1 - p)  # nn.Dropout's draw on the CPU
    if not noise.numel():
        return x * noise, noise != 0, None
    kept = noise[(0,) * (noise.dim() - 1)].max()  # a kept element's value (as the division rounded it), from one row
    if kept == 0:  # the whole row dropped: look at every element
        kept = noise.max()
    return x * noise, noise != 0, kept


def rebuild(x: torch.Tensor, keep: torch.Tensor, kept: torch.Tensor | None, p: float) -> torch.Tensor:
    """x' from x and the mask, as the forward pass computed it."""
    if kept is None:
        return torch.ops.aten.native_dropout_backward(x, keep, 1 / (1 - p))
    return torch.where(keep, x, 0) * kept  # x·kept where kept, else 0: the forward's values


class DroppedDownProjection(torch.autograd.Function):
    """``(dropout(x), scaling·A·dropout(x))`` from x ``(..., d_in)`` and A ``(r, d_in)``, saving x and
    a bool mask instead of dropout(x) and a float mask. The first output feeds DoRA's W0·x' term;
    its gradient joins x's like any other. Once differentiable: a second-order gradient raises."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, p: float, scaling: float):
        ctx.set_materialize_grads(False)  # an output no one used gets None, not zeros, in backward
        dropped, keep, ctx.kept = dropout_with_mask(x, p)
        if not ctx.needs_input_grad[0]:  # x' then leads back to nothing: no gradient computed for it
            ctx.mark_non_differentiable(dropped)
        # A frozen (LoRA-FA): x is needed for A's gradient only, so it is not kept. x's gradient is
        # linear in x, so backward runs the same ops on a stand-in of zeros (no memory: stride 0).
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, keep, weight)
        ctx.x_like = (x.shape, x.dtype, x.device)
        ctx.p, ctx.scaling = p, scaling
        device = x.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        return dropped, down_projection(dropped, weight, scaling)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_dropped: torch.Tensor | None, grad_down: torch.Tensor | None):
        x, keep, weight = ctx.saved_tensors
        needs_x, needs_weight = ctx.needs_input_grad[:2]
        device, autocast, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=autocast):
            if x is None:
                shape, dtype, where = ctx.x_like
                x = torch.zeros((), dtype=dtype, device=where).expand(shape)
            x_ = x.detach().requires_grad_(needs_x)
            weight_ = weight.detach().requires_grad_(needs_weight)
            dropped = rebuild(x_, keep, ctx.kept, ctx.p)
            down = down_projection(dropped, weight_, ctx.scaling)
        outputs, grads = [], []
        for output, grad in ((down, grad_down), (dropped, grad_dropped)):
            if grad is not None and output.requires_grad:
                outputs.append(output)
                grads.append(grad)
        inputs = [t for t, needed in ((x_, needs_x), (weight_, needs_weight)) if needed]
        found = iter(torch.autograd.grad(outputs, inputs, grads, allow_unused=True) if outputs and inputs else ())
        return (next(found, None) if needs_x else None), (next(found, None) if needs_weight else None), None, None
