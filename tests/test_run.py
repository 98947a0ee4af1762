"""run.py end to end: run dirs, sweeps, W&B offline files, and one-line errors for bad input."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors import safe_open
from safetensors.torch import load_file
from test_data import write_sst2

from schema import ConfigError
from schema.door import check_overrides
from schema.variant import node
from training import run_experiment
from training.cli import check_group_choices
from variants.methods.lora import LoRASettings

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["trainer.max_steps=4", "trainer.eval_every=2", "trainer.log_every=2"]
TINY = [*STEPS, "task.train_size=64", "task.eval_size=32"]


def run_py(*args, cwd=ROOT, **env_values):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_SILENT": "true", **env_values}
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600, check=False)


def assert_run_dir(run_dir: Path, steps: int = 4) -> dict:
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "adapter.safetensors"):
        assert (run_dir / name).is_file(), name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == steps
    assert 0 < summary["trainable_params"] < summary["total_params"]
    for key in ("wall_time_s", "step_time_s", "peak_memory_mb"):
        assert summary[key] > 0, key
    assert set(summary["eval"]) >= {"accuracy", "f1", "loss"}
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/loss" in r]
    evals = [r for r in records if "eval/accuracy" in r]
    assert [r["step"] for r in train] == list(range(2, steps + 1, 2))
    assert all("train/lr" in r for r in train)
    assert [r["step"] for r in evals] == list(range(2, steps + 1, 2))
    assert "${" not in (run_dir / "config.yaml").read_text()  # resolved
    with safe_open(str(run_dir / "adapter.safetensors"), "pt") as f:
        assert any(k.endswith("lora_A") for k in f.keys())  # noqa: SIM118  (safe_open is no dict)
    return summary


def wandb_offline_runs(run_dir: Path) -> list[Path]:
    return list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))


def test_single_run(tmp_path):
    """The default experiment, with peft and bitsandbytes made to fail on import: a LoRA run needs
    neither, and importing them costs seconds per run (``training/optim.py``'s schedules)."""
    for package in ("peft", "bitsandbytes"):
        (tmp_path / "blocked" / package).mkdir(parents=True)
        (tmp_path / "blocked" / package / "__init__.py").write_text(f"raise ImportError('{package} imported')\n")
    run_dir = tmp_path / "single"
    pythonpath = os.pathsep.join(filter(None, [str(tmp_path / "blocked"), os.environ.get("PYTHONPATH")]))
    result = run_py(*TINY, f"hydra.run.dir={run_dir}", PYTHONPATH=pythonpath)
    assert result.returncode == 0, result.stderr
    assert "imported" not in result.stderr
    summary = assert_run_dir(run_dir)
    assert summary["variant"] == "lora" and summary["rank"] == 8 and len(summary["adapted_modules"]) == 12
    assert len(wandb_offline_runs(run_dir)) == 1
    assert summary["wandb_run_id"] in wandb_offline_runs(run_dir)[0].name


def test_multirun_leaves_one_dir_per_job_in_one_wandb_group(tmp_path):
    """The headline command, `variant=dora rank=...  -m`, on a tiny budget."""
    sweep_dir = tmp_path / "sweep"
    result = run_py(*TINY, "variant=dora", "rank=2,4", f"hydra.sweep.dir={sweep_dir}", "-m")
    assert result.returncode == 0, result.stderr
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [p.name.split(",")[0] for p in jobs] == ["0_rank=2", "1_rank=4"]  # job number + overrides
    summaries = [assert_run_dir(job) for job in jobs]
    assert [(s["variant"], s["rank"]) for s in summaries] == [("dora", 2), ("dora", 4)]
    assert summaries[0]["trainable_params"] < summaries[1]["trainable_params"]
    groups = {s["wandb_group"] for s in summaries}
    assert groups == {sweep_dir.name}
    assert all(len(wandb_offline_runs(job)) == 1 for job in jobs)


def test_adalora_run_records_its_rank_allocation(tmp_path):
    run_dir = tmp_path / "ada"
    result = run_py(*TINY, "variant=adalora", "rank=6", "variant.target_rank=3", "tracking.mode=disabled",
                    f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    report = summary["adapter_report"]
    assert report["total_rank"] == 3 * 12 and report["initial_total_rank"] == 6 * 12
    assert sum(report["rank_allocation"].values()) == 36
    assert all(trace[0] == [0, 6] for trace in report["rank_trace"].values())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("adalora/budget") == 36 for r in records)
    assert all("train/adapter_loss" in r for r in records if "train/loss" in r)


def test_qlora_and_staged_runs(tmp_path):
    qlora_dir, staged_dir = tmp_path / "qlora", tmp_path / "staged"
    result = run_py(*TINY, "variant=qlora", "trainer.optimizer=paged_adamw_8bit", "tracking.mode=disabled",
                    f"hydra.run.dir={qlora_dir}")
    assert result.returncode == 0, result.stderr
    assert "paged_adamw_8bit needs CUDA; using plain AdamW on cpu" in (qlora_dir / "run.log").read_text()
    summary = assert_run_dir(qlora_dir)
    assert summary["optimizer"] == "adamw" and len(summary["adapted_modules"]) == 37  # all-linear but the head
    quantization = summary["adapter_report"]["quantization"]
    assert quantization["quant_type"] == "nf4" and quantization["double_quant"] is True
    assert quantization["quantized_linears"] == 37 and 0.51 < quantization["bytes_per_param"] < 0.53

    result = run_py(*TINY, "variant=staged", "variant.full_fraction=0.5", "tracking.mode=disabled",
                    f"hydra.run.dir={staged_dir}")
    assert result.returncode == 0, result.stderr
    summary = assert_run_dir(staged_dir)
    assert summary["adapter_report"]["switch_step"] == 2
    records = [json.loads(line) for line in (staged_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in records if "train/loss" in r] == [1, 2]
    with safe_open(str(staged_dir / "adapter.safetensors"), "pt") as f:  # the fully fine-tuned weights too
        assert "bert.embeddings.word_embeddings.weight" in f.keys()  # noqa: SIM118  (safe_open is no dict)


LEARN = ["task.train_size=1280", "task.eval_size=300", "trainer.max_steps=150", "trainer.batch_size=16",
         "trainer.eval_every=150", "tracking.mode=disabled"]


@pytest.mark.slow
@pytest.mark.parametrize("settings", [
    # Each at a rate of its own: LoRA-GA's A and B start large (at 3e-3 it reached 0.71 in 120
    # steps, at 1e-3 0.95); LoRA-Pro's full mode takes full fine-tuning's Adam steps (at 3e-3 it
    # stayed at chance, 0.72 at 1e-4, 0.95 at 3e-4); LoRA+ puts 16x the rate on B (0.75 at 1e-3,
    # 0.85 at 3e-4).
    ["variant=lora_ga", "trainer.lr=1e-3"], ["variant=lora_pro", "trainer.lr=3e-4"],
    ["variant=lora_pro", "variant.mode=efficient", "trainer.lr=3e-3"],
    ["variant=lora", "variant.lr_ratio=16", "trainer.lr=3e-4"],
    # Starts from W0's SVD (PiSSA 0.90 at 1e-3, 0.67 at 3e-4; MiLoRA 0.92 at 3e-3, 0.83 at 1e-3),
    # from the inputs' principal components (EVA 0.92 at 1e-3), and rsLoRA's α/√r (0.95 at 1e-3).
    ["variant=pissa", "trainer.lr=1e-3"], ["variant=milora", "trainer.lr=3e-3"], ["variant=eva", "trainer.lr=1e-3"],
    ["variant=lora", "variant.scaling=rslora", "trainer.lr=1e-3"],
    ["variant=olora", "trainer.lr=1e-3"],
    # VeRA trains vectors over frozen random A and B, at peft's default r (0.89 at 5e-2, 0.68 at 1e-2).
    ["variant=vera", "rank=256", "trainer.lr=5e-2"],
    # HiRA moves each weight by a fraction B·A of itself (0.98 at 3e-2, 0.82 at 1e-2, 0.70 at 3e-3);
    # GraLoRA at LoRA's smoke rate (0.95 at 3e-3, 0.78 at 1e-3).
    ["variant=hira", "trainer.lr=3e-2"], ["variant=gralora", "trainer.lr=3e-3"],
    # CorDA's instruction-previewed start on its training batches' covariance (0.92 at 1e-3).
    ["variant=corda", "trainer.lr=1e-3"],
], ids=["lora_ga", "lora_pro", "lora_pro_efficient", "loraplus", "pissa", "milora", "eva", "rslora", "olora", "vera",
        "hira", "gralora", "corda"])
def test_data_guided_variants_learn_the_smoke_task_through_run_py(tmp_path, settings):
    run_dir = tmp_path / "run"
    result = run_py(*LEARN, *settings, f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 150
    assert summary["eval"]["accuracy"] > 0.8, summary["eval"]
    given = float(next(o for o in settings if o.startswith("trainer.lr=")).split("=")[1])
    assert summary["peak_lr"] == given  # trainer.lr=... wins over the variant's own rate (lora_pro's 3e-4)
    if "variant=lora_ga" in settings:
        assert summary["initialization"]["init_batches"] == 8 and len(summary["initialization"]["gradient_norm"]) == 12
    elif "variant=eva" in settings:  # ranks redistributed under the budget of rank 8 on 12 layers
        ranks = summary["initialization"]["ranks"]
        assert sum(ranks.values()) == 96 and len(set(ranks.values())) > 1 and summary["initialization"]["batches"] > 1
    elif "variant=corda" in settings:  # 8 training batches of 16: the covariance of 128 samples
        assert summary["initialization"]["batches"] == 8 and summary["initialization"]["samples_per_process"] == 128
    else:
        assert summary["initialization"] == {}
    log = (run_dir / "run.log").read_text()
    if "variant.lr_ratio=16" in settings:  # B (and the vectors) in their own AdamW group at 16x
        assert "13 tensors at weight decay 0, rate x1; 13 tensors at weight decay 0, rate x16" in log, log


def test_a_bf16_checkpoint_trains_fp32_adapters(tmp_path):
    run_dir = tmp_path / "bf16"
    # 2 steps on short inputs: bf16 autocast is ~13x slower than fp32 on a CPU without native bf16
    result = run_py("trainer.max_steps=2", "trainer.eval_every=2", "task.train_size=32", "task.eval_size=16",
                    "model.max_length=16", "variant=dora", "model.dtype=bfloat16", "tracking.mode=disabled",
                    f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr
    saved = load_file(run_dir / "adapter.safetensors")
    adapter = {k: v.dtype for k, v in saved.items() if k.endswith(("lora_A", "lora_B", "magnitude"))}
    assert len(adapter) == 36 and set(adapter.values()) == {torch.float32}
    assert saved["classifier.weight"].dtype == torch.float32  # the head too: fp32 master weights
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["precision"] == "bf16"  # over bf16 frozen weights, under autocast


def test_baselines_run_as_variants_in_one_sweep(tmp_path, capsys):
    from analysis import glue_table

    sweep_dir = tmp_path / "sweep"
    result = run_py(*TINY, "variant=head,bitfit,full", "tracking.mode=disabled", f"hydra.sweep.dir={sweep_dir}", "-m")
    assert result.returncode == 0, result.stderr
    summaries, saved = {}, {}
    for job in (p for p in sweep_dir.iterdir() if p.is_dir()):
        summary = json.loads((job / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["steps"] == 4 and summary["rank"] is None
        assert summary["adapted_modules"] == [] and "accuracy" in summary["eval"]
        summaries[summary["variant"]] = summary
        with safe_open(str(job / "adapter.safetensors"), "pt") as f:
            saved[summary["variant"]] = set(f.keys())
    head, bitfit, full = summaries["head"], summaries["bitfit"], summaries["full"]
    assert head["trainable_params"] == 384 * 2 + 2 and saved["head"] == {"classifier.weight", "classifier.bias"}
    assert all(k.endswith(".bias") or k.startswith("classifier.") for k in saved["bitfit"])
    assert head["trainable_params"] < bitfit["trainable_params"] < full["trainable_params"] == full["total_params"]
    assert full["peak_lr"] == 1e-4 and bitfit["peak_lr"] == 3e-3  # each variant's own rate, from its YAML
    assert (head["method_params"], head["head_params"]) == (0, 770)  # the paper tables count the method alone
    assert full["method_params"] == full["total_params"] - 770 and bitfit["head_params"] == 770
    assert saved["head"] < saved["bitfit"] < saved["full"] and "bert.embeddings.word_embeddings.weight" in saved["full"]
    capsys.readouterr()
    assert glue_table.main([str(sweep_dir)]) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    rows = [line.split(" | ")[0].lstrip("| ") for line in table[1:]]
    assert rows == ["bitfit", "full", "head"]


def test_a_cut_off_sweep_is_completed_by_rerunning_it_with_skip_completed(tmp_path):
    """The same command and sweep dir with skip_completed=true: a completed job is left alone,
    one that failed (or never finished) runs again from a clean metrics file."""
    sweep_dir = tmp_path / "sweep"
    command = [*TINY, "variant=head,bitfit", "tracking.mode=disabled", f"hydra.sweep.dir={sweep_dir}"]
    assert run_py(*command, "-m").returncode == 0
    done, cut = sorted(p for p in sweep_dir.iterdir() if p.is_dir())
    kept = (done / "summary.json").read_text()
    (cut / "summary.json").write_text(json.dumps({"status": "failed", "error": "killed"}))
    records = len((cut / "metrics.jsonl").read_text().splitlines())
    result = run_py(*command, "skip_completed=true", "-m")
    assert result.returncode == 0, result.stderr
    assert f"skip: {done} already holds a completed run" in result.stderr and str(cut) not in result.stderr
    assert (done / "summary.json").read_text() == kept
    assert json.loads((cut / "summary.json").read_text())["status"] == "completed"
    assert len((cut / "metrics.jsonl").read_text().splitlines()) == records  # not the old records twice


def test_mnli_and_stsb_from_glue_folders(tmp_path):
    """Pair inputs, MNLI's two dev sets, and STS-B's regression head, end to end."""
    from test_glue import LAYOUTS, write_layout

    for task in ("mnli", "stsb"):
        folder = write_layout(task, tmp_path / task)
        for file, lines in LAYOUTS[task].items():  # a second row per split, with another label
            second = [line.replace("3.800", "1.200").replace("5.000", "0.500").replace("\tneutral\tneutral", "\tneutral\tentailment")
                      for line in lines[1:]]
            (folder / file).write_text("\n".join(lines + second) + "\n", encoding="utf-8")
        run_dir = tmp_path / f"run_{task}"
        result = run_py("trainer.max_steps=2", "trainer.eval_every=epoch", "trainer.batch_size=1", f"task={task}",
                        f"task.data_dir={folder}", "tracking.mode=disabled", f"hydra.run.dir={run_dir}")
        assert result.returncode == 0, result.stderr
        summary = json.loads((run_dir / "summary.json").read_text())
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        if task == "mnli":
            assert set(summary["eval_extra"]) == {"mismatched"} and "accuracy" in summary["eval_extra"]["mismatched"]
            assert any("eval_mismatched/accuracy" in r for r in records)
            assert set(summary["eval_extra_best"]) == {"mismatched"}  # at the best matched evaluation
        else:
            assert set(summary["eval"]) == {"loss", "pearson", "spearman"}
        assert summary["eval_best"]["step"] == 2  # eval_every=epoch: 2 examples, batch 1 → after step 2

    # The LoRA paper's warm start: STS-B's adapters start as MNLI's (its 3-class head is not
    # loaded into the 1-output regression head). At lr 1e-12 they end where they started.
    run_dir = tmp_path / "stsb_from_mnli"
    result = run_py("trainer.max_steps=2", "trainer.batch_size=1", "trainer.lr=1e-12", "task=stsb",
                    f"task.data_dir={tmp_path / 'stsb'}", f"init_from={tmp_path / 'run_mnli'}",
                    "tracking.mode=disabled", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr
    assert json.loads((run_dir / "summary.json").read_text())["init_from"] == str(tmp_path / "run_mnli")
    mnli, stsb = load_file(tmp_path / "run_mnli" / "adapter.safetensors"), load_file(run_dir / "adapter.safetensors")
    lora = [k for k in mnli if "lora_" in k]
    assert len(lora) == 24 and max((stsb[k] - mnli[k]).abs().max().item() for k in lora) < 1e-8
    assert mnli["bert.encoder.layer.0.attention.self.query.lora_B"].abs().max() > 0  # MNLI's trained B
    assert stsb["classifier.weight"].shape == (1, 384) and mnli["classifier.weight"].shape == (3, 384)


def test_local_glue_folder_and_model_path(tmp_path):
    """Real-data path offline: SST-2 from a GLUE-format folder, model from a local folder."""
    from training.models import resolve_model_path

    data = write_sst2(tmp_path / "SST-2", n=40)
    run_dir = tmp_path / "sst2"
    result = run_py(*STEPS, "task=sst2", f"task.data_dir={data}", f"model.name_or_path={resolve_model_path('minilm')}",
                    "tracking.mode=disabled", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["task"] == "sst2" and summary["eval_examples"] == 2 and summary["wandb_run_id"] is None
    assert not (run_dir / "wandb").exists()


# The allowed lists come from their sources: conf/variant/ and LoRA's config node (its settings + runner keys).
VARIANTS = ", ".join(sorted(p.stem for p in (ROOT / "conf" / "variant").glob("*.yaml")))
LORA_KEYS = ", ".join(sorted(f"variant.{f.name}" for f in dataclasses.fields(node("lora", LoRASettings))))


@pytest.mark.parametrize(
    "override, message",
    [  # one case per place a mistake can surface: before Hydra, in the model, in tracking, in a baseline
        ("variant=foo", f"variant='foo' is not a known variant; allowed: {VARIANTS}"),
        ("rank=0", "rank=0 must be an integer >= 1"),
        ("+variant.foo=1", f"variant.foo is not a config key; allowed: {LORA_KEYS}"),
        ("model.name_or_path=/no/such/model", "model.name_or_path='/no/such/model' is neither"),
        ("tracking.mode=sometimes", "tracking.mode='sometimes' is not supported; allowed: online, offline, disabled"),
        ("variant=full variant.lr=0", "variant.lr=0.0 must be null or a finite number > 0"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, override, message):
    run_dir = tmp_path / "bad"
    result = run_py(*TINY, *override.split(), f"hydra.run.dir={run_dir}")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, result.stderr
    assert not (run_dir / "metrics.jsonl").exists()  # nothing started


@pytest.mark.parametrize(
    "override, message",
    [
        ("variant=qlora variant.quant_type=int4", "variant.quant_type='int4' is not supported; allowed: nf4, fp4, int8"),
        ("variant=staged variant.full_fraction=1.5", "variant.full_fraction=1.5 must be a finite number in (0, 1)"),
        ("variant=staged variant.full_fraction=0.1", "variant.full_fraction=0.1 of 4 steps gives a switch at step 0"),
        ("variant.dropout=1.0", "variant.dropout=1.0 must be a finite number in [0, 1)"),
        ("trainer.lr=abc", "trainer.lr='abc' must be null or a finite number > 0"),
        ("seed=x", "seed='x' must be an integer"),
        ("variant=adalora variant.target_rank=9", "variant.target_rank=9.0 must be a number in (0, rank=8]"),
        ("variant=adalora variant.t_init=3 variant.t_final=3", "variant.t_init + variant.t_final = 3 + 3 steps exceeds the 4"),
        ("model=foo", "model='foo' is not a known model; allowed: minilm, roberta_base"),
        ("task=foo", "task='foo' is not a known task; allowed: "),
        ("rank=100000", "rank=100000 must be an integer in [1, 384]"),
        ("rank=abc", "rank='abc' must be an integer"),
        ("alpha=0", "alpha=0.0 must be a finite number > 0"),
        ("variant.targets=[q_proj]", "variant.targets=['q_proj'] matches no nn.Linear module; allowed:"),
        ("variant=full variant.train_embeddings=maybe", "variant.train_embeddings='maybe' must be true or false"),
        ("variant=bitfit variant.targets=[LayerNorm.weight]", "variant.targets=['LayerNorm.weight'] names no module with a bias"),
        ("variant=head variant.targets=[q_proj]", "variant.targets=['q_proj'] names no module with parameters"),
        ("model.dtype=double", "model.dtype='double' is not supported; allowed: float32, bfloat16, float16, auto"),
        ("model.dtype=float16", "model.dtype: the weights load as float16, and training in fp16 needs loss scaling"),
        ("model.dtype=bfloat16 trainer.precision=fp32", "trainer.precision=fp32 cannot train bfloat16 weights"),
        ("init_from=/no/such/run", "init_from='/no/such/run' does not exist; allowed: a finished run dir or its"),
        ("task.val_fraction=0.7", "task.val_fraction=0.7 must be null or a finite number in (0, 0.5]"),
        ("task.val_fraction=0.001", "task.val_fraction=0.001 would leave a class empty on one side"),
        ("budget=5000", "budget=5000 is below one rank of lora on the targeted layers; allowed: >= 9216"),
        ("budget=99999999", "budget=99999999 needs rank 10851 of lora, above the largest possible (384); allowed: <= 3538944"),
        ("variant=lora variant.lr=-1", "variant.lr=-1.0 must be null or a finite number > 0"),
    ],
)
def test_bad_config_values_fail_before_anything_is_written(tmp_path, override, message):
    """The same checks as above, in process, as run.py makes them: the group choices and every
    value (the schema) before Hydra, then what only the model or the data can tell (run.py turns
    any ConfigError into that one line)."""
    overrides = [*TINY, "tracking.mode=disabled", *override.split()]
    run_dir = tmp_path / "bad"
    with pytest.raises(ConfigError) as failure:
        check_group_choices(overrides, ROOT / "conf")
        check_overrides(overrides, ROOT / "conf")
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
            cfg = compose(config_name="config", overrides=overrides)
        run_experiment(cfg, run_dir)
    assert message in str(failure.value) and "\n" not in str(failure.value)
    assert not run_dir.exists()


@pytest.mark.parametrize("native", [False, True])
def test_bf16_on_a_cpu_without_native_bf16_is_logged_once_with_the_fast_choice(tmp_path, monkeypatch, caplog, native):
    """On an x86 CPU with neither AVX-512 BF16 nor AMX, bf16 autocast is software-emulated (12-14x
    slower than fp32 there): the run says so and names trainer.precision=fp32; with either, silence."""
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    overrides = ["trainer.max_steps=1", "trainer.eval_every=1", "task.train_size=16", "task.eval_size=8",
                 "trainer.precision=bf16", "tracking.mode=disabled"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=overrides)
    with caplog.at_level("WARNING"):
        run_experiment(cfg, tmp_path / "run")
    notes = [r.getMessage() for r in caplog.records if "without AVX-512 BF16" in r.getMessage()]
    assert len(notes) == (0 if native else 1)
    assert native or "trainer.precision=fp32" in notes[0]
