"""QLoRA: LoRA over a bitsandbytes 4-bit (NF4, double-quantized) base; runs on CPU."""

import copy

import bitsandbytes as bnb
import pytest
import torch
from torch import nn

import variants
from schema import ConfigError
from variants import QLoRALinear
from variants.methods.qlora import dequantized_weight, quantization_storage, quantize_linear, quantize_model


def quantized_minilm(model):
    """Every linear but the head quantized, as QLoRA's prepare_model does, with no adapters."""
    quantize_model(model, keep=["classifier"])
    return model


def test_every_linear_but_the_head_is_quantized(minilm):
    model, _ = minilm
    total_before = variants.count_parameters(model)[1]
    variants.inject_adapters(model, "qlora", ["query", "value"], rank=8, alpha=16, exclude=["classifier"])
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    plain = sorted(n for n, m in linears.items() if not isinstance(m, bnb.nn.Linear4bit))
    assert plain == ["classifier"]
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in linears.values()) == 6 * 6 + 1  # 6 per layer + pooler
    assert variants.count_parameters(model)[1] == total_before + 12 * 2 * 8 * 384  # 4-bit weights counted in full


@pytest.mark.parametrize("quant_type, double_quant, low, high", [
    ("nf4", True, 0.515, 0.525),    # 4 bits + 8-bit absmax per 64 + fp32 per 256 blocks ≈ 4.13 bits
    ("nf4", False, 0.56, 0.57),     # 4 bits + fp32 absmax per 64 = 4.5 bits
    ("fp4", True, 0.515, 0.525),
    ("int8", False, 1.0, 1.02),     # int8 + one fp32 scale per row
])
def test_storage_per_parameter(minilm, quant_type, double_quant, low, high):
    model, _ = minilm
    variants.inject_adapters(model, "qlora", ["query", "value"], rank=8, alpha=16, exclude=["classifier"],
                             quant_type=quant_type, double_quant=double_quant)
    storage = quantization_storage(model)
    assert storage["quantized_linears"] == 37
    assert low <= storage["bytes_per_param"] <= high, storage


def test_zero_init_is_the_quantized_base_not_the_fp32_one(minilm, batch):
    model, _ = minilm
    fp32 = copy.deepcopy(model)
    quantized = quantized_minilm(copy.deepcopy(model))
    variants.inject_adapters(model, "qlora", ["query", "value"], rank=8, alpha=16, exclude=["classifier"])
    with torch.no_grad():
        ours = model(**batch).logits
        torch.testing.assert_close(ours, quantized(**batch).logits, atol=0, rtol=0)
        assert (ours - fp32(**batch).logits).abs().max() > 1e-4  # quantization changed the base


def test_matches_peft_lora_on_the_same_quantized_base(minilm, batch):
    peft = pytest.importorskip("peft")
    model, _ = minilm
    quantized_minilm(model)
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["query", "value"], task_type="SEQ_CLS")).eval()
    variants.inject_adapters(model, "qlora", ["query", "value"], rank=8, alpha=16, exclude=["classifier"])
    peft_layers = {n.removeprefix("base_model.model."): m for n, m in theirs.named_modules()
                   if isinstance(m, peft.tuners.lora.LoraLayer)}
    ours = variants.layers_of(model)
    assert ours.keys() == peft_layers.keys()
    with torch.no_grad():
        for name, layer in ours.items():
            assert isinstance(peft_layers[name].base_layer, bnb.nn.Linear4bit)
            layer.lora_B.normal_(std=0.02)
            peft_layers[name].lora_A["default"].weight.copy_(layer.lora_A)
            peft_layers[name].lora_B["default"].weight.copy_(layer.lora_B)
        torch.testing.assert_close(model(**batch).logits, theirs(**batch).logits, atol=1e-5, rtol=1e-5)
        for name, layer in ours.items():
            torch.testing.assert_close(layer.delta_weight(), peft_layers[name].get_delta_weight("default"))


