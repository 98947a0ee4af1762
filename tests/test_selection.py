"""Training to convergence through run.py: early stopping, the best state kept, the reported set
evaluated where it can be reported, and length-grouped batches."""

import json

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from test_run import run_py
from transformers import AutoTokenizer

from training import rundir
from training.checkpoint import TrainState
from training.data import load_task, make_loader
from training.data.examples import LengthGroupedBatches, training_batches  # was data/batching.py
from training.device import runtime_for
from training.evaluation import ClassifierEvaluator
from training.experiment import _setup_data, completed
from training.models import load_trained, resolve_model_path
from training.selection import Selection
from variants import read_adapter_config

# MiniLM's first 2 blocks on the smoke task: 120 pairs train (8 steps an epoch), 40 validate, 64 test.
BASE = ["model.keep_layers=2", "task.train_size=160", "task.eval_size=64", "task.val_fraction=0.25",
        "trainer.batch_size=16", "trainer.eval_every=3", "trainer.log_every=1", "tracking.mode=disabled"]


def records(run_dir):
    return [json.loads(line) for line in (run_dir / rundir.METRICS).read_text().splitlines()]


def history(values, metric="accuracy"):
    state = TrainState()
    for i, value in enumerate(values):
        state.record_eval("val", {metric: value})
        state.step = i + 1
    state.extra_eval_history["val"] = [(i + 1, {metric: v}) for i, v in enumerate(values)]
    return state


def test_patience_counts_evaluations_without_a_gain_above_min_delta():
    rising_slowly = history([0.50, 0.51, 0.515, 0.519])
    assert Selection("val", "accuracy", patience=3, min_delta=0.0).evaluations_without_gain(rising_slowly) == 0
    # gains of 0.01, 0.015 and 0.019 over the first evaluation: none above 0.02
    assert Selection("val", "accuracy", patience=3, min_delta=0.02).evaluations_without_gain(rising_slowly) == 3
    assert Selection("val", "accuracy", patience=3, min_delta=0.02).should_stop(rising_slowly)
    # the reference moves only with a counted gain: 0.53 beats 0.50 by more than 0.02, then 0.54 does not beat 0.53
    assert Selection("val", "accuracy", patience=3, min_delta=0.02).evaluations_without_gain(
        history([0.50, 0.53, 0.54])) == 1
    falling_loss = history([2.0, 1.0, 1.5, 1.2], metric="loss")  # lower is better for a loss
    selection = Selection("val", "loss", patience=2)
    assert selection.evaluations_without_gain(falling_loss) == 2 and selection.best(falling_loss)["step"] == 2
    assert not Selection("val", "accuracy", patience=None).should_stop(history([0.5] * 10))


def test_the_best_evaluation_is_the_first_of_equals():
    selection = Selection("val", "accuracy")
    state = history([0.5, 0.7, 0.7, 0.6])
    assert selection.best(state) == {"set": "val", "metric": "accuracy", "step": 2, "value": 0.7}
    assert not selection.latest_is_best(state) and not selection.latest_is_best(history([0.5, 0.7, 0.7]))
    assert selection.latest_is_best(history([0.5, 0.7])) and selection.latest_is_best(history([0.5]))


