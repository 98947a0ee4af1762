"""AdaLoRA (Zhang et al. 2023): SVD-form update, orthogonality loss, importance, budget schedule."""

import copy
import itertools

import pytest
import torch
from torch import nn

import variants
from schema import ConfigError
from variants import AdaLoRALinear
from variants.methods.adalora import budget_at

torch.manual_seed(0)


def make_layer(d_in=12, d_out=10, rank=4, **kwargs) -> AdaLoRALinear:
    return AdaLoRALinear(nn.Linear(d_in, d_out), rank=rank, alpha=8, **kwargs)


def randomise(layer: AdaLoRALinear) -> None:
    with torch.no_grad():
        layer.lora_E.normal_()


def test_zero_init_is_identity():
    layer = make_layer()
    x = torch.randn(3, 5, 12)
    torch.testing.assert_close(layer(x), layer.base(x), atol=0, rtol=0)
    assert torch.count_nonzero(layer.delta_weight()) == 0


def test_forward_and_delta_follow_eq3():
    layer = make_layer()
    randomise(layer)
    x = torch.randn(7, 12)
    delta = 2.0 * layer.lora_P @ torch.diag(layer.lora_E) @ layer.lora_Q  # α/r = 8/4
    torch.testing.assert_close(layer.delta_weight(), delta)
    torch.testing.assert_close(layer(x), x @ (layer.base.weight + delta).t() + layer.base.bias)


def test_merge_unmerge_round_trip():
    layer = make_layer()
    randomise(layer)
    w0 = layer.base.weight.clone()
    x = torch.randn(4, 12)
    expected = layer(x)
    layer.merge()
    layer.merge()  # idempotent
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-6)
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, w0, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("form, expected", [
    # ‖PᵀP − I‖_F = 3 and ‖QQᵀ − I‖_F = √3 in one module, 0 and 0 in the other.
    ("mean_norm", 0.5 * (3 + 3 ** 0.5) / 4),   # official code / peft: γ · mean of the 4 norms
    ("sum_squared", 0.5 * (9 + 3)),            # Eq. 4 as printed: γ · Σ squared norms
])
def test_orthogonality_regulariser_both_forms(form, expected):
    model = nn.Sequential(nn.Linear(12, 10), nn.Linear(12, 10))
    variants.inject_adapters(model, "adalora", ["0", "1"], rank=3, alpha=8, orth_reg_weight=0.5, orth_reg_form=form)
    first, second = model[0], model[1]
    with torch.no_grad():  # orthonormal P columns and Q rows: R = 0
        for layer in (first, second):
            layer.lora_P.copy_(torch.eye(10)[:, :3])
            layer.lora_Q.copy_(torch.eye(12)[:3])
    assert variants.variant_of(model).adapter_loss(model).item() == pytest.approx(0.0)
    with torch.no_grad():  # PᵀP = diag(4, 1, 1); QQᵀ = I + 1s at (0,0), (0,1), (1,0)
        first.lora_P[0, 0] = 2.0
        first.lora_Q[0, 1] = 1.0
    assert variants.variant_of(model).adapter_loss(model).item() == pytest.approx(expected)
    model = nn.Sequential(nn.Linear(12, 10))
    variants.inject_adapters(model, "adalora", ["0"], rank=3, alpha=8, orth_reg_weight=0.0)
    assert variants.variant_of(model).adapter_loss(model) is None
    with pytest.raises(ConfigError, match="variant.orth_reg_form='squared' is not supported; allowed: mean_norm"):
        adalora(orth_reg_form="squared")


