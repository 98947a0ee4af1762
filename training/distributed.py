"""One run over several processes (``torchrun``), in one of two ways (``trainer.strategy``).

Every process sees its own slice of each global batch, and the gradients are averaged over the
processes in backward, so a step equals the single-process step on the same global batch.

* ``ddp``: every process holds the whole model; ``DistributedDataParallel`` averages the
  gradients, and every process applies the same update to its copy.
* ``fsdp``: every process holds 1/N of each parameter, gradient and optimizer state (PyTorch's
  FSDP2, ``fully_shard``): a block's weights are gathered for its forward and backward and freed
  after; the gradients are averaged and scattered, so each process updates its own shard.
  Whatever needs a whole tensor outside the forward pass (saving, a variant's rank allocation
  or gradient transform) gathers it (``variants.whole``), a collective every process joins.

Only rank 0 writes the run dir and logs (metrics.jsonl, W&B); every rank evaluates the full dev
set.

    torchrun --nproc_per_node 2 run.py hydra.run.dir=runs/ddp_lora trainer.batch_size=32
    torchrun --nproc_per_node 2 run.py hydra.run.dir=runs/fsdp_full variant=full trainer.strategy=fsdp
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
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
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


def any_true(flag: bool, context: Context) -> bool:
    """Whether ``flag`` holds on some process (a collective: every process must call it)."""
    return not all_true(not flag, context)


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


def wrap(model: nn.Module, context: Context, strategy: str = "ddp") -> nn.Module:
    """The module the training loop calls: ``model`` itself in a single process; under ``ddp``
    a DDP wrapper over the parameters that train now (build a new one when that set changes);
    under ``fsdp`` ``model`` itself, sharded in place (``shard``; once: a later call, after the
    trainable set changed, finds it sharded and returns it)."""
    if not context.enabled:
        return model
    if strategy == "fsdp":
        return shard(model)
    return torch.nn.parallel.DistributedDataParallel(model)


def shard(model: nn.Module) -> nn.Module:
    """``model`` sharded with FSDP2: each transformer block (the classes a transformers model
    lists in ``_no_split_modules``: BertLayer, LlamaDecoderLayer) is one unit, gathered for its
    own forward and backward only; what lies outside the blocks (embeddings, head, final norm)
    is the root unit. Parameters become DTensors sharded on their first dimension."""
    if isinstance(model, FSDPModule):
        return model
    # No casting: each tensor computes in its own dtype, so what trains stays fp32 (its gradient
    # averaged in fp32) and a frozen bf16 base stays bf16; bf16 compute comes from autocast, as
    # in a single process.
    policy = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=None)
    # on the device the model is on (the default mesh is CUDA's wherever a GPU exists, also for
    # a run with trainer.device=cpu)
    mesh = init_device_mesh(next(model.parameters()).device.type, (dist.get_world_size(),))
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    for module in model.modules():
        if type(module).__name__ in blocks and module is not model:
            fully_shard(module, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    # transformers' generate then keeps every process stepping until all have finished, so the
    # gathers stay in step even if one process's sequences end earlier
    model._is_fsdp_managed_module = True
    return model


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def reshard(model: nn.Module) -> None:
    """After forward passes without a backward (evaluation): FSDP's root unit keeps its
    parameters gathered after a forward, for the backward that usually follows; put them back to
    shards, so that the model's parameters are again the ones the optimizer steps and the
    checkpoint gathers. Nothing for a model that is not sharded."""
    if is_sharded(model):
        model.reshard()


NO_STATE = "no_state_yet"  # an FSDP checkpoint's optimizer entry before the optimizer's first step


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """What a checkpoint keeps of the optimizer: its ``state_dict()``; under FSDP the whole
    state, gathered from the shards onto rank 0's CPU (keyed by parameter name; empty on the
    other ranks). A collective under FSDP."""
    if not is_sharded(model):
        return optimizer.state_dict()
    if not optimizer.state:  # (torch would first take a zero step to create the state: a changed optimizer)
        return {NO_STATE: True}
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                 cpu_offload=True))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Put back what ``optimizer_state`` returned (every process read the whole of it from the
    checkpoint; under FSDP each keeps its own shard of it)."""
    if not is_sharded(model):
        optimizer.load_state_dict(saved)
        return
    if saved.get(NO_STATE):
        return
    set_optimizer_state_dict(model, optimizer, saved, options=StateDictOptions(full_state_dict=True))


def local_memory_mb(model: nn.Module, optimizer: torch.optim.Optimizer, context: Context) -> list[dict[str, float]] | None:
    """What each process holds of the model's parameters and of the optimizer's state, in MiB,
    counted from the tensors it owns (a shard's local part under FSDP), in rank order, on rank
    0 (None elsewhere); ``trainable_mb`` is also what the gradients take while they live. A
    collective."""
    def mb(tensors: Any) -> float:
        return sum(_local(t).numel() * _local(t).element_size() for t in tensors) / 2**20

    params = list(model.parameters())
    state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor) and t.dim()]
    own = {"parameters_mb": mb(params), "trainable_mb": mb(p for p in params if p.requires_grad),
           "optimizer_mb": mb(state)}
    return gather_to_main(own, context)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


@torch.no_grad()
def max_replica_difference(model: nn.Module, context: Context) -> float | None:
    """The largest absolute difference, over all processes, between this process's copy of the
    tensors a run saves and rank 0's (None in a single process, and under FSDP, where no process
    holds a replica). Data-parallel training applies the same averaged gradients everywhere, so
    anything but 0.0 means the replicas drifted apart. Every process must call it."""
    if not context.enabled or is_sharded(model):
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
