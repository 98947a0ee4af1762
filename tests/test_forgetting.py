"""The forgetting probe (training/forgetting.py) and analysis/forgetting.py: linear CKA on cases
known by hand; through run.py's path, a frozen backbone forgets nothing, full fine-tuning does,
what the run records is what the saved weights give after the fact, and a causal LM starts at
no change; a bad probe file is a one-line error."""

import csv
import json

import numpy as np
import pytest
import torch
from helpers.config import composed
from test_causal_lm import needs_smollm2
from test_run import run_py

from analysis import forgetting as forgetting_cli
from training import run_experiment
from training.forgetting import linear_cka

ENCODER = ["task=smoke", "model.keep_layers=2", "task.train_size=96", "task.eval_size=48", "trainer.batch_size=16",
           "trainer.max_steps=12", "trainer.eval_every=6", "trainer.checkpoint_every=null", "tracking.mode=disabled"]


def test_linear_cka_on_cases_known_by_hand():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, generator=generator)
    rotation, _ = torch.linalg.qr(torch.randn(6, 6, generator=generator))
    assert linear_cka(x, 3.0 * x @ rotation + 5.0) == pytest.approx(1.0, abs=1e-12)  # rotated, scaled, shifted
    a, b = torch.randn(200, 1, generator=generator), torch.randn(200, 1, generator=generator)
    y = a + 0.5 * b  # one feature each: linear CKA is the squared Pearson correlation
    assert linear_cka(a, y) == pytest.approx(np.corrcoef(a[:, 0], y[:, 0])[0, 1] ** 2, abs=1e-12)
    signs = torch.tensor([[1.0], [-1.0], [1.0], [-1.0]])
    assert linear_cka(signs, torch.tensor([[1.0], [1.0], [-1.0], [-1.0]])) == pytest.approx(0.0)  # uncorrelated


def forget_records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if any(k.startswith("forget/") for k in r)]


def test_frozen_backbone_forgets_nothing_full_fine_tuning_drifts_and_the_weights_agree(tmp_path):
    head, full = tmp_path / "head", tmp_path / "full"
    assert run_experiment(composed(*ENCODER, "variant=head"), head)["status"] == "completed"
    summary = run_experiment(composed(*ENCODER, "variant=full", "trainer.lr=3e-4"), full)
    head_summary = json.loads((head / "summary.json").read_text())
    assert [r["step"] for r in forget_records(head)] == [6, 12]  # at every evaluation
    assert all(r["forget/drift"] == pytest.approx(0.0, abs=1e-9) for r in forget_records(head))
    assert head_summary["forgetting"]["headline"] == "drift" and "48 inputs" in head_summary["forgetting"]["measure"]
    drift = summary["forgetting"]["final"]["drift"]
    assert drift > 1e-3 and forget_records(full)[-1]["forget/drift"] == drift

    # after the fact, from the saved weights against the base model: the number the run recorded
    out = tmp_path / "out"
    assert forgetting_cli.main([str(head), str(full), "--measure", "--out", str(out)]) == 0
    rows = {row["method"]: row for row in csv.DictReader((out / "forgetting.csv").open())}
    assert float(rows["full"]["forgetting"]) == pytest.approx(drift, rel=1e-4)
    assert float(rows["head"]["forgetting"]) == pytest.approx(0.0, abs=1e-9)
    assert rows["full"]["source"] == "measured from adapter.safetensors"
    assert float(rows["full"]["test"]) == summary["eval"]["accuracy"]
    # and as recorded: the same rows without --measure, and the plot
    assert forgetting_cli.main([str(tmp_path), "--out", str(tmp_path / "recorded")]) == 0
    recorded = {row["method"]: row for row in csv.DictReader((tmp_path / "recorded" / "forgetting.csv").open())}
    assert float(recorded["full"]["forgetting"]) == drift and recorded["full"]["source"] == "recorded"
    assert (tmp_path / "recorded" / "learn_vs_forget.png").stat().st_size > 0


