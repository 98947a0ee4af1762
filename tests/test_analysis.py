import json

import pytest

from analysis.collect_runs import collect, main


def fake_run(folder, variant, rank, accuracy, at_start=None):
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({
        "status": "completed", "variant": variant, "rank": rank, "alpha": 2 * rank, "seed": 0, "task": "smoke",
        "trainable_params": 1000 * rank, "main_metric": "accuracy", "eval": {"accuracy": accuracy, "loss": 0.1},
        "step_time_s": 0.2, "peak_memory_mb": 900.4, "eval_at_start": at_start,
    }))


def test_collect_runs_table_and_csv(tmp_path, capsys):
    fake_run(tmp_path / "sweep" / "0_rank=8", "lora", 8, 0.91234)
    fake_run(tmp_path / "sweep" / "1_rank=64", "lora", 64, 0.95, at_start={"accuracy": 0.51234, "loss": 0.7})
    failed = tmp_path / "sweep" / "2_rank=100000"
    failed.mkdir()
    (failed / "summary.json").write_text(json.dumps({"status": "failed", "variant": "lora", "error": "..."}))
    rows = collect([tmp_path])
    assert [(r["rank"], r["value"]) for r in rows] == [(8, 0.9123), (64, 0.95)]
    assert main([str(tmp_path), "--csv", str(tmp_path / "out.csv")]) == 0
    out = capsys.readouterr().out
    assert "| lora | 64 | 128 | 0 | smoke | accuracy | 0.5123 | 0.95 | 64000 |" in out  # before and after training
    assert "| lora | 8 | 16 | 0 | smoke | accuracy |  | 0.9123 | 8000 |" in out  # not evaluated at step 0
    assert (tmp_path / "out.csv").read_text().count("\n") == 3
    assert main([str(tmp_path / "nothing")]) == 2


def test_rank_allocation_plot(tmp_path, capsys):
    from analysis import rank_allocation

    run = tmp_path / "ada"
    run.mkdir()
    modules = [f"bert.encoder.layer.{i}.attention.self.{kind}" for i in range(2) for kind in ("query", "value")]
    final = dict(zip(modules, [1, 3, 2, 2]))
    (run / "summary.json").write_text(json.dumps({"adapter_report": {
        "rank_allocation": final, "total_rank": 8, "initial_total_rank": 12,
        "rank_trace": {m: [[0, 3], [10, 3], [20, r]] for m, r in final.items()},
    }}))
    rank_allocation.main([str(run), "--csv", str(tmp_path / "trace.csv")])
    out = capsys.readouterr().out
    assert "    0       1       3" in out and "    1       2       2" in out and "total 8 of 12" in out
    assert (run / "rank_allocation.png").stat().st_size > 10_000
    assert (tmp_path / "trace.csv").read_text().count("\n") == 1 + 4 * 3
    fake_run(tmp_path / "lora", "lora", 8, 0.9)
    try:
        rank_allocation.main([str(tmp_path / "lora")])
    except SystemExit as err:
        assert "not a run of a rank-allocating variant" in str(err)
    else:
        raise AssertionError("a LoRA run has no allocation to plot")


def test_glue_table_mean_std_over_seeds_in_paper_order(tmp_path, capsys):
    from analysis import glue_table

    def run(name, variant, task, seed, value, rank=8, config=""):
        folder = tmp_path / name
        folder.mkdir()
        if config:
            (folder / "config.yaml").write_text(config)
        (folder / "summary.json").write_text(json.dumps({
            "status": "completed", "variant": variant, "rank": rank, "alpha": 8, "seed": seed, "task": task, "trainable_params": 1000 * (rank or 22714),
            "main_metric": "accuracy", "eval": {"accuracy": value}, "step_time_s": 0.1, "peak_memory_mb": 1,
        }))

    run("a", "lora", "rte", 0, 0.70)
    run("b", "lora", "rte", 1, 0.74)
    run("c", "lora", "mnli", 0, 0.86)
    run("d", "dora", "rte", 0, 0.75)
    tasks, table = glue_table.aggregate(glue_table.collect([tmp_path]))
    assert tasks == ["mnli", "rte"]  # the paper's column order
    lora = next(row for row in table if row["method"] == "lora")
    mean, std, n = lora["rte"]
    assert (round(mean, 6), n) == (72.0, 2) and std == pytest.approx(2.828427, rel=1e-5)
    assert lora["avg"] == pytest.approx((86.0 + 72.0) / 2)
    assert glue_table.main([str(tmp_path), "--csv", str(tmp_path / "t.csv")]) == 0
    out = capsys.readouterr().out
    assert "| lora | 0.008M | – | 86.0 ± 0.0 (n=1) | 72.0 ± 2.8 (n=2) | 79.0 |" in out  # no head count recorded
    assert "| dora | 0.008M | – | – | 75.0 ± 0.0 (n=1) | 75.0 |" in out
    assert "Cells: mean ± std over seeds of each run's last evaluation" in out
    assert (tmp_path / "t.csv").read_text().splitlines()[0] == (
        "method,method_params,head_params,mnli_mean,mnli_std,mnli_n,rte_mean,rte_std,rte_n,avg")
    run("e", "lora", "rte", 2, 0.72, rank=64)  # two ranks of one variant: one row each
    _, table = glue_table.aggregate(glue_table.collect([tmp_path]))
    assert {row["method"] for row in table} == {"dora", "lora r=8", "lora r=64"}
    run("f", "full", "rte", 0, 0.78, rank=None)  # a baseline: no rank, a row like any variant
    tasks, table = glue_table.aggregate(glue_table.collect([tmp_path]))
    full = next(row for row in table if row["method"] == "full")
    assert full["rte"] == (78.0, 0.0, 1) and full["mnli"] is None and full["avg"] == 78.0

    # Runs that differ in a variant knob are different methods, not seeds of one; --by splits
    # by any other key, and the task's own settings never split a row.
    for name, embeddings, lr, seed, value in [("g", "true", 1e-4, 1, 0.76), ("h", "false", 1e-4, 0, 0.70),
                                              ("i", "false", 5e-5, 1, 0.72)]:
        run(name, "full", "rte", seed, value, rank=None,
            config=f"variant:\n  name: full\n  train_embeddings: {embeddings}\ntrainer:\n  lr: {lr}\n")
    (tmp_path / "f" / "config.yaml").write_text("variant:\n  name: full\n  train_embeddings: true\ntrainer:\n  lr: 5.0e-05\n")
    _, table = glue_table.aggregate(glue_table.collect([tmp_path]))
    by_name = {row["method"]: row for row in table}
    assert by_name["full"]["rte"][::2] == (77.0, 2)  # the knob at its default is not named
    assert by_name["full train_embeddings=false"]["rte"][::2] == (71.0, 2)
    _, table = glue_table.aggregate(glue_table.collect([tmp_path]), by=["trainer.lr"])
    assert {row["method"] for row in table if row["method"].startswith("full")} == {
        "full trainer.lr=5e-05", "full trainer.lr=0.0001",
        "full train_embeddings=false trainer.lr=5e-05", "full train_embeddings=false trainer.lr=0.0001"}
    assert glue_table.main([]) == 2


