"""PiSSA and MiLoRA: the start is W0's principal (PiSSA) or minor (MiLoRA) rank-r part, checked by
hand on a matrix whose SVD is known; PiSSA's factors and residual against peft's
``init_lora_weights="pissa"`` (exact and randomized SVD); bad settings are one line. (Start as the
base model, merge/unmerge and exact reload on a fresh base: tests/test_contract.py.)"""

import copy

import pytest
import torch
from torch import nn

import variants
from variants.methods.pissa import singular_factors

R = 3


def known_svd_layer(d_out=10, d_in=8, s=None):
    """A layer whose weight is U·diag(S)·Vᵀ, by default S = 8, 7, ..., 1 (distinct, decreasing)."""
    gen = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(d_out, 8, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(d_in, 8, generator=gen))
    s = torch.arange(8.0, 0.0, -1.0) if s is None else s
    layer = nn.Linear(d_in, d_out)
    with torch.no_grad():
        layer.weight.copy_(u @ torch.diag(s) @ v.t())
    return nn.Sequential(layer), u, s, v


@pytest.mark.parametrize("variant, index", [("pissa", [0, 1, 2]), ("milora", [5, 6, 7])])
@pytest.mark.parametrize("scaling", ["standard", "rslora"])
def test_the_start_is_the_principal_or_minor_part_and_the_residual_the_rest(variant, index, scaling):
    model, u, s, v = known_svd_layer()
    variants.inject_adapters(model, variant, ["0"], rank=R, alpha=6, scaling=scaling)
    layer = model[0]
    scale = 6 / R if scaling == "standard" else 6 / R ** 0.5
    assert layer.scaling == pytest.approx(scale)
    part = u[:, index] @ torch.diag(s[index]) @ v[:, index].t()
    torch.testing.assert_close(layer.scaling * layer.lora_B0 @ layer.lora_A0, part, atol=1e-5, rtol=1e-5)
    # A₀ = √(S/s)·Vᵀ and B₀ = U·√(S/s) (each singular vector up to its sign)
    root = (s[index] / scale).sqrt()
    torch.testing.assert_close(layer.lora_A0.abs(), (root[:, None] * v[:, index].t()).abs(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.lora_B0.abs(), (u[:, index] * root[None, :]).abs(), atol=1e-5, rtol=1e-5)
    residual = torch.linalg.svdvals(layer.initial_weight())[:8 - R]
    rest = [i for i in range(8) if i not in index]
    torch.testing.assert_close(residual, s[rest], atol=1e-5, rtol=1e-5)
    assert torch.equal(layer.lora_A, layer.lora_A0) and torch.equal(layer.lora_B, layer.lora_B0)
    assert not layer.delta_weight().any()


def test_the_randomized_svd_finds_the_principal_part():
    """q = r and 4 power iterations, as peft's pissa_niter_4: close where the spectrum decays (here
    by half per component; with q = r it is only as good as the gap after the r-th value)."""
    model, u, s, v = known_svd_layer(s=8 * 0.5 ** torch.arange(8.0))
    down, up = singular_factors(model[0].weight, R, 2.0, niter=4)
    torch.testing.assert_close(2.0 * up @ down, u[:, :R] @ torch.diag(s[:R]) @ v[:, :R].t(), atol=2e-2, rtol=0)


peft = pytest.importorskip("peft")


@pytest.mark.parametrize("init, niter, scaling", [("pissa", None, "standard"), ("pissa_niter_4", 4, "standard"),
                                                  ("pissa", None, "rslora")])
def test_factors_and_residual_match_peft_pissa(minilm, monkeypatch, init, niter, scaling):
    """The same A, B and frozen residual W0 − s·B·A as peft's PiSSA on MiniLM's W_q and W_v (the
    randomized SVD draws its projections from seed 0 in both)."""
    import peft.tuners.lora.layer as peft_layer

    svd_lowrank = torch.svd_lowrank

    def seeded(*args, **kwargs):
        torch.manual_seed(0)
        return svd_lowrank(*args, **kwargs)

    monkeypatch.setattr(peft_layer, "svd_lowrank", seeded)
    model, _ = minilm
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], init_lora_weights=init,
                             task_type="SEQ_CLS", use_rslora=scaling == "rslora")
    theirs = peft.get_peft_model(copy.deepcopy(model), config)
    variants.inject_adapters(model, "pissa", ["query", "value"], rank=8, alpha=16, niter=niter, scaling=scaling)
    peft_layers = {n.removeprefix("base_model.model."): m for n, m in theirs.named_modules()
                   if isinstance(m, peft.tuners.lora.LoraLayer)}
    ours = variants.layers_of(model)
    assert ours.keys() == peft_layers.keys()
    for name, layer in ours.items():
        ref = peft_layers[name]
        torch.testing.assert_close(layer.lora_A, ref.lora_A["default"].weight, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(layer.lora_B, ref.lora_B["default"].weight, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(layer.initial_weight(), ref.get_base_layer().weight, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("variant, settings, message", [
    ("pissa", {"niter": -1}, "variant.niter=-1 must be null or an integer >= 0"),
    ("milora", {"niter": 4}, r"variant.niter=4 must be null \(niter is PiSSA's randomized SVD"),
])
def test_bad_settings(variant, settings, message):
    with pytest.raises(variants.ConfigError, match=message):
        variants.get_variant(variant).create(rank=4, alpha=8, **settings)


def test_a_rank_above_the_layer_is_one_line_and_leaves_the_model_alone():
    model, *_ = known_svd_layer()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(variants.ConfigError, match=r"rank=9 must be an integer in \[1, 8\]"):
        variants.inject_adapters(model, "pissa", ["0"], rank=9, alpha=9)
    assert isinstance(model[0], nn.Linear) and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_adapter_dropout_acts_on_the_trained_path_alone_as_in_peft(minilm, batch):
    """In train mode with adapter dropout, peft computes W_res·x + s·B·A·drop(x); so does the
    offset layer (W0·x + s·B·A·drop(x) − s·B₀·A₀·x), given the same dropout masks."""
    model, _ = minilm
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], init_lora_weights="pissa",
                             lora_dropout=0.5, task_type="SEQ_CLS")
    theirs = peft.get_peft_model(copy.deepcopy(model), config)
    variants.inject_adapters(model, "pissa", ["query", "value"], rank=8, alpha=16, dropout=0.5)
    model.train()
    theirs.train()
    outputs = []
    for m in (model, theirs):
        torch.manual_seed(0)  # the same masks: both draw one per adapted layer, in the same order
        with torch.no_grad():
            outputs.append(m(**batch).logits)
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-4, rtol=1e-4)
    torch.manual_seed(1)
    with torch.no_grad():
        assert not torch.allclose(model(**batch).logits, outputs[0], atol=1e-3)  # the masks matter
