"""LoRA-GA: the first step is the best rank-2r approximation of full fine-tuning's (the paper's
Theorem 3.1, checked by hand on a small layer), the model starts as the base model, parity with
peft's LoRA-GA on the same gradient, and exact save/load on a fresh base."""

import copy

import pytest
import torch
from torch import nn

import variants
from variants.methods.lora_ga import estimate_weight_gradients, gradient_factors
from variants.methods.offset import OffsetLoRALinear


def small_layer(rank=2, alpha=4):
    torch.manual_seed(0)
    return OffsetLoRALinear(nn.Linear(12, 10), rank=rank, alpha=alpha)


def test_the_first_step_is_the_best_rank_2r_approximation_of_the_gradient():
    """With A₀ = c·V[:, :r]ᵀ and B₀ = c·U[:, r:2r], LoRA's equivalent gradient
    s·(B·∂L/∂A + ∂L/∂B·A) = s²·(B·Bᵀ·G + G·Aᵀ·A) is c²·s² times G's top 2r singular components."""
    layer, r = small_layer(), 2
    grad = torch.randn(10, 12, generator=torch.Generator().manual_seed(1))
    u, s, vh = torch.linalg.svd(grad, full_matrices=False)
    c = 10 ** 0.25 / 16 ** 0.5  # d_out^{1/4} / √γ
    down, up = gradient_factors(grad, r, layer.scaling, svd="exact")
    torch.testing.assert_close(down, c * vh[:r])
    torch.testing.assert_close(up, c * u[:, r:2 * r])
    layer.start_from(down, up)

    (grad * layer.delta_weight()).sum().backward()  # a loss whose gradient in W is `grad`
    equivalent = layer.scaling * (layer.lora_B @ layer.lora_A.grad + layer.lora_B.grad @ layer.lora_A)
    best = u[:, :2 * r] @ torch.diag(s[:2 * r]) @ vh[:2 * r]
    torch.testing.assert_close(equivalent, c ** 2 * layer.scaling ** 2 * best, atol=1e-6, rtol=1e-5)
    # ... which is never further from the full gradient (in direction) than any other rank-2r matrix:
    cosine = nn.functional.cosine_similarity(equivalent.flatten(), grad.flatten(), dim=0)
    assert float(cosine) == pytest.approx(float(s[:2 * r].norm() / s.norm()), rel=1e-5)



@pytest.mark.parametrize("direction, a_index, b_index", [
    ("ArB2r", [0, 1], [2, 3]), ("A2rBr", [2, 3], [0, 1]), ("ArBr", [1, 3], [0, 2])])
@pytest.mark.parametrize("scale", ["stable", "unit", "gd"])
def test_every_direction_and_scale_takes_the_top_2r_singular_vectors(direction, a_index, b_index, scale):
    """A₀ rows and B₀ columns are G's singular vectors by the direction's indices, times the
    scale's factor k (stable: c; unit: 1; gd: 1/s); so the first equivalent gradient
    s²·(B·Bᵀ·G + G·Aᵀ·A) is s²·k² times G's top 2r components whichever the direction."""
    r, scaling = 2, 2.0
    grad = torch.randn(10, 12, generator=torch.Generator().manual_seed(1))
    u, s, vh = torch.linalg.svd(grad, full_matrices=False)
    k = {"stable": 10 ** 0.25 / 16 ** 0.5, "unit": 1.0, "gd": 1 / scaling}[scale]
    down, up = gradient_factors(grad, r, scaling, direction, scale, svd="exact")
    torch.testing.assert_close(down, k * vh[a_index])
    torch.testing.assert_close(up, k * u[:, b_index])
    equivalent = scaling ** 2 * (up @ up.t() @ grad + grad @ down.t() @ down)
    best = u[:, :2 * r] @ torch.diag(s[:2 * r]) @ vh[:2 * r]
    torch.testing.assert_close(equivalent, scaling ** 2 * k ** 2 * best, atol=1e-5, rtol=1e-5)


def test_the_randomized_svd_finds_the_subspaces_of_the_exact_one():
    """svd=lowrank (the authors' torch.svd_lowrank, q = 4r, 4 power iterations) against the exact
    SVD on a gradient whose spectrum decays: the same spans for A and for B (signs may differ)."""
    gen = torch.Generator().manual_seed(5)
    left, _ = torch.linalg.qr(torch.randn(64, 48, generator=gen))
    right, _ = torch.linalg.qr(torch.randn(48, 48, generator=gen))
    grad = left @ torch.diag(0.7 ** torch.arange(48.0)) @ right.t()
    exact, lowrank = (gradient_factors(grad, 4, 2.0, svd=svd, scale="unit") for svd in ("exact", "lowrank"))
    torch.testing.assert_close(lowrank[0].t() @ lowrank[0], exact[0].t() @ exact[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(lowrank[1] @ lowrank[1].t(), exact[1] @ exact[1].t(), atol=1e-4, rtol=0)


def test_the_layer_starts_as_its_base_and_its_delta_is_the_change_since_the_start():
    layer = small_layer()
    x = torch.randn(5, 12)
    down, up = gradient_factors(torch.randn(10, 12), 2, layer.scaling)
    layer.start_from(down, up)
    assert torch.equal(layer(x), layer.base(x))  # bit for bit
    assert torch.count_nonzero(layer.delta_weight()) == 0
    torch.testing.assert_close(layer.initial_weight(), layer.base.weight - layer.scaling * up @ down)
    with torch.no_grad():  # training moved both factors
        layer.lora_B.add_(0.1)
        layer.lora_A.mul_(1.5)
    torch.testing.assert_close(layer(x), x @ (layer.base.weight + layer.delta_weight()).t() + layer.base.bias)
    torch.testing.assert_close(layer.delta_weight(), layer.scaling * (layer.lora_B @ layer.lora_A - up @ down))
    expected = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-6)
    layer.unmerge()
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-6)


