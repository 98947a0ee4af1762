"""The adapter contract, checked on LoRA: identity at init, ΔW, merge, trainability, save/load."""

import copy
import math

import pytest
import torch
from torch import nn

import variants
from schema import ConfigError
from variants import LoRALinear


def make_lora(d_in=64, d_out=48, rank=4, alpha=8.0, **kw) -> LoRALinear:
    torch.manual_seed(0)
    return LoRALinear(nn.Linear(d_in, d_out), rank=rank, alpha=alpha, **kw)


def randomize(layer: LoRALinear) -> None:
    with torch.no_grad():
        layer.lora_B.normal_()


def test_zero_init_is_identity():
    layer = make_lora(dropout=0.5)
    x = torch.randn(3, 5, 64)
    assert torch.equal(layer(x), layer.base(x))
    assert torch.count_nonzero(layer.delta_weight()) == 0


def test_forward_equals_base_plus_scaled_BA():
    layer = make_lora(rank=4, alpha=8.0)
    randomize(layer)
    x = torch.randn(7, 64)
    expected = x @ (layer.base.weight + 2.0 * layer.lora_B @ layer.lora_A).T + layer.base.bias
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.delta_weight(), 2.0 * layer.lora_B @ layer.lora_A)
    assert layer.delta_weight().shape == layer.base.weight.shape


def test_merge_unmerge_round_trip():
    layer = make_lora()
    randomize(layer)
    w0 = layer.base.weight.clone()
    x = torch.randn(4, 64)
    unmerged = layer(x)
    layer.merge()
    layer.merge()  # idempotent
    assert layer.merged
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.base.weight, w0 + layer.delta_weight())
    layer.unmerge()
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, w0, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer(x), unmerged, atol=1e-6, rtol=0)


def test_dropout_only_on_adapter_path():
    layer = make_lora(dropout=0.9).train()
    x = torch.randn(8, 64)
    assert torch.equal(layer(x), layer.base(x))  # B = 0: dropout on the adapter path is invisible


def test_init_options():
    kaiming = make_lora(d_in=512, rank=16, init="kaiming")
    bound = 1 / math.sqrt(512)  # kaiming_uniform with a=sqrt(5) gives U(-1/sqrt(d_in), 1/sqrt(d_in))
    assert kaiming.lora_A.abs().max() <= bound
    gaussian = make_lora(d_in=512, rank=16, init="gaussian")
    assert abs(gaussian.lora_A.std().item() - 1 / 16) < 0.005
    lora = variants.get_variant("lora")
    with pytest.raises(ConfigError, match="variant.init='orthogonal' is not supported; allowed: kaiming, gaussian"):
        lora.create(rank=4, alpha=8, init="orthogonal")
    with pytest.raises(ConfigError, match="variant.dropout"):
        lora.create(rank=4, alpha=8, dropout=1.0)
    with pytest.raises(ConfigError, match="variant.lr_ratio=0 must be null or a finite number > 0"):
        lora.create(rank=4, alpha=8, lr_ratio=0)
    with pytest.raises(ConfigError, match=r"variant.detach_norm is not a setting of variant='lora'; allowed: dropout, "
                                          r"init, lr_ratio"):
        lora.create(rank=4, alpha=8, detach_norm=True)


def test_model_starts_identical_to_base(minilm, batch):
    model, _ = minilm
    base = copy.deepcopy(model)
    variants.inject_adapters(model, "lora", ["query", "value"], rank=8, alpha=16, dropout=0.1)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, base(**batch).logits)