def test_probe_off_records_nothing_and_the_script_says_why(tmp_path, capsys):
    summary = run_experiment(composed(*ENCODER, "trainer.forgetting.measure=false"), tmp_path / "run")
    assert summary["forgetting"] is None and not forget_records(tmp_path / "run")
    assert forgetting_cli.main([str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "trained without the probe: use --measure" in capsys.readouterr().err


@pytest.mark.parametrize("task", ["task=smoke", pytest.param("task=sft_smoke", marks=needs_smollm2)])
def test_a_missing_probe_file_is_one_line_and_writes_nothing(tmp_path, task):
    model = ["model=smollm2", "model.keep_layers=2"] if task == "task=sft_smoke" else []
    result = run_py(task, *model, "trainer.forgetting.file=/nowhere/probe.txt", "tracking.mode=disabled",
                    f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2, result.stderr
    assert "trainer.forgetting.file='/nowhere/probe.txt' is not a file" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "summary.json").exists()


@needs_smollm2
def test_causal_lm_probe_starts_at_no_change_and_moves_with_training(tmp_path):
    overrides = ["model=smollm2", "task=sft_smoke", "model.keep_layers=2", "task.train_size=16",
                 "task.max_eval_examples=2", "task.max_new_tokens=4", "trainer.batch_size=4", "trainer.max_steps=4",
                 "trainer.eval_every=4", "trainer.eval_at_start=true", "trainer.checkpoint_every=null",
                 "trainer.forgetting.examples=3", "trainer.forgetting.max_new_tokens=8", "variant=full",
                 "trainer.lr=1e-3", "tracking.mode=disabled"]
    summary = run_experiment(composed(*overrides), tmp_path / "run")
    start, end = forget_records(tmp_path / "run")
    assert start["step"] == 0 and start["forget/loss_change"] == 0.0 and start["forget/exact_match"] == 1.0
    # (2 of 30 blocks: its own answers are noise, so only that they moved is checked, not which way)
    assert abs(end["forget/loss_change"]) > 1e-3 and end["forget/exact_match"] < 1.0
    assert summary["forgetting"]["headline"] == "loss_change" and "3 generic prompts" in summary["forgetting"]["measure"]


@pytest.mark.parametrize("task", ["task=smoke", pytest.param("task=sft_smoke", marks=needs_smollm2)])
def test_the_probe_leaves_training_exactly_as_it_was(tmp_path, task):
    """Adapter dropout on the CPU draws from the global generator; the probe's passes must not."""
    if task == "task=sft_smoke":
        overrides = ["model=smollm2", task, "model.keep_layers=2", "task.train_size=12", "task.max_eval_examples=2",
                     "task.max_new_tokens=2", "trainer.batch_size=4", "trainer.max_steps=6", "trainer.eval_every=2",
                     "trainer.forgetting.examples=2", "trainer.forgetting.max_new_tokens=2"]
    else:
        overrides = [*ENCODER, "trainer.max_steps=6", "trainer.eval_every=2"]
    overrides += ["variant=lora", "adapter_dropout=0.3", "trainer.checkpoint_every=null",
                  "tracking.mode=disabled"]
    with_probe = run_experiment(composed(*overrides), tmp_path / "on")
    without = run_experiment(composed(*overrides, "trainer.forgetting.measure=false"), tmp_path / "off")
    assert with_probe["forgetting"] and without["forgetting"] is None
    losses = [[r.get("train/loss") for r in map(json.loads, (tmp_path / d / "metrics.jsonl").read_text().splitlines())]
              for d in ("on", "off")]
    assert losses[0] == losses[1] and with_probe["eval"] == without["eval"]


def test_a_checkpoint_from_before_the_probe_resumes_and_records_no_forgetting(tmp_path):
    """Its config has no trainer.forgetting (a knob added since is taken at its default, not as a
    change that refuses the resume) and its state no reference: the run finishes without one."""
    from test_resume import RUN, kill_after_checkpoint, start

    run_dir = tmp_path / "run"
    kill_after_checkpoint(start(*RUN, "model.keep_layers=2", f"hydra.run.dir={run_dir}"), run_dir / "checkpoint.pt", 10)
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    del saved["run"]["config"]["trainer"]["forgetting"]
    del saved["train_state"]["forgetting_reference"], saved["train_state"]["forgetting_history"]
    torch.save(saved, run_dir / "checkpoint.pt")
    result = run_py(f"resume={run_dir}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "holds no reference from the start of the run" in result.stdout + result.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["forgetting"] is None
    assert all(r["step"] <= saved["step"] for r in forget_records(run_dir))  # none after the resume
