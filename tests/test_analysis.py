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
