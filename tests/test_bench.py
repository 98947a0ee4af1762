"""The benchmark harness runs end to end at tiny sizes (its figures live in BENCHMARKS.md)."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench


def test_harness_smoke(tmp_path, capsys):
    out = tmp_path / "bench.json"
    only = "full,lora-qv,peft-lora-qv,lora-all,dora-qv,adalora-qv,qlora-qv"
    assert bench.main(["--batch", "2", "--seq", "8", "--rounds", "2", "--steps", "1", "--warmup", "1",
                       "--only", only, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert list(report["train"]) == only.split(",")
    for result in report["train"].values():
        assert result["step_s"] > 0 and result["timed_steps"] == 2 and result["memory_mb"] > 0
    assert report["train"]["full"]["trainable_params"] == report["train"]["full"]["total_params"]
    assert report["train"]["lora-qv"]["trainable_params"] == report["train"]["peft-lora-qv"]["trainable_params"]
    assert set(report["ratios"]) >= {"lora-qv / peft-lora-qv", "lora-all / full", "dora-qv / lora-qv",
                                     "qlora-qv / lora-qv", "merged / base inference"}
    assert set(report["inference_s"]) == {"base", "lora-unmerged", "lora-merged"}
    assert "| lora-qv |" in capsys.readouterr().out


def test_unknown_configuration_is_an_error():
    try:
        bench.main(["--only", "lora-qv,nope", "--batch", "1", "--seq", "4"])
    except SystemExit as err:
        assert "--only has ['nope']; allowed: full, lora-qv" in str(err)
    else:
        raise AssertionError("expected an error")


def test_the_step_is_the_trainers_with_the_variants_hooks(tmp_path):
    """LoRA-GA's and EVA's starts are timed once (PiSSA's SVD is part of building it); LoRA-Pro's
    transform_gradients runs in each step, so its
    full-size moments (bf16 m and v of every adapted 384 x 384 layer) count in its memory."""
    out = tmp_path / "bench.json"
    only = "lora-qv,loraplus-qv,lora_ga-qv,lora_pro-qv,rslora-qv,pissa-qv,milora-qv,eva-qv"
    assert bench.main(["--batch", "2", "--seq", "8", "--rounds", "1", "--steps", "1", "--warmup", "1",
                       "--only", only, "--skip-inference", "--json", str(out)]) == 0
    train = json.loads(out.read_text())["train"]
    assert train["lora_ga-qv"]["init_s"] > 0 and train["eva-qv"]["init_s"] > 0
    assert not {"lora-qv", "rslora-qv", "pissa-qv", "milora-qv"} & {name for name in train if "init_s" in train[name]}
    moments = 12 * 384 * 384 * 2 * 2 / 2**20  # 12 layers (q, v of 6 blocks), m and v, bf16
    adamw_of_a_and_b = 12 * 8 * (384 + 384) * 2 * 4 / 2**20  # which LoRA-Pro's own step replaces
    assert train["lora_pro-qv"]["memory_mb"] - train["lora-qv"]["memory_mb"] == pytest.approx(
        moments - adamw_of_a_and_b, abs=0.01)


def test_process_memory_stages(tmp_path, capsys):
    """bench/process_memory.py: every configuration in its own process, the stages in order,
    RSS split into anonymous + file pages, the peak never below the RSS."""
    import process_memory

    out = tmp_path / "memory.json"
    assert process_memory.main(["--only", "lora-qv,qlora-qv", "--keep-layers", "2", "--steps", "1", "--batch", "2",
                                "--seq", "8", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert list(report) == ["lora-qv", "qlora-qv"]
    for stages in report.values():
        assert [s["stage"] for s in stages] == ["imports", "model loaded (fp32)", "variant applied",
                                                "after malloc_trim", "after 1 training steps"]
        for s in stages:
            assert s["peak_mb"] >= s["rss_mb"] > 0 and abs(s["anon_mb"] + s["file_mb"] - s["rss_mb"]) < 64
    # quantizing touches the fp32 weights and writes the 4-bit copy: applying qlora grows its process, applying
    # lora does not (each measured within its own process: the first load may also convert the GGUF file)
    def growth(stages):
        rss = {s["stage"]: s["rss_mb"] for s in stages}
        return rss["variant applied"] - rss["model loaded (fp32)"]

    assert growth(report["qlora-qv"]) > growth(report["lora-qv"]) + 10
    assert "| variant applied |" in capsys.readouterr().out
    assert process_memory.main(["--only", "lora-qv,nope"]) == 2


def test_saved_activation_bytes_before_and_after_the_lean_paths(tmp_path):
    """With adapter dropout, LoRA's lean backward saves less than the plain path, which saves what
    peft's does; DoRA's factored norm and lean backward save less than V formed. ``--share-base``
    shares the frozen weights between configurations but counts them in each."""
    out = tmp_path / "bench.json"
    assert bench.main(["--batch", "2", "--seq", "16", "--rounds", "1", "--steps", "1", "--warmup", "1",
                       "--dropout", "0.1", "--only", "lora-all,lora-all-plain,peft-lora-all,dora-all,dora-all-plain",
                       "--skip-inference", "--share-base", "--json", str(out)]) == 0
    train = json.loads(out.read_text())["train"]
    assert train["lora-all"]["saved_mb"] < train["lora-all-plain"]["saved_mb"] == train["peft-lora-all"]["saved_mb"]
    assert train["dora-all"]["saved_mb"] < train["dora-all-plain"]["saved_mb"]
    for result in train.values():
        parts = result["memory_parts_mb"]
        assert parts["total"] == pytest.approx(parts["weights"] + parts["grads"] + parts["optimizer"] + parts["saved"])
        assert parts["weights"] > 80  # MiniLM's 22.7M fp32 parameters, shared or not
    base = torch.nn.Sequential(torch.nn.Linear(4, 4))
    shared, own = bench.copy_of(base, True), bench.copy_of(base, False)
    assert shared[0].weight is base[0].weight and own[0].weight is not base[0].weight


def test_layer_profile_smoke(capsys):
    import layer_profile

    assert layer_profile.main(["--d-in", "16", "--d-out", "8", "--tokens", "4", "--rank", "2", "--rounds", "1",
                               "--top", "1"]) == 0
    out = capsys.readouterr().out
    assert "| dora | " in out and "| peft-dora | " in out


def test_group_by_length_bench_reads_a_glue_folder(tmp_path, capsys):
    """bench/group_by_length.py on a small STS-B folder in GLUE's layout: the task composed as
    run.py composes it, padding counted both ways, the four configurations timed."""
    import group_by_length

    folder = tmp_path / "STS-B"
    folder.mkdir()
    rows = ["index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"]
    for i in range(60):
        words = " ".join(["word"] * (1 + i % 17))
        rows.append(f"{i}\tmain\tx\t2012\t{i}\tnone\tnone\tA {words} here.\tThe {words}.\t{i % 6}.000")
    for name in ("train.tsv", "dev.tsv"):
        (folder / name).write_text("\n".join(rows) + "\n")
    out = tmp_path / "gbl.json"
    assert group_by_length.main(["--glue-dir", str(tmp_path), "--tasks", "stsb", "--batches", "1", "--rounds", "1",
                                 "--json", str(out)]) == 0
    (result,) = json.loads(out.read_text())
    assert result["batches_per_epoch"] == 4  # 54 training pairs after 10% held out, batches of 16
    assert result["grouped_padding_share"] < result["plain_padding_share"]
    assert all(result[f"{k}_{p}_step_s"] > 0 for k in ("plain", "grouped") for p in ("fp32", "bf16"))
    assert "| stsb | 4 |" in capsys.readouterr().out