def test_merge_dequantizes_and_unmerge_restores_the_quantized_base():
    torch.manual_seed(0)
    layer = QLoRALinear(nn.Linear(128, 64), rank=4, alpha=8)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.02)
    quantized = layer.base
    x = torch.randn(5, 128)
    expected = layer(x)
    layer.merge()
    assert type(layer.base) is nn.Linear and layer.base.weight.dtype == torch.float32
    torch.testing.assert_close(layer.base.weight, dequantized_weight(quantized) + layer.delta_weight())
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    layer.unmerge()
    assert layer.base is quantized
    torch.testing.assert_close(layer(x), expected, atol=0, rtol=0)

    layer.requantize_on_merge = True
    layer.merge()
    assert isinstance(layer.base, bnb.nn.Linear4bit)
    # Re-quantizing rounds every weight once more: the error is of the order of NF4's step.
    error = (layer(x) - expected).abs().max().item()
    assert 1e-4 < error < 0.2 * expected.abs().max().item()
    layer.unmerge()
    assert layer.base is quantized


def test_only_adapters_train_and_save_load_round_trip(minilm, batch, tmp_path):
    model, _ = minilm
    fresh = copy.deepcopy(model)
    variants.inject_adapters(model, "qlora", ["query", "value"], rank=4, alpha=8, exclude=["classifier"])
    variants.mark_trainable(model, train_modules=["classifier"])
    model.train()
    loss = model(**batch, labels=torch.tensor([0, 1])).loss
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in n or n.startswith("classifier") for n in with_grad)
    with torch.no_grad():
        for layer in variants.layers_of(model).values():
            layer.lora_B.normal_(std=0.02)
    model.eval()
    path = tmp_path / "qlora.safetensors"
    variants.save_adapter(model, path)
    config = variants.load_adapter(fresh, path)  # quantizes the fresh fp32 model, then loads A, B
    assert config["variant"] == "qlora"
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(**batch).logits, model(**batch).logits, atol=0, rtol=0)


def test_the_api_example_runs_for_qlora(minilm, batch):
    """The Python API example (docs/python-api.md) with "qlora" and no exclude: the task head outside the
    backbone is left in full precision, so it can train."""
    model, _ = minilm
    variants.inject_adapters(model, "qlora", ["query", "value"], rank=8, alpha=16, dropout=0.1)
    variants.mark_trainable(model, bias="none", train_modules=["classifier"])
    assert type(model.classifier) is nn.Linear and model.classifier.weight.dtype == torch.float32
    assert isinstance(model.bert.encoder.layer[0].intermediate.dense, bnb.nn.Linear4bit)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    head = model.classifier.weight.detach().clone()
    model.train()
    model(**batch, labels=torch.tensor([0, 1])).loss.backward()
    optimizer.step()
    assert not torch.equal(model.classifier.weight, head)


@pytest.mark.parametrize("variant", ["qlora", "lora"])
def test_all_linear_leaves_the_task_head_alone_without_exclude(minilm, variant):
    model, _ = minilm
    names = variants.inject_adapters(model, variant, "all-linear", rank=8, alpha=16)
    assert "classifier" not in names and len(names) == 37 and type(model.classifier) is nn.Linear
    variants.mark_trainable(model, train_modules=["classifier"])
    assert model.classifier.weight.requires_grad and model.classifier.weight.dtype == torch.float32


def test_a_quantized_train_module_is_one_clear_error(minilm):
    model, _ = minilm
    variants.inject_adapters(model, "qlora", ["query"], rank=4, alpha=8)
    with pytest.raises(ConfigError) as failure:
        variants.mark_trainable(model, train_modules=["key"])
    message = str(failure.value)
    assert "bert.encoder.layer.0.attention.self.key.weight is quantized, so it cannot train" in message
    assert "pass exclude=['key'] to inject_adapters" in message and "\n" not in message


