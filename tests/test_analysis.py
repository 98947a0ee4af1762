import json

from analysis.collect_runs import collect, main


def fake_run(folder, variant, rank, accuracy):
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({
        "variant": variant, "rank": rank, "alpha": 2 * rank, "seed": 0, "task": "smoke",
        "trainable_params": 1000 * rank, "main_metric": "accuracy", "eval": {"accuracy": accuracy, "loss": 0.1},
        "step_time_s": 0.2, "peak_memory_mb": 900.4,
    }))


def test_collect_runs_table_and_csv(tmp_path, capsys):
    fake_run(tmp_path / "sweep" / "0_rank=8", "lora", 8, 0.91234)
    fake_run(tmp_path / "sweep" / "1_rank=64", "lora", 64, 0.95)
    rows = collect([tmp_path])
    assert [(r["rank"], r["value"]) for r in rows] == [(8, 0.9123), (64, 0.95)]
    assert main([str(tmp_path), "--csv", str(tmp_path / "out.csv")]) == 0
    out = capsys.readouterr().out
    assert "| lora | 64 | 128 | 0 | smoke | accuracy | 0.95 | 64000 |" in out
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
