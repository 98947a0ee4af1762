"""Data-parallel training of one run over several processes (``torchrun``).

Every process holds the whole model and sees its own slice of each global batch; the forward
pass goes through ``DistributedDataParallel``, which averages the gradients in backward, so a
step equals the single-process step on the same global batch and every process applies the
same update. Only rank 0 writes the run dir and logs (metrics.jsonl, W&B); every rank
evaluates the full dev set.

    torchrun --nproc_per_node 2 run.py hydra.run.dir=runs/ddp_lora trainer.batch_size=32
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import BatchSampler

import variants
from schema import ConfigError


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def context_from_env(device: torch.device) -> Context:
    """The process's place in a ``torchrun`` job (or a single process), joining the group:
    NCCL when the run trains on CUDA, gloo otherwise (also on a GPU machine with device=cpu)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Context()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Context(rank=dist.get_rank(), world_size=world_size)


def device_for(context: Context, device: torch.device) -> torch.device:
    """Each process of a multi-GPU job takes the GPU of its local rank (and makes it the current
    one, where NCCL's collectives run)."""
    if context.enabled and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return device


class ShardedBatches:
    """This rank's slice of every global batch of ``batches``. A trailing global batch that does
    not split evenly over the ranks is dropped, so every rank's slice has the same size."""

    def __init__(self, batches: BatchSampler, context: Context) -> None:
        if batches.batch_size % context.world_size:
            raise ConfigError(
                f"trainer.batch_size={batches.batch_size} must be divisible by the {context.world_size} processes"
            )
        self.batches, self.context = batches, context

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            if len(batch) % self.context.world_size:
                continue
            share = len(batch) // self.context.world_size
            yield batch[self.context.rank * share:(self.context.rank + 1) * share]

    def __len__(self) -> int:
        full, rest = divmod(len(self.batches.sampler), self.batches.batch_size)
        return full + (1 if rest and rest % self.context.world_size == 0 else 0)


def all_true(flag: bool, context: Context) -> bool:
    """Whether ``flag`` holds on every process (a collective: every process must call it)."""
    if not context.enabled:
        return flag
    value = torch.tensor(int(flag), device=_collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def gather_to_main(obj: Any, context: Context) -> list[Any] | None:
    """Every process's ``obj`` (tensors and plain containers), in rank order, on rank 0 (None
    elsewhere); a collective. Sent as ``torch.save`` bytes: ``gather_object``'s own pickling of
    CPU tensors fails on this torch version."""
    if not context.enabled:
        return [obj]
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    gathered = [None] * context.world_size if context.is_main else None
    dist.gather_object(buffer.getvalue(), gathered, dst=0)
    if gathered is None:
        return None
    return [torch.load(io.BytesIO(data), weights_only=True) for data in gathered]


def mean_over_ranks(value: torch.Tensor, context: Context) -> torch.Tensor:
    if context.enabled:
        value = value.clone()
        dist.all_reduce(value)
        value /= context.world_size
    return value


def wrap(model: nn.Module, context: Context) -> nn.Module:
    """The module the training loop calls: ``model`` itself in a single process, else a DDP
    wrapper over the parameters that train now (build a new one when that set changes)."""
    if not context.enabled:
        return model
    return torch.nn.parallel.DistributedDataParallel(model)


@torch.no_grad()
def max_replica_difference(model: nn.Module, context: Context) -> float | None:
    """The largest absolute difference, over all processes, between this process's copy of the
    tensors a run saves and rank 0's (None in a single process). Data-parallel training applies
    the same averaged gradients everywhere, so anything but 0.0 means the replicas drifted apart.
    Every process must call it."""
    if not context.enabled:
        return None
    own = model.state_dict(keep_vars=True)
    worst = torch.zeros((), dtype=torch.float64, device=_collective_device())
    for name in variants.adapter_state_dict(model):
        mine = own[name].detach().to(worst.device, torch.float64)
        reference = mine.clone()
        dist.broadcast(reference, src=0)
        worst = torch.maximum(worst, (mine - reference).abs().max())
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return float(worst)


def _collective_device() -> torch.device:
    """NCCL reduces CUDA tensors only; gloo reduces CPU tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
