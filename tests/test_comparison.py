"""The honest comparison: real GLUE files, the validation split, learning-rate selection on it,
per-example predictions, the paired bootstrap, equal budgets, and analysis/compare.py end to end.

Real GLUE TSVs are found through $GLUE_DIR (default ../shared/glue beside the repository); the
tests that need them skip, saying why, when they are absent.
"""

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.config import task_config
from omegaconf import OmegaConf
from scipy import stats
from sklearn import metrics as skm
from test_run import ROOT, run_py

import variants
from analysis import compare
from schema import ConfigError
from schema.door import check_overrides
from training.data import load_task, split_validation
from training.models import load_model
from variants.inject import rank_for_budget  # was variants/budget.py

GLUE_DIR = Path(os.environ.get("GLUE_DIR", ROOT.parent / "shared" / "glue"))
needs_glue = pytest.mark.skipif(not GLUE_DIR.is_dir(), reason=f"no GLUE data at {GLUE_DIR} (set GLUE_DIR)")
# Rows of each file, from ../shared/glue/SOURCES.md (header excluded).
GLUE_ROWS = {"mrpc": ("MRPC", 3668, 408), "stsb": ("STS-B", 5749, 1500), "cola": ("CoLA", 8551, 1043),
             "rte": ("RTE", 2490, 277)}


def glue_task(name: str, **overrides):
    task = task_config(name)
    return task_config(name, data_dir=str(GLUE_DIR / task.glue_folder), **overrides)


# ---------------------------------------------------------------- real files

@needs_glue
@pytest.mark.parametrize("name", sorted(GLUE_ROWS))
def test_real_glue_files_load_whole(name):
    """Every row of the distributed files, MRPC's byte-order mark included."""
    _folder, n_train, n_dev = GLUE_ROWS[name]
    train, evaluations = load_task(glue_task(name))
    assert (len(train), len(evaluations["main"])) == (n_train, n_dev)
    labels = {ex["label"] for ex in train}
    assert labels == ({0, 1} if name != "stsb" else labels) and all(isinstance(x, float) for x in labels) == (name == "stsb")


# ---------------------------------------------------------------- validation split

def examples(n_per_class: dict[int, int]):
    return [{"sentence": f"{label}-{i}", "label": label} for label, n in n_per_class.items() for i in range(n)]


def test_val_split_is_seeded_stratified_and_disjoint():
    data = examples({0: 300, 1: 100})
    kept, val = split_validation(data, 0.1, seed=3, num_labels=2)
    again, val_again = split_validation(data, 0.1, seed=3, num_labels=2)
    _, other = split_validation(data, 0.1, seed=4, num_labels=2)
    texts = lambda rows: [r["sentence"] for r in rows]
    assert texts(val) == texts(val_again) and texts(kept) == texts(again)
    assert texts(val) != texts(other)
    assert not set(texts(val)) & set(texts(kept)) and len(val) + len(kept) == len(data) and len(val) == 40
    assert sum(r["label"] for r in val) == 10  # 25% positives, as in the whole


def test_val_split_regression_is_stratified_by_quantile():
    data = [{"sentence": str(i), "label": float(i % 50) / 10} for i in range(500)]
    _kept, val = split_validation(data, 0.2, seed=0, num_labels=1)
    assert len(val) == 100 and abs(np.mean([r["label"] for r in val]) - np.mean([r["label"] for r in data])) < 0.1


@pytest.mark.parametrize("fraction, shown", [("0.0", "0.0"), ("0.6", "0.6"), ("true", "True")])
def test_val_fraction_out_of_range(fraction, shown):
    """The schema's range (schema.groups.ClassificationTask), checked before Hydra as run.py does."""
    with pytest.raises(ConfigError) as failure:
        check_overrides(["task=mrpc", f"task.val_fraction={fraction}"], ROOT / "conf")
    assert str(failure.value) == f"task.val_fraction={shown} must be null or a finite number in (0, 0.5]"


def test_val_split_that_empties_a_class():
    with pytest.raises(ConfigError, match="would leave a class empty on one side"):
        split_validation(examples({0: 50, 1: 1}), 0.1, seed=0, num_labels=2)


@needs_glue
def test_val_split_of_real_rte_through_load_task():
    train, evaluations = load_task(glue_task("rte", val_fraction=0.1), seed=0)
    assert (len(train), len(evaluations["val"]), len(evaluations["main"])) == (2241, 249, 277)
    assert list(evaluations) == ["main", "val"]


