"""DoRA: Eq. 5 of Liu et al. 2024, its merge, its detached norm, and parity with peft's DoRA."""

import copy

import pytest
import torch
from helpers.close import assert_close_or_bf16, assert_merged_as_peft, forward_backward_both
from helpers.saved import held_for_backward
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


def magnitude_effect(layer: DoRALinear, x: torch.Tensor, bf16: bool) -> torch.Tensor:
    """How the output changes when m grows by 0.1%, a typical learned change (the same dropout
    mask in every call, so that a training-mode layer is compared with itself)."""
    outputs = []
    for factor in (1.0, 1.001):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            layer.magnitude.mul_(factor)
            torch.manual_seed(1)
            outputs.append(layer(x).float())
            layer.magnitude.div_(factor)
    return outputs[1] - outputs[0]


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_a_small_magnitude_change_survives_bf16_autocast(dropout):
    """bf16's step near 1 is 0.4-0.8%: rounding s = m/||V|| (or the sum it scales) to bf16 would
    move no output, or move a whole feature by a step. Per output feature, the least-squares
    slope of the bf16 change on the fp32 change must be 1 (within 5%); the old code gave slope 0
    for most features and 7.9 for a few. With dropout the layer is in training mode: the path
    that computes W0·x' for the dropped-out input x' separately."""
    torch.manual_seed(0)
    layer = DoRALinear(nn.Linear(384, 384), rank=8, alpha=16, dropout=dropout)
    layer.train(dropout > 0)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.02)
    x = torch.randn(512, 384)
    expected, got = magnitude_effect(layer, x, bf16=False), magnitude_effect(layer, x, bf16=True)
    slope = (got * expected).sum(0) / expected.pow(2).sum(0)
    assert ((slope - 1).abs() < 0.05).all(), (slope.min().item(), slope.max().item())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.float32  # the sum is not rounded to bf16 either
    out.sum().backward()
    assert layer.magnitude.grad.dtype == torch.float32 and layer.magnitude.grad.abs().sum() > 0


def test_model_identity_and_save_load(minilm, batch, tmp_path):
    model, _ = minilm
    pristine = copy.deepcopy(model)
    variants.inject_adapters(model, "dora", ["query", "value"], rank=8, alpha=16)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, pristine(**batch).logits, atol=1e-6, rtol=0)
        for layer in variants.layers_of(model).values():
            layer.lora_B.normal_(std=0.02)
            layer.magnitude.mul_(1.05)
    variants.mark_trainable(model, train_modules=["classifier"])
    assert sum(n.endswith("magnitude") for n, p in model.named_parameters() if p.requires_grad) == 12
    variants.save_adapter(model, tmp_path / "adapter.safetensors")
    variants.load_adapter(pristine, tmp_path / "adapter.safetensors")
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, pristine(**batch).logits)


peft = pytest.importorskip("peft")


@pytest.mark.parametrize("bf16", [False, True])
def test_matches_peft_dora(minilm, batch, bf16):
    """Identical weights: logits, gradients and merged weights as peft's DoRA, in fp32 and
    under CPU bf16 autocast (there to bf16's precision: peft rounds each layer's sum to bf16,
    this DoRA keeps it in fp32)."""
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
        for name, layer in variants.layers_of(model).items():
            layer.lora_B.normal_(std=0.02)
            layer.magnitude.mul_(1 + 0.05 * torch.randn_like(layer.magnitude))
            peft_layers[name].lora_A["default"].weight.copy_(layer.lora_A)
            peft_layers[name].lora_B["default"].weight.copy_(layer.lora_B)
            peft_layers[name].lora_magnitude_vector["default"].weight.copy_(layer.magnitude)
    model.eval()  # BERT's own dropout would draw different masks in the two models
    theirs.eval()

    def close(got, expected, atol, rtol):
        assert_close_or_bf16(got, expected, atol, rtol, bf16)

    forward_backward_both(model, theirs, batch, bf16, lambda got, expected: close(got, expected, atol=1e-5, rtol=1e-5))
    for name, layer in variants.layers_of(model).items():
        ref = peft_layers[name]
        close(layer.lora_B.grad, ref.lora_B["default"].weight.grad, atol=1e-5, rtol=1e-4)
        close(layer.magnitude.grad, ref.lora_magnitude_vector["default"].weight.grad, atol=1e-5, rtol=1e-4)

    assert_merged_as_peft(model, theirs, variants.layers_of(model), atol=1e-6, rtol=1e-5)


# The factored column norm (module docstring): ‖W0‖²_c + 2s·rowsum(B ∘ W0·Aᵀ) + s²·rowsum(B·A·Aᵀ ∘ B).

def norm_in_float64(layer: DoRALinear) -> torch.Tensor:
    v = layer.base.weight.double() + layer.scaling * layer.lora_B.double() @ layer.lora_A.double()
    return v.norm(dim=1)


