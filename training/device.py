"""Where a run computes: its device, its autocast precision, its place in a ``torchrun`` job,
and how much memory it peaked at."""

from __future__ import annotations

import contextlib
import platform
import resource
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from schema import ConfigError

from . import distributed


@dataclass(frozen=True)
class Runtime:
    """The device, the autocast dtype (None: plain fp32) and the process's place in the job."""

    device: torch.device
    autocast_dtype: torch.dtype | None = None
    context: distributed.Context = field(default_factory=distributed.Context)

    @property
    def precision(self) -> str:
        return "bf16" if self.autocast_dtype is not None else "fp32"

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def synchronize(self) -> None:
        """Wait for queued GPU work, so that a step's wall time is its own."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def pick_device(device: str, precision: str) -> tuple[torch.device, torch.dtype | None]:
    """The device, and the autocast dtype (None = plain fp32). ``auto`` prefers CUDA and bf16;
    ``precision`` is one of ``schema.groups.PRECISIONS``."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"trainer.device={device!r} is not a torch device; allowed: auto, cpu, cuda, cuda:N") from None
    use_bf16 = precision == "bf16" or (
        precision == "auto" and dev.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    return dev, (torch.bfloat16 if use_bf16 else None)


def cpu_bf16_note(runtime: Runtime) -> str | None:
    """A line for the log when bf16 autocast runs on an x86 CPU with neither AVX-512 BF16 nor AMX:
    PyTorch then converts every bf16 operand in software, and a MiniLM LoRA step measured 12-14x
    slower than fp32 on such a CPU (AVX2; BENCHMARKS.md "bf16 autocast on a CPU without native
    bf16"), where one with AVX-512 BF16 runs it 1.3-1.6x faster than fp32. None otherwise."""
    if runtime.device.type != "cpu" or runtime.autocast_dtype != torch.bfloat16:
        return None
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None  # ARM's bf16 extensions: PyTorch exposes no check, so no claim either way
    native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)() or getattr(
        torch.cpu, "_is_amx_tile_supported", lambda: False)()
    if native:
        return None
    return ("trainer.precision=bf16 on a CPU without AVX-512 BF16 or AMX: autocast emulates bf16 in software, "
            "12-14x slower than fp32 on a MiniLM step in BENCHMARKS.md; trainer.precision=fp32 is the fast choice")


def runtime_for(device: str, precision: str) -> Runtime:
    """The runtime of this process: joins the ``torchrun`` group if there is one, and each
    process of a multi-GPU job takes the GPU of its local rank."""
    dev, autocast_dtype = pick_device(device, precision)
    context = distributed.context_from_env(dev)
    return Runtime(distributed.device_for(context, dev), autocast_dtype, context)


def for_weights(runtime: Runtime, weights: torch.dtype, precision: str) -> Runtime:
    """The runtime for a model whose weights load in ``weights`` (``model.dtype``). bf16 weights
    train under bf16 autocast whatever the device, since what trains is kept in fp32 (the
    optimizer builds fp32 master weights) while the frozen weights stay bf16; fp16 would need
    loss scaling, which this trainer does not do."""
    if weights == torch.float16:
        raise ConfigError("model.dtype: the weights load as float16, and training in fp16 needs loss scaling, which "
                          "this trainer does not do; allowed: float32, bfloat16")
    if weights != torch.bfloat16:
        return runtime
    if precision == "fp32":
        raise ConfigError("trainer.precision=fp32 cannot train bfloat16 weights (model.dtype): the trained tensors are "
                          "fp32 over bf16 frozen weights, which needs autocast; allowed: auto, bf16")
    return replace(runtime, autocast_dtype=torch.bfloat16)


_PROC_STATUS, _PROC_CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def reset_peak_memory(device: torch.device) -> bool:
    """Start measuring peak memory afresh; False where the process's peak RSS cannot be reset.
    The jobs of a sweep share one process, and without this each would report the highest peak
    of the jobs before it."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        _PROC_CLEAR_REFS.write_text("5")  # Linux: resets VmHWM, the peak resident set size
        return True
    except OSError:
        return False


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """Peak memory since ``reset_peak_memory`` and what it measures: allocated CUDA memory, or
    the process's peak RSS (over the process's life where it cannot be reset)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    try:
        for line in _PROC_STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024, "process_max_rss"
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_max_rss"
