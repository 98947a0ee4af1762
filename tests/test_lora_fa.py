"""LoRA-FA (``variant.freeze_a=true``): A does not train, B's gradient is projected as peft's
``create_lorafa_optimizer`` projects it (checked against that optimizer on MiniLM's and SmolLM2's
layers), backward keeps no copy of the adapted layers' inputs, and bad combinations are one line."""

import copy

import pytest
import torch
from helpers.close import assert_close_or_bf16
from helpers.saved import held_for_backward
from torch import nn

import variants


def test_a_does_not_train_and_b_does():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12))
    variants.inject_adapters(model, "lora", ["0"], rank=4, alpha=8, freeze_a=True)
    variants.mark_trainable(model)
    layer = model[0]
    assert not layer.lora_A.requires_grad and layer.lora_B.requires_grad
    assert variants.variant_of(model).trainable_parameters(model) == [layer.lora_B]


def test_the_projected_gradient_is_the_least_squares_match_of_the_full_gradient():
    """With G the full weight's gradient, s·ΔB·A for ΔB = −g̃_B is −G projected on A's row space,
    G·Aᵀ·(A·Aᵀ)⁻¹·A (what full fine-tuning's step would be, restricted to what B can reach)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12))
    variants.inject_adapters(model, "lora", ["0"], rank=4, alpha=8, freeze_a=True)
    variants.mark_trainable(model)
    layer, x = model[0], torch.randn(32, 16)
    model(x).pow(2).sum().backward()
    full = (2 * model(x).detach()).t() @ x  # ∂L/∂W for L = ‖W·x + b‖², ΔW = 0 (B = 0)
    variants.variant_of(model).transform_gradients(model, None, 1.0)
    a = layer.lora_A.detach()
    projection = a.t() @ torch.linalg.inv(a @ a.t()) @ a  # (d_in, d_in), onto A's rows
    torch.testing.assert_close(layer.scaling * layer.lora_B.grad @ a, full @ projection, atol=1e-3, rtol=1e-4)


def test_plain_keeps_b_own_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12))
    variants.inject_adapters(model, "lora", ["0"], rank=4, alpha=8, freeze_a=True, fa_gradient="plain")
    variants.mark_trainable(model)
    model(torch.randn(8, 16)).sum().backward()
    before = model[0].lora_B.grad.clone()
    variants.variant_of(model).transform_gradients(model, None, 1.0)
    assert torch.equal(model[0].lora_B.grad, before)


class ThreeReaders(nn.Module):
    """q, k, v reading one input, as attention's projections do."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64)

    def forward(self, x):
        return self.q(x) * self.k(x) + self.v(x)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_backward_keeps_no_copy_of_the_input(dropout):
    """What LoRA-FA saves: LoRA keeps x (d_in per token, once for the three layers that read it);
    LoRA-FA does not (with dropout it keeps the bool masks alone, as lean LoRA does beside x)."""
    torch.manual_seed(0)
    x = torch.randn(256, 64, requires_grad=True)
    held = {}
    for freeze in (False, True):
        model = ThreeReaders()
        variants.inject_adapters(model, "lora", ["q", "k", "v"], rank=4, alpha=8, dropout=dropout, freeze_a=freeze)
        variants.mark_trainable(model)
        model.train()
        tensors = held_for_backward(lambda m=model: m(x), model)
        held[freeze] = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    assert x.untyped_storage().data_ptr() in held[False]
    assert x.untyped_storage().data_ptr() not in held[True]
    assert sum(held[False].values()) - sum(held[True].values()) == x.numel() * 4


@pytest.mark.parametrize("variant, settings, message", [
    ("lora_pro", {"freeze_a": True}, r"variant.freeze_a=true \(LoRA-FA\) cannot combine with LoRA-Pro"),
    ("dora", {"freeze_a": True}, "variant.fa_gradient=projected assumes ΔW = s·B·A"),
    ("lora", {"fa_gradient": "exact"}, "variant.fa_gradient='exact' is not supported; allowed: projected, plain"),
])
def test_bad_settings_are_one_line(variant, settings, message):
    with pytest.raises(variants.ConfigError, match=message):
        variants.get_variant(variant).create(rank=4, alpha=8, **settings)


peft = pytest.importorskip("peft")

MODELS = {"minilm": (["query", "value"], "SEQ_CLS"), "smollm2": (["q_proj", "v_proj"], "CAUSAL_LM")}
EPS = 1e9  # peft's Adam denominator √v + ε ≈ ε: its first step is then linear in the projected gradient


def peft_projected_gradients(theirs, lr=1.0):
    """B's gradient as peft's LoRA-FA optimizer projects it, read off its first step from B = 0:
    with ε ≫ √v the step is −lr·√(1 − β₂)/(1 − β₁)·(1 − β₁)·g̃/ε = −lr·√(1 − β₂)·g̃/ε."""
    from peft.optimizers import create_lorafa_optimizer

    config = theirs.peft_config["default"]
    optimizer = create_lorafa_optimizer(theirs, r=config.r, lora_alpha=config.lora_alpha, lr=lr)
    optimizer.param_groups[0]["eps"] = EPS
    b = {n: p for n, p in theirs.named_parameters() if "lora_B" in n}
    assert not any(p.any() for p in b.values())
    optimizer.step()
    return {n.removeprefix("base_model.model.").removesuffix(".lora_B.default.weight"): -p.detach() * EPS
            / (lr * (1 - 0.999) ** 0.5) for n, p in b.items()}


@pytest.mark.parametrize("which", list(MODELS))
@pytest.mark.parametrize("bf16", [False, True])
def test_projected_gradients_match_peft_lorafa_optimizer(request, monkeypatch, which, bf16):
    """On identical weights (rank 8, α = 32: s = 4, so the 1/s² matters), the same forward and
    backward in both: our B gradients after ``transform_gradients`` against the ones peft's
    optimizer steps with. peft computes the projection under bf16 autocast where bf16 is
    available; in fp32 it is turned off there (ours is always fp32); under bf16 autocast (the
    forward and backward in bf16, as training there) to a few bf16 steps of the largest value."""
    from peft.optimizers import lorafa

    monkeypatch.setattr(lorafa, "is_bf16_available", lambda: bf16)
    model, _ = request.getfixturevalue(which)
    batch = request.getfixturevalue("batch" if which == "minilm" else "smollm2_batch")
    targets, task = MODELS[which]
    config = peft.LoraConfig(r=8, lora_alpha=32, target_modules=targets, task_type=task, lora_dropout=0.0)
    theirs = peft.get_peft_model(copy.deepcopy(model), config).eval()
    variants.inject_adapters(model, "lora", targets, rank=8, alpha=32, freeze_a=True)
    variants.mark_trainable(model)
    ours = variants.layers_of(model)
    peft_layers = {n.removeprefix("base_model.model."): m for n, m in theirs.named_modules()
                   if isinstance(m, peft.tuners.lora.LoraLayer)}
    with torch.no_grad():
        for name, layer in ours.items():
            peft_layers[name].lora_A["default"].weight.copy_(layer.lora_A)
    for m in (model, theirs):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = m(**batch).logits
        logits.float().pow(2).mean().backward()
    variants.variant_of(model).transform_gradients(model, None, 1.0)
    expected = peft_projected_gradients(theirs)
    for name, layer in ours.items():
        want = expected[name]
        assert_close_or_bf16(layer.lora_B.grad, want, 1e-4 * want.abs().max().item(), 1e-3, bf16)
