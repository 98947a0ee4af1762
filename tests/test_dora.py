"""DoRA: Eq. 5 of Liu et al. 2024, its merge, its detached norm, and parity with peft's DoRA."""

import copy

import pytest
import torch
from torch import nn

import variants
from variants import DoRALinear


def make_dora(d_in=64, d_out=48, rank=4, alpha=8.0, trained=True, **kw) -> DoRALinear:
    torch.manual_seed(0)
    layer = DoRALinear(nn.Linear(d_in, d_out), rank=rank, alpha=alpha, **kw)
    if trained:
        with torch.no_grad():
            layer.lora_B.normal_(std=0.1)
            layer.magnitude.mul_(1 + 0.1 * torch.randn_like(layer.magnitude))
    return layer


def eq5_weight(layer: DoRALinear, w0: torch.Tensor) -> torch.Tensor:
    v = w0 + layer.scaling * layer.lora_B @ layer.lora_A
    return layer.magnitude[:, None] * v / v.norm(dim=1, keepdim=True)


def test_zero_init_is_identity():
    layer = make_dora(trained=False, dropout=0.3)
    torch.testing.assert_close(layer.magnitude, layer.base.weight.norm(dim=1))
    x = torch.randn(3, 5, 64)
    torch.testing.assert_close(layer(x), layer.base(x), atol=1e-6, rtol=0)
    assert layer.delta_weight().abs().max() < 1e-6


def test_forward_and_delta_follow_eq5():
    layer = make_dora()
    w0 = layer.base.weight.clone()
    x = torch.randn(7, 64)
    torch.testing.assert_close(layer(x), x @ eq5_weight(layer, w0).T + layer.base.bias, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.delta_weight(), eq5_weight(layer, w0) - w0, atol=1e-6, rtol=1e-5)


def test_merge_unmerge_round_trip():
    layer = make_dora()
    w0 = layer.base.weight.clone()
    delta = layer.delta_weight()
    x = torch.randn(4, 64)
    unmerged = layer(x)
    layer.merge()
    torch.testing.assert_close(layer.base.weight, eq5_weight(layer, w0), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.delta_weight(), delta, atol=1e-5, rtol=0)  # still relative to W0
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, w0, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer(x), unmerged, atol=1e-6, rtol=0)


@pytest.mark.parametrize("detach_norm", [True, False])
def test_norm_gradient(detach_norm):
    layer = make_dora(detach_norm=detach_norm)
    w0 = layer.base.weight.detach().clone()
    x = torch.randn(6, 64)
    layer(x).pow(2).sum().backward()
    ours = [p.grad.clone() for p in (layer.lora_A, layer.lora_B, layer.magnitude)]
    for p in layer.adapter_parameters():
        p.grad = None
    v = w0 + layer.scaling * layer.lora_B @ layer.lora_A
    norm = v.norm(dim=1, keepdim=True)
    weight = layer.magnitude[:, None] * v / (norm.detach() if detach_norm else norm)
    (x @ weight.T + layer.base.bias).pow(2).sum().backward()
    for got, p in zip(ours, (layer.lora_A, layer.lora_B, layer.magnitude)):
        torch.testing.assert_close(got, p.grad, atol=1e-4, rtol=1e-4)


def test_dropout_applies_to_both_direction_terms():
    layer = make_dora(dropout=0.5).train()
    x = torch.randn(4, 64)
    torch.manual_seed(1)
    out = layer(x)
    torch.manual_seed(1)
    dropped = layer.dropout(x)
    scale = layer.magnitude / layer.direction_norm()
    frozen = dropped @ layer.base.weight.T
    expected = layer.base(x) + (scale - 1) * frozen + scale * (dropped @ layer.lora_A.t() @ layer.lora_B.t()) * layer.scaling
    torch.testing.assert_close(out, expected)


def test_model_identity_and_save_load(minilm, batch, tmp_path):
    model, _ = minilm
    pristine = copy.deepcopy(model)
    variants.inject_adapters(model, "dora", ["query", "value"], rank=8, alpha=16)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, pristine(**batch).logits, atol=1e-6, rtol=0)
        for _, layer in variants.adapter_layers(model):
            layer.lora_B.normal_(std=0.02)
            layer.magnitude.mul_(1.05)
    variants.mark_trainable(model, train_modules=["classifier"])
    assert sum(n.endswith("magnitude") for n, p in model.named_parameters() if p.requires_grad) == 12
    variants.save_adapter(model, tmp_path / "adapter.safetensors")
    variants.load_adapter(pristine, tmp_path / "adapter.safetensors")
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, pristine(**batch).logits)


peft = pytest.importorskip("peft")


def test_matches_peft_dora(minilm, batch):
    model, _ = minilm
    theirs = peft.get_peft_model(
        copy.deepcopy(model),
        peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["query", "value"], use_dora=True,
                        task_type="SEQ_CLS"),
    )
    variants.inject_adapters(model, "dora", ["query", "value"], rank=8, alpha=16)
    variants.mark_trainable(model)
    peft_layers = {n.removeprefix("base_model.model."): m for n, m in theirs.named_modules()
                   if isinstance(m, peft.tuners.lora.LoraLayer)}
    with torch.no_grad():
        for name, layer in variants.adapter_layers(model):
            layer.lora_B.normal_(std=0.02)
            layer.magnitude.mul_(1 + 0.05 * torch.randn_like(layer.magnitude))
            peft_layers[name].lora_A["default"].weight.copy_(layer.lora_A)
            peft_layers[name].lora_B["default"].weight.copy_(layer.lora_B)
            peft_layers[name].lora_magnitude_vector["default"].weight.copy_(layer.magnitude)
    model.eval()  # BERT's own dropout would draw different masks in the two models
    theirs.eval()
    ours_out, theirs_out = model(**batch).logits, theirs(**batch).logits
    torch.testing.assert_close(ours_out, theirs_out, atol=1e-5, rtol=1e-5)
    ours_out.sum().backward()
    theirs_out.sum().backward()
    for name, layer in variants.adapter_layers(model):
        ref = peft_layers[name]
        torch.testing.assert_close(layer.lora_B.grad, ref.lora_B["default"].weight.grad, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(layer.magnitude.grad, ref.lora_magnitude_vector["default"].weight.grad,
                                   atol=1e-5, rtol=1e-4)

    variants.merge_adapters(model)
    merged_theirs = theirs.merge_and_unload().state_dict()
    for name, layer in variants.adapter_layers(model):
        torch.testing.assert_close(layer.base.weight, merged_theirs[f"{name}.weight"], atol=1e-6, rtol=1e-5)
