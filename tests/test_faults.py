"""Faults injected on purpose through run.py (issue 32): each leaves a run dir that tells the truth,
and a user's mistake gets one line, exit 2, no traceback."""

import json

import pytest

from test_run import run_py
from training import rundir
from training.trainer import check_divergence

SMALL = ["model.keep_layers=2", "task.train_size=160", "task.eval_size=64", "trainer.batch_size=16",
         "tracking.mode=disabled"]


def test_divergence_is_the_loss_staying_far_above_its_minimum_and_its_start():
    rising = [0.5, 0.3, 2.0, 9.0, 12.0]
    assert check_divergence(0.69, rising, 10, 3) is None  # 2.0 is not above 10 x 0.3
    assert "for 3 logs in a row (now 1200)" in check_divergence(0.69, [0.5, 0.3, 40.0, 90.0, 1200.0], 10, 3)
    assert check_divergence(0.69, [0.5, 0.3, 40.0, 0.2, 1200.0], 10, 3) is None  # not in a row
    assert check_divergence(0.69, [0.001, 0.0001, 0.05, 0.08, 0.1], 10, 3) is None  # far above the minimum, below the start
    assert check_divergence(0.69, [0.3, 40.0, 90.0, 1200.0], None, 3) is None  # off
    assert check_divergence(0.69, [40.0, 90.0], 10, 3) is None  # too few logs to say
    assert check_divergence(0.69, [8e5, 2e6, 1e7], 10, 3)  # blown up before the first log: the first step says where it began


def test_a_diverging_run_ends_failed_not_completed(tmp_path):
    run_dir = tmp_path / "diverged"
    result = run_py(*SMALL, "trainer.max_steps=40", "trainer.log_every=2", "trainer.lr=1e6", f"hydra.run.dir={run_dir}")
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: Diverged: at step ") and "lower trainer.lr" in last, last
    summary = json.loads((run_dir / rundir.SUMMARY).read_text())
    assert summary["status"] == "failed" and summary["error"].startswith("Diverged: ")
    # the same run without the guard "completes" with a loss in the millions: the guard is what caught it
    run_dir = tmp_path / "unguarded"
    result = run_py(*SMALL, "trainer.max_steps=12", "trainer.log_every=2", "trainer.lr=1e6",
                    "trainer.divergence.factor=null", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-2000:]
    losses = [json.loads(line)["train/loss"] for line in (run_dir / rundir.METRICS).read_text().splitlines()
              if "train/loss" in line]
    assert json.loads((run_dir / rundir.SUMMARY).read_text())["status"] == "completed" and min(losses) > 1e4


@pytest.mark.parametrize("value, shown", [("nan", "nan"), ("inf", "inf"), ("abc", "'abc'"), ("-1", "-1")])
def test_a_bad_rate_is_one_line_before_anything_and_leaves_no_run_dir(tmp_path, value, shown):
    run_dir = tmp_path / "refused"
    result = run_py(*SMALL, f"trainer.lr={value}", f"hydra.run.dir={run_dir}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"error: trainer.lr={shown} must be a finite number > 0"
    assert "Traceback" not in result.stderr and "Logging error" not in result.stderr
    assert not run_dir.exists()  # Hydra had made it; nothing of the run's was written, so it is gone
