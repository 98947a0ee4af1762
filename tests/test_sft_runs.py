"""Instruction tuning on SmolLM2 through the runner: every variant family trains, the merged
export reloads with plain transformers and generates the same tokens, the peft export loads
into peft with the same outputs, and LoRA learns the smoke task.

The short runs keep the first 2 of SmolLM2's 30 blocks (``model.keep_layers=2``): every adapted
module, loss, evaluation and export path is the full model's, at a fifteenth of the cost.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from peft import PeftModel
from test_causal_lm import ROOT, compose_cfg, needs_smollm2, task_cfg
from transformers import AutoModelForCausalLM, GenerationConfig

from training import run_experiment, rundir
from training.data.sft import prompt_format
from training.export import main as export_main
from training.models import keep_first_layers, load_model, load_trained

pytestmark = needs_smollm2

SHORT = ["model=smollm2", "task=sft_smoke", "model.keep_layers=2", "trainer.max_steps=4", "trainer.eval_every=4",
         "trainer.log_every=1", "task.max_eval_examples=4", "task.max_new_tokens=4", "trainer.batch_size=2",
         "task.train_size=16", "trainer.eval_at_start=false", "trainer.checkpoint_every=null",
         "trainer.forgetting.examples=2", "trainer.forgetting.max_new_tokens=4"]  # the probe, cheaply, on every family
FAMILIES = ["lora", "dora", "adalora", "qlora", "staged", "full", "head", "lora_ga", "lora_pro", "pissa", "milora", "eva",
            "lora variant.lr_ratio=16", "lora variant.scaling=rslora"]
PROMPTS = ["Which is larger, 58 or 85? Answer with the number only.", "Sort these numbers in ascending order: 42 17 93",
           "How many times does the word 'cat' appear? dog cat cat fox cat"]


def short_run(run_dir, *overrides):
    return run_experiment(compose_cfg(*SHORT, *overrides), run_dir)


@pytest.mark.parametrize("variant", FAMILIES, ids=[v.replace(" variant.", "-") for v in FAMILIES])
def test_every_variant_family_trains_on_smollm2(tmp_path, variant):
    summary = short_run(tmp_path, *f"variant={variant}".split())
    assert summary["status"] == "completed" and summary["steps"] == 4
    assert set(summary["eval"]) >= {"loss", "exact_match", "answer_in_output", "perplexity"}
    assert np.isfinite(summary["eval"]["loss"]) and summary["method_params"] > 0
    saved = rundir.read_predictions(tmp_path)
    assert saved["main.generated.step4"].shape == (4,) and saved["main.references"].shape == (4,)
    if variant == "qlora":  # NF4 re-quantization of the real LLaMA linears, bytes per weight reported
        storage = summary["adapter_report"]["quantization"]
        assert storage["quantized_linears"] == 14 and 0.5 < storage["bytes_per_param"] < 0.6


def greedy(model, tokenizer, prompts=PROMPTS, new_tokens=12):
    fmt = prompt_format(tokenizer, task_cfg())
    tokenizer.padding_side = "left"
    batch = tokenizer([fmt.prompt_text(p) for p in prompts], return_tensors="pt", padding=True,
                      add_special_tokens=False)
    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        return model.eval().generate(**batch, generation_config=config)[:, batch["input_ids"].shape[1]:]


@pytest.mark.parametrize("variant", ["lora", "qlora"])
def test_merged_export_reloads_with_plain_transformers_and_generates_the_same(tmp_path, variant):
    run_dir = tmp_path / "run"
    short_run(run_dir, f"variant={variant}", "trainer.lr=0.01")
    adapted, tokenizer = load_trained(run_dir / rundir.ADAPTER)
    assert export_main([str(run_dir), "--merged", str(tmp_path / "merged")]) == 0
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert plain.config.num_hidden_layers == 2 and not any("lora" in n for n, _ in plain.named_parameters())
    expected = greedy(adapted, tokenizer)
    assert torch.equal(greedy(plain, tokenizer), expected)
    untrained, _ = load_model("smollm2", model_type="causal_lm")
    keep_first_layers(untrained, 2)
    assert not torch.equal(greedy(untrained, tokenizer), expected)  # the adapter changed what it writes


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_peft_export_of_a_smollm2_run_loads_into_peft(tmp_path, variant):
    run_dir = tmp_path / "run"
    short_run(run_dir, f"variant={variant}", "trainer.lr=0.01")
    adapted, tokenizer = load_trained(run_dir / rundir.ADAPTER)
    assert export_main([str(run_dir), "--peft", str(tmp_path / "peft")]) == 0
    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert peft_config["task_type"] == "CAUSAL_LM"
    # the base as from_pretrained finds it here (SmolLM2's converted folder), not the alias
    base = AutoModelForCausalLM.from_pretrained(peft_config["base_model_name_or_path"])
    keep_first_layers(base, 2)  # the run trained the first 2 blocks (README: keep_layers)
    loaded = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    ids = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**ids).logits, adapted.eval()(**ids).logits, atol=1e-4, rtol=1e-4)


def test_export_refuses_qlora_in_peft_format_in_one_line(tmp_path):
    run_dir = tmp_path / "run"
    short_run(run_dir, "variant=qlora")
    result = subprocess.run([sys.executable, "-m", "training.export", str(run_dir), "--peft", str(tmp_path / "p")],
                            cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "QLoRA's A and B were trained on the 4-bit base" in result.stderr.strip().splitlines()[-1]


def test_bitfit_is_refused_on_a_model_without_biases(tmp_path):
    from schema import ConfigError

    with pytest.raises(ConfigError, match="LlamaForCausalLM has no bias terms to train"):
        short_run(tmp_path / "run", "variant=bitfit")
    assert not (tmp_path / "run").exists()


def test_subspace_and_amplification_analyses_read_the_causal_lm_adapters(tmp_path):
    from analysis import amplification, subspace_overlap

    r8, r16 = tmp_path / "r8_s0", tmp_path / "r16_s1"
    short_run(r8, "rank=8", "seed=0", "trainer.lr=0.01")
    short_run(r16, "rank=16", "seed=1", "trainer.lr=0.01")
    assert subspace_overlap.main([str(r8), str(r16), "--out", str(tmp_path / "phi")]) == 0
    modules = json.loads((tmp_path / "phi" / "phi.json").read_text())["modules"]
    assert sorted(modules) == [f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "v_proj")]
    assert len(modules["model.layers.1.self_attn.v_proj"]["phi"]) == 8
    csv = tmp_path / "amplification.csv"
    assert amplification.main([str(r8), str(r16), "--csv", str(csv)]) == 0
    rows = csv.read_text().splitlines()
    assert len(rows) == 1 + 8 and all("_proj" in row for row in rows[1:])


@pytest.mark.slow
def test_lora_learns_the_smoke_task_through_run_py(tmp_path):
    """The whole SmolLM2 (30 blocks) through run.py: from no exact answers to many in 24 steps.
    (The default budget, 200 steps, reaches 0.85 on all 200 eval examples: README.)"""
    from test_run import run_py

    run_dir = tmp_path / "learn"
    result = run_py("model=smollm2", "task=sft_smoke", "trainer.max_steps=24", "trainer.eval_every=24",
                    "trainer.lr=3e-3", "task.max_eval_examples=20", "task.max_new_tokens=8", "tracking.mode=disabled",
                    "trainer.forgetting.examples=4", "trainer.forgetting.max_new_tokens=8",
                    "trainer.checkpoint_every=null", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-2000:]
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if "eval/loss" in line]
    (start, end) = evals
    assert start["step"] == 0 and end["step"] == 24
    assert start["eval/exact_match"] <= 0.05 and end["eval/exact_match"] >= 0.3, (start, end)
    assert end["eval/loss"] < start["eval/loss"] / 3
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["eval_at_start"]["exact_match"] == start["eval/exact_match"]  # the before of before/after
