"""Exports: adapters in peft's format that peft loads onto a fresh base and that reproduce the
adapted model; merged Hugging Face folders that reload with plain transformers."""

import copy
import json

import pytest
import torch
from peft import PeftModel
from test_causal_lm import (  # noqa: F401  (tokenizer fixture below)
    needs_smollm2,
    tiny_llama,
    tokenizer,
)

import variants
from training.export import main as export_main
from variants.interop.peft_format import save_peft_adapter

PEFT_FAMILY = [
    ("lora", {}),
    ("lora", {"scaling": "rslora"}),
    ("dora", {}),
    ("pissa", {}),
    ("adalora", {"total_steps": 100}),
    ("eva", {}),
]


def perturb(model: torch.nn.Module, seed: int = 1) -> None:
    """Every adapter tensor moved off its start, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in variants.layers_of(model).values():
            for name, param in layer.named_parameters():
                if not name.startswith("base."):
                    param.add_(0.05 * torch.randn(param.shape, generator=generator))


def adapt(model, name, settings, targets):
    kwargs = dict(settings)
    total_steps = kwargs.pop("total_steps", None)
    variants.inject_adapters(model, name, targets, rank=4, alpha=8, **kwargs)
    if total_steps:
        variants.variant_of(model).on_train_begin(model, total_steps)
    perturb(model)
    return model


@pytest.mark.parametrize("name, settings", PEFT_FAMILY, ids=[f"{n}{'-' + str(s) if s else ''}" for n, s in PEFT_FAMILY])
def test_peft_loads_the_classifier_adapter_and_gives_the_same_outputs(minilm, batch, tmp_path, name, settings):
    model, _ = minilm
    fresh = copy.deepcopy(model)
    adapted = adapt(model, name, settings, ["query", "value"])
    with torch.no_grad():
        adapted.classifier.weight.add_(0.1)  # the trained head travels in modules_to_save
    trained = ["classifier.weight", "classifier.bias"]
    config = save_peft_adapter(adapted, tmp_path, "classification", trained=trained)
    assert config["modules_to_save"] == ["classifier"] and config["use_dora"] == (name == "dora")
    if settings.get("scaling") == "rslora":  # α/√r at r = 4 is 4, written as lora_alpha = 4·r (not 8)
        assert config["lora_alpha"] == pytest.approx(16.0) and not config["use_rslora"]
    loaded = PeftModel.from_pretrained(fresh, tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, adapted.eval()(**batch).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name, settings", PEFT_FAMILY[:4], ids=["lora", "rslora", "dora", "pissa"])
def test_peft_loads_the_causal_lm_adapter_and_gives_the_same_outputs(tokenizer, tmp_path, name, settings):  # noqa: F811
    base = tiny_llama(tokenizer)
    fresh = copy.deepcopy(base)
    adapted = adapt(base, name, settings, ["q_proj", "v_proj"])
    config = save_peft_adapter(adapted, tmp_path, "causal_lm", trained=[])
    if name == "pissa":  # the update's rank-2r LoRA on the unmodified W0
        assert config["r"] == 8
    loaded = PeftModel.from_pretrained(fresh, tmp_path).eval()
    ids = tokenizer(["Which is larger, 58 or 85?", "Sort: 3 1 2"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**ids).logits, adapted.eval()(**ids).logits, atol=1e-5, rtol=1e-5)


def test_an_eva_adapter_with_its_own_ranks_and_a_rank_0_layer_loads_into_peft(minilm, batch, tmp_path):
    """EVA's ranks from data (rank_pattern, alpha_pattern) and a layer at rank 0, which peft must
    not adapt: the loaded model gives the adapted model's outputs."""
    from training.data import make_loader
    from training.data.synthetic import generate_smoke as generate

    model, minilm_tokenizer = minilm
    fresh = copy.deepcopy(model)
    loader = make_loader(generate(320, 10)[0], minilm_tokenizer, ["sentence"], 64, 16, shuffle=False)
    data = [{k: v for k, v in b.items() if k != "labels"} for b in loader]
    variants.inject_adapters(model, "eva", ["query", "intermediate.dense"], rank=4, alpha=8, rho=2.0)
    variants.variant_of(model).initialize(model, variants.InitData(iter(data * 10), lambda m, b: None))
    layers = variants.layers_of(model)
    dropped = next(name for name, layer in layers.items() if layer.rank)
    layers[dropped].resize(0, 0.0)
    perturb(model)
    config = save_peft_adapter(model, tmp_path, "classification", trained=["classifier.weight", "classifier.bias"])
    ranks = {name: layer.rank for name, layer in layers.items()}
    assert 0 in ranks.values() and len(set(ranks.values()) - {0}) > 1, ranks
    assert dropped not in config["target_modules"] and len(config["target_modules"]) == sum(r > 0 for r in ranks.values())
    assert config["rank_pattern"] and config["alpha_pattern"]
    loaded = PeftModel.from_pretrained(fresh, tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model.eval()(**batch).logits, atol=1e-5, rtol=1e-5)


def test_methods_without_a_peft_lora_are_refused(minilm, tmp_path):
    model, _ = minilm
    variants.inject_adapters(model, "bitfit")
    with pytest.raises(variants.ConfigError, match="variant='bitfit' has no adapter layers"):
        save_peft_adapter(model, tmp_path, "classification")


def test_trained_biases_outside_the_head_are_refused(minilm, tmp_path):
    model, _ = minilm
    variants.inject_adapters(model, "lora", ["query", "value"], rank=4, alpha=8)
    with pytest.raises(variants.ConfigError, match="trained outside the adapters and the task head"):
        save_peft_adapter(model, tmp_path, "classification", trained=["bert.embeddings.LayerNorm.bias"])


def test_export_cli_refuses_a_dir_without_an_adapter(tmp_path, capsys):
    assert export_main([str(tmp_path), "--merged", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip().startswith("error: ") and not (tmp_path / "out").exists()


def test_written_config_is_peft_json(minilm, tmp_path):
    model, _ = minilm
    adapt(model, "lora", {}, ["query", "value"])
    save_peft_adapter(model, tmp_path, "classification", base_model="minilm", trained=[])
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == pytest.approx(8.0)
    assert config["base_model_name_or_path"] == "minilm" and len(config["target_modules"]) == 12
