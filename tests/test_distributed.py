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
# torchrun's default rendezvous port is one per machine: under pytest-xdist these tests share a worker.
pytestmark = pytest.mark.xdist_group("torchrun")

SETTINGS = {
    "lora": ["tracking.mode=offline"],
    # The switch at step 3 changes what trains: the data-parallel wrapper must be rebuilt there.
    # The LoRA phase's rate is pinned: AdamW turns the reduction-order noise of near-zero gradients
    # into steps of the order of the rate (1.1e-5 at 3e-3 against 1.8e-6 at 1e-3; the unwrapped
    # model's error is 2e-3), so the bound below holds for this rate, whatever the default becomes.
    "staged": ["variant=staged", "variant.full_fraction=0.5", "variant.lr=1e-3", "tracking.mode=disabled"],
}


def torchrun(*args):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *args],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600, check=False)


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


def test_a_data_driven_start_is_the_same_in_every_process(tmp_path):
    """LoRA-GA: each process estimates the gradient on its half of each batch; the mean over the
    processes is the whole batch's gradient (its norms match the single process's), and every
    process starts, and ends, with the same weights. The factors themselves are not compared with
    the single process's: where two singular values nearly tie, float-level differences between
    the halves' padding rotate the singular vectors."""
    args = [*COMMON, "variant=lora_ga", "variant.init_batches=2", "tracking.mode=disabled"]
    single, double = tmp_path / "single", tmp_path / "double"
    assert run_py(*args, f"hydra.run.dir={single}").returncode == 0
    result = torchrun("run.py", *args, f"hydra.run.dir={double}")
    assert result.returncode == 0, result.stderr
    one, two = (json.loads((d / "summary.json").read_text()) for d in (single, double))
    assert two["replica_max_abs_diff"] == 0.0
    norms_one, norms_two = one["initialization"]["gradient_norm"], two["initialization"]["gradient_norm"]
    assert norms_one.keys() == norms_two.keys() and len(norms_one) == 12
    assert all(abs(norms_two[k] - norms_one[k]) <= 1e-4 * norms_one[k] for k in norms_one), (norms_one, norms_two)


def test_torchrun_needs_a_run_dir(tmp_path):
    result = torchrun("run.py", "trainer.max_steps=1")
    assert result.returncode != 0
    assert "error: hydra.run.dir is required under torchrun" in result.stderr


def kill_processes_naming(text):
    """SIGKILL every process whose command line contains ``text`` (Linux /proc)."""
    import signal
    from pathlib import Path

    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                os.kill(int(entry.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass  # gone meanwhile


def test_a_killed_torchrun_run_resumes_to_identical_results(tmp_path):
    """With dropout on, each process draws its own masks: a checkpoint keeps every process's RNG
    state, so a 2-process run killed mid-epoch and resumed ends bit-identical to one that was not."""
    import time

    import torch

    args = ["trainer.max_steps=20", "trainer.batch_size=8", "trainer.checkpoint_every=5", "trainer.log_every=1",
            "trainer.eval_every=10", "task.train_size=72", "task.eval_size=32", "tracking.mode=disabled"]
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    result = torchrun("run.py", *args, f"hydra.run.dir={whole}")
    assert result.returncode == 0, result.stderr

    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "run.py", *args,
                             f"hydra.run.dir={broken}"], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline, killed_at = time.time() + 300, None
    while time.time() < deadline and proc.poll() is None and killed_at is None:
        try:
            step = torch.load(broken / "checkpoint.pt", weights_only=True, mmap=True)["step"]
        except Exception:  # noqa: BLE001  (not written yet, or replaced while reading)
            step = -1
        if step >= 10:
            kill_processes_naming(str(broken))  # the launcher and both workers (in sessions of their own)
            proc.wait()
            killed_at = step
        time.sleep(0.05)
    assert killed_at is not None and not (broken / "summary.json").exists()
    result = torchrun("run.py", f"resume={broken}")
    assert result.returncode == 0, result.stderr

    expected = json.loads((whole / "summary.json").read_text())
    got = json.loads((broken / "summary.json").read_text())
    assert got["eval"] == expected["eval"] and got["replica_max_abs_diff"] == 0.0
    records = [(broken / "metrics.jsonl"), (whole / "metrics.jsonl")]
    assert records[0].read_text() == records[1].read_text()  # every loss and lr, bit for bit
    one, two = load_file(whole / "adapter.safetensors"), load_file(broken / "adapter.safetensors")
    assert all(torch.equal(one[k], two[k]) for k in one)