def test_a_run_that_stops_gaining_stops_early_and_says_why(tmp_path):
    # at this rate nothing moves: the first evaluation (step 3) stays the best, and 2 more end the run
    run_dir = tmp_path / "still"
    result = run_py(*BASE, "trainer.max_steps=60", "trainer.lr=1e-9", "trainer.early_stopping.patience=2",
                    f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr
    summary = json.loads((run_dir / rundir.SUMMARY).read_text())
    assert summary["status"] == "completed" and summary["steps"] == 9
    assert summary["stopped"] == {"reason": "early_stopping", "step": 9, "planned_steps": 60, "epochs": 9 / 8,
                                  "patience": 2, "min_delta": 0.0, "min_steps": 0}
    assert summary["best"]["step"] == 3 and summary["best"]["set"] == "val"
    assert [r["step"] for r in records(run_dir) if "eval_val/accuracy" in r] == [3, 6, 9]
    assert [r["step"] for r in records(run_dir) if "train/loss" in r] == list(range(1, 10))
    assert "step 9: early stopping, 2 evaluations without a gain above 0.0 in val/accuracy" in result.stdout

    # min_epochs=2 (16 steps): the same run goes on to the first evaluation from step 16 on
    run_dir = tmp_path / "slow_start"
    assert run_py(*BASE, "trainer.max_steps=60", "trainer.lr=1e-9", "trainer.early_stopping.patience=2",
                  "trainer.early_stopping.min_epochs=2", f"hydra.run.dir={run_dir}").returncode == 0
    summary = json.loads((run_dir / rundir.SUMMARY).read_text())
    assert (summary["stopped"]["reason"], summary["steps"], summary["stopped"]["min_steps"]) == ("early_stopping", 18, 16)

    # without a patience the same run trains to the end of its schedule
    run_dir = tmp_path / "whole"
    assert run_py(*BASE, "trainer.max_steps=15", "trainer.lr=1e-9", f"hydra.run.dir={run_dir}").returncode == 0
    summary = json.loads((run_dir / rundir.SUMMARY).read_text())
    assert summary["stopped"]["reason"] == "schedule_end" and summary["steps"] == 15


def evaluate_file(adapter_file, summary, eval_set):
    """The metrics of an adapter file's model on the run's ``eval_set``, rebuilt from its config."""
    model, tokenizer = load_trained(adapter_file)
    cfg = OmegaConf.load(adapter_file.parent / rundir.CONFIG)
    _, sets = load_task(cfg.task, cfg.seed)
    loader = make_loader(sets[eval_set], tokenizer, list(cfg.task.text_fields), cfg.model.max_length,
                         cfg.trainer.eval_batch_size, shuffle=False)
    return ClassifierEvaluator(list(cfg.task.metrics))(model, loader, runtime_for("cpu", "fp32"))[0]


def test_the_best_state_is_kept_and_reproduces_the_reported_metrics(tmp_path):
    run_dir = tmp_path / "run"
    result = run_py(*BASE, "trainer.max_steps=80", "trainer.lr=3e-3", "trainer.early_stopping.patience=3",
                    "trainer.keep_best=true", "trainer.eval_others=when_best", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr
    summary = json.loads((run_dir / rundir.SUMMARY).read_text())
    best, at_best_val = summary["best"], summary["eval_at_best_val"]
    assert best["adapter"] == rundir.ADAPTER_BEST and best["step"] == at_best_val["step"]  # what compare.py reads
    assert best["step"] < summary["steps"]  # the run went on past its best, so the two states differ
    assert read_adapter_config(run_dir / rundir.ADAPTER_BEST)["step"] == best["step"]
    assert not (run_dir / (rundir.ADAPTER_BEST + ".tmp")).exists()

    # the kept file is the model that scored those numbers, on validation and on the test set
    val = evaluate_file(run_dir / rundir.ADAPTER_BEST, summary, "val")
    assert val["accuracy"] == best["value"] == at_best_val["val"]["accuracy"]
    assert val["loss"] == pytest.approx(at_best_val["val"]["loss"], abs=1e-6)
    test = evaluate_file(run_dir / rundir.ADAPTER_BEST, summary, "main")
    assert test["accuracy"] == at_best_val["test"]["accuracy"]
    assert test["loss"] == pytest.approx(at_best_val["test"]["loss"], abs=1e-6)
    last, kept = load_file(run_dir / rundir.ADAPTER), load_file(run_dir / rundir.ADAPTER_BEST)
    assert any(not torch.equal(last[k], kept[k]) for k in last)

    # eval_others=when_best: the test set only where validation reached a new best, and at the end
    evals = [r for r in records(run_dir) if "eval_val/accuracy" in r]
    new_bests, top = [], -1.0
    for record in evals:
        if record["eval_val/accuracy"] > top:
            new_bests.append(record["step"])
            top = record["eval_val/accuracy"]
    tested = [r["step"] for r in evals if "eval/accuracy" in r]
    assert tested == sorted(set(new_bests) | {evals[-1]["step"]}) and len(tested) < len(evals)


def test_length_grouped_batches_cover_the_epoch_once_with_little_padding():
    lengths = [int(x) for x in torch.randint(5, 120, (1000,), generator=torch.Generator().manual_seed(1))]

    def epoch(group_by_length, seed):
        return list(training_batches(lengths, 16, torch.Generator().manual_seed(seed), group_by_length))

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    grouped = epoch(True, 0)
    assert sorted(i for b in grouped for i in b) == list(range(1000))  # every example once
    assert len(grouped) == len(LengthGroupedBatches(lengths, 16, torch.Generator())) == 63
    assert padding(grouped) < 0.1 * padding(epoch(False, 0))
    assert grouped == epoch(True, 0) and grouped != epoch(True, 1)  # fixed by the seed
    # the batch order is shuffled: not sorted by length within the groups
    longest = [max(lengths[i] for i in b) for b in grouped]
    assert longest != sorted(longest, reverse=True)
    assert longest[:50] != sorted(longest[:50], reverse=True)


def test_group_by_length_reaches_the_trainer():
    """The training loader of a run groups by length when asked (the padding it trains on drops)."""
    from helpers.config import composed

    cfg = completed(composed("task=smoke", "task.train_size=160", "trainer.batch_size=8", "trainer.group_by_length=true"))
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    grouped = _setup_data(cfg, tokenizer, runtime_for("cpu", "fp32")).train_loader
    cfg.trainer.group_by_length = False
    plain = _setup_data(cfg, tokenizer, runtime_for("cpu", "fp32")).train_loader

    def pads(loader):
        return sum(int((batch["attention_mask"] == 0).sum()) for batch in loader)

    assert isinstance(grouped.batch_sampler, LengthGroupedBatches)
    assert pads(grouped) < pads(plain) / 4