def fake_data(model, batch, count=3):
    """``count`` copies of ``batch`` (with labels), and the task loss the trainer would use."""
    batches = iter([{**batch, "labels": torch.tensor([0, 1])}] * count)
    return variants.InitData(batches, lambda m, b: m(**b).loss)


def test_gradients_are_the_mean_over_batches_in_train_mode_and_nothing_else_changes(minilm, batch):
    model, _ = minilm
    for module in model.modules():  # train mode without dropout: a pass is deterministic
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    variants.inject_adapters(model, "lora_ga", ["query"], rank=2, alpha=4, init_batches=2)
    variants.mark_trainable(model, train_modules=["classifier"])
    layers = variants.layers_of(model)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    two = [{**batch, "labels": torch.tensor([0, 1])}, {**batch, "labels": torch.tensor([1, 1])}]  # two gradients
    modes = []

    def loss(m, b):
        modes.append(m.training)
        return m(**b).loss

    model.eval()
    grads = estimate_weight_gradients(model, layers, variants.InitData(iter(two), loss), 2)
    assert modes == [True, True]
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before and not model.training
    assert all(p.grad is None for p in model.parameters())
    weight = next(iter(layers.values())).base.weight  # by hand: the mean of the two batches' gradients
    weight.requires_grad_(True)
    by_hand = []
    for b in two:
        model(**b).loss.backward()
        by_hand.append(weight.grad.clone())
        weight.grad = None
    torch.testing.assert_close(grads[next(iter(layers))], (by_hand[0] + by_hand[1]) / 2)
    assert not torch.allclose(by_hand[0], by_hand[1], atol=1e-6)


def test_the_model_starts_identical_to_the_base_and_reloads_exactly(minilm, batch, tmp_path):
    model, _ = minilm
    base = copy.deepcopy(model).eval()
    variants.inject_adapters(model, "lora_ga", ["query", "value"], rank=4, alpha=8, init_batches=2)
    report = variants.variant_of(model).initialize(model, fake_data(model, batch))
    assert report["init_batches"] == 2 and len(report["gradient_norm"]) == 12
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, base(**batch).logits)
        layer = next(iter(variants.layers_of(model).values()))
        assert layer.lora_B.abs().max() > 0 and torch.equal(layer.lora_B, layer.lora_B0)
        for layer in variants.layers_of(model).values():  # stands in for training
            layer.lora_A.add_(0.01 * torch.randn_like(layer.lora_A))
            layer.lora_B.mul_(1.5)
    trained = model(**batch).logits
    path = tmp_path / "adapter.safetensors"
    variants.save_adapter(model, path)
    fresh = copy.deepcopy(base)
    assert variants.load_adapter(fresh, path)["variant"] == "lora_ga"
    with torch.no_grad():
        assert torch.equal(fresh.eval()(**batch).logits, trained)
        assert not torch.equal(trained, base(**batch).logits)


peft = pytest.importorskip("peft")


def test_initial_factors_and_adjusted_weight_match_peft_on_the_same_gradient(monkeypatch):
    """peft's LoRA-GA (``init_lora_weights="lora_ga"``) against ``scale="peft_stable"``, the same
    gradient and the same random projections of the randomized SVD (both draw them from seed 0)."""
    svd_lowrank = torch.svd_lowrank

    def seeded(*args, **kwargs):
        torch.manual_seed(0)
        return svd_lowrank(*args, **kwargs)

    monkeypatch.setattr(torch, "svd_lowrank", seeded)
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(24, 20))
    grad = torch.randn(20, 24)
    theirs = copy.deepcopy(base)
    theirs[0]._peft_loraga_grad = grad.clone()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights="lora_ga",
                             lora_ga_config=peft.LoraGAConfig(direction="ArB2r", scale="stable", stable_gamma=16))
    torch.manual_seed(0)
    theirs = peft.get_peft_model(theirs, config)
    their_layer = theirs.base_model.model[0]

    ours = copy.deepcopy(base)
    variants.inject_adapters(ours, "lora_ga", ["0"], rank=4, alpha=8, scale="peft_stable")
    layer = ours[0]
    down, up = gradient_factors(grad, 4, layer.scaling, scale="peft_stable", seed=0)
    layer.start_from(down, up)
    torch.testing.assert_close(layer.lora_A, their_layer.lora_A["default"].weight)
    torch.testing.assert_close(layer.lora_B, their_layer.lora_B["default"].weight)
    torch.testing.assert_close(layer.initial_weight(), their_layer.base_layer.weight, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("settings, message", [
    ({"init_batches": 0}, "variant.init_batches=0 must be an integer >= 1"),
    ({"direction": "BA"}, "variant.direction='BA' is not supported; allowed: ArB2r, A2rBr, ArBr"),
    ({"scale": "big"}, "variant.scale='big' is not supported; allowed: stable, unit, gd, peft_stable"),
    ({"rank": 200}, ("rank=200 needs 2r singular vectors, more than bert.encoder.layer.0.attention.self.query has; "
                     "allowed: rank <= 192")),
])
def test_bad_settings_are_one_line_and_leave_the_model_alone(minilm, settings, message):
    model, _ = minilm
    settings = {"rank": 4, **settings}
    with pytest.raises(variants.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        variants.inject_adapters(model, "lora_ga", ["query"], alpha=8, **settings)
    assert not variants.layers_of(model)