def test_glue_table_paper_convention_mnli_both_sets_and_head_apart(tmp_path, capsys):
    """--paper: the median over seeds of each run's best evaluation; MNLI's mismatched set in its
    own column (at the best matched step); the method's parameters apart from the head's."""
    from analysis import glue_table

    for seed, (last, best, mm_last, mm_best) in enumerate([(0.80, 0.86, 0.79, 0.85), (0.82, 0.84, 0.81, 0.83),
                                                           (0.70, 0.88, 0.69, 0.87)]):
        folder = tmp_path / f"mnli{seed}"
        folder.mkdir()
        (folder / "summary.json").write_text(json.dumps({
            "status": "completed", "variant": "lora", "rank": 8, "alpha": 16, "seed": seed, "task": "mnli",
            "trainable_params": 297_219, "method_params": 294_912, "head_params": 2_307, "main_metric": "accuracy",
            "eval": {"accuracy": last}, "eval_best": {"step": 3, "accuracy": best},
            "eval_extra": {"mismatched": {"accuracy": mm_last}},
            "eval_extra_best": {"mismatched": {"accuracy": mm_best}}, "step_time_s": 0.1, "peak_memory_mb": 1,
        }))
    assert glue_table.main([str(tmp_path), "--paper", "--csv", str(tmp_path / "t.csv")]) == 0
    out = capsys.readouterr().out
    assert "| method | # params | # head | mnli | mnli-mm | avg |" in out
    assert "| lora | 0.295M | 0.002M | 86.0 (84.0–88.0) | 85.0 (83.0–87.0) | 86.0 |" in out  # avg: main sets only
    assert "median (min–max) over seeds of each run's best evaluation on the dev set (best epoch" in out
    assert (tmp_path / "t.csv").read_text().splitlines()[0].startswith(
        "method,method_params,head_params,mnli_median,mnli_min,mnli_max,mnli_n,mnli-mm_median")
    tasks, table = glue_table.aggregate(glue_table.collect([tmp_path]), stat="mean")  # last evaluations
    assert tasks == ["mnli", "mnli-mm"] and table[0]["mnli"][0] == pytest.approx(77.333333)


def test_warm_and_cold_starts_are_different_methods(tmp_path):
    """init_from (the MNLI warm start) changes the method: its runs are not seeds of a cold start's."""
    from analysis import glue_table

    for name, init_from, value in [("cold", "null", 0.70), ("warm", "runs/mnli", 0.80)]:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.yaml").write_text(f"variant:\n  name: lora\ninit_from: {init_from}\n")
        (folder / "summary.json").write_text(json.dumps({
            "status": "completed", "variant": "lora", "rank": 8, "alpha": 16, "seed": 0, "task": "rte",
            "trainable_params": 1, "main_metric": "accuracy", "eval": {"accuracy": value}, "step_time_s": 0.1,
            "peak_memory_mb": 1,
        }))
    _, table = glue_table.aggregate(glue_table.collect([tmp_path]))
    assert {row["method"]: row["rte"][0] for row in table} == {"lora warm_start=false": 70.0,
                                                               "lora warm_start=true": 80.0}


def test_a_knob_at_its_default_does_not_split_a_method(tmp_path):
    """Runs written before a knob existed (no variant.scaling, variant.lr_ratio; no variant.bias,
    a runner key) and runs that carry it at its default are seeds of one method (n = 2); a knob away from its default is another."""
    from analysis import glue_table

    knobs = {"old": "", "new": "  lr_ratio: null\n  scaling: standard\n  bias: none\n", "plus": "  lr_ratio: 16\n"}
    for seed, (name, extra) in enumerate(knobs.items()):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.yaml").write_text(f"variant:\n  name: lora\n  dropout: 0.0\n{extra}")
        (folder / "summary.json").write_text(json.dumps({
            "status": "completed", "variant": "lora", "rank": 8, "alpha": 16, "seed": seed, "task": "rte",
            "trainable_params": 1, "main_metric": "accuracy", "eval": {"accuracy": 0.7 + seed / 10},
            "step_time_s": 0.1, "peak_memory_mb": 1,
        }))
    _, table = glue_table.aggregate(glue_table.collect([tmp_path]))
    rows = {row["method"]: row["rte"] for row in table}
    assert sorted(rows) == ["lora", "lora lr_ratio=16"] and rows["lora"][2] == 2
