"""Data-parallel training with torchrun on CPU (gloo, 2 processes), through run.py.

A step of a 2-process run is the single-process step on the same global batch, so both runs
must save the same tensors (to float-level differences: the two halves of a batch are padded
and summed separately), and the two processes must hold bit-identical weights at the end.
"""

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from test_run import ROOT, run_py

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_SILENT": "true",
       "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
COMMON = ["trainer.max_steps=6", "trainer.batch_size=8", "trainer.log_every=2", "trainer.eval_every=3",
          "task.train_size=64", "task.eval_size=32", "model.dropout=0", "variant.dropout=0"]
SETTINGS = {
    "lora": ["tracking.mode=offline"],
    # The switch at step 3 changes what trains: the data-parallel wrapper must be rebuilt there.
    "staged": ["variant=staged", "variant.full_fraction=0.5", "tracking.mode=disabled"],
}


def torchrun(*args):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *args],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("variant", list(SETTINGS))
def test_two_processes_train_the_single_process_model(tmp_path, variant):
    args = [*COMMON, *SETTINGS[variant]]
    single, double = tmp_path / "single", tmp_path / "double"
    result = run_py(*args, f"hydra.run.dir={single}")
    assert result.returncode == 0, result.stderr
    result = torchrun("run.py", *args, f"hydra.run.dir={double}")
    assert result.returncode == 0, result.stderr

    one, two = load_file(single / "adapter.safetensors"), load_file(double / "adapter.safetensors")
    assert one.keys() == two.keys() and any(k.endswith("lora_B") for k in one)
    worst = max((two[k] - one[k]).abs().max().item() for k in one)
    assert worst < 1e-5, f"saved tensors differ from the single-process run by up to {worst:.2e}"
    assert max(one[k].abs().max().item() for k in one if k.endswith("lora_B")) > 1e-4  # the adapters trained

    summary_one = json.loads((single / "summary.json").read_text())
    summary = json.loads((double / "summary.json").read_text())
    assert (summary_one["processes"], summary["processes"]) == (1, 2)
    assert summary["replica_max_abs_diff"] == 0.0  # rank 1 holds exactly rank 0's weights
    assert "replica_max_abs_diff" not in summary_one
    records = [json.loads(line) for line in (double / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 3, 4, 6, 6]  # one writer: no duplicated records
    if variant == "lora":
        assert len(list((double / "wandb").glob("offline-run-*"))) == 1


def test_torchrun_needs_a_run_dir(tmp_path):
    result = torchrun("run.py", "trainer.max_steps=1")
    assert result.returncode != 0
    assert "error: hydra.run.dir is required under torchrun" in result.stderr
