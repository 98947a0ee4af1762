"""LoRA-Pro: the adjusted gradients' equivalent gradient is the projection of the full gradient
the paper defines (Theorem 2.1), never further from it than LoRA's; X solves Theorem 2.2's
Sylvester equation and changes LoRA's gradients least; the two AdamW modes by hand."""

import pytest
import scipy.linalg
import torch
from torch import nn

import variants
from variants.methods.lora_pro import equivalent_gradient, projected_gradients, solve_sylvester_symmetric

M, N, R, S = 12, 10, 3, 2.0  # d_out, d_in, rank, scaling


def factors(seed=0):
    gen = torch.Generator().manual_seed(seed)
    down, up = torch.randn(R, N, generator=gen), torch.randn(M, R, generator=gen)
    full = torch.randn(M, N, generator=gen)  # the full gradient g = ∂L/∂W
    return down, up, full, S * up.t() @ full, S * full @ down.t()  # ..., LoRA's ∂L/∂A, ∂L/∂B


def test_the_equivalent_gradient_is_the_projection_of_the_full_gradient():
    down, up, full, g_a, g_b = factors()
    new_a, new_b = projected_gradients(down, up, g_a, g_b, S)
    p_b = up @ torch.linalg.inv(up.t() @ up) @ up.t()          # projector on B's columns
    p_a = down.t() @ torch.linalg.inv(down @ down.t()) @ down  # projector on A's rows
    projection = p_b @ full + (torch.eye(M) - p_b) @ full @ p_a
    pro = equivalent_gradient(down, up, new_a, new_b, S)
    torch.testing.assert_close(pro, projection, atol=1e-4, rtol=1e-4)
    lora = equivalent_gradient(down, up, g_a, g_b, S)  # s²(BBᵀg + gAᵀA)
    torch.testing.assert_close(lora, S ** 2 * (up @ up.t() @ full + full @ down.t() @ down), atol=1e-4, rtol=1e-4)
    assert (pro - full).norm() < 0.99 * (lora - full).norm()
    # the projection: what is left is orthogonal to every matrix LoRA's step can make (B·Y + Z·A)
    rest = full - pro
    assert abs((rest * (up @ torch.randn(R, N))).sum()) < 1e-3 and abs((rest * (torch.randn(M, R) @ down)).sum()) < 1e-3


def test_x_solves_the_sylvester_equation_and_changes_loras_gradients_least():
    down, up, _, g_a, g_b = factors(1)
    btb, aat = up.t() @ up, down @ down.t()
    rhs = -(1 / S ** 2) * torch.linalg.inv(btb) @ g_a @ down.t()
    x = solve_sylvester_symmetric(btb, aat, rhs)
    torch.testing.assert_close(x.double(), torch.from_numpy(scipy.linalg.solve_sylvester(
        btb.double().numpy(), aat.double().numpy(), rhs.double().numpy())), atol=1e-6, rtol=1e-4)

    def change(x_mode_or_x):
        zero_a, zero_b = projected_gradients(down, up, g_a, g_b, S, "zero")
        new_a, new_b = zero_a + x_mode_or_x @ down, zero_b - up @ x_mode_or_x
        return float((new_a - g_a).norm() ** 2 + (new_b - g_b).norm() ** 2)

    new_a, _new_b = projected_gradients(down, up, g_a, g_b, S, "sylvester")
    zero_a, _ = projected_gradients(down, up, g_a, g_b, S, "zero")
    torch.testing.assert_close(new_a, zero_a + x @ down, atol=1e-4, rtol=1e-4)
    best = change(x)
    gen = torch.Generator().manual_seed(2)
    assert all(best <= change(x + 0.01 * torch.randn(R, R, generator=gen)) for _ in range(20))
    assert best < change(torch.zeros(R, R))


def lora_pro_layer(mode, **settings):
    torch.manual_seed(0)  # the same W0 and A on every call
    model = nn.Sequential(nn.Linear(N, M))
    variants.inject_adapters(model, "lora_pro", ["0"], rank=R, alpha=S * R, mode=mode, **settings)
    with torch.no_grad():  # a state after some training: B ≠ 0
        model[0].lora_B.normal_(generator=torch.Generator().manual_seed(3))
    return model


def one_step(model, lr=0.01):
    layer = model[0]
    x = torch.randn(5, N, generator=torch.Generator().manual_seed(4))
    layer(x).pow(2).sum().backward()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    before = (layer.lora_A.detach().clone(), layer.lora_B.detach().clone(), layer.lora_A.grad.clone(),
              layer.lora_B.grad.clone())
    variants.variant_of(model).transform_gradients(model, optimizer, lr)
    optimizer.step()
    return before