# ---------------------------------------------------------------- bootstrap

def test_bootstrap_of_identical_predictions_contains_zero():
    rng = np.random.default_rng(0)
    gold = rng.integers(0, 2, 300)
    preds = [np.where(rng.random(300) < 0.8, gold, 1 - gold) for _ in range(3)]
    result = compare.paired_bootstrap("accuracy", gold, preds, [p.copy() for p in preds], resamples=500)
    assert result["difference"] == 0 and result["low"] == 0 == result["high"] and not result["excludes_zero"]  # paired: every resample 0


@pytest.mark.parametrize("metric", ["accuracy", "f1", "matthews"])
def test_bootstrap_excludes_zero_when_one_method_is_right_where_the_other_is_wrong(metric):
    rng = np.random.default_rng(1)
    gold = rng.integers(0, 2, 200)
    wrong = rng.random(200) < 0.3  # the reference's mistakes; the method gets every one of them right
    reference = [np.where(wrong, 1 - gold, gold)] * 2
    method = [gold.copy(), gold.copy()]
    result = compare.paired_bootstrap(metric, gold, method, reference, resamples=500)
    assert result["low"] > 0 and result["excludes_zero"]


def test_the_interval_covers_the_seeds_not_only_the_test_examples():
    # Three seeds disagree (+14.8, -7.8, +4.5 points) on one fixed test set: over test examples alone
    # the mean +3.8 looks certain, but which seeds were run decides its sign as much as the data.
    rng = np.random.default_rng(3)
    gold, draw = rng.integers(0, 2, 400), rng.random(400)
    correct_share = lambda share: np.where(draw < share, gold, 1 - gold)
    reference = [correct_share(0.75)] * 3
    method = [correct_share(share) for share in (0.90, 0.68, 0.80)]
    result = compare.paired_bootstrap("accuracy", gold, method, reference, resamples=500)
    assert result["per_seed"] == pytest.approx([0.1475, -0.0775, 0.045])
    assert result["test_low"] > 0 and result["low"] < 0 < result["high"] and not result["excludes_zero"]
    one_seed = compare.paired_bootstrap("accuracy", gold, method[:1], reference[:1], resamples=500)
    assert (one_seed["low"], one_seed["high"]) == (one_seed["test_low"], one_seed["test_high"])
    assert one_seed["covers"] == "test examples only (one seed)"


def test_the_median_delta_is_the_difference_of_the_medians_which_a_failed_reference_seed_moves_little():
    # The reference's seed 2 failed (30% right); seeds 0 and 1 differ by +1 point. The mean of the
    # per-seed differences is +17.3; the difference of the medians over seeds is +2 (80 - 78).
    rng = np.random.default_rng(4)
    gold, draw = rng.integers(0, 2, 1000), rng.random(1000)
    correct_share = lambda share: np.where(draw < share, gold, 1 - gold)
    method = [correct_share(share) for share in (0.81, 0.79, 0.80)]
    reference = [correct_share(share) for share in (0.80, 0.78, 0.30)]
    accuracy = lambda preds: [float(np.mean(p == gold)) for p in preds]
    mean = compare.paired_bootstrap("accuracy", gold, method, reference, resamples=500)
    median = compare.paired_bootstrap("accuracy", gold, method, reference, resamples=500, center="median")
    assert mean["difference"] == pytest.approx(np.mean(np.subtract(accuracy(method), accuracy(reference))))
    assert median["difference"] == pytest.approx(np.median(accuracy(method)) - np.median(accuracy(reference)))
    assert median["difference"] == pytest.approx(0.02, abs=0.005) and mean["difference"] > 0.15
    assert median["per_seed"] == mean["per_seed"]
    assert (median["low"], median["high"]) == (median["test_low"], median["test_high"]) and median["low"] < 0.02
    assert median["covers"] == "test examples only (the seeds' spread: per_seed)"
    same = compare.paired_bootstrap("accuracy", gold, method, method, resamples=200, center="median")
    assert same["difference"] == 0 and same["low"] == 0 == same["high"]