@pytest.mark.parametrize("shape", [(64, 48), (384, 1536)])
@pytest.mark.parametrize("size", [1e-4, 1e-2, 1.0, 10.0])
def test_the_factored_norm_is_the_norm_of_v_for_tiny_and_large_updates(shape, size):
    """``size``: ‖s·B·A‖_F / ‖W0‖_F. At 1e-4 the update changes each norm in the 5th digit or later,
    so ‖W0‖²_c dominates the sum and what could cancel is the update's share: both ways must stay
    within fp32's rounding of the float64 truth, and the factored one must move with the update."""
    d_in, d_out = shape
    layer = make_dora(d_in=d_in, d_out=d_out, rank=8, alpha=16.0, trained=False)
    with torch.no_grad():
        layer.lora_B.normal_()
        update = layer.scaling * layer.lora_B @ layer.lora_A
        layer.lora_B.mul_(size * layer.base.weight.norm() / update.norm())
    truth = norm_in_float64(layer)
    factored = layer.factored_norm()
    direct = layer.direction().norm(dim=1)
    assert factored.dtype == torch.float32 and factored.shape == (d_out,)
    torch.testing.assert_close(factored.double(), truth, atol=0, rtol=2e-6)
    torch.testing.assert_close(direct.double(), truth, atol=0, rtol=2e-6)
    change, truth_change = factored.double() - layer.base.weight.double().norm(dim=1), truth - layer.base.weight.double().norm(dim=1)
    assert (change - truth_change).abs().max() <= 1e-6 * truth.max() + 1e-3 * truth_change.abs().max()


@pytest.mark.parametrize("detach_norm", [True, False])
def test_the_factored_and_direct_norms_give_the_same_outputs_and_gradients(detach_norm):
    factored, direct = make_dora(detach_norm=detach_norm), make_dora(detach_norm=detach_norm, column_norm="direct")
    x = torch.randn(6, 64)
    for layer in (factored, direct):
        layer(x).pow(2).sum().backward()
    torch.testing.assert_close(factored(x), direct(x), atol=1e-6, rtol=1e-6)
    for mine, theirs in zip(factored.adapter_parameters(), direct.adapter_parameters()):
        torch.testing.assert_close(mine.grad, theirs.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("detach_norm", [True, False])
def test_the_factored_norm_saves_nothing_of_the_weights_size(detach_norm):
    """Nothing W-sized is held for backward but W0 itself; ``direct`` holds V when the norm's
    gradient flows."""
    x = torch.randn(5, 64)
    for column_norm in ("factored", "direct"):
        layer = make_dora(detach_norm=detach_norm, column_norm=column_norm)
        shapes = [tuple(t.shape) for t in held_for_backward(lambda layer=layer: layer(x), layer)]
        assert ((48, 64) in shapes) == (column_norm == "direct" and not detach_norm), (column_norm, shapes)


def test_the_factored_norm_follows_the_base_weight():
    """‖W0‖²_c is taken from the weight in every forward: writes in place, through ``.data``, a
    replaced weight and a merge/unmerge are all seen."""
    layer = make_dora()
    before = layer.factored_norm()
    with torch.no_grad():
        layer.base.weight.mul_(2)
    torch.testing.assert_close(layer.factored_norm(), norm_in_float64(layer).float(), atol=0, rtol=2e-6)
    layer.base.weight.data.mul_(0.5)
    torch.testing.assert_close(layer.factored_norm(), before, atol=0, rtol=2e-6)
    layer.base.weight = nn.Parameter(layer.base.weight.detach() * 3, requires_grad=False)
    torch.testing.assert_close(layer.factored_norm(), norm_in_float64(layer).float(), atol=0, rtol=2e-6)
    layer.merge()
    layer.unmerge()
    torch.testing.assert_close(layer.factored_norm(), norm_in_float64(layer).float(), atol=0, rtol=2e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_factored_norm_over_a_low_precision_base(dtype):
    """A bf16/fp16 base with fp32 adapters: the norm of the base as stored plus the fp32 update."""
    torch.manual_seed(0)
    layer = DoRALinear(nn.Linear(64, 48).to(dtype), rank=4, alpha=8.0)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.1)
    assert layer.lora_A.dtype == torch.float32
    torch.testing.assert_close(layer.factored_norm().double(), norm_in_float64(layer), atol=0, rtol=2e-6)
    torch.testing.assert_close(layer.factored_norm(), layer.direction().norm(dim=1), atol=0, rtol=2e-6)


def test_the_factored_norm_is_fp32_under_bf16_autocast():
    layer = make_dora()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = layer.factored_norm()
    assert under.dtype == torch.float32
    torch.testing.assert_close(under, layer.factored_norm(), atol=0, rtol=0)