def test_efficient_mode_hands_the_projected_gradients_to_adamw():
    model = lora_pro_layer("efficient")
    layer = model[0]
    a, b, g_a, g_b = one_step(model)
    new_a, new_b = projected_gradients(a, b, g_a, g_b, S)
    # AdamW's first step moves each entry by lr·g/(|g| + eps)
    torch.testing.assert_close(layer.lora_A, a - 0.01 * new_a / (new_a.abs() + 1e-8), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(layer.lora_B, b - 0.01 * new_b / (new_b.abs() + 1e-8), atol=1e-6, rtol=1e-5)


def test_full_mode_keeps_adam_on_the_equivalent_gradient_and_steps_a_and_b_itself():
    model = lora_pro_layer("full", moment_dtype="fp32")
    layer = model[0]
    a, b, g_a, g_b = one_step(model)
    zero_a, zero_b = projected_gradients(a, b, g_a, g_b, S, "zero")
    full = equivalent_gradient(a, b, zero_a, zero_b, S)
    direction = full / (full.abs() + 1e-8)  # Adam's first step on g̃
    step_a, step_b = projected_gradients(a, b, S * b.t() @ direction, S * direction @ a.t(), S)
    torch.testing.assert_close(layer.lora_A, a - 0.01 * step_a, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(layer.lora_B, b - 0.01 * step_b, atol=1e-6, rtol=1e-5)
    method = variants.variant_of(model)
    assert method.adam_step == 1 and method.moments["0"][0].shape == (M, N)


@pytest.mark.parametrize("settings, message", [
    ({"mode": "fast"}, "variant.mode='fast' is not supported; allowed: full, efficient"),
    ({"x_mode": "symmetric"}, "variant.x_mode='symmetric' is not supported; allowed: sylvester, zero"),
    ({"lr_ratio": 16}, r"variant.lr_ratio \(LoRA\+\) needs variant.mode=efficient"),
])
def test_bad_settings(settings, message):
    with pytest.raises(variants.ConfigError, match=message):
        variants.get_variant("lora_pro").create(rank=4, alpha=8, **settings)


def test_at_the_start_b_is_zero_so_the_first_full_step_moves_b_alone_along_the_projected_adam_direction():
    """B₀ = 0: P_B = 0, so g̃ = g·P_A (the part of the full gradient in A's row space), X = 0,
    A's step is 0 and W moves by s·ΔB·A = −η·d·P_A, d = g̃/(|g̃| + ε) Adam's first direction."""
    model = nn.Sequential(nn.Linear(N, M))
    variants.inject_adapters(model, "lora_pro", ["0"], rank=R, alpha=S * R, moment_dtype="fp32")
    layer, lr = model[0], 0.01
    assert not layer.lora_B.any()
    a = layer.lora_A.detach().clone()
    x = torch.randn(5, N, generator=torch.Generator().manual_seed(4))
    y = layer(x)
    y.pow(2).sum().backward()
    full = 2 * y.detach().t() @ x  # g = ∂L/∂W of L = Σ y², y = W·x (+ bias)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    variants.variant_of(model).transform_gradients(model, optimizer, lr)
    optimizer.step()

    assert torch.equal(layer.lora_A, a)
    p_a = a.t() @ torch.linalg.inv(a @ a.t()) @ a
    projected = full @ p_a
    direction = projected / (projected.abs() + 1e-8)
    torch.testing.assert_close(S * layer.lora_B.detach() @ a, -lr * direction @ p_a, atol=1e-6, rtol=1e-4)


def test_full_mode_weight_decay_shrinks_the_whole_equivalent_weight_and_the_decayed_base_is_saved(tmp_path):
    """AdamW's decoupled decay on W = W0 + s·B·A (the authors' code): W0 by (1 − ηλ), A and B by
    √(1 − ηλ) each before the step; the adapter file then carries W0, and reloads exactly."""
    lr, decay = 0.01, 0.1
    stepped = {}
    for weight_decay in (0.0, decay):
        model = lora_pro_layer("full", moment_dtype="fp32")
        w0 = model[0].base.weight.detach().clone()
        x = torch.randn(5, N, generator=torch.Generator().manual_seed(4))
        model[0](x).pow(2).sum().backward()
        a, b = model[0].lora_A.detach().clone(), model[0].lora_B.detach().clone()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                      weight_decay=weight_decay)
        variants.variant_of(model).transform_gradients(model, optimizer, lr)
        stepped[weight_decay] = model
    plain, decayed = stepped[0.0][0], stepped[decay][0]
    shrink = (1 - lr * decay) ** 0.5
    torch.testing.assert_close(decayed.lora_A, plain.lora_A + (shrink - 1) * a)
    torch.testing.assert_close(decayed.lora_B, plain.lora_B + (shrink - 1) * b)
    torch.testing.assert_close(decayed.base.weight, (1 - lr * decay) * w0)
    assert torch.equal(plain.base.weight, w0)

    variants.save_adapter(stepped[decay], tmp_path / "adapter")
    fresh = nn.Sequential(nn.Linear(N, M))
    fresh[0].load_state_dict({"weight": w0, "bias": decayed.base.bias.detach()})
    variants.inject_adapters(fresh, "lora_pro", ["0"], rank=R, alpha=S * R)
    variants.load_adapter(fresh, tmp_path / "adapter")
    probe = torch.randn(7, N, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(fresh(probe), stepped[decay](probe), atol=0, rtol=0)


def test_bf16_moments_follow_fp32_moments_over_several_steps():
    """The authors keep g̃'s moments in bf16: over 5 steps A and B stay within bf16's rounding of
    the fp32 run (a moment that stopped updating, or one updated twice, is far outside it)."""
    runs = {}
    for dtype in ("fp32", "bf16"):
        model, lr = lora_pro_layer("full", moment_dtype=dtype), 0.01
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
        start = model[0].lora_A.detach().clone(), model[0].lora_B.detach().clone()
        for step in range(5):
            x = torch.randn(5, N, generator=torch.Generator().manual_seed(10 + step))
            model[0](x).pow(2).sum().backward()
            variants.variant_of(model).transform_gradients(model, optimizer, lr)
            optimizer.step()
        method = variants.variant_of(model)
        assert method.adam_step == 5 and method.moments["0"][0].dtype == getattr(torch, {"fp32": "float32",
                                                                                          "bf16": "bfloat16"}[dtype])
        runs[dtype] = [p.detach() - p0 for p, p0 in zip((model[0].lora_A, model[0].lora_B), start)]
    for exact, rounded in zip(runs["fp32"], runs["bf16"]):
        assert float((rounded - exact).norm() / exact.norm()) < 0.02