def test_compare_cli_reports_the_median_delta_when_asked(tmp_path):
    rng = np.random.default_rng(5)
    gold, draw = rng.integers(0, 2, 400), rng.random(400)
    tests = {}
    for variant, shares in [("lora", (0.80, 0.78, 0.30)), ("dora", (0.81, 0.79, 0.80))]:
        for seed, share in enumerate(shares):
            predicted = np.where(draw < share, gold, 1 - gold)
            tests[variant, seed] = float(np.mean(predicted == gold))
            run_dir = fake_run(tmp_path / "runs", f"{variant}{seed}", variant, 1e-3, seed, 0.8, tests[variant, seed])
            np.savez(run_dir / "predictions.npz", **{"main.labels": gold, "main.step10": np.eye(2)[predicted]})
    per_seed = [100 * (tests["dora", k] - tests["lora", k]) for k in range(3)]
    medians = [np.median([100 * tests[v, k] for k in range(3)]) for v in ("dora", "lora")]
    for delta, shown in [("median", medians[0] - medians[1]), ("mean", np.mean(per_seed))]:
        out = tmp_path / delta
        assert compare.main([str(tmp_path / "runs"), "--out", str(out), "--delta", delta, "--resamples", "200"]) == 0
        text = (out / "report.md").read_text()
        (row,) = [line for line in text.splitlines() if line.startswith("| dora | 0.001 |")]
        assert f"| {shown:+.1f} [" in row and "({:+.1f}, {:+.1f}, {:+.1f})".format(*per_seed) in row, row
        assert ("the median over shared seeds" in text) == (delta == "median")
        assert json.loads((out / "report.json").read_text())["rows"][0]["vs_reference"]["center"] == delta

@pytest.mark.parametrize("metric", ["pearson", "spearman"])
def test_bootstrap_of_a_regression_metric(metric):
    rng = np.random.default_rng(4)
    gold = rng.random(300) * 5
    close, far = gold + rng.normal(0, 0.3, 300), gold + rng.normal(0, 2.0, 300)
    same = compare.paired_bootstrap(metric, gold, [close, close], [close.copy(), close.copy()], resamples=300)
    assert same["low"] == 0 == same["high"] and not same["excludes_zero"]
    better = compare.paired_bootstrap(metric, gold, [close, close], [far, far], resamples=300)
    assert better["low"] > 0 and better["excludes_zero"]


def test_batched_metrics_of_one_class_are_zero_not_nan_and_more_classes_refused():
    gold, constant = np.array([0, 1, 1, 0, 1]), np.ones(5, dtype=int)
    assert compare.batch_metric("matthews", constant, gold) == 0 == skm.matthews_corrcoef(gold, constant)
    with pytest.raises(compare.CompareError, match="two classes"):
        compare.batch_metric("matthews", np.array([0, 2]), np.array([0, 1]))


@pytest.mark.parametrize("metric, reference", [
    ("accuracy", lambda p, g: skm.accuracy_score(g, p)), ("f1", lambda p, g: skm.f1_score(g, p)),
    ("matthews", lambda p, g: skm.matthews_corrcoef(g, p)), ("pearson", lambda p, g: stats.pearsonr(p, g)[0]),
    ("spearman", lambda p, g: stats.spearmanr(p, g)[0]),
])
def test_batched_metrics_match_the_trainers(metric, reference):
    rng = np.random.default_rng(2)
    if metric in ("pearson", "spearman"):
        gold = rng.random((3, 50)) * 5
        pred = gold + rng.normal(size=(3, 50))
    else:
        gold = rng.integers(0, 2, (3, 50))
        pred = np.where(rng.random((3, 50)) < 0.7, gold, 1 - gold)
    expected = [reference(p, g) for p, g in zip(pred, gold)]
    assert np.allclose(compare.batch_metric(metric, pred, gold), expected)


# ---------------------------------------------------------------- selection

def fake_run(root: Path, name: str, variant: str, lr: float, seed: int, val: float, test: float,
             task_name: str = "mrpc", metric: str = "accuracy", **config):
    run_dir = root / name
    run_dir.mkdir(parents=True)
    summary = {"status": "completed", "variant": variant, "rank": 8, "alpha": 16, "seed": seed, "task": task_name,
               "main_metric": metric, "eval": {metric: test}, "eval_extra": {"val": {metric: val}},
               "peak_lr": lr, "steps": 10, "method_params": 100, "total_params": 1000, "trainable_params": 102,
               "step_time_s": 0.1, "peak_memory_mb": 10}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    base = {"variant": {"name": variant, "lr": lr}, "model": {"name_or_path": "minilm"}, "trainer": {"lr": lr}}
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.merge(base, config)))
    return run_dir


