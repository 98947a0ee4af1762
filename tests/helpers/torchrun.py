"""Running run.py under torchrun on CPU (gloo, 2 processes), and the single-process runs that
the distributed ones are compared with."""

import os
import signal
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_SILENT": "true",
       "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
# A short run whose two halves of a batch are the single process's batch: no dropout anywhere.
COMMON = ["trainer.max_steps=6", "trainer.batch_size=8", "trainer.log_every=2", "trainer.eval_every=3",
          "task.train_size=64", "task.eval_size=32", "model.dropout=0", "variant.dropout=0"]
BASELINE = [a for a in COMMON if not a.startswith("variant.dropout")]  # the baselines have no adapter dropout

_single_runs: dict[tuple[str, ...], Path] = {}


def torchrun(*args, processes=2):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), *args],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600, check=False)


def single_process_run(args, root: Path) -> Path:
    """The run dir of ``python run.py *args`` under ``root``, run once per pytest process (the
    DDP and FSDP tests compare with the same one)."""
    key = tuple(args)
    if key not in _single_runs:
        run_dir = root / f"single{len(_single_runs)}"
        result = subprocess.run([sys.executable, str(ROOT / "run.py"), *args, f"hydra.run.dir={run_dir}"], cwd=ROOT,
                                env=ENV, capture_output=True, text=True, timeout=600, check=False)
        assert result.returncode == 0, result.stderr
        _single_runs[key] = run_dir
    return _single_runs[key]


def largest_difference(one: Path, two: Path) -> float:
    """The largest absolute difference between two run dirs' saved tensors (the same names)."""
    first, second = load_file(one / "adapter.safetensors"), load_file(two / "adapter.safetensors")
    assert first.keys() == second.keys()
    return max((second[k].float() - first[k].float()).abs().max().item() for k in first)


def kill_processes_naming(text):
    """SIGKILL every process whose command line contains ``text`` (Linux /proc)."""
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                os.kill(int(entry.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass  # gone meanwhile