@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
def test_trainable_biases_keep_fp32_master_weights_under_bf16_compute(minilm, batch, quant_type):
    """bitsandbytes casts a layer's bias to the compute dtype in place at every forward; a bias
    that trains must stay fp32, and a step smaller than bf16's resolution must still move it."""
    model, _ = minilm
    variants.inject_adapters(model, "qlora", ["query", "value"], rank=4, alpha=8, quant_type=quant_type,
                             compute_dtype="bf16")
    variants.mark_trainable(model, bias="all", train_modules=["classifier"])
    biases = {n: p for n, p in model.named_parameters() if n.endswith(".bias") and "encoder" in n}
    before = {n: p.detach().clone() for n, p in biases.items()}
    optimizer = torch.optim.AdamW(list(biases.values()), lr=1e-6)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch, labels=torch.tensor([0, 1])).loss
    loss.backward()
    optimizer.step()
    assert {p.dtype for p in biases.values()} == {torch.float32}
    moved = max((p.detach() - before[n]).abs().max().item() for n, p in biases.items())
    assert 0 < moved < 1e-5  # one Adam step of 1e-6: far below bf16's step at these magnitudes


@pytest.mark.parametrize("kwargs, message", [
    ({"quant_type": "int4"}, "variant.quant_type='int4' is not supported; allowed: nf4, fp4, int8"),
    ({"blocksize": 100}, "variant.blocksize=100 is not supported"),
    ({"compute_dtype": "fp8"}, "variant.compute_dtype='fp8' is not supported"),
])
def test_bad_quantization_knobs(minilm, kwargs, message):
    model, _ = minilm
    with pytest.raises(ConfigError, match=message):
        variants.inject_adapters(model, "qlora", ["query"], rank=4, alpha=8, exclude=["classifier"], **kwargs)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())  # checked before changing anything


def test_quantize_linear_keeps_outputs_close():
    torch.manual_seed(0)
    linear = nn.Linear(256, 128)
    x = torch.randn(8, 256)
    for quant_type in ("nf4", "fp4", "int8"):
        q = quantize_linear(linear, quant_type=quant_type)
        relative = (q(x) - linear(x)).norm() / linear(x).norm()
        assert relative < 0.15, (quant_type, relative)


def test_merged_model_dequantized_for_export(minilm, batch, tmp_path):
    """merge_and_unwrap + dequantize_model: a plain full-precision model with the same outputs."""
    from transformers import AutoModelForSequenceClassification

    from variants.methods.qlora import dequantize_model

    model, _ = minilm
    variants.inject_adapters(model, "qlora", ["query", "value"], rank=4, alpha=8, exclude=["classifier"])
    with torch.no_grad():
        for layer in variants.layers_of(model).values():
            layer.lora_B.normal_(std=0.02)
        expected = model(**batch).logits
    variants.merge_and_unwrap(model)
    dequantize_model(model)
    leftovers = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt, variants.AdapterLayer)
    assert not any(isinstance(m, leftovers) for m in model.modules())
    model.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, expected, atol=1e-5, rtol=1e-5)


def test_the_docs_qlora_api_example_runs(batch, capsys):
    """The QLoRA snippet of docs/python-api.md, as written, on the offline MiniLM instead of roberta-base."""
    from pathlib import Path

    from transformers import AutoModelForSequenceClassification

    from training.models import resolve_model_path

    readme = (Path(__file__).resolve().parents[1] / "docs" / "python-api.md").read_text()
    after = readme[readme.index("QLoRA goes through the same calls."):]
    snippet = after[after.index("```python") + len("```python"):after.index("```", after.index("```python") + 9)]
    snippet = snippet.replace('"roberta-base"', repr(resolve_model_path("minilm")))
    namespace = {"variants": variants, "AutoModelForSequenceClassification": AutoModelForSequenceClassification,
                 "batch": {**batch, "labels": torch.tensor([0, 1])}}
    exec(compile(snippet, "docs/python-api.md", "exec"), namespace)  # noqa: S102  (runs the snippet as written)
    model = namespace["model"]
    assert model.classifier.weight.grad is not None and isinstance(model.bert.pooler.dense, QLoRALinear)
    assert "4.1" in capsys.readouterr().out