def test_learning_rate_is_chosen_by_median_validation_never_by_test(tmp_path):
    # lr 1e-3: median val 0.80, worse on test; lr 3e-3: one great val seed, so its mean (0.813)
    # beats 1e-3's (0.800) but its median (0.75) does not; best on test. The median picks 1e-3.
    for seed, (val_a, test_a, val_b, test_b) in enumerate([(0.80, 0.60, 0.99, 0.90), (0.81, 0.61, 0.75, 0.91),
                                                          (0.79, 0.62, 0.70, 0.92)]):
        fake_run(tmp_path, f"a{seed}", "lora", 1e-3, seed, val_a, test_a)
        fake_run(tmp_path, f"b{seed}", "lora", 3e-3, seed, val_b, test_b)
    runs, skipped = compare.load_runs([tmp_path], "final")
    (row,) = compare.select(runs)
    assert row.lr == 1e-3 and sorted(row.tests) == [0.60, 0.61, 0.62] and not skipped
    assert row.grid == {1e-3: 0.80, 3e-3: 0.75}


def with_forgetting(run_dir: Path, drift: float, measure: str = "1 - CKA on the main eval set") -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["forgetting"] = {"measure": measure, "headline": "drift", "final": {"drift": drift}, "at_best_val": None}
    (run_dir / "summary.json").write_text(json.dumps(summary))


def test_forgetting_column_is_the_median_of_the_runs_that_measured_it_on_the_same_inputs(tmp_path):
    for seed, drift in enumerate([0.2, 0.4, None]):
        run_dir = fake_run(tmp_path / "a", f"a{seed}", "lora", 1e-3, seed, 0.8, 0.7)
        if drift is not None:
            with_forgetting(run_dir, drift)
    (row,) = compare.select(compare.load_runs([tmp_path / "a"], "final")[0])
    assert compare.forgetting(row) == {"forgetting": pytest.approx(0.3), "forgetting_metric": "drift", "forgetting_n": 2}
    assert compare._forgetting_text(compare.record(row)) == "0.3000 (2/3)"
    for seed, measure in enumerate(["1 - CKA on the main eval set", "1 - CKA on probe.txt"]):
        with_forgetting(fake_run(tmp_path / "b", f"b{seed}", "lora", 1e-3, seed, 0.8, 0.7), 0.1, measure)
    (row,) = compare.select(compare.load_runs([tmp_path / "b"], "final")[0])
    assert compare.forgetting(row)["forgetting"] is None and "mixed" in compare.forgetting(row)["forgetting_metric"]


def test_a_rate_is_not_chosen_on_its_surviving_seeds_nor_on_an_undefined_metric(tmp_path):
    # 3e-3 diverged in seeds 1 and 2 (no completed run): its one survivor's 0.95 must not win;
    # 1e-4's metric is undefined (constant predictions) in every seed.
    for seed in range(3):
        fake_run(tmp_path, f"a{seed}", "lora", 1e-3, seed, 0.70, 0.6)
        fake_run(tmp_path, f"c{seed}", "lora", 1e-4, seed, float("nan"), 0.5)
    fake_run(tmp_path, "b0", "lora", 3e-3, 0, 0.95, 0.9)
    runs, _ = compare.load_runs([tmp_path], "final")
    (row,) = compare.select(runs)
    assert row.lr == 1e-3 and row.grid_n == {1e-4: 3, 1e-3: 3, 3e-3: 1}
    assert row.grid[3e-3] == row.grid[1e-4] == -math.inf
    (record,) = [compare.record(row)]
    assert compare._grid_cell(record, "0.003") == "failed (1/3)" and not record["lr_at_grid_edge"]