def test_sensitivity_importance_hand_checked():
    """Eq. 6–10 and the triplet score (Eq. 7) over two steps on a 2×2, rank-2 layer."""
    layer = AdaLoRALinear(nn.Linear(2, 2, bias=False), rank=2, alpha=2)
    with torch.no_grad():
        layer.lora_P.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        layer.lora_E.copy_(torch.tensor([1.0, -1.0]))
        layer.lora_Q.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    grads = [
        {"P": [[1.0, 1.0], [1.0, 1.0]], "E": [2.0, 1.0], "Q": [[1.0, 1.0], [1.0, 1.0]]},
        {"P": [[3.0, 0.0], [0.0, 0.0]], "E": [0.0, 1.0], "Q": [[0.0, 0.0], [0.0, 1.0]]},
    ]
    for g in grads:
        for name in ("P", "E", "Q"):
            getattr(layer, f"lora_{name}").grad = torch.tensor(g[name])
        layer.update_importance(beta1=0.5, beta2=0.5)
    # By hand, β = 0.5. I = |w·g|.  Step 1: Ī = I/2, Ū = |I − I/2|/2 = I/4.  Step 2: Ī' = Ī/2 + I'/2,
    # Ū' = Ū/2 + |I' − Ī'|/2.  s = Ī'·Ū'.
    # λ: I1 = [2, 1], I2 = [0, 1] → Ī' = [0.5, 0.75], Ū' = [0.25, 0.125] + [0.25, 0.125] = [0.5, 0.25]
    # s(λ) = [0.25, 0.1875]
    # P: I1 = [[1,2],[3,4]], I2 = [[3,0],[0,0]] → Ī' = [[1.75,0.5],[0.75,1]], Ū' = [[0.125,0.25],[0.375,0.5]]
    #     + |I2 − Ī'|/2 = [[0.625,0.25],[0.375,0.5]] → Ū' = [[0.75,0.5],[0.75,1]]
    #     s = [[1.3125,0.25],[0.5625,1]]; column means (over d_out) = [0.9375, 0.625]
    # Q: I1 = [[1,0],[0,2]], I2 = [[0,0],[0,2]] → Ī' = [[0.25,0],[0,1.5]], Ū' = [[0.125,0],[0,0.25]]
    #     + [[0.125,0],[0,0.25]] = [[0.25,0],[0,0.5]]; s = [[0.0625,0],[0,0.75]]; row means = [0.03125, 0.375]
    expected = torch.tensor([0.25 + 0.9375 + 0.03125, 0.1875 + 0.625 + 0.375])
    torch.testing.assert_close(layer.triplet_scores("sensitivity"), expected)


def test_magnitude_importance():
    layer = make_layer()
    randomise(layer)
    expected = torch.stack([
        (layer.lora_E[i] * torch.outer(layer.lora_P[:, i], layer.lora_Q[i])).pow(2).sum() for i in range(4)
    ])
    torch.testing.assert_close(layer.triplet_scores("magnitude"), expected.detach())


def test_budget_schedule_is_cubic():
    kw = {"initial": 120, "target": 80, "t_init": 10, "t_final": 40, "total_steps": 100}
    assert [budget_at(s, **kw) for s in (1, 10)] == [120, 120]
    assert budget_at(35, **kw) == 80 + round(40 * 0.5**3)
    assert [budget_at(s, **kw) for s in (60, 61, 100)] == [80, 80, 80]
    budgets = [budget_at(s, **kw) for s in range(1, 101)]
    assert all(a >= b for a, b in itertools.pairwise(budgets))


def adalora(**settings) -> variants.AdaLoRA:
    return variants.get_variant("adalora").create(rank=4, alpha=8, **settings)


def adalora_model(layers: int, rank: int = 4, **settings) -> nn.Module:
    """``layers`` linear layers, ``layer0``, ``layer1``…, under AdaLoRA."""
    model = nn.ModuleDict({f"layer{i}": nn.Linear(12, 10) for i in range(layers)})
    variants.inject_adapters(model, "adalora", [f"layer{i}" for i in range(layers)], rank=rank, alpha=8, **settings)
    return model


def fake_training(model: nn.Module, total_steps: int, seed: int = 0) -> list[dict[str, float]]:
    """Drive the hooks with random gradients and parameter noise standing in for optimizer steps."""
    gen = torch.Generator().manual_seed(seed)
    variants.variant_of(model).on_train_begin(model, total_steps)
    logs = []
    for step in range(1, total_steps + 1):
        for i, layer in enumerate(variants.layers_of(model).values()):
            for p in layer.adapter_parameters():
                with torch.no_grad():
                    p.add_(torch.randn(p.shape, generator=gen) * 0.1)
                # Later layers get larger gradients, so they should win more of the budget.
                p.grad = torch.randn(p.shape, generator=gen) * (1 + i)
        logs.append(variants.variant_of(model).after_optimizer_step(model, step, total_steps))
    return logs


def test_budget_reaches_target_globally_and_pruned_values_stay_zero():
    model = adalora_model(4, rank=6, target_rank=3, t_init=5, t_final=10, delta_t=5)
    layers = variants.layers_of(model)
    logs = fake_training(model, total_steps=50)
    final = {name: layer.kept_rank for name, layer in layers.items()}
    assert sum(final.values()) == 12  # b(T) = 3 × 4 modules
    assert final["layer3"] > final["layer0"]  # allocated by importance, not uniformly
    for layer in layers.values():
        assert torch.all(layer.lora_E[~layer.rank_mask] == 0)
        assert layer.rank_history[0] == (0, 6) and layer.rank_history[-1] == (40, layer.kept_rank)
    budgets = [log["adalora/budget"] for log in logs if "adalora/budget" in log]
    assert budgets[0] < 24 and budgets[-1] == 12 and budgets == sorted(budgets, reverse=True)
    pruning_steps = [step for step, log in enumerate(logs, 1) if log]
    assert pruning_steps == [10, 15, 20, 25, 30, 35, 40]
    report = variants.adapter_report(model)
    assert report["rank_allocation"] == final and report["total_rank"] == 12 and report["initial_total_rank"] == 24
    assert report["rank_trace"]["layer0"] == layers["layer0"].rank_history


