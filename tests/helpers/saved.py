"""What autograd holds for backward: the tensors a forward pass saved and still keeps."""

import weakref

import torch
from torch import nn


def held_for_backward(run, module: nn.Module) -> list[torch.Tensor]:
    """The tensors autograd holds for backward once ``run()`` has returned, ``module``'s
    parameters (saved without new memory) left out. The hook keeps a detached view and a weak
    reference, so what a dropped graph saved (a detached norm's) is freed and not counted; the
    caller's result of ``run()`` is kept alive while they are collected."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    saved = []

    def pack(tensor):
        tensor = tensor.detach()
        if tensor.untyped_storage().data_ptr() not in params:
            saved.append(weakref.ref(tensor))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = run()
    held = [t for ref in saved if (t := ref()) is not None]
    del out
    return held