def test_best_val_reads_the_predictions_of_the_step_it_reports(tmp_path):
    # Each run evaluated at steps 2 and 3 and was best on val at step 2, where the two methods differ
    # by +0.25 accuracy (one of four examples); at step 3 they agree. The difference must be step 2's.
    gold = np.array([0, 1, 1, 0])
    logits = lambda predicted: np.eye(2)[predicted]
    for variant, at_2 in (("lora", [0, 1, 0, 0]), ("dora", [0, 1, 1, 0])):
        for seed in (0, 1):
            run_dir = fake_run(tmp_path, f"{variant}{seed}", variant, 1e-3, seed, 0.8, 0.75)
            summary = json.loads((run_dir / "summary.json").read_text())
            summary["steps"] = 3
            summary["eval_at_best_val"] = {"step": 2, "val": {"accuracy": 0.9},
                                           "test": {"accuracy": float(np.mean(np.array(at_2) == gold))}}
            (run_dir / "summary.json").write_text(json.dumps(summary))
            np.savez(run_dir / "predictions.npz", **{"main.labels": gold, "main.step2": logits(at_2),
                                                     "main.step3": logits(gold)})
    out = tmp_path / "report"
    assert compare.main([str(tmp_path), "--out", str(out), "--at", "best_val", "--resamples", "100"]) == 0
    rows = {row["method"]: row for row in json.loads((out / "report.json").read_text())["rows"]}
    assert rows["dora"]["vs_reference"]["per_seed"] == [0.25, 0.25]
    assert rows["dora"]["test_median"] == 1.0 and rows["lora"]["test_median"] == 0.75


def test_unreadable_runs_are_skipped_with_their_reason(tmp_path):
    fake_run(tmp_path, "ok", "lora", 1e-3, 0, 0.8, 0.7)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "summary.json").write_text('{"status": "compl')
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "summary.json").write_text('{"status": "completed", "eval_extra": {"val": {}}}')
    runs, skipped = compare.load_runs([tmp_path], "best_val")
    reasons = {Path(where).name: why for where, why in skipped}
    assert not runs and reasons["ok"].startswith("no eval_at_best_val")
    assert reasons["half"].startswith("unreadable (JSONDecodeError") and reasons["keys"].startswith("unreadable (KeyError")


def test_runs_without_val_split_or_failed_are_skipped_and_mixed_data_refused(tmp_path):
    fake_run(tmp_path, "ok", "lora", 1e-3, 0, 0.8, 0.7)
    no_val = fake_run(tmp_path, "noval", "lora", 1e-3, 1, 0.8, 0.7)
    summary = json.loads((no_val / "summary.json").read_text())
    summary["eval_extra"] = {}
    (no_val / "summary.json").write_text(json.dumps(summary))
    (tmp_path / "failed").mkdir()
    (tmp_path / "failed" / "summary.json").write_text(json.dumps({"status": "failed", "error": "boom"}))
    runs, skipped = compare.load_runs([tmp_path], "final")
    assert len(runs) == 1 and {Path(w).name for w, _ in skipped} == {"noval", "failed"}
    fake_run(tmp_path, "other_data", "dora", 1e-3, 0, 0.8, 0.7, task={"max_train_examples": 100})
    runs, _ = compare.load_runs([tmp_path], "final")
    with pytest.raises(compare.CompareError, match=r"task mrpc: runs differ in task.max_train_examples"):
        compare.check_comparable(runs, allow_mixed=False)
    assert compare.check_comparable(runs, allow_mixed=True)