def test_only_adapters_and_head_train(minilm, batch):
    model, _ = minilm
    names = variants.inject_adapters(model, "lora", ["query", "value"], rank=4, alpha=8)
    variants.mark_trainable(model, train_modules=["classifier"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{m}.lora_{ab}" for m in names for ab in "AB"} | {"classifier.weight", "classifier.bias"}
    model(**batch, labels=torch.tensor([1, 0])).loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in trainable), n
    trainable_count, total = variants.count_parameters(model)
    assert trainable_count == 12 * 4 * (384 + 384) + 384 * 2 + 2
    assert total == 22_713_986 + 12 * 4 * (384 + 384)


@pytest.mark.parametrize(
    "bias, expected",
    [
        ("none", set()),
        ("lora_only", {"query.base.bias", "value.base.bias"}),
        ("all", {"bias"}),
    ],
)
def test_bias_modes(minilm, bias, expected):
    model, _ = minilm
    variants.inject_adapters(model, "lora", ["query", "value"], rank=2, alpha=2)
    variants.mark_trainable(model, bias=bias)
    biases = {n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")}
    if bias == "all":
        assert biases == {n for n, _ in model.named_parameters() if n.endswith("bias")}
    else:
        assert {".".join(n.split(".")[-3:]) for n in biases} == expected
    with pytest.raises(ConfigError, match="variant.bias.*allowed: none, all, lora_only"):
        variants.mark_trainable(model, bias="some")


def test_target_selection(minilm):
    model, _ = minilm
    assert len(variants.find_target_modules(model, ["query", "value"])) == 12
    assert variants.find_target_modules(model, r".*layer\.0\.attention\.self\.key") == [
        "bert.encoder.layer.0.attention.self.key"
    ]
    all_linear = variants.find_target_modules(model, "all-linear", exclude=["classifier"])
    assert len(all_linear) == 6 * 6 + 1  # q, k, v, attn-out, ffn-in, ffn-out per layer, plus the pooler
    assert "classifier" not in all_linear
    with pytest.raises(ConfigError, match=r"variant.targets=\['q_proj'\] matches no nn.Linear.*allowed"):
        variants.find_target_modules(model, ["q_proj"])


def test_bad_arguments_leave_model_untouched(minilm):
    model, _ = minilm
    before = copy.deepcopy(model.state_dict())
    for kwargs, key in [
        ({"rank": 0, "alpha": 8}, "rank"),
        ({"rank": 385, "alpha": 8}, "rank"),
        ({"rank": "8", "alpha": 8}, "rank"),
        ({"rank": 8, "alpha": 0}, "alpha"),
        ({"rank": 8, "alpha": 8, "dropout": -0.1}, "variant.dropout"),
    ]:
        with pytest.raises(ConfigError, match=key):
            variants.inject_adapters(model, "lora", ["query"], **kwargs)
    with pytest.raises(ConfigError, match="variant='nope'.*allowed: .*lora"):
        variants.inject_adapters(model, "nope", ["query"], rank=8, alpha=8)
    assert not variants.layers_of(model)
    assert model.state_dict().keys() == before.keys()


def test_save_load_reproduces_outputs(minilm, batch, tmp_path):
    model, _ = minilm
    pristine = copy.deepcopy(model)
    variants.inject_adapters(model, "lora", "all-linear", rank=4, alpha=8, exclude=["classifier"])
    variants.mark_trainable(model, bias="lora_only", train_modules=["classifier"])
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    path = tmp_path / "adapter.safetensors"
    variants.save_adapter(model, path)
    assert path.read_bytes()[:8] != b"\x80\x04\x95"  # not a pickle
    config = variants.read_adapter_config(path)
    assert config["variant"] == "lora" and config["rank"] == 4 and len(config["modules"]) == 37

    restored = variants.load_adapter(pristine, path)  # injects from the file's metadata, then loads
    assert restored["rank"] == 4
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, pristine(**batch).logits)


def test_load_rejects_mismatched_or_corrupt_files(minilm, tmp_path):
    model, _ = minilm
    other = copy.deepcopy(model)
    variants.inject_adapters(model, "lora", ["query"], rank=4, alpha=8)
    path = tmp_path / "adapter.safetensors"
    variants.save_adapter(model, path)
    variants.inject_adapters(other, "lora", ["query"], rank=8, alpha=8)
    with pytest.raises(ConfigError, match=r"shape \(4, 384\).*expects \(8, 384\)"):
        variants.load_adapter(other, path)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ConfigError, match="not a readable safetensors file"):
        variants.load_adapter(copy.deepcopy(model), corrupt)


def test_merged_model_matches_unmerged(minilm, batch):
    model, _ = minilm
    variants.inject_adapters(model, "lora", "all-linear", rank=8, alpha=16, exclude=["classifier"])
    for layer in variants.layers_of(model).values():
        randomize(layer)
        layer.lora_B.data.mul_(0.01)
    with torch.no_grad():
        unmerged = model(**batch).logits
        variants.merge_adapters(model)
        merged = model(**batch).logits
        variants.unmerge_adapters(model)
        again = model(**batch).logits
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
    torch.testing.assert_close(again, unmerged, atol=1e-5, rtol=0)


def test_all_linear_excludes_everything_inside_a_two_layer_head():
    """RoBERTa's head is classifier.dense + classifier.out_proj; neither may get an adapter."""
    model = nn.Sequential()
    model.add_module("encoder", nn.Linear(8, 8))
    head = nn.Sequential()
    head.add_module("dense", nn.Linear(8, 8))
    head.add_module("out_proj", nn.Linear(8, 2))
    model.add_module("classifier", head)
    assert variants.find_target_modules(model, "all-linear", exclude=["classifier"]) == ["encoder"]


def test_init_from_loads_the_adapter_tensors_and_nothing_else(minilm, tmp_path):
    """The LoRA paper's warm start: adapters from another task's run; the head stays new."""
    model, _ = minilm
    source, other, dora = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
    variants.inject_adapters(source, "lora", ["query", "value"], rank=4, alpha=8, exclude=["classifier"])
    variants.mark_trainable(source, train_modules=["classifier"])
    with torch.no_grad():
        for layer in variants.layers_of(source).values():
            layer.lora_B.normal_(std=0.02)
        source.classifier.weight.add_(1.0)
    variants.save_adapter(source, tmp_path / "mnli.safetensors")

    variants.inject_adapters(model, "lora", ["query", "value"], rank=4, alpha=8, exclude=["classifier"])
    head = model.classifier.weight.detach().clone()
    loaded = variants.init_adapters_from(model, tmp_path / "mnli.safetensors")
    assert len(loaded) == 24 and all(n.endswith(("lora_A", "lora_B")) for n in loaded)
    ours, theirs = variants.layers_of(model), variants.layers_of(source)
    for name, layer in ours.items():
        assert torch.equal(layer.lora_A, theirs[name].lora_A) and torch.equal(layer.lora_B, theirs[name].lora_B)
    assert torch.equal(model.classifier.weight, head)

    variants.inject_adapters(other, "lora", ["query", "value"], rank=8, alpha=16, exclude=["classifier"])
    with pytest.raises(ConfigError, match=r"'bert.encoder.layer.0.attention.self.query.lora_A' is of shape \(4, 384\), "
                                          r"this run needs shape \(8, 384\)"):
        variants.init_adapters_from(other, tmp_path / "mnli.safetensors")
    variants.inject_adapters(dora, "dora", ["query", "value"], rank=4, alpha=8, exclude=["classifier"])
    with pytest.raises(ConfigError, match="holds a 'lora' adapter; this run's variant is 'dora'"):
        variants.init_adapters_from(dora, tmp_path / "mnli.safetensors")
