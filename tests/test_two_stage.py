"""The converged comparison's protocol end to end on real MRPC rows: the experiment config, stage 1
(a rate grid on seed 0), analysis/two_stage.py's next command, stage 2, and compare.py's two-stage
selection with standard errors and convergence times."""

import json
import shlex
import subprocess
import sys

import pytest
from test_comparison import GLUE_DIR, compare_py, needs_glue
from test_run import ROOT, run_py

from analysis import two_stage

# 48 training pairs, 2 epochs of 6 steps, an evaluation each half epoch (every 3 steps) on the
# first 96 validation and test pairs
TINY = ["+experiment=glue_minilm_converged", "task=mrpc", f"glue_dir={GLUE_DIR}", "task.max_train_examples=48",
        "task.max_eval_examples=96", "model.max_length=32", "trainer.batch_size=8", "max_epochs=2",
        "trainer.eval_batch_size=128", "trainer.forgetting.examples=32",
        "trainer.precision=fp32",  # the protocol, not its precision: bf16 is 12-14x slower on an AVX2 CPU (BENCHMARKS.md)
        "hydra/launcher=basic", "variant=lora", "++lr_grid.lora.p0=1e-6", "++lr_grid.lora.p1=3e-3",
        "++lr_grid.lora.p2=1e-2", "~lr_grid.lora.p3"]  # a 3-point grid (the experiment's p3 removed), all of it run


def two_stage_py(*argv):
    return subprocess.run([sys.executable, str(ROOT / "analysis" / "two_stage.py"), *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False,
                          env={"PYTHONPATH": str(ROOT), "PATH": ""})


@needs_glue
def test_two_stage_protocol_on_real_mrpc_rows(tmp_path):
    stage1 = tmp_path / "mrpc_s1_lora"
    result = run_py(*TINY, "lr_point=p0,p1,p2", f"hydra.sweep.dir={stage1}")
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = [json.loads(p.read_text()) for p in stage1.glob("*/summary.json")]
    assert len(summaries) == 3 and all(s["status"] == "completed" for s in summaries)
    for s in summaries:  # the experiment's protocol reached every run
        assert s["val_fraction"] == 0.1 and s["best"]["adapter"] == "adapter_best.safetensors"
        assert s["stopped"]["planned_steps"] == 12 and s["best"]["step"] == s["eval_at_best_val"]["step"]

    result = two_stage_py(str(stage1))
    assert result.returncode == 0, result.stderr
    vals = {s["peak_lr"]: s["eval_at_best_val"]["val"]["accuracy"] for s in summaries}
    chosen = max(sorted(vals), key=lambda lr: vals[lr])
    assert f"lr {chosen:g}: {100 * vals[chosen]:.2f}" in result.stdout and "<- chosen" in result.stdout
    command = [line.strip() for line in result.stdout.splitlines() if line.strip().startswith("python run.py")]
    assert len(command) == 1 and "skip_completed=true" in command[0] and "variant=lora" in command[0]
    if chosen in (1e-6, 1e-2):  # at an edge: the next command extends the grid a factor beyond it
        assert ("lr_grid.lora.m1=3.33e-07" if chosen == 1e-6 else "lr_grid.lora.p3=0.0333") in command[0]
        return
    assert "lr_point=p1 seed=1,2" in command[0]

    # stage 2 is the printed command, run as printed
    result = run_py(*shlex.split(command[0])[2:])  # the job's own overrides are in it
    assert result.returncode == 0, result.stderr[-3000:]
    stage2 = stage1.parent / "mrpc_s2_lora"
    assert sorted(json.loads(p.read_text())["seed"] for p in stage2.glob("*/summary.json")) == [1, 2]

    out = tmp_path / "report"
    result = compare_py(str(stage1), str(stage2), "--at", "best_val", "--select-seed", "0", "--out", str(out),
                        "--resamples", "100")
    assert result.returncode == 0, result.stderr
    (row,) = json.loads((out / "report.json").read_text())["rows"]
    assert row["lr"] == chosen and row["seeds"] == [0, 1, 2] and row["n"] == 3
    assert row["lr_grid"] == {f"{lr:g}": vals[lr] for lr in vals}  # seed 0's values, not a median over seeds
    assert all(0 < se < 0.1 for se in row["lr_grid_se"].values())  # 96 validation pairs: about 0.05
    speed = row["convergence"]
    assert speed["epochs_trained"] <= 2 and len(speed["runs"]) == 3
    assert "Convergence on validation" in (out / "report.md").read_text() and (out / "curves.png").is_file()

    result = two_stage_py(str(stage1), str(stage2), "--cost")
    assert result.returncode == 0 and "| mrpc | lora | 5 |" in result.stdout


def job(task, grid, lr, val, point, seed=0):
    return {"dir": None, "overrides": [f"variant={grid}"],
            "config": two_stage.OmegaConf.create({"trainer": {"lr": lr}, "lr_point": point, "lr_grid_of": grid,
                                                  "lr_grid": {grid: {"p0": 1e-4, "p1": 3e-4, "p2": 1e-3}}}),
            "summary": {"task": task, "variant": grid, "seed": seed, "main_metric": "accuracy",
                        "eval_at_best_val": {"step": 5, "val": {"accuracy": val}}, "wall_time_s": 3600}}


@pytest.mark.parametrize("best, expected", [
    (1e-4, "++lr_grid.lora.m1=3.33e-05 lr_point=m1 seed=0"),
    (3e-4, "lr_point=p1 seed=1,2"),
    (1e-3, "++lr_grid.lora.p3=0.00333 lr_point=p3 seed=0"),  # the grid's own last factor, 10/3
])
def test_a_choice_at_the_edge_extends_the_grid_a_step_beyond_it(tmp_path, best, expected):
    found = [job("stsb", "lora", lr, 0.9 if lr == best else 0.8, point)
             for lr, point in ((1e-4, "p0"), (3e-4, "p1"), (1e-3, "p2"))]
    found.append(job("stsb", "lora", 1e-3, 0.99, "p2", seed=1))  # another seed never chooses
    text = "\n".join(two_stage.plan(found, 0, [1, 2], tmp_path))
    assert expected in text and text.count("<- chosen") == 1
    assert f"lr {best:g}: 90.00" in text


def test_an_unfinished_grid_gets_no_command_and_copied_runs_get_their_method_back(tmp_path):
    found = [job("stsb", "lora", lr, 0.9 if lr == 3e-4 else 0.8, point) for lr, point in ((1e-4, "p0"), (3e-4, "p1"))]
    text = "\n".join(two_stage.plan(found, 0, [1, 2], tmp_path))
    assert "stage 1 unfinished: no completed run at p2; no choice yet" in text and "python run.py" not in text
    config = two_stage.OmegaConf.create({"variant": {"name": "lora", "targets": "all-linear"},
                                         "lr_grid_of": "lora_all_linear"})
    assert two_stage.method_overrides(config) == ["variant=lora", "variant.targets=all-linear",
                                                  "lr_grid_of=lora_all_linear"]
    assert two_stage.method_overrides(two_stage.OmegaConf.create({"variant": {"name": "dora"}, "lr_grid_of": "dora"})) \
        == ["variant=dora"]