def test_report_over_two_tasks_has_the_headline_and_each_tasks_chosen_rate(tmp_path):
    # Each task chooses its own rate (by validation), and the headline averages the test medians.
    for seed in range(3):
        for lr, val, test in [(1e-3, 0.8, 0.70), (3e-3, 0.7, 0.90)]:
            fake_run(tmp_path, f"mrpc_{lr}_{seed}", "lora", lr, seed, val, test)
            fake_run(tmp_path, f"stsb_{lr}_{seed}", "lora", lr, seed, 1.5 - val, test - 0.1, task_name="stsb",
                     metric="pearson")
    out = tmp_path / "report"
    assert compare.main([str(tmp_path), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "| method | mrpc | stsb | avg |" in text  # the LoRA paper's order of tasks
    assert "| lora | 70.0 (70.0–70.0) | 80.0 (80.0–80.0) | 75.0 |" in text
    assert "| lora | 0.001 | 0.003 |" in text


def test_a_repeated_run_is_refused(tmp_path):
    fake_run(tmp_path, "a", "lora", 1e-3, 0, 0.8, 0.7)
    fake_run(tmp_path, "again", "lora", 1e-3, 0, 0.8, 0.7)
    runs, _ = compare.load_runs([tmp_path], "final")
    with pytest.raises(compare.CompareError, match="are the same method, lr and seed"):
        compare.check_comparable(runs, allow_mixed=True)


def test_compare_cli_errors_are_one_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for argv, message in [([str(empty)], "error: roots: no completed run with a val split below"),
                          ([str(tmp_path / "nope")], "error: roots: not a directory"),
                          ([str(empty), "--confidence", "2"], "error: --confidence=2.0 must be in (0, 1)")]:
        result = compare_py(*argv, "--out", str(tmp_path / "out"))
        last = result.stderr.strip().splitlines()[-1]  # (bitsandbytes may print a notice on import)
        assert result.returncode == 2 and last.startswith(message) and "Traceback" not in result.stderr, argv


def compare_py(*argv):
    import subprocess
    import sys

    return subprocess.run([sys.executable, str(ROOT / "analysis" / "compare.py"), *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_predictions_come_back_in_the_eval_sets_order(minilm):
    """Evaluation runs length-sorted batches; each example's scores must still be its own."""
    from training.data import make_loader
    from training.device import Runtime
    from training.evaluation import evaluate_with_predictions

    model, tokenizer = minilm
    texts = ["a fine film , truly .", "no", "the acting was superb but the ending , alas , was clumsy and far too long .",
             "dull", "it was not good at all .", "an odd , slow , yet oddly moving picture about nothing much ."]
    data = [{"sentence": t, "label": i % 2} for i, t in enumerate(texts)]
    loader = make_loader(data, tokenizer, ["sentence"], 64, batch_size=4, shuffle=False)
    assert list(loader.example_order) != list(range(len(data)))  # the sort did reorder
    _, predictions = evaluate_with_predictions(model, loader, ["accuracy"], Runtime(torch.device("cpu")))
    assert predictions.labels.tolist() == [ex["label"] for ex in data]
    with torch.no_grad():
        alone = torch.cat([model(**tokenizer(t, return_tensors="pt")).logits for t in texts]).numpy()
    assert np.allclose(predictions.scores, alone, atol=1e-5)


# ---------------------------------------------------------------- equal budget

@pytest.mark.parametrize("variant", ["lora", "dora", "adalora", "qlora", "staged"])
def test_budget_rank_lands_within_one_rank_step_and_is_what_trains(variant):
    model, _ = load_model("minilm", num_labels=2)
    budget = 100_000
    choice = rank_for_budget(model, variant, ["query", "value"], budget, ["classifier"])
    per_rank = variants.get_variant(variant).parameters_at_rank(384, 384, 1) - \
        variants.get_variant(variant).parameters_at_rank(384, 384, 0)
    assert abs(choice.method_params - budget) <= 12 * per_rank / 2  # 12 adapted layers
    settings = dict(choice.settings)
    variants.inject_adapters(model, variant, ["query", "value"], alpha=16, exclude=["classifier"], **settings)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if variant == "adalora":  # P, Q, lambda start at 1.5x the final rank; the budget counts the final rank
        assert variants.variant_of(model).target_rank == choice.rank  # a model-wide setting of the variant
        assert trained == choice.method_params // choice.rank * settings["rank"]
    else:
        assert trained == choice.method_params


def test_budget_below_one_rank_and_baselines():
    model, _ = load_model("minilm", num_labels=2)
    with pytest.raises(ConfigError, match=r"budget=1000 is below one rank of lora on the targeted layers; allowed: >= 9216"):
        rank_for_budget(model, "lora", ["query", "value"], 1000, ["classifier"])
    with pytest.raises(ConfigError, match="budget=0 must be null or a positive integer"):
        rank_for_budget(model, "lora", ["query", "value"], 0, ["classifier"])
    assert rank_for_budget(model, "full", None, 1000, ["classifier"]) is None


# ---------------------------------------------------------------- end to end on real data

@needs_glue
def test_compare_end_to_end_on_a_tiny_real_mrpc_sweep(tmp_path, monkeypatch, capsys):
    sweep = tmp_path / "sweep"
    result = run_py(
        "-m", "variant=lora,dora", "seed=0,1", "task=mrpc", f"task.data_dir={GLUE_DIR / 'MRPC'}",
        "task.val_fraction=0.1", "task.max_train_examples=48", "model.max_length=32", "trainer.batch_size=8",
        "trainer.max_steps=3", "trainer.eval_every=2", "trainer.eval_batch_size=64", "trainer.forgetting.examples=32",
        "tracking.mode=disabled", "budget=40000", f"hydra.sweep.dir={sweep}")  # (its time: 775 examples evaluated twice)
    assert result.returncode == 0, result.stderr[-3000:]
    _, evaluations = load_task(glue_task("mrpc"))
    dev_labels = np.array([ex["label"] for ex in evaluations["main"]])
    for run_dir in sorted(p for p in sweep.iterdir() if (p / "summary.json").is_file()):
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["budget"]["requested"] == 40000 and summary["rank"] == summary["budget"]["rank"]
        assert summary["val_fraction"] == 0.1 and summary["eval_at_best_val"]["step"] in (2, 3)  # evaluated at 2, 3
        saved = np.load(run_dir / "predictions.npz")
        assert np.array_equal(saved["main.labels"], dev_labels)  # the dev file's order, though evaluated by length
        predicted = saved["main.step3"].argmax(-1)
        assert skm.accuracy_score(dev_labels, predicted) == pytest.approx(summary["eval"]["accuracy"])
        assert len(saved["val.labels"]) == 367
    out = tmp_path / "report"
    result = compare_py(str(sweep), "--out", str(out), "--resamples", "200")
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    rows = {row["method"]: row for row in report["rows"]}
    assert set(rows) == {"lora", "dora"}
    dora = rows["dora"]
    assert dora["n"] == 2 and dora["seeds"] == [0, 1]
    summaries = {(json.loads((d / "summary.json").read_text())["variant"], json.loads((d / "summary.json")
                  .read_text())["seed"]): json.loads((d / "summary.json").read_text()) for d in sweep.iterdir()
                 if (d / "summary.json").is_file()}
    per_seed = [summaries["dora", s]["eval"]["accuracy"] - summaries["lora", s]["eval"]["accuracy"] for s in (0, 1)]
    assert dora["vs_reference"]["per_seed"] == pytest.approx(per_seed)  # paired by seed, at the reported step
    assert dora["vs_reference"]["difference"] == pytest.approx(np.mean(per_seed))
    drifts = [summaries["dora", s]["forgetting"]["final"]["drift"] for s in (0, 1)]
    assert dora["forgetting_metric"] == "drift" and dora["forgetting"] == pytest.approx(np.median(drifts))
    assert "forgetting (drift)" in (out / "report.md").read_text()

    # --at best_val: each run at its step with the best validation metric, predictions of that step
    assert compare_py(str(sweep), "--out", str(tmp_path / "best"), "--at", "best_val").returncode == 0
    best = {row["method"]: row for row in json.loads((tmp_path / "best" / "report.json").read_text())["rows"]}
    at_best = {key: s["eval_at_best_val"]["test"]["accuracy"] for key, s in summaries.items()}
    assert sorted(best["dora"]["runs"]) == sorted(dora["runs"])
    assert best["dora"]["vs_reference"]["per_seed"] == pytest.approx(
        [at_best["dora", s] - at_best["lora", s] for s in (0, 1)])
    for name in ("report.md", "report.csv", "pareto_params.png", "pareto_step_time.png", "seeds.png"):
        assert (out / name).is_file(), name

    # The same runs as W&B serves them (summary and nested config per run): the same selection and
    # numbers, without the bootstrap, which needs the predictions only the run dirs hold.
    class FakeRun:
        def __init__(self, run_dir):
            self.id = run_dir.name
            self.summary = json.loads((run_dir / "summary.json").read_text())
            self.config = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))

    class FakeApi:
        def runs(self, project):
            assert project == "me/glue"
            return [FakeRun(p) for p in sorted(sweep.iterdir()) if (p / "summary.json").is_file()]

    import wandb

    monkeypatch.setattr(wandb, "Api", FakeApi)
    assert compare.main(["--wandb", "me/glue", "--out", str(tmp_path / "from_wandb")]) == 0
    from_wandb = json.loads((tmp_path / "from_wandb" / "report.json").read_text())
    for row in from_wandb["rows"]:
        local = rows[row["method"]]
        keys = ("lr", "val_median", "test_median", "test_min", "test_max", "seeds", "method_params")
        assert {k: row[k] for k in keys} == {k: local[k] for k in keys}
    assert rows["dora"]["vs_reference"].get("difference") is not None
    assert {r["method"]: r for r in from_wandb["rows"]}["dora"]["vs_reference"] == {
        "note": "no per-example predictions (W&B keeps summaries only; pass the run dirs)"}

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(wandb, "Api", offline)
    capsys.readouterr()
    assert compare.main(["--wandb", "me/glue", "--out", str(tmp_path / "offline")]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --wandb='me/glue': could not read its runs (ConnectionError: no network)")