def test_schedule_longer_than_training_is_a_config_error():
    with pytest.raises(ConfigError, match=r"variant.t_init \+ variant.t_final = 30 \+ 30 steps exceeds the 50"):
        variants.variant_of(adalora_model(1, t_init=30, t_final=30)).check_total_steps(50)
    fake_training(adalora_model(1, t_init=0.5, t_final=0.5), total_steps=10)  # fractions summing to 1 are fine


@pytest.mark.parametrize(
    "kwargs, key",
    [({"target_rank": 5}, "variant.target_rank=5"), ({"importance": "random"}, "variant.importance='random'"),
     ({"beta1": 1.0}, "variant.beta1=1.0"), ({"delta_t": 0}, "variant.delta_t=0"), ({"t_init": -1}, "variant.t_init=-1")],
)
def test_bad_knobs(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        adalora(**kwargs)


def test_model_identity_save_load(minilm, batch, tmp_path):
    model, _ = minilm
    base = copy.deepcopy(model)
    variants.inject_adapters(model, "adalora", ["query", "value"], rank=6, alpha=12, target_rank=2)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, base(**batch).logits, atol=0, rtol=0)
    layers = variants.layers_of(model)
    fake_training(model, total_steps=20)
    path = tmp_path / "adapter.safetensors"
    variants.save_adapter(model, path)
    fresh = copy.deepcopy(base)
    config = variants.load_adapter(fresh, path)
    assert config["variant_kwargs"] == {"target_rank": 2}
    loaded = variants.layers_of(fresh)
    assert {n: l.kept_rank for n, l in loaded.items()} == {n: l.kept_rank for n, l in layers.items()}
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, model(**batch).logits)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:  # the importance EMAs are training state, not adapter
        assert not any("_ipt_" in k or "_unc_" in k for k in f.keys())  # noqa: SIM118  (safe_open is no dict)


def test_matches_peft_adalora(minilm, batch):
    peft = pytest.importorskip("peft")
    model, _ = minilm
    config = peft.AdaLoraConfig(
        init_r=6, target_r=4, lora_alpha=12, lora_dropout=0.0, target_modules=["query", "value"],
        task_type="SEQ_CLS", total_step=100, orth_reg_weight=0.1,
    )
    theirs = peft.get_peft_model(copy.deepcopy(model), config).eval()
    variants.inject_adapters(model, "adalora", ["query", "value"], rank=6, alpha=12)
    peft_layers = {
        name.removeprefix("base_model.model."): module
        for name, module in theirs.named_modules()
        if isinstance(module, peft.tuners.adalora.SVDLinear)
    }
    ours = variants.layers_of(model)
    assert ours.keys() == peft_layers.keys()
    with torch.no_grad():
        for name, layer in ours.items():
            layer.lora_E.normal_()
            peft_layers[name].lora_A["default"].copy_(layer.lora_Q)  # peft's A is Q, B is P, E is Λ
            peft_layers[name].lora_B["default"].copy_(layer.lora_P)
            peft_layers[name].lora_E["default"].copy_(layer.lora_E.unsqueeze(1))
        # peft scales by α/(r + 1e-5); the 1e-5 is a division guard, within the tolerance here.
        torch.testing.assert_close(model(**batch).logits, theirs(**batch).logits, atol=1e-5, rtol=1e-4)
        for name, layer in ours.items():
            torch.testing.assert_close(
                layer.delta_weight(), peft_layers[name].get_delta_weight("default"), atol=1e-6, rtol=1e-4
            )

    # The orthogonality term: peft adds γ · mean of the norms to the loss it returns; ours is
    # the variant's adapter_loss, which the trainer adds. Same value and same gradients for P and Q.
    labels = torch.tensor([0, 1])
    theirs_loss = theirs(**batch, labels=labels).loss
    ours_loss = model(**batch, labels=labels).loss + variants.variant_of(model).adapter_loss(model)
    torch.testing.assert_close(ours_loss, theirs_loss, atol=1e-6, rtol=1e-5)
    ours_loss.backward()
    theirs_loss.backward()
    for name, layer in ours.items():
        torch.testing.assert_close(layer.lora_P.grad, peft_layers[name].lora_B["default"].grad, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(layer.lora_Q.grad, peft_layers[name].lora_A["default"].grad, atol=1e-6, rtol=1e-4)
